"""Stage `dpo`: DPO on this config's mix, from its SFT model (trl's DPOTrainer).

cai train dpo --config configs/quickstart.yaml
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cai.stages.training import training_stage_def
from cai.train.dpo import DPOConfig

if TYPE_CHECKING:
    from cai.stages.context import StageContext


def _train(ctx: StageContext, cfg: DPOConfig, output: Path, seed: int) -> tuple[dict, str]:
    from cai.preferences import read_preferences
    from cai.train.dpo import train_dpo

    rows = read_preferences(ctx.upstream("mix").path / "preferences.jsonl")
    base, _ = ctx.starting_model(cfg.model, complete=True)
    result = train_dpo(cfg, base, rows, output, seed, ctx.console)
    return result.model_dump(mode="json"), f"{result.steps} DPO steps"


STAGE = training_stage_def(
    "dpo",
    config=DPOConfig,
    reads=("mix", "sft"),
    train=_train,
    policy=True,
    default=False,
    help="DPO on the mixed preferences, from the SFT model (trl's DPOTrainer).",
    about="DPO on the mix (alternative to PM + PPO).",
)
