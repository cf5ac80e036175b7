"""Stage `rloo`: RLOO against this config's preference model, from its SFT model (trl's RLOOTrainer).

cai train rloo --config configs/quickstart.yaml
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cai.stages.training import training_stage_def
from cai.train.rloo import RLOOConfig

if TYPE_CHECKING:
    from cai.stages.context import StageContext


def _train(ctx: StageContext, cfg: RLOOConfig, output: Path, seed: int) -> tuple[dict, str]:
    from cai.sources import load_prompts
    from cai.train.rloo import train_rloo

    reward, _ = ctx.model_of("pm", complete=True)
    policy, _ = ctx.starting_model(cfg.model, complete=True)
    prompts = [item.prompt for item in load_prompts(ctx.config.label.prompts)]
    result = train_rloo(cfg, policy, reward, prompts, output, seed, ctx.console)
    return result.model_dump(mode="json"), f"{result.steps} RLOO steps"


STAGE = training_stage_def(
    "rloo",
    config=RLOOConfig,
    reads=("pm", "sft"),
    train=_train,
    policy=True,
    default=False,
    help="RLOO against the preference model, from the SFT model (trl's RLOOTrainer).",
    about="RLOO against the PM (alternative to PPO).",
)
