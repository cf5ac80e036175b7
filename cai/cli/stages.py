"""The stage commands, one per stage of the registry, and `cai run` / `cai report`.

    cai label -c configs/quickstart.yaml --set label.principles.count=2

A stage's command, help text and runner come from its `Stage` declaration, so adding a stage to
`cai.stages.registry` adds its command here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cai.cli.app import ConfigOption, FreshOption, SetOption, app, generate_app, run_stage, train_app
from cai.stages.base import Stage
from cai.stages.registry import STAGES

GROUPS = {"generate": generate_app, "train": train_app}


def _command(stage: Stage):
    def command(config: ConfigOption, set_: SetOption = None, fresh: FreshOption = False) -> None:
        run_stage(config, set_, lambda ctx: stage.run(ctx, fresh=fresh))

    command.__doc__ = stage.help
    command.__name__ = stage.name
    return command


for _stage in STAGES.values():
    if _stage.key is None:  # the report has its own command below
        continue
    *group, name = _stage.command.split()[1:]
    (GROUPS[group[0]] if group else app).command(name)(_command(_stage))


@app.command("run")
def run(
    config: Annotated[
        str, typer.Argument(help="Run config YAML (a path or a shipped name like 'quickstart').")
    ],
    set_: SetOption = None,
) -> None:
    """Every stage of the recipe into one run directory; complete stages are skipped."""
    from cai.pipeline import run_pipeline

    run_stage(config, set_, run_pipeline)


@app.command("report")
def report(
    config: ConfigOption,
    set_: SetOption = None,
    output: Annotated[Path | None, typer.Option(help="HTML file (default: RUN_DIR/report.html).")] = None,
) -> None:
    """Write the self-contained HTML report of a run (audit plots, PPO curves, eval results)."""
    from cai.stages.report import run_report

    run_stage(config, set_, lambda ctx: run_report(ctx, path=output))
