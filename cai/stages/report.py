"""Stage `report`: the self-contained HTML report of this config's outputs, and the run summary.

    cai report --config configs/quickstart.yaml

Everything shown comes from this config's own stage folders (their keys are computed from the
config), so a run directory shared by several configs still reports each one truthfully.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from cai.stages.base import Stage

if TYPE_CHECKING:
    from cai.stages.context import StageContext

NAME = "report"


def run_summary(ctx: StageContext) -> dict[str, dict[str, Any]]:
    """Per stage of this recipe: status, rows, time, tokens, its exact key and upstream keys."""
    stages: dict[str, dict[str, Any]] = {}
    for name in ctx.config.stages:
        if ctx.stage(name).key is None:
            continue
        store = ctx.store(name)
        if not store.path.exists():
            stages[name] = {"status": "not run", "config_hash": store.config_hash, "upstream": store.upstream}
            continue
        manifest = store.manifest
        usage, done = manifest.usage, manifest.summary or {}
        # training stages commit no rows: show what they trained on (examples, pairs, rollouts)
        trained = next((done[k] for k in ("rows", "examples", "n_train", "rollouts") if k in done), 0)
        stages[name] = {
            "status": manifest.status,
            "rows": manifest.rows or trained,
            "seconds": round(manifest.elapsed_s, 1),
            "attempts": manifest.attempts,
            "prompt_tokens": usage.get("prompt_tokens", 0),
            "generated_tokens": usage.get("completion_tokens", 0) or done.get("generated_tokens", 0),
            "scored_tokens": usage.get("scored_tokens", 0),
            "config_hash": manifest.config_hash,
            "upstream": manifest.upstream,
            "path": str(store.path),
        }
    return stages


def _complete(ctx: StageContext, name: str):
    """This config's store of a stage it uses, if that stage has finished (else None: 'not run')."""
    if not ctx.uses(name):
        return None
    store = ctx.store(name)
    return store if store.is_complete else None


def write_run_report(ctx: StageContext, path: Path | None = None) -> Path:
    """The report of everything this config has produced so far."""
    from cai.audit import load_audit, load_gate, summarize
    from cai.report import write_report
    from cai.stages.evaluation import read_metrics

    label = _complete(ctx, "label")
    audit = summarize(load_audit(label.path), *load_gate(label.path)) if label is not None else None
    ppo = _complete(ctx, "ppo")
    evaluation = _complete(ctx, "eval")
    pm = _complete(ctx, "pm")
    sl = _complete(ctx, "sl")
    target = path or ctx.run_dir / "report.html"
    write_report(
        target,
        audit=audit,
        ppo_history=ppo.manifest.summary.get("history") if ppo is not None else None,
        eval_rows=read_metrics(evaluation.path) if evaluation is not None else None,
        pm_metrics={k: v for k, v in pm.manifest.summary.items() if not isinstance(v, list)} if pm else None,
        summary=run_summary(ctx),
        title=f"cai run {ctx.run_dir.name}",
        constitution=ctx.constitution,
        sl_verify=(sl.manifest.summary or {}).get("verify") if sl is not None else None,
    )
    return target


def run_report(ctx: StageContext, fresh: bool = False, path: Path | None = None) -> Path:
    report = write_run_report(ctx, path)
    ctx.console.print(f"[bold green]report:[/] {report}", highlight=False)
    return report


STAGE = Stage(
    name=NAME,
    command="cai report",
    help="Write the self-contained HTML report of a run (audit plots, PPO curves, eval results).",
    reads=("sl", "label", "pm", "ppo", "eval"),
    key=None,
    run=run_report,
)
