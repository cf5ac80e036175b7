"""Pieces every trainer shares: LoRA settings, optimisation settings, logging targets, dtype.

SFT, the preference model, DPO and RLOO go through trl; PPO is our own. All of them read the
same small sections so a user learns one vocabulary (`lora.r`, `train.learning_rate`, ...).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from cai.sections import Section


class LoraSection(Section):
    """Low-rank adapters (peft). Cheap on CPU: ~2x faster than a full fine-tune on SmolLM2."""

    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: int = Field(32, ge=1, description="Scaling numerator (alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on adapter inputs.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], description="Module names that get adapters."
    )
    merge: bool = Field(
        True,
        description="Merge the adapter into the weights when saving, so later stages load a plain model.",
    )


class PolicyTrainingSection(Section):
    """What the trl policy trainers (DPO, RLOO) share: where the policy starts, and its adapters.

    With LoRA the reference model is the policy with its adapters disabled, so no second copy of
    the model is loaded.
    """

    model: str | None = Field(
        None, description="Policy to start from; default: the SFT model (or the run's model)."
    )
    lora: LoraSection | None = Field(
        default_factory=LoraSection,
        description="LoRA adapters (reference = the model, adapters disabled); null = full fine-tune.",
    )


class TrainSection(Section):
    """Optimisation settings shared by the trl-based trainers."""

    max_steps: int = Field(8, ge=1, description="Optimizer steps.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")
    batch_size: int = Field(4, ge=1, description="Examples per device per step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_length: int = Field(
        512, ge=16, description="Longest tokenized example; longer ones are truncated or dropped."
    )
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="auto = bf16 autocast on GPUs and CPUs with native bf16 (AVX512-BF16/AMX), else fp32; "
        "bf16 = always; fp32 = full precision.",
    )
    save_steps: int = Field(0, ge=0, description="Checkpoint every N steps (0 = only at the end).")
    logging_steps: int = Field(1, ge=1, description="Log every N steps.")
    report_to: list[Literal["tensorboard", "trackio", "wandb"]] = Field(
        default_factory=list, description="Experiment trackers besides the console."
    )
    seed: int | None = Field(None, description="Training seed; default: the run seed.")
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in the backward pass: less memory, ~20% slower (trl turns it on "
        "by default; small models on CPU do not need it).",
    )


def peft_config(lora: LoraSection, task_type: Literal["CAUSAL_LM", "SEQ_CLS"]) -> Any:
    """The peft LoraConfig for a section; a sequence classifier also trains its new score head."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type=task_type,
        modules_to_save=["score"] if task_type == "SEQ_CLS" else None,
    )


def use_bf16(precision: str) -> bool:
    """bf16 autocast for "bf16"; for "auto" only where the hardware computes in bf16 (cai.hardware)."""
    from cai.hardware import auto_bf16

    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    return auto_bf16()


# --------------------------------------------------------------------------------------------
# Glue shared by the trl-based trainers (sft, reward, dpo, rloo)
# --------------------------------------------------------------------------------------------

KEEP_CHECKPOINTS = 2
"""Resuming needs only the newest checkpoint; the one before it survives a crash mid-save."""


class TrainResult(BaseModel):
    """What a trl-based trainer did and where its model is; stages store it next to the model."""

    model_path: str = Field(description="Folder with the trained model (or adapter) and its tokenizer.")
    steps: int = Field(description="Optimizer steps done in total, including resumed ones.")
    train_loss: list[float] = Field(description="Logged training loss, one value per logging step.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Last logged value of each metric.")
    lora: bool = Field(description="Trained with LoRA adapters.")
    merged: bool = Field(description="LoRA merged into the saved weights (else: adapter + base name).")
    resumed_from: str | None = Field(None, description="Checkpoint the run continued from.")
    elapsed: float = Field(description="Seconds spent in this call.")


def trainer_arguments(train: TrainSection, checkpoints: Path, seed: int) -> dict[str, Any]:
    """Keyword arguments every trl config (SFT/Reward/DPO/RLOO) takes the same way.

    A checkpoint is written every `save_steps` and always at the last step (save_strategy
    "steps" saves at the end too), so a killed run re-run with the same output folder resumes.
    """
    import torch

    return dict(
        output_dir=str(checkpoints),
        max_steps=train.max_steps,
        learning_rate=train.learning_rate,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        warmup_steps=train.warmup_ratio,  # transformers 5: a float below 1 is a ratio of max_steps
        weight_decay=train.weight_decay,
        bf16=use_bf16(train.precision),
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=train.gradient_checkpointing,
        save_strategy="steps",
        save_steps=train.save_steps or train.max_steps,
        save_total_limit=KEEP_CHECKPOINTS,
        logging_steps=train.logging_steps,
        report_to=list(train.report_to) or "none",
        seed=train.seed if train.seed is not None else seed,
        disable_tqdm=True,  # attach_console's table replaces the progress bar
        trust_remote_code=False,
    )


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """Hide datasets' per-map and transformers' per-save progress bars; the console table is enough."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets_bars = datasets.is_progress_bar_enabled()
    hf_bars = hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_bars:
            datasets.enable_progress_bars()
        if hf_bars:
            hf_logging.enable_progress_bar()


def newest_checkpoint(checkpoints: Path) -> str | None:
    """The newest `checkpoint-N` folder under `checkpoints`, or None for a fresh run."""
    if not Path(checkpoints).is_dir():
        return None
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(checkpoints))


def console_log_callback(console: Any, columns: dict[str, str]) -> Any:
    """A TrainerCallback printing one aligned row per log: step, then each present column.

    `columns` maps a trainer log key (e.g. "rewards/accuracies") to a short header.
    """
    from rich.table import Table
    from transformers import TrainerCallback

    class ConsoleLog(TrainerCallback):
        def __init__(self) -> None:
            self.header = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "train_runtime" in logs:
                return
            shown = {key: name for key, name in columns.items() if key in logs}
            table = Table(box=None, show_header=self.header, pad_edge=False, header_style="bold")
            table.add_column("step", width=6, justify="right")
            for name in shown.values():
                table.add_column(name, width=max(10, len(name)), justify="right")
            table.add_row(str(state.global_step), *(f"{float(logs[key]):.4g}" for key in shown))
            console.print(table)
            self.header = False

    return ConsoleLog()


def default_console() -> Any:
    """Where trainers print when the caller passes no console: stderr, like the rest of cai."""
    from rich.console import Console

    return Console(stderr=True)


def attach_console(trainer: Any, console: Any, columns: dict[str, str]) -> None:
    """Swap transformers' raw-dict printer (added when tqdm is off) for the console table."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(console_log_callback(console, columns))


def build_trainer(
    trainer_cls: Any,
    model_path: str,
    args: Any,
    lora: LoraSection | None,
    console: Any,
    columns: dict[str, str],
    **kwargs: Any,
) -> Any:
    """`trainer_cls` (trl's SFT, DPO or RLOO trainer) on the causal LM in `model_path`.

    The tokenizer and model load quietly, with LoRA adapters when `lora` is set; the logs print
    as `columns` rows on `console` (default: stderr). `kwargs` (train_dataset, reward_funcs, ...)
    go to the trainer as they are.
    """
    from transformers import AutoTokenizer

    from cai.models import quiet_loading

    with quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
        trainer = trainer_cls(
            model=model_path,
            args=args,
            processing_class=tokenizer,
            peft_config=peft_config(lora, "CAUSAL_LM") if lora else None,
            **kwargs,
        )
    attach_console(trainer, console or default_console(), columns)
    return trainer


def run_trainer(trainer: Any, checkpoints: Path) -> str | None:
    """Train, resuming from the newest checkpoint when there is one; returns that checkpoint."""
    resume = newest_checkpoint(checkpoints)
    trainer.train(resume_from_checkpoint=resume)
    return resume


def logged_losses(trainer: Any) -> list[float]:
    """Training losses from the trainer's log history (restored on resume, so it covers all steps)."""
    return [float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]


def last_metrics(trainer: Any) -> dict[str, float]:
    """The last logged value of every numeric training metric (not eval, not the run summary)."""
    metrics: dict[str, float] = {}
    for entry in trainer.state.log_history:
        if "train_runtime" in entry:
            continue
        for key, value in entry.items():
            if isinstance(value, int | float) and not key.startswith("eval_") and key != "step":
                metrics[key] = float(value)
    return metrics


def save_trained(trainer: Any, folder: Path, merge: bool) -> bool:
    """Save the trained model + tokenizer (safetensors) to `folder`; returns whether LoRA was merged.

    With LoRA and `merge`, later stages get a plain model folder; without merge, peft writes the
    adapter and its adapter_config names the base model folder it applies to. Unmerged models go
    through `trainer.save_model`, which gathers FSDP/DeepSpeed shards and writes on one process.
    """
    from peft import PeftModel

    model = trainer.accelerator.unwrap_model(trainer.model)
    # transformers' Trainer writes args.use_cache (False) into the config; a saved model is for
    # inference, where the KV cache is what makes generation fast.
    model.config.use_cache = True
    folder = Path(folder)
    if isinstance(model, PeftModel) and merge:
        plain = model.merge_and_unload()
        if trainer.args.should_save:
            folder.mkdir(parents=True, exist_ok=True)
            plain.save_pretrained(folder)
            trainer.processing_class.save_pretrained(folder)
        trainer.accelerator.wait_for_everyone()
        return True
    trainer.save_model(str(folder))
    if trainer.args.should_save:
        # A pickle of the TrainingArguments; the checkpoints keep one, the model folder needs none.
        (folder / "training_args.bin").unlink(missing_ok=True)
    return False


def train_and_save(trainer: Any, output_dir: Path, lora: LoraSection | None, started: float) -> TrainResult:
    """Train (resuming from output_dir/checkpoints), save to output_dir/model and say what was done.

    `started` is the `time.perf_counter()` reading the caller's run began at.
    """
    resumed = run_trainer(trainer, Path(output_dir) / "checkpoints")
    model_dir = Path(output_dir) / "model"
    merged = save_trained(trainer, model_dir, merge=bool(lora and lora.merge))
    return TrainResult(
        model_path=str(model_dir),
        steps=trainer.state.global_step,
        train_loss=logged_losses(trainer),
        metrics=last_metrics(trainer),
        lora=lora is not None,
        merged=merged,
        resumed_from=resumed,
        elapsed=time.perf_counter() - started,
    )
