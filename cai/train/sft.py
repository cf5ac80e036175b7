"""`cai train sft`: supervised fine-tuning on (prompt, final revision) with trl's SFTTrainer.

    cai train sft configs/quickstart.yaml

The SL stage of Constitutional AI: the model is fine-tuned on its own revised answers, so it
answers harmful prompts the way its critiques asked it to. Revisions alone teach a small model
that every prompt is a red-team prompt, so helpfulness demonstrations (the *chosen* side of an
HH-format file) can be mixed in, as the paper mixes in helpful samples.

Each conversation becomes trl's prompt-completion format: every turn but the last is the prompt,
the last (assistant) turn is the completion. With `completion_only_loss` trl masks the prompt
tokens out of the labels (-100), so the loss is on the answer only.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from cai.backends.base import Chat
from cai.sections import Section
from cai.train.common import (
    LoraSection,
    TrainResult,
    TrainSection,
    build_trainer,
    default_console,
    no_progress_bars,
    train_and_save,
    trainer_arguments,
)

__all__ = ["SFTConfig", "SFTResult", "build_sft_trainer", "helpful_demonstrations", "train_sft"]

LOG_COLUMNS = {
    "loss": "loss",
    "mean_token_accuracy": "token_acc",
    "grad_norm": "grad_norm",
    "learning_rate": "lr",
}


class SFTConfig(Section):
    """Supervised fine-tuning on the final revisions (full or LoRA)."""

    model: str | None = Field(None, description="Model to fine-tune; default: the run's model.")
    lora: LoraSection | None = Field(
        default_factory=LoraSection, description="LoRA adapters; null for a full fine-tune."
    )
    train: TrainSection = Field(default_factory=TrainSection, description="Optimisation settings.")
    helpful_demos: int = Field(
        0, ge=0, description="Helpfulness demonstrations (chosen HH conversations) mixed into the SFT set."
    )
    helpful_source: str = Field(
        "hh_helpful.jsonl", description="HH-format file (or shipped file name) the demonstrations come from."
    )
    completion_only_loss: bool = Field(
        True, description="Loss on the final assistant answer only (prompt tokens masked out)."
    )


class SFTResult(TrainResult):
    examples: int = Field(description="Training conversations, demonstrations included.")
    helpful_demos: int = Field(description="How many of them are helpfulness demonstrations.")


def helpful_demonstrations(source: str, count: int, seed: int) -> list[Chat]:
    """`count` chosen conversations from an HH-format file, sampled with `seed` (all if fewer)."""
    if count == 0:
        return []
    from cai.mix import PreferenceSource
    from cai.preferences import load_hh

    rows, _ = load_hh(PreferenceSource(path=source).resolved_path())
    picked = random.Random(f"{seed}:helpful").sample(range(len(rows)), min(count, len(rows)))
    return [[*rows[i].prompt, *rows[i].chosen] for i in sorted(picked)]


def _prompt_completion(conversation: Chat) -> dict[str, Chat]:
    if not conversation or conversation[-1]["role"] != "assistant":
        raise ValueError("an SFT example must end with an assistant turn (the answer to learn)")
    if len(conversation) < 2:
        raise ValueError("an SFT example needs a prompt before its assistant answer")
    return {"prompt": list(conversation[:-1]), "completion": [conversation[-1]]}


def build_sft_trainer(
    config: SFTConfig,
    base_model: str,
    examples: list[Chat],
    output_dir: Path,
    seed: int,
    console: Any = None,
) -> tuple[Any, int]:
    """The configured SFTTrainer (not yet trained) and the number of demonstrations mixed in.

    Separate from `train_sft` so tests and notebooks can look at the prepared data and batches.
    """
    from datasets import Dataset
    from trl import SFTConfig as TrlSFTConfig
    from trl import SFTTrainer

    from cai.models import resolve_model

    run_seed = config.train.seed if config.train.seed is not None else seed
    demos = helpful_demonstrations(config.helpful_source, config.helpful_demos, run_seed)
    conversations = [*examples, *demos]
    if not conversations:
        raise ValueError(
            "no SFT examples: the SL stage produced no rows and no demonstrations were asked for"
        )
    random.Random(run_seed).shuffle(conversations)
    dataset = Dataset.from_list([_prompt_completion(c) for c in conversations])

    model_path = resolve_model(config.model or base_model)
    args = TrlSFTConfig(
        **trainer_arguments(config.train, Path(output_dir) / "checkpoints", seed),
        max_length=config.train.max_length,
        completion_only_loss=config.completion_only_loss,
    )
    trainer = build_trainer(
        SFTTrainer, model_path, args, config.lora, console, LOG_COLUMNS, train_dataset=dataset
    )
    return trainer, len(demos)


def train_sft(
    config: SFTConfig,
    base_model: str,
    examples: list[Chat],
    output_dir: Path,
    seed: int,
    console: Any = None,
) -> SFTResult:
    """Fine-tune on `examples` (conversations in TRL "messages" form, answer last); save to output_dir/model.

    Re-running with the same `output_dir` resumes from the newest checkpoint in
    output_dir/checkpoints, so a killed run continues where it stopped.
    """
    started = time.perf_counter()
    console = console or default_console()
    with no_progress_bars():
        trainer, demos = build_sft_trainer(config, base_model, examples, output_dir, seed, console)
        console.print(
            f"[bold]SFT[/] on {len(trainer.train_dataset)} conversations ({demos} helpful demonstrations), "
            f"{'LoRA' if config.lora else 'full fine-tune'}, {config.train.max_steps} steps"
        )
        result = train_and_save(trainer, output_dir, config.lora, started)
    return SFTResult(**result.model_dump(), examples=len(examples) + demos, helpful_demos=demos)
