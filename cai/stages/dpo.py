"""Stage `dpo`: DPO on this config's mix, from its SFT model (trl's DPOTrainer).

cai train dpo --config configs/quickstart.yaml
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cai.stages.base import Stage
from cai.stages.training import training_key, training_stage
from cai.store import StageStore
from cai.train.dpo import DPOConfig

if TYPE_CHECKING:
    from cai.stages.context import StageContext


def key(ctx: StageContext) -> StageStore:
    cfg = ctx.config.dpo
    base, upstream = ctx.starting_model(cfg.model)
    return training_key(ctx, "dpo", cfg, base, {"mix": ctx.store("mix").config_hash, **upstream})


def run_dpo(ctx: StageContext, fresh: bool = False) -> StageStore:
    from cai.preferences import read_preferences
    from cai.train.dpo import train_dpo

    cfg = ctx.config.dpo

    def train(output: Path, seed: int) -> tuple[dict, str]:
        rows = read_preferences(ctx.upstream("mix").path / "preferences.jsonl")
        base, _ = ctx.starting_model(cfg.model, complete=True)
        result = train_dpo(cfg, base, rows, output, seed, ctx.console)
        return result.model_dump(mode="json"), f"{result.steps} DPO steps"

    return training_stage(ctx, "dpo", cfg, fresh, train)


STAGE = Stage(
    name="dpo",
    command="cai train dpo",
    help="DPO on the mixed preferences, from the SFT model (trl's DPOTrainer).",
    reads=("mix", "sft"),
    key=key,
    run=run_dpo,
    model_dir="model",
    policy=True,
    config=DPOConfig,
    about="DPO on the mix (alternative to PM + PPO).",
    default=False,
)
