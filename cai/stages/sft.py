"""Stage `sft`: fine-tune the model on (prompt, final revision) from this config's SL stage.

cai train sft --config configs/quickstart.yaml
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from cai.stages.training import training_stage_def
from cai.train.sft import SFTConfig

if TYPE_CHECKING:
    from cai.stages.context import StageContext


def _start(ctx: StageContext, complete: bool) -> tuple[str, dict[str, str]]:
    """The base model (or `sft.model`): SFT is where the recipe's own models begin."""
    return ctx.config.sft.model or ctx.config.model, {"sl": ctx.store("sl").config_hash}


def _train(ctx: StageContext, cfg: SFTConfig, output: Path, seed: int) -> tuple[dict, str]:
    from cai.train.sft import train_sft

    data = ctx.upstream("sl").path / "sft.jsonl"
    examples = [json.loads(line)["messages"] for line in data.read_text().splitlines()]
    if not examples:
        raise ValueError(f"{data} has no examples: every SL row failed")
    base, _ = _start(ctx, True)
    result = train_sft(cfg, base, examples, output, seed, ctx.console)
    return result.model_dump(mode="json"), f"{result.steps} steps on {len(examples)} revisions"


STAGE = training_stage_def(
    "sft",
    config=SFTConfig,
    reads=("sl",),
    start=_start,
    train=_train,
    policy=True,
    help="Fine-tune the model on (prompt, final revision) from `cai generate sl` (full or LoRA).",
    about="Fine-tuning on the final revisions.",
)
