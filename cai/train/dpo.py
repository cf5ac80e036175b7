"""`cai train dpo`: Direct Preference Optimisation on the mixed preference set, with trl's DPOTrainer.

    cai train dpo configs/quickstart.yaml

An alternative to PM + RL: the policy is trained on the same (prompt, chosen, rejected) rows the
PM would see, with the implicit reward beta * log(pi / pi_ref). The reference is the starting
model: with LoRA, trl builds no second model and computes the reference log-probs with the
adapter disabled (`DPOTrainer` sets `ref_model = None` for a peft model and wraps the reference
pass in `use_adapter(model, None)`, i.e. `model.disable_adapter()`); a full fine-tune loads a
frozen copy of the starting model from its folder.

The rows' provenance columns (source, soft label, weight) are dropped by DPOTrainer: DPO here
trains on the label's direction only.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from cai.records import PreferenceRow
from cai.train.common import (
    PolicyTrainingSection,
    TrainResult,
    TrainSection,
    build_trainer,
    default_console,
    no_progress_bars,
    train_and_save,
    trainer_arguments,
)

__all__ = ["DPOConfig", "train_dpo"]

DPOLoss = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "sigmoid_norm",
]

LOG_COLUMNS = {
    "loss": "loss",
    "rewards/accuracies": "accuracy",
    "rewards/margins": "margin",
    "rewards/chosen": "r_chosen",
    "rewards/rejected": "r_rejected",
    "grad_norm": "grad_norm",
}


class DPOConfig(PolicyTrainingSection):
    """Direct Preference Optimisation (trl's DPOTrainer) on the preference rows."""

    train: TrainSection = Field(default_factory=TrainSection, description="Optimisation settings.")
    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference model.")
    loss_type: DPOLoss = Field("sigmoid", description="trl's DPO loss variant (sigmoid = the DPO paper).")


def train_dpo(
    config: DPOConfig,
    base_model: str,
    rows: list[PreferenceRow],
    output_dir: Path,
    seed: int,
    console: Any = None,
) -> TrainResult:
    """Train the policy with DPO on `rows`; save to output_dir/model, resume from output_dir/checkpoints."""
    from trl import DPOConfig as TrlDPOConfig
    from trl import DPOTrainer

    from cai.models import resolve_model
    from cai.preferences import to_dataset

    if not rows:
        raise ValueError("no preference rows to train DPO on")
    started = time.perf_counter()
    console = console or default_console()
    model_path = resolve_model(config.model or base_model)
    args = TrlDPOConfig(
        **trainer_arguments(config.train, Path(output_dir) / "checkpoints", seed),
        max_length=config.train.max_length,
        beta=config.beta,
        loss_type=[config.loss_type],
    )
    with no_progress_bars():
        trainer = build_trainer(
            DPOTrainer, model_path, args, config.lora, console, LOG_COLUMNS, train_dataset=to_dataset(rows)
        )
        console.print(
            f"[bold]DPO[/] on {len(trainer.train_dataset)} pairs, beta {config.beta}, "
            f"{config.loss_type} loss, {'LoRA' if config.lora else 'full'}, {config.train.max_steps} steps"
        )
        return train_and_save(trainer, output_dir, config.lora, started)
