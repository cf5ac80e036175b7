"""`cai run`: every stage of the recipe into one run directory, skipping what is already done.

    cai run configs/quickstart.yaml

Stages run in order (SL generate -> SFT -> label -> mix -> PM -> PPO -> eval -> report by
default; `stages:` in the config chooses). Each stage is keyed by its config and the keys of
the stages it reads, computed from the config: a second run with the same config loads no
model and makes no model call, editing one principle re-runs the stages that depend on the
constitution and everything downstream of them, and a run directory shared by several configs
never mixes their outputs. The summary at the end answers the cost question: time and tokens
per stage, with each stage's exact key.
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from cai.stages.base import Timer, is_main_process
from cai.stages.context import StageContext
from cai.stages.registry import STAGE_ORDER, STAGES


def run_pipeline(ctx: StageContext) -> dict:
    """Run the configured stages; return the per-stage summary (also printed)."""
    from cai.stages.report import run_summary, write_run_report

    ran: dict[str, str] = {}
    timer = Timer()
    for stage in ctx.config.stages:
        if STAGES[stage].key is None:
            continue
        ctx.console.rule(f"[bold]{stage}")
        STAGES[stage].run(ctx)
        ran[stage] = "skipped" if stage in ctx.skipped else "ran"
    ctx.release()
    if not is_main_process():  # under a launch every rank ran the stages; rank 0 alone reports
        return {"stages": {}, "ran": ran, "report": None}
    report: Path | None = None
    if "report" in ctx.config.stages:
        ctx.console.rule("[bold]report")
        report = write_run_report(ctx)
    summary = run_summary(ctx)
    write_run_manifest(ctx, summary)
    print_summary(ctx, summary, ran, timer.seconds, report)
    return {"stages": summary, "ran": ran, "report": str(report) if report else None}


def write_run_manifest(ctx: StageContext, summary: dict) -> Path:
    """run_dir/manifest.json: the config, its hash, versions, and per stage its key, upstream
    keys, time and tokens (and, in a pluralistic run, the groups with their normalised shares).
    Written by each `cai run`: it describes the config that ran last."""
    from cai.atomic import atomic_write_json
    from cai.hashing import content_hash
    from cai.manifest import versions

    config = ctx.config.model_dump(mode="json")
    path = ctx.run_dir / "manifest.json"
    manifest = {
        "config": config,
        "config_hash": content_hash(config),
        "config_source": ctx.config_source,
        "constitution": {"name": ctx.constitution.name, "hash": ctx.constitution.hash},
        "versions": versions(),
        "stages": summary,
    }
    if ctx.groups:  # pluralistic runs: every group's constitution, raw weight and normalised share
        manifest["groups"] = [
            {
                "name": g.spec.name,
                "constitution": g.constitution.name,
                "hash": g.constitution.hash,
                "weight": g.spec.weight,
                "share": g.weight,
            }
            for g in ctx.groups
        ]
    atomic_write_json(path, manifest)
    return path


def print_summary(
    ctx: StageContext, summary: dict, ran: dict[str, str], seconds: float, report: Path | None
) -> None:
    table = Table(title=f"run {ctx.run_dir} ({seconds:.0f} s this time)")
    for column in ("stage", "now", "key", "rows", "seconds", "prompt tok", "gen tok", "scored tok"):
        table.add_column(column, justify="left" if column in {"stage", "now", "key"} else "right")
    shown = [stage for stage in STAGE_ORDER if stage in summary and stage in ran]
    for stage in shown:
        s = summary[stage]
        table.add_row(
            stage,
            ran[stage],
            s["config_hash"][:12],
            str(s.get("rows", 0)),
            f"{s.get('seconds', 0):.0f}",
            str(s.get("prompt_tokens", 0)),
            str(s.get("generated_tokens", 0)),
            str(s.get("scored_tokens", 0)),
        )
    ctx.console.print(table)
    ctx.console.print(
        "rows: items produced (sl, label, eval), or trained on (sft: examples, mix: pairs, pm: training "
        "pairs, ppo: rollouts); seconds and tokens are totals over every attempt of the stage's output"
    )
    for stage in shown:
        ctx.console.print(f"  {stage:6} {summary[stage].get('path', '')}", highlight=False)
    if report is not None:
        ctx.console.print(f"[bold green]report:[/] {report}")
