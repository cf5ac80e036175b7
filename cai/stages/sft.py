"""Stage `sft`: fine-tune the model on (prompt, final revision) from this config's SL stage.

cai train sft --config configs/quickstart.yaml
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from cai.stages.base import Stage
from cai.stages.training import training_key, training_stage
from cai.store import StageStore
from cai.train.sft import SFTConfig

if TYPE_CHECKING:
    from cai.stages.context import StageContext


def key(ctx: StageContext) -> StageStore:
    cfg = ctx.config.sft
    sl = ctx.store("sl")
    return training_key(ctx, "sft", cfg, cfg.model or ctx.config.model, {"sl": sl.config_hash})


def run_sft(ctx: StageContext, fresh: bool = False) -> StageStore:
    from cai.train.sft import train_sft

    cfg = ctx.config.sft
    base = cfg.model or ctx.config.model

    def train(output: Path, seed: int) -> tuple[dict, str]:
        sl = ctx.upstream("sl")
        data = sl.path / "sft.jsonl"
        examples = [json.loads(line)["messages"] for line in data.read_text().splitlines()]
        if not examples:
            raise ValueError(f"{data} has no examples: every SL row failed")
        result = train_sft(cfg, base, examples, output, seed, ctx.console)
        return result.model_dump(mode="json"), f"{result.steps} steps on {len(examples)} revisions"

    return training_stage(ctx, "sft", cfg, fresh, train)


STAGE = Stage(
    name="sft",
    command="cai train sft",
    help="Fine-tune the model on (prompt, final revision) from `cai generate sl` (full or LoRA).",
    reads=("sl",),
    key=key,
    run=run_sft,
    model_dir="model",
    policy=True,
    config=SFTConfig,
    about="Fine-tuning on the final revisions.",
)
