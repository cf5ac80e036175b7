"""`cai train pm`: the preference model, trained with trl's RewardTrainer on the mixed preference set.

    cai train pm configs/quickstart.yaml

A sequence-classification head on the SFT model (or another base) scores prompt + response; the
loss compares the scores of the chosen and the rejected answer (Δ = r_chosen - r_rejected).
Constitutional AI mixes AI-labelled harmlessness pairs, which carry the judge's soft label
p = P(chosen is better), with human helpfulness pairs (p = 1). `label_mode` picks the loss:

* soft   -[p log σ(Δ) + (1-p) log σ(-Δ)]: binary cross-entropy against the soft label, so a 55/45
         judgement asks for a small Δ instead of an unbounded one (human rows: p = 1, plain BT);
* margin -log σ(Δ - m): trl's own margin term, m = the row's `margin` (0 for human rows);
* hard   -log σ(Δ): plain Bradley-Terry on the label's direction.

Each pair's loss is multiplied by its `weight` (contested labels are down-weighted upstream) and
the batch loss is the mean of the weighted losses.

How the extra columns reach the loss: trl's RewardTrainer keeps only the columns it names in
`_set_signature_columns_if_needed` (chosen_ids, rejected_ids, margin) and its collator only
tensorises those. Our subclass (`CAIRewardTrainer`, built in `_trainer_classes`) adds
`soft_label`, `weight` and `prompt_group` to the kept columns, its collator adds them to the
batch as tensors, and its `compute_loss` pops them before the forward pass and calls
`preference_loss`. `prompt_group` also feeds a sampler that puts the pairs of one prompt into
the same batch (DESIGN.md section 7), as far as the batch size allows.

The stage splits its rows with `split_by_prompt(rows, config.eval_fraction, seed)` and passes
both halves to `train_preference_model`, which reports held-out accuracy per source and
calibration (`preference_metrics`).
"""

from __future__ import annotations

import functools
import json
import math
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from cai.backends.base import Chat
from cai.records import PreferenceRow
from cai.sections import Section
from cai.train.common import (
    LoraSection,
    TrainSection,
    attach_console,
    default_console,
    logged_losses,
    no_progress_bars,
    peft_config,
    quiet_logs,
    run_trainer,
    save_trained,
    trainer_arguments,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "Calibration",
    "CalibrationBin",
    "PMConfig",
    "PMMetrics",
    "PMReport",
    "PreferenceScorer",
    "RewardStats",
    "build_pm_trainer",
    "evaluate_preference_model",
    "grouped_order",
    "preference_loss",
    "preference_metrics",
    "split_by_prompt",
    "train_preference_model",
]

LabelMode = Literal["soft", "margin", "hard"]

LOG_COLUMNS = {"loss": "loss", "accuracy": "accuracy", "margin": "margin", "grad_norm": "grad_norm"}


class PMConfig(Section):
    """The preference model: a scalar head trained on chosen/rejected pairs."""

    model: str | None = Field(
        None, description="Base of the PM; default: the SFT model (or the run's model)."
    )
    lora: LoraSection | None = Field(
        default_factory=LoraSection,
        description="LoRA adapters (the score head is trained in full); the saved PM is always merged.",
    )
    train: TrainSection = Field(default_factory=TrainSection, description="Optimisation settings.")
    label_mode: LabelMode = Field(
        "soft",
        description="soft: cross-entropy against the judge's soft label; margin: trl's -log σ(Δ - margin); "
        "hard: -log σ(Δ).",
    )
    eval_fraction: float = Field(
        0.2, ge=0, lt=1, description="Share of prompts held out for evaluation (split by prompt, per source)."
    )
    weighting: bool = Field(True, description="Multiply each pair's loss by its row weight.")
    group_by_prompt: bool = Field(True, description="Put the pairs of one prompt in the same batch.")


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


def preference_loss(
    delta: torch.Tensor,  # (B,) r_chosen - r_rejected
    mode: LabelMode = "soft",
    soft_label: torch.Tensor | None = None,  # (B,) P(chosen better); NaN = hard label (p = 1)
    weight: torch.Tensor | None = None,  # (B,)
    margin: torch.Tensor | None = None,  # (B,)
) -> torch.Tensor:  # () mean of the weighted per-pair losses
    """The PM loss of a batch of pairs; see the module docstring for the three modes."""
    import torch
    import torch.nn.functional as F

    if mode == "soft":
        p = torch.ones_like(delta) if soft_label is None else soft_label.to(delta.dtype).nan_to_num(nan=1.0)
        losses = -(p * F.logsigmoid(delta) + (1 - p) * F.logsigmoid(-delta))
    elif mode == "margin":
        losses = -F.logsigmoid(delta - (margin.to(delta.dtype) if margin is not None else 0.0))
    elif mode == "hard":
        losses = -F.logsigmoid(delta)
    else:
        raise ValueError(f"unknown label mode {mode!r}")
    if weight is not None:
        losses = losses * weight.to(delta.dtype)
    return losses.mean()


# --------------------------------------------------------------------------------------------
# Batches grouped by prompt
# --------------------------------------------------------------------------------------------


def grouped_order(groups: Sequence[int], batch_size: int, rng: random.Random) -> list[int]:
    """Row indices ordered so that consecutive `batch_size` chunks hold whole prompt groups.

    With K responses per prompt there are K(K-1)/2 pairs; scattering them over batches shows
    each response in K-1 separate updates, which overfits (DESIGN.md section 7). Groups larger
    than a batch are cut into batch-sized pieces; pieces are packed best-fit-decreasing, full
    batches are shuffled, and the few batches that could not be filled go last.
    """
    members: dict[int, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    pieces: list[list[int]] = []
    for rows in members.values():
        rng.shuffle(rows)
        pieces += [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    rng.shuffle(pieces)
    pieces.sort(key=len, reverse=True)  # stable: equal sizes keep their shuffled order
    full: list[list[int]] = []
    open_by_room: dict[int, list[list[int]]] = {room: [] for room in range(1, batch_size)}
    for piece in pieces:
        room = next((r for r in range(len(piece), batch_size) if open_by_room[r]), None)
        batch = open_by_room[room].pop() if room is not None else []
        batch += piece
        if len(batch) == batch_size:
            full.append(batch)
        else:
            open_by_room[batch_size - len(batch)].append(batch)
    rng.shuffle(full)
    partial = [batch for room in sorted(open_by_room) for batch in open_by_room[room]]
    return [i for batch in full + partial for i in batch]


class PromptGroupSampler:
    """A training sampler yielding `grouped_order`, reshuffled each epoch from (seed, epoch)."""

    def __init__(self, groups: Sequence[int], batch_size: int, seed: int) -> None:
        self.groups = list(groups)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(grouped_order(self.groups, self.batch_size, random.Random(f"{self.seed}:{self.epoch}")))

    def __len__(self) -> int:
        return len(self.groups)


def _prompt_key(prompt: Chat) -> str:
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


@functools.cache
def _trainer_classes() -> tuple[type, type]:
    """The collator and trainer subclasses, built on first use so importing cai stays cheap."""
    import torch
    from trl import RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    class Collator(DataCollatorForPreference):
        """trl's collator plus each pair's soft label and weight (and prompt group, for inspection)."""

        def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
            batch = super().torch_call(examples)
            for key in ("soft_label", "weight"):
                batch[key] = torch.tensor([float(e[key]) for e in examples], dtype=torch.float)  # (B,)
            if "prompt_group" in examples[0]:
                batch["prompt_group"] = torch.tensor([e["prompt_group"] for e in examples])  # (B,)
            return batch

    class CAIRewardTrainer(RewardTrainer):
        def __init__(
            self, *args: Any, label_mode: LabelMode, weighting: bool, group_by_prompt: bool, **kwargs: Any
        ):
            self.label_mode = label_mode
            self.weighting = weighting
            self.group_by_prompt = group_by_prompt
            super().__init__(*args, **kwargs)

        def _set_signature_columns_if_needed(self) -> None:
            if self._signature_columns is None:
                self._signature_columns = [
                    "chosen_ids",
                    "rejected_ids",
                    "margin",
                    "soft_label",
                    "weight",
                    "prompt_group",
                ]

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if not self.group_by_prompt or "prompt_group" not in dataset.column_names:
                return super()._get_train_sampler(train_dataset)
            return PromptGroupSampler(
                dataset["prompt_group"], self.args.per_device_train_batch_size, self.args.seed
            )

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            soft_label = inputs.pop("soft_label")
            weight = inputs.pop("weight")
            margin = inputs.pop("margin", None)
            inputs.pop("prompt_group", None)
            outputs = model(**inputs, use_cache=False)
            chosen, rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)  # (B,), (B,)
            delta = chosen - rejected
            loss = preference_loss(
                delta.float(), self.label_mode, soft_label, weight if self.weighting else None, margin
            )
            with torch.no_grad():
                gather = self.accelerator.gather_for_metrics
                self._metrics[mode]["accuracy"].append(gather((delta > 0).float().mean()).mean().item())
                self._metrics[mode]["margin"].append(gather(delta.float().mean()).mean().item())
                self._metrics[mode]["mean_reward"].append(gather(outputs.logits.float().mean()).mean().item())
            return (loss, outputs) if return_outputs else loss

    return Collator, CAIRewardTrainer


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
    """

    def __init__(
        self,
        model_path: str | Path,
        device: str = "auto",
        dtype: str = "float32",
        batch_size: int = 16,
        max_length: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        with quiet_logs():
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_path), trust_remote_code=False)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                str(model_path), trust_remote_code=False, dtype=getattr(torch, dtype)
            )
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
                ).logits  # (b, 1)
            for row, i in enumerate(chunk):
                scores[i] = float(logits[row, 0])
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


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


class PMReport(BaseModel):
    """What `cai train pm` did and how the PM ranks the held-out pairs."""

    model_path: str
    steps: int
    train_loss: list[float]
    n_train: int
    label_mode: LabelMode
    lora: bool
    resumed_from: str | None
    elapsed: float
    accuracy: float | None
    accuracy_by_source: dict[str, float]
    n_eval: int
    n_eval_by_source: dict[str, int]
    calibration: Calibration
    rewards: RewardStats
    correct: list[float] = Field(description="Per held-out pair: 1, 0, or 0.5 for a tie.")
    sources: list[str] = Field(description="Per held-out pair: its source.")


def split_by_prompt(
    rows: list[PreferenceRow], eval_fraction: float, seed: int
) -> tuple[list[PreferenceRow], list[PreferenceRow]]:
    """(train, eval): whole prompts go to one side, `eval_fraction` of each source's prompts to eval.

    Splitting pairs instead of prompts would leak: the PM would be tested on responses it was
    trained on, against a different partner.
    """
    prompts: dict[str, dict[str, None]] = {}
    for row in rows:
        prompts.setdefault(row.source, {})[_prompt_key(row.prompt)] = None
    held: set[str] = set()
    for source, keys in prompts.items():
        ordered = list(keys)
        random.Random(f"{seed}:{source}").shuffle(ordered)
        held.update(ordered[: round(eval_fraction * len(ordered))])
    train = [row for row in rows if _prompt_key(row.prompt) not in held]
    return train, [row for row in rows if _prompt_key(row.prompt) in held]


def _pm_dataset(rows: list[PreferenceRow]) -> Any:
    """cai.mix's trl dataset plus what our loss and sampler read: p (1 for hard labels), group."""
    from cai.preferences import to_dataset

    dataset = to_dataset(rows)
    groups: dict[str, int] = {}
    group_ids = [groups.setdefault(_prompt_key(row.prompt), len(groups)) for row in rows]
    p = [1.0 if row.soft_label is None else row.soft_label for row in rows]
    dataset = dataset.remove_columns(["soft_label"]).add_column("soft_label", p)
    return dataset.add_column("prompt_group", group_ids)


def build_pm_trainer(
    config: PMConfig,
    base_model: str,
    train: list[PreferenceRow],
    output_dir: Path,
    seed: int,
    console: Any = None,
) -> Any:
    """The configured reward trainer (not yet trained); tests and notebooks look at its batches."""
    from transformers import AutoTokenizer
    from trl import RewardConfig

    from cai.models import resolve_model

    if not train:
        raise ValueError("no preference rows to train the PM on")
    model_path = resolve_model(config.model or base_model)
    args = RewardConfig(
        **trainer_arguments(config.train, Path(output_dir) / "checkpoints", seed),
        max_length=config.train.max_length,
    )
    collator_cls, trainer_cls = _trainer_classes()
    with quiet_logs():
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        trainer = trainer_cls(
            model=model_path,
            args=args,
            train_dataset=_pm_dataset(train),
            processing_class=tokenizer,
            data_collator=collator_cls(pad_token_id=tokenizer.pad_token_id),
            peft_config=peft_config(config.lora, "SEQ_CLS") if config.lora else None,
            label_mode=config.label_mode,
            weighting=config.weighting,
            group_by_prompt=config.group_by_prompt,
        )
    attach_console(trainer, console or default_console(), LOG_COLUMNS)
    return trainer


def train_preference_model(
    config: PMConfig,
    base_model: str,
    train: list[PreferenceRow],
    eval: list[PreferenceRow],
    output_dir: Path,
    seed: int,
    console: Any = None,
) -> PMReport:
    """Train the PM on `train`, save it to output_dir/model, and report how it ranks `eval`.

    The saved folder is a plain sequence-classification model (LoRA merged, pad_token_id set)
    that `AutoModelForSequenceClassification.from_pretrained` and `PreferenceScorer` load.
    Re-running with the same `output_dir` resumes from output_dir/checkpoints.
    """
    started = time.perf_counter()
    console = console or default_console()
    with no_progress_bars():
        trainer = build_pm_trainer(config, base_model, train, output_dir, seed, console)
        counts = {s: sum(r.source == s for r in train) for s in sorted({r.source for r in train})}
        console.print(
            f"[bold]PM[/] on {len(trainer.train_dataset)} pairs "
            f"({', '.join(f'{s}: {n}' for s, n in counts.items())}), {config.label_mode} labels, "
            f"{'LoRA' if config.lora else 'full fine-tune'}, {config.train.max_steps} steps"
        )
        resumed = run_trainer(trainer, Path(output_dir) / "checkpoints")
        model_dir = Path(output_dir) / "model"
        pad_token_id = trainer.processing_class.pad_token_id
        trainer.accelerator.unwrap_model(trainer.model).config.pad_token_id = pad_token_id
        save_trained(trainer, model_dir, merge=True)
    metrics = evaluate_preference_model(model_dir, eval)
    if eval:
        by_source = ", ".join(f"{s} {a:.3f}" for s, a in sorted(metrics.accuracy_by_source.items()))
        brier = metrics.calibration.brier
        console.print(
            f"[bold]PM held-out[/]: accuracy {metrics.accuracy:.3f} on {metrics.n} pairs ({by_source}); "
            f"ECE {metrics.calibration.ece:.3f}" + (f", Brier {brier:.3f}" if brier is not None else "")
        )
    return PMReport(
        model_path=str(model_dir),
        steps=trainer.state.global_step,
        train_loss=logged_losses(trainer),
        n_train=len(trainer.train_dataset),
        label_mode=config.label_mode,
        lora=config.lora is not None,
        resumed_from=resumed,
        elapsed=time.perf_counter() - started,
        accuracy=metrics.accuracy,
        accuracy_by_source=metrics.accuracy_by_source,
        n_eval=metrics.n,
        n_eval_by_source=metrics.n_by_source,
        calibration=metrics.calibration,
        rewards=metrics.rewards,
        correct=metrics.correct,
        sources=metrics.sources,
    )
