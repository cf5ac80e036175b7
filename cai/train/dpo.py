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
from cai.sections import Section
from cai.train.common import (
    LoraSection,
    TrainResult,
    TrainSection,
    attach_console,
    default_console,
    last_metrics,
    logged_losses,
    no_progress_bars,
    peft_config,
    quiet_logs,
    run_trainer,
    save_trained,
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


class DPOConfig(Section):
    """Direct Preference Optimisation (trl's DPOTrainer) on the preference rows."""

    model: str | None = Field(
        None, description="Policy to start from; default: the SFT model (or the run's model)."
    )
    lora: LoraSection | None = Field(
        default_factory=LoraSection,
        description="LoRA adapters (reference = the model, adapters disabled); null = full fine-tune.",
    )
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
    from transformers import AutoTokenizer
    from trl import DPOConfig as TrlDPOConfig
    from trl import DPOTrainer

    from cai.models import resolve_model
    from cai.preferences import to_dataset

    if not rows:
        raise ValueError("no preference rows to train DPO on")
    started = time.perf_counter()
    console = console or default_console()
    checkpoints = Path(output_dir) / "checkpoints"
    model_path = resolve_model(config.model or base_model)
    args = TrlDPOConfig(
        **trainer_arguments(config.train, checkpoints, seed),
        max_length=config.train.max_length,
        beta=config.beta,
        loss_type=[config.loss_type],
    )
    with no_progress_bars():
        with quiet_logs():
            tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
            trainer = DPOTrainer(
                model=model_path,
                args=args,
                train_dataset=to_dataset(rows),
                processing_class=tokenizer,
                peft_config=peft_config(config.lora, "CAUSAL_LM") if config.lora else None,
            )
        attach_console(trainer, console, LOG_COLUMNS)
        console.print(
            f"[bold]DPO[/] on {len(trainer.train_dataset)} pairs, beta {config.beta}, "
            f"{config.loss_type} loss, {'LoRA' if config.lora else 'full'}, {config.train.max_steps} steps"
        )
        resumed = run_trainer(trainer, checkpoints)
        model_dir = Path(output_dir) / "model"
        merged = save_trained(trainer, model_dir, merge=bool(config.lora and config.lora.merge))
    return TrainResult(
        model_path=str(model_dir),
        steps=trainer.state.global_step,
        train_loss=logged_losses(trainer),
        metrics=last_metrics(trainer),
        lora=config.lora is not None,
        merged=merged,
        resumed_from=resumed,
        elapsed=time.perf_counter() - started,
    )
