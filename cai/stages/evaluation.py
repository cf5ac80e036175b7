"""Stages `eval` and `report`: compare the run's policies with the judge; write the HTML report.

    cai eval --config configs/quickstart.yaml
    cai report runs/quickstart

The policies compared are those this run produced (base, sft, ppo, dpo, rloo: whichever stages
are complete), unless `eval.policies` names them. Each policy's answers are committed as soon as
they exist, so a killed evaluation resumes without regenerating them.
"""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from cai.records import MetricRow
from cai.stages.base import StageContext, Timer, skip_message
from cai.stages.ppo import stage_model
from cai.store import StageStore, atomic_write_jsonl

POLICY_STAGES = ("sft", "ppo", "dpo", "rloo")


def eval_policies(ctx: StageContext) -> tuple[dict[str, str], dict[str, str]]:
    """Policy name -> model, and the upstream hashes they came from."""
    cfg = ctx.config.eval
    if cfg.policies:
        return dict(cfg.policies), {}
    policies, upstream = {"base": ctx.config.model}, {}
    for stage in POLICY_STAGES:
        store = ctx.upstream_or_none(stage)
        if store is not None:
            policies[stage] = stage_model(store)
            upstream[stage] = store.config_hash
    return policies, upstream


def run_eval(ctx: StageContext, fresh: bool = False) -> StageStore:
    from cai.evaluate import evaluate_policies, generate_answers, load_eval_prompts, pm_accuracy_rows

    cfg = ctx.config.eval
    policies, upstream = eval_policies(ctx)
    pm = ctx.upstream_or_none("pm")
    if pm is not None:
        upstream["pm"] = pm.config_hash
    judge_model = cfg.judge_model or ctx.config.model
    store = StageStore(
        ctx.run_dir,
        "eval",
        {
            "eval": cfg.model_dump(mode="json"),
            "policies": policies,
            "judge_model": judge_model,
            "engine": ctx.config.engine.model_dump(mode="json"),
        },
        upstream=upstream,
    )
    if fresh:
        store.discard()
    if store.is_complete:
        skip_message(ctx, store)
        print_metrics(ctx, read_metrics(store.path))
        return store
    prompts = {
        "red_team": load_eval_prompts(cfg.red_team, cfg.limit),
        "helpful": load_eval_prompts(cfg.helpful, cfg.limit),
    }
    timer = Timer()
    with store:
        done = {row["row_id"]: row for row in store.rows()}
        answers: dict[str, dict[str, list[str | None]]] = {
            row["policy"]: row["answers"] for row in done.values()
        }
        todo = [name for name in policies if f"answers:{name}" not in done]
        with ctx.progress("eval: policy answers", len(policies)) as advance:
            advance(len(policies) - len(todo))
            for name in todo:
                backend = ctx.backend(policies[name])
                before = backend.usage.model_copy()
                answers[name] = {
                    split: generate_answers(backend, items, cfg.sampling) for split, items in prompts.items()
                }
                store.commit(
                    [
                        {
                            "row_id": f"answers:{name}",
                            "policy": name,
                            "model": policies[name],
                            "answers": answers[name],
                        }
                    ],
                    usage=backend.usage.minus(before),
                )
                ctx.model_calls += 1
                if policies[name] != judge_model:
                    ctx.release(policies[name])
                advance()
        judge = ctx.backend(judge_model, None)
        before = judge.usage.model_copy()
        rows = evaluate_policies(answers, judge, cfg, prompts, ctx.templates)
        ctx.model_calls += 1
        if pm is not None:
            rows += pm_accuracy_rows(pm.manifest.summary, cfg.bootstrap, cfg.seed)
        store.commit([], usage=judge.usage.minus(before))
        store.finalize(
            outputs={"metrics.jsonl": lambda path: atomic_write_jsonl(path, rows)},
            summary={"metrics": len(rows), "policies": list(policies), "seconds": round(timer.seconds, 1)},
        )
    print_metrics(ctx, rows)
    ctx.console.print(f"[green]✓[/] eval: {len(rows)} figures for {', '.join(policies)} -> {store.path}")
    return store


def read_metrics(path: Path) -> list[MetricRow]:
    file = path / "metrics.jsonl"
    return (
        [MetricRow.model_validate_json(line) for line in file.read_text().splitlines()]
        if file.exists()
        else []
    )


def print_metrics(ctx: StageContext, rows: list[MetricRow]) -> None:
    table = Table(title="evaluation (95% bootstrap intervals)")
    for column in ("metric", "policy", "value", "95% CI", "n"):
        table.add_column(
            column, justify="right" if column in {"value", "n"} else "left", no_wrap=column == "metric"
        )
    for row in rows:
        ci = "" if row.ci_low is None else f"[{row.ci_low:.3g}, {row.ci_high:.3g}]"
        table.add_row(row.metric, row.policy, f"{row.value:.3g}", ci, str(row.n))
    ctx.console.print(table)
    notes = sorted({f"{row.metric}: {row.note}" for row in rows if row.note and "dropped" in row.note})
    for note in notes:
        ctx.console.print(f"[yellow]note[/] {note}", highlight=False)


# --------------------------------------------------------------------------- report


def run_summary(run_dir: Path) -> dict:
    """Per stage: status, rows, time and tokens, from the manifests of the latest outputs."""
    from cai.store import latest

    stages = {}
    for stage in ("sl", "sft", "label", "mix", "pm", "ppo", "dpo", "rloo", "eval"):
        store = latest(run_dir, stage)
        if store is None:
            continue
        try:
            manifest = store.manifest
        except Exception:  # noqa: BLE001 - a half-created folder is reported, not fatal
            continue
        usage, done = manifest.usage, manifest.summary or {}
        # training stages commit no rows: show what they trained on (examples, pairs, rollouts)
        trained = next((done[k] for k in ("rows", "examples", "n_train", "rollouts") if k in done), 0)
        stages[stage] = {
            "status": manifest.status,
            "rows": manifest.rows or trained,
            "seconds": round(manifest.elapsed_s, 1),
            "attempts": manifest.attempts,
            "prompt_tokens": usage.get("prompt_tokens", 0),
            "generated_tokens": usage.get("completion_tokens", 0) or done.get("generated_tokens", 0),
            "scored_tokens": usage.get("scored_tokens", 0),
            "config_hash": manifest.config_hash[:12],
            "path": str(store.path),
        }
    return stages


def write_run_report(ctx: StageContext, path: Path | None = None) -> Path:
    """The self-contained HTML report of everything this run has produced so far."""
    from cai.audit import load_audit
    from cai.report import write_report

    run_dir = ctx.run_dir
    audit = None
    if ctx.upstream_or_none("label") is not None:
        audit = load_audit(run_dir)
    ppo = ctx.upstream_or_none("ppo")
    history = ppo.manifest.summary.get("history") if ppo is not None else None
    evaluation = ctx.upstream_or_none("eval")
    pm = ctx.upstream_or_none("pm")
    target = path or run_dir / "report.html"
    write_report(
        target,
        audit=audit,
        ppo_history=history,
        eval_rows=read_metrics(evaluation.path) if evaluation is not None else None,
        pm_metrics={k: v for k, v in pm.manifest.summary.items() if not isinstance(v, list)} if pm else None,
        summary=run_summary(run_dir),
        title=f"cai run {run_dir.name}",
        constitution=ctx.constitution,
    )
    return target
