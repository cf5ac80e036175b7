"""How good is a preference model: held-out accuracy per source, calibration, and scoring.

    scores = PreferenceScorer("runs/x/pm/<hash>/model").score(prompts, responses)

`preference_metrics` turns held-out reward differences into accuracy (overall and per source),
ECE and Brier against the soft labels; `PreferenceScorer` is what PPO and RLOO call for rewards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, Field

from cai.backends.base import Chat
from cai.classifier import acceptability, check_label_index
from cai.models import quiet_loading
from cai.records import PreferenceRow

# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


class CalibrationBin(BaseModel):
    low: float
    high: float
    n: int
    confidence: float | None = Field(description="Mean max(σ(Δ), 1-σ(Δ)) in the bin.")
    accuracy: float | None = Field(description="Share of the bin's pairs ranked the labelled way.")


class Calibration(BaseModel):
    ece: float | None = Field(
        description="Expected calibration error of the PM's confidence against outcome."
    )
    brier: float | None = Field(description="Mean (σ(Δ) - p)² over pairs with a soft label p.")
    n_brier: int = Field(description="Pairs with a soft label.")
    bins: list[CalibrationBin] = Field(
        description="Reliability diagram: confidence in [0.5, 1] split evenly."
    )


class RewardStats(BaseModel):
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    mean_margin: float | None = Field(description="Mean Δ = r_chosen - r_rejected.")


class PMMetrics(BaseModel):
    """How a PM ranks held-out pairs; the numbers `cai train pm` and evaluation report."""

    n: int
    accuracy: float | None = Field(description="Share ranked the labelled way (a tie counts half).")
    n_by_source: dict[str, int]
    accuracy_by_source: dict[str, float]
    calibration: Calibration
    rewards: RewardStats
    correct: list[float] = Field(description="Per pair: 1 ranked the labelled way, 0 not, 0.5 a tie.")
    sources: list[str] = Field(description="Per pair: its source (with `correct`: bootstrap intervals).")


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def preference_metrics(
    chosen_scores: Sequence[float],
    rejected_scores: Sequence[float],
    sources: Sequence[str],
    soft_labels: Sequence[float | None],
    bins: int = 10,
) -> PMMetrics:
    """Accuracy (overall and per source), calibration and reward statistics of scored pairs.

    The PM's probability that the chosen answer is better is σ(Δ). Calibration is measured on
    its confidence max(σ(Δ), 1-σ(Δ)) in `bins` equal bins over [0.5, 1]: ECE = Σ_b (n_b/N) ·
    |accuracy_b - confidence_b|. Brier compares σ(Δ) with the judge's soft label where there is
    one (human rows have none).
    """
    n = len(chosen_scores)
    if not (len(rejected_scores) == len(sources) == len(soft_labels) == n):
        raise ValueError("chosen_scores, rejected_scores, sources and soft_labels must have the same length")
    deltas = [c - r for c, r in zip(chosen_scores, rejected_scores, strict=True)]
    correct = [1.0 if d > 0 else 0.5 if d == 0 else 0.0 for d in deltas]
    probs = [_sigmoid(d) for d in deltas]

    by_source: dict[str, list[float]] = {}
    for source, hit in zip(sources, correct, strict=True):
        by_source.setdefault(source, []).append(hit)

    edges = [0.5 + 0.5 * b / bins for b in range(bins + 1)]
    members: list[list[int]] = [[] for _ in range(bins)]
    for i, p in enumerate(probs):
        confidence = max(p, 1 - p)
        members[min(int((confidence - 0.5) * 2 * bins), bins - 1)].append(i)
    table = []
    ece = 0.0
    for b, rows in enumerate(members):
        conf = sum(max(probs[i], 1 - probs[i]) for i in rows) / len(rows) if rows else None
        acc = sum(correct[i] for i in rows) / len(rows) if rows else None
        if rows:
            ece += len(rows) / n * abs(acc - conf)
        table.append(
            CalibrationBin(low=edges[b], high=edges[b + 1], n=len(rows), confidence=conf, accuracy=acc)
        )
    labelled = [(p, s) for p, s in zip(probs, soft_labels, strict=True) if s is not None]
    brier = sum((p - s) ** 2 for p, s in labelled) / len(labelled) if labelled else None

    rewards = [*chosen_scores, *rejected_scores]
    mean = sum(rewards) / len(rewards) if rewards else None
    return PMMetrics(
        n=n,
        accuracy=sum(correct) / n if n else None,
        n_by_source={s: len(v) for s, v in by_source.items()},
        accuracy_by_source={s: sum(v) / len(v) for s, v in by_source.items()},
        calibration=Calibration(ece=ece if n else None, brier=brier, n_brier=len(labelled), bins=table),
        rewards=RewardStats(
            mean=mean,
            std=math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards)) if rewards else None,
            min=min(rewards) if rewards else None,
            max=max(rewards) if rewards else None,
            mean_margin=sum(deltas) / n if n else None,
        ),
        correct=correct,
        sources=list(sources),
    )


# --------------------------------------------------------------------------------------------
# Scoring with a saved PM
# --------------------------------------------------------------------------------------------


class PreferenceScorer:
    """Scores conversations with a saved PM folder; PPO, RLOO and evaluation use it as the reward.

    Conversations go through the tokenizer's chat template exactly as RewardTrainer tokenized the
    training pairs; a sequence longer than `max_length` keeps its end (the answer being scored).
    Scoring runs in float32 by default: rewards feed advantages and near-tie comparisons.

    A scalar head (num_labels 1, `label_index` None) is the reward as it is. Any other
    sequence-classification model needs `label_index`, the label meaning "acceptable"; its reward is
    the logit-scale acceptability log p / (1 - p) (`cai.classifier.acceptability`). A label index
    the model lacks fails at load, naming `label_field`.
    """

    def __init__(
        self,
        model_path: str | Path,
        device: str = "auto",
        dtype: str = "float32",
        batch_size: int = 16,
        max_length: int | None = None,
        label_index: int | None = None,
        label_field: str = "label_index",
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        with quiet_loading():
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_path), trust_remote_code=False)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                str(model_path), trust_remote_code=False, use_safetensors=True, dtype=getattr(torch, dtype)
            )
        check_label_index(self.model.config, label_index, label_field, str(model_path))
        self.label_index = label_index
        self.model.to(self.device).eval()
        self.pad_token_id = self.model.config.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.tokenizer.pad_token_id
            if self.pad_token_id is None:
                self.pad_token_id = self.tokenizer.eos_token_id
            self.model.config.pad_token_id = self.pad_token_id

    def score(self, prompts: list[Chat], responses: list[str]) -> list[float]:
        """The reward of each response (an assistant turn) to its prompt conversation."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return self.score_chats(
            [
                [*prompt, {"role": "assistant", "content": text}]
                for prompt, text in zip(prompts, responses, strict=True)
            ]
        )

    def score_chats(self, chats: list[Chat]) -> list[float]:
        """The reward of each whole conversation (its last assistant turn is what is judged)."""
        import torch

        ids = [
            self.tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
            for chat in chats
        ]
        if self.max_length is not None:
            ids = [seq[-self.max_length :] for seq in ids]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths pad less
        scores = [0.0] * len(ids)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            width = max(len(ids[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), self.pad_token_id, dtype=torch.long)  # (b, L)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)  # (b, L)
            for row, i in enumerate(chunk):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                attention[row, : len(ids[i])] = 1
            with torch.inference_mode():
                logits = self.model(
                    input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device)
                ).logits  # (b, C)
            for i, value in zip(chunk, acceptability(logits, self.label_index).tolist(), strict=True):
                scores[i] = float(value)
        return scores


def evaluate_preference_model(
    model_path: str | Path, rows: list[PreferenceRow], batch_size: int = 16
) -> PMMetrics:
    """Score both sides of every pair with a saved PM and summarise (`preference_metrics`)."""
    if not rows:
        return preference_metrics([], [], [], [])
    scorer = PreferenceScorer(model_path, batch_size=batch_size)
    chosen = scorer.score_chats([[*row.prompt, *row.chosen] for row in rows])
    rejected = scorer.score_chats([[*row.prompt, *row.rejected] for row in rows])
    return preference_metrics(chosen, rejected, [r.source for r in rows], [r.soft_label for r in rows])
