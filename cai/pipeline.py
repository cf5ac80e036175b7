"""`cai run`: every stage of the recipe into one run directory, skipping what is already done.

    cai run configs/quickstart.yaml

Stages run in order (SL generate -> SFT -> label -> mix -> PM -> PPO -> eval -> report by
default; `stages:` in the config chooses). Each stage is keyed by its config and the hashes of
its inputs, so a second run with the same config loads no model and makes no model call, and
editing one principle re-runs the stages that depend on the constitution and everything
downstream of them. The summary at the end answers the cost question: time and tokens per stage.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.table import Table

from cai.stages.base import StageContext, Timer

STAGE_ORDER = ("sl", "sft", "label", "mix", "pm", "ppo", "dpo", "rloo", "eval", "report")


def stage_runners() -> dict[str, Callable]:
    from cai.stages.evaluation import run_eval
    from cai.stages.label import run_label
    from cai.stages.ppo import run_ppo
    from cai.stages.sl import run_sl
    from cai.stages.training import run_dpo, run_mix, run_pm, run_rloo, run_sft

    return {
        "sl": run_sl,
        "sft": run_sft,
        "label": run_label,
        "mix": run_mix,
        "pm": run_pm,
        "ppo": run_ppo,
        "dpo": run_dpo,
        "rloo": run_rloo,
        "eval": run_eval,
    }


def run_pipeline(ctx: StageContext) -> dict:
    """Run the configured stages; return the per-stage summary (also printed)."""
    from cai.stages.evaluation import run_summary, write_run_report

    runners = stage_runners()
    ran: dict[str, str] = {}
    timer = Timer()
    for stage in ctx.config.stages:
        if stage == "report":
            continue
        ctx.console.rule(f"[bold]{stage}")
        runners[stage](ctx)
        ran[stage] = "skipped" if stage in ctx.skipped else "ran"
    ctx.release()
    report: Path | None = None
    if "report" in ctx.config.stages:
        ctx.console.rule("[bold]report")
        report = write_run_report(ctx)
    summary = run_summary(ctx.run_dir)
    write_run_manifest(ctx, summary)
    print_summary(ctx, summary, ran, timer.seconds, report)
    return {"stages": summary, "ran": ran, "report": str(report) if report else None}


def write_run_manifest(ctx: StageContext, summary: dict) -> Path:
    """run_dir/manifest.json: the config, its hash, versions, and per stage hash/time/tokens."""
    from cai.constitution import content_hash
    from cai.store import atomic_write_json, versions

    config = ctx.config.model_dump(mode="json")
    path = ctx.run_dir / "manifest.json"
    atomic_write_json(
        path,
        {
            "config": config,
            "config_hash": content_hash(config),
            "constitution": {"name": ctx.constitution.name, "hash": ctx.constitution.hash},
            "versions": versions(),
            "stages": summary,
        },
    )
    return path


def print_summary(
    ctx: StageContext, summary: dict, ran: dict[str, str], seconds: float, report: Path | None
) -> None:
    table = Table(title=f"run {ctx.run_dir} ({seconds:.0f} s this time)")
    for column in ("stage", "now", "rows", "seconds", "prompt tok", "gen tok", "scored tok"):
        table.add_column(column, justify="left" if column in {"stage", "now"} else "right")
    shown = [stage for stage in STAGE_ORDER if stage in summary and stage in ran]
    for stage in shown:
        s = summary[stage]
        table.add_row(
            stage,
            ran[stage],
            str(s["rows"]),
            f"{s['seconds']:.0f}",
            str(s["prompt_tokens"]),
            str(s["generated_tokens"]),
            str(s["scored_tokens"]),
        )
    ctx.console.print(table)
    ctx.console.print(
        "rows: items produced (sl, label, eval), or trained on (sft: examples, mix: pairs, pm: training "
        "pairs, ppo: rollouts); seconds and tokens are totals over every attempt of the stage's output"
    )
    for stage in shown:
        ctx.console.print(f"  {stage:6} {summary[stage]['path']}", highlight=False)
    if report is not None:
        ctx.console.print(f"[bold green]report:[/] {report}")
