"""`cai judge check`: the judge a config would label with, measured on gold pairs (no stage runs).

cai judge check -c quickstart --gold my_gold.jsonl --json judge.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cai.cli.app import ConfigOption, SetOption, judge_app, run_stage


@judge_app.command("check")
def judge_check(
    config: ConfigOption,
    set_: SetOption = None,
    gold: Annotated[
        str | None,
        typer.Option(
            help="Gold pairs (JSON Lines; a path or a shipped name). Default: the config's label.gold."
        ),
    ] = None,
    json_path: Annotated[
        Path | None,
        typer.Option("--json", help="Also write every figure, the judge and the gate to this JSON file."),
    ] = None,
) -> None:
    """Measure the config's judge on gold pairs: agreement, per category, position consistency, cost.

    Writes nothing into the run directory. Exits 0: a judge below label.gate is only a warning.
    """
    from cai.stages.judge_check import run_judge_check

    run_stage(config, set_, lambda ctx: run_judge_check(ctx, gold, json_path))
