"""`cai train pm`: the preference model, trained with trl's RewardTrainer on the mixed preference set.

    cai train pm configs/quickstart.yaml

A sequence-classification head on the SFT model (or another base) scores prompt + response; the
loss compares the scores of the chosen and the rejected answer (Δ = r_chosen - r_rejected).
Constitutional AI mixes AI-labelled harmlessness pairs, which carry the judge's soft label
p = P(chosen is better), with human helpfulness pairs (p = 1). `label_mode` picks the loss
(`cai.train.pm_loss`: soft cross-entropy, trl's margin term, or plain Bradley-Terry); each pair's
loss is multiplied by its `weight` (contested labels are down-weighted upstream).

How the extra columns reach the loss: trl's RewardTrainer keeps only the columns it names in
`_set_signature_columns_if_needed` (chosen_ids, rejected_ids, margin) and its collator only
tensorises those. Our subclass (`CAIRewardTrainer`, built in `_trainer_classes`) adds
`soft_label`, `weight` and `prompt_group` to the kept columns, its collator adds them to the
batch as tensors, and its `compute_loss` pops them before the forward pass and calls
`preference_loss`. `prompt_group` also feeds a sampler that puts the pairs of one prompt into
the same batch (DESIGN.md section 7), as far as the batch size allows.

The stage splits its rows with `split_by_prompt(rows, config.eval_fraction, seed)` and passes
both halves to `train_preference_model`, which reports held-out accuracy per source and
calibration (`cai.train.pm_metrics`).
"""

from __future__ import annotations

import functools
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from cai.models import quiet_loading
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
    run_trainer,
    save_trained,
    trainer_arguments,
)
from cai.train.pm_loss import LabelMode, PromptGroupSampler, preference_loss, prompt_key
from cai.train.pm_metrics import Calibration, RewardStats, evaluate_preference_model

if TYPE_CHECKING:
    pass


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
        prompts.setdefault(row.source, {})[prompt_key(row.prompt)] = None
    held: set[str] = set()
    for source, keys in prompts.items():
        ordered = list(keys)
        random.Random(f"{seed}:{source}").shuffle(ordered)
        held.update(ordered[: round(eval_fraction * len(ordered))])
    train = [row for row in rows if prompt_key(row.prompt) not in held]
    return train, [row for row in rows if prompt_key(row.prompt) in held]


def _pm_dataset(rows: list[PreferenceRow]) -> Any:
    """cai.preferences' trl dataset plus what our loss and sampler read: p (1 for hard labels), group."""
    from cai.preferences import to_dataset

    dataset = to_dataset(rows)
    groups: dict[str, int] = {}
    group_ids = [groups.setdefault(prompt_key(row.prompt), len(groups)) for row in rows]
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
    with quiet_loading():
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
