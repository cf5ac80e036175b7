"""Every stage of the recipe, in pipeline order: the one list the pipeline, the CLI, eval and
the report read. Adding a stage means writing its module (a `STAGE = Stage(...)`) and one line
here."""

from __future__ import annotations

from cai.stages import dpo, evaluation, label, mix, pm, ppo, report, rloo, sft, sl
from cai.stages.base import Stage

STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        sl.STAGE,
        sft.STAGE,
        label.STAGE,
        mix.STAGE,
        pm.STAGE,
        ppo.STAGE,
        dpo.STAGE,
        rloo.STAGE,
        evaluation.STAGE,
        report.STAGE,
    )
}
STAGE_ORDER: tuple[str, ...] = tuple(STAGES)
