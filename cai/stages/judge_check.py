"""`cai judge check`: measure the judge a config would label with, on gold pairs, and nothing else.

    cai judge check -c configs/quickstart.yaml --gold my_gold.jsonl --json judge.json

The judge (model, engine, mode, principle selection, margin) is opened and measured exactly as
the label stage's gate does it (`cai.stages.label.measure_config_judge`), so the figures are the
ones `cai label` would print for the same config. No stage runs and nothing is written into the
run directory; the only file written is the `--json` file, when asked for. It is a measurement,
not a gate: a judge below `label.gate` is a warning, never a failed command.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from cai.atomic import atomic_write_bytes
from cai.gate import GoldError, JudgeCheck, gate_failures, load_gold, print_check
from cai.judge import PrincipleSelection
from cai.stages.label import judge_model, measure_config_judge

if TYPE_CHECKING:
    from cai.stages.context import StageContext


class JudgeDescription(BaseModel):
    """Which judge was measured: what a config's label stage would judge with."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="label.judge_model, else the run's model.")
    engine: str = Field(description="The engine kind (label.judge_engine, else the run's engine).")
    mode: str = Field(description="label.judge, with '+CoT' under label.cot.")
    principles: PrincipleSelection = Field(description="label.principles: which principles judge a pair.")
    min_margin: float = Field(description="label.min_margin: how far from 0.5 a verdict must be.")


class GateFigures(BaseModel):
    """The config's gate thresholds and whether this measurement meets them."""

    model_config = ConfigDict(extra="forbid")

    min_agreement: float
    min_consistency: float
    action: str
    passed: bool
    failures: list[str]


class JudgeCheckReport(JudgeCheck):
    """Every figure of the measurement (`JudgeCheck`), the judge measured, and the gate's verdict."""

    judge: JudgeDescription
    gate: GateFigures


def describe_judge(ctx: StageContext) -> JudgeDescription:
    cfg = ctx.config.label
    return JudgeDescription(
        model=judge_model(ctx),
        engine=(cfg.judge_engine or ctx.config.engine).kind,
        mode=cfg.judge + ("+CoT" if cfg.cot else ""),
        principles=cfg.principles,
        min_margin=cfg.min_margin,
    )


def principles_text(selection: PrincipleSelection) -> str:
    """`count=1, weighted` and any tag or id filter, as one line."""
    parts = [f"count={selection.count}", "weighted" if selection.weighted else "unweighted"]
    if selection.tags:
        parts.append(f"tags={','.join(selection.tags)}")
    if selection.ids:
        parts.append(f"ids={','.join(selection.ids)}")
    return ", ".join(parts)


def run_judge_check(
    ctx: StageContext, gold: str | None = None, json_path: Path | None = None
) -> JudgeCheckReport:
    """Measure the config's judge on `gold` (default: `label.gold`), print it, and write `json_path`."""
    cfg = ctx.config.label
    source = gold or cfg.gold
    if source is None:
        raise GoldError("no gold pairs to measure on: label.gold is null in this config; pass --gold FILE")
    pairs = load_gold(source)  # a bad file fails before any model is loaded
    check, _ = measure_config_judge(ctx, pairs, source)
    failures = gate_failures(check, cfg.gate)
    report = JudgeCheckReport(
        **check.model_dump(),
        judge=describe_judge(ctx),
        gate=GateFigures(
            min_agreement=cfg.gate.min_agreement,
            min_consistency=cfg.gate.min_consistency,
            action=cfg.gate.action,
            passed=not failures,
            failures=failures,
        ),
    )
    print_report(ctx.console, report)
    if json_path is not None:
        atomic_write_bytes(json_path, report.model_dump_json(indent=2).encode() + b"\n")
        ctx.console.print(f"[green]json:[/] {json_path}", highlight=False)
    return report


def print_report(console, report: JudgeCheckReport) -> None:
    """The judge, the gate's table of figures, and a warning (not an error) below `label.gate`."""
    from rich.text import Text

    judge = report.judge
    console.print(
        Text(
            f"judge: {judge.model} (engine {judge.engine}), mode {judge.mode}, "
            f"principles {principles_text(judge.principles)}, min_margin {judge.min_margin:g}"
        )
    )
    print_check(console, report, title=f"judge check: {judge.model} on {report.n} gold pairs ({report.gold})")
    for failure in report.gate.failures:
        console.print(Text.assemble(("warning: ", "bold yellow"), failure))
    if report.gate.failures:
        console.print(
            Text(
                f"`cai label` with this config would {report.gate.action} at its gate "
                "(label.gate sets the thresholds and the action)"
            )
        )
