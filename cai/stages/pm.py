"""Stage `pm`: the preference model on this config's mix, from its SFT model (or `pm.model`).

cai train pm --config configs/quickstart.yaml
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cai.stages.training import training_stage_def
from cai.train.reward import PMConfig

if TYPE_CHECKING:
    from cai.stages.context import StageContext


def _train(ctx: StageContext, cfg: PMConfig, output: Path, seed: int) -> tuple[dict, str]:
    from cai.preferences import read_preferences
    from cai.train.reward import split_by_prompt, train_preference_model

    rows = read_preferences(ctx.upstream("mix").path / "preferences.jsonl")
    base, _ = ctx.starting_model(cfg.model, complete=True)
    train_rows, held_out = split_by_prompt(rows, cfg.eval_fraction, seed)
    report = train_preference_model(cfg, base, train_rows, held_out, output, seed, ctx.console)
    by_source = ", ".join(f"{k} {v:.2f}" for k, v in report.accuracy_by_source.items())
    return report.model_dump(mode="json"), f"held-out accuracy {report.accuracy:.3f} ({by_source})"


STAGE = training_stage_def(
    "pm",
    config=PMConfig,
    reads=("mix", "sft"),
    train=_train,
    help="Train the preference model on the mix; report held-out, per-source accuracy and calibration.",
    about="Preference model on the mix.",
)
