"""Stage `rloo`: RLOO against this config's preference model, from its SFT model (trl's RLOOTrainer).

cai train rloo --config configs/quickstart.yaml
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cai.stages.base import Stage
from cai.stages.training import training_key, training_stage
from cai.store import StageStore
from cai.train.rloo import RLOOConfig

if TYPE_CHECKING:
    from cai.stages.context import StageContext


def key(ctx: StageContext) -> StageStore:
    cfg = ctx.config.rloo
    policy, upstream = ctx.starting_model(cfg.model)
    return training_key(ctx, "rloo", cfg, policy, {"pm": ctx.store("pm").config_hash, **upstream})


def run_rloo(ctx: StageContext, fresh: bool = False) -> StageStore:
    from cai.sources import load_prompts
    from cai.train.rloo import train_rloo

    cfg = ctx.config.rloo

    def train(output: Path, seed: int) -> tuple[dict, str]:
        reward, _ = ctx.model_of("pm", complete=True)
        policy, _ = ctx.starting_model(cfg.model, complete=True)
        prompts = [item.prompt for item in load_prompts(ctx.config.label.prompts)]
        result = train_rloo(cfg, policy, reward, prompts, output, seed, ctx.console)
        return result.model_dump(mode="json"), f"{result.steps} RLOO steps"

    return training_stage(ctx, "rloo", cfg, fresh, train)


STAGE = Stage(
    name="rloo",
    command="cai train rloo",
    help="RLOO against the preference model, from the SFT model (trl's RLOOTrainer).",
    reads=("pm", "sft"),
    key=key,
    run=run_rloo,
    model_dir="model",
    policy=True,
    config=RLOOConfig,
    about="RLOO against the PM (alternative to PPO).",
    default=False,
)
