"""Stage `eval`: compare this config's policies with the judge.

    cai eval --config configs/quickstart.yaml

The policies compared are the base model and those this recipe trains (the policy stages in
`stages:`, each read by its own key), unless `eval.policies` names them. Each policy's answers
are committed as soon as they exist, so a killed evaluation resumes without regenerating them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from cai.atomic import atomic_write_jsonl
from cai.chats import COMPARE_ANSWER_TEMPLATE
from cai.classifier import flag_rate_rows, open_classifier
from cai.constitution import load_constitution
from cai.eval_judges import RATE_HARM_TEMPLATE, eval_settings
from cai.evaluate import EvalConfig
from cai.records import MetricRow
from cai.stages.base import Stage, Timer, open_or_skip
from cai.stages.parallel import DataParallel
from cai.store import StageStore

if TYPE_CHECKING:
    from cai.backends.base import Backend
    from cai.judge import LabelConfig
    from cai.sections import EngineConfig
    from cai.stages.context import StageContext

NAME = "eval"


def eval_policies(ctx: StageContext) -> tuple[dict[str, str], dict[str, str]]:
    """Policy name -> model, and the upstream hashes they came from (this config's only)."""
    cfg = ctx.config.eval
    if cfg.policies:
        return dict(cfg.policies), {}
    policies, upstream = {"base": ctx.config.model}, {}
    for stage in ctx.policies():
        policies[stage], up = ctx.model_of(stage)
        upstream.update(up)
    return policies, upstream


def judge_settings(ctx: StageContext) -> LabelConfig:
    """The label settings eval judges with: label's, in the mode `eval.judge` picks."""
    cfg = ctx.config.eval
    return eval_settings(ctx.config.label, cfg.judge, cfg.harm_principles)


def eval_judge(ctx: StageContext) -> tuple[str, EngineConfig | None]:
    """The eval judge's model and engine (None: the run's engine).

    A classifier judge is label.classifier's model. A language-model judge is `eval.judge_model`,
    else the label stage's judge (`label.judge_model` on `label.judge_engine`, else the run's
    model): by default a run's figures come from the judge its gate measured.
    """
    cfg, label, model = ctx.config.eval, ctx.config.label, ctx.config.model
    settings = judge_settings(ctx)
    if settings.judge == "classifier":
        assert settings.classifier is not None  # eval_settings refuses a classifier mode without one
        return settings.classifier.model, None
    if cfg.judge_model is None:
        return label.judge_model or model, label.judge_engine
    return cfg.judge_model, None


def open_eval_judge(ctx: StageContext) -> Backend:
    """The judge eval reads: a Backend, or a ClassifierScorer under a classifier mode."""
    settings = judge_settings(ctx)
    if settings.judge == "classifier":
        return open_classifier(ctx, settings.classifier, "label.classifier")  # type: ignore[return-value]
    return ctx.backend(*eval_judge(ctx))


def key(ctx: StageContext) -> StageStore:
    cfg = ctx.config.eval
    policies, upstream = eval_policies(ctx)
    if ctx.uses("pm"):
        upstream["pm"] = ctx.store("pm").config_hash
    settings = judge_settings(ctx)
    judge_model, judge_engine = eval_judge(ctx)
    read = settings.template_names()
    read += [COMPARE_ANSWER_TEMPLATE, RATE_HARM_TEMPLATE] if settings.judge == "choice" else []
    return StageStore(
        ctx.run_dir,
        NAME,
        {
            "eval": cfg.model_dump(mode="json"),
            "policies": policies,
            "judge_model": judge_model,
            "engine": ctx.config.engine.model_dump(mode="json"),
            "judge_engine": None if judge_engine is None else judge_engine.model_dump(mode="json"),
            # eval judges and counts verdicts as labelling does, in the mode eval.judge picks
            # (judge_settings names it): every text and setting it reads
            "judge": settings.judge_settings(),
            "templates": ctx.builder.template_hashes(sorted(set(read))),
            "constitutions": {
                name: load_constitution(name).stage_hash("compare", judge_settings(ctx).judge)
                for name in (cfg.helpful_constitution, cfg.harm_constitution)
            },
        },
        upstream=upstream,
    )


def run_eval(ctx: StageContext, fresh: bool = False) -> StageStore:
    from cai.evaluate import evaluate_policies, generate_answers, load_eval_prompts, pm_accuracy_rows

    cfg = ctx.config.eval
    store, done = open_or_skip(ctx, NAME, fresh)
    if done:
        print_metrics(ctx, read_metrics(store.path))
        return store
    policies, upstream = eval_policies(ctx)
    for stage in upstream:
        ctx.upstream(stage)  # every policy of this recipe must exist
    pm = ctx.upstream("pm") if ctx.uses("pm") else None
    judge_model, _ = eval_judge(ctx)
    prompts = {
        "red_team": load_eval_prompts(cfg.red_team, cfg.limit),
        "helpful": load_eval_prompts(cfg.helpful, cfg.limit),
    }
    # loaded first: a label index the classifier lacks fails before any answer is generated
    scorer = open_classifier(ctx, cfg.classifier, "eval.classifier") if cfg.classifier else None
    judge = open_eval_judge(ctx) if judge_settings(ctx).judge == "classifier" else None
    timer = Timer()
    part = DataParallel(ctx, store)  # under a launch each rank answers for its share of the policies
    with part:
        todo = part.pending_chunks(list(policies), lambda name: f"answers:{name}", 1, "policies")
        with ctx.progress("eval: policy answers", len(policies)) as advance:
            advance(len(policies) - len(todo))
            for _, (name,) in todo:
                backend = ctx.backend(policies[name])
                before = backend.usage.model_copy()
                answers = {
                    split: generate_answers(backend, items, cfg.sampling) for split, items in prompts.items()
                }
                row = {"row_id": f"answers:{name}", "policy": name, "model": policies[name]}
                part.commit([{**row, "answers": answers}], usage=backend.usage.minus(before))
                ctx.model_calls += 1
                if policies[name] != judge_model:
                    ctx.release(policies[name])
                advance()
        if part.gather():  # rank 0 judges every policy's answers, in the config's policy order
            by_policy = {row["policy"]: row["answers"] for row in store.rows()}
            answers_of: dict[str, dict[str, list[str | None]]] = {name: by_policy[name] for name in policies}
            judge = judge or open_eval_judge(ctx)
            before = judge.usage.model_copy()
            rows = evaluate_policies(answers_of, judge, cfg, prompts, ctx.templates, ctx.config.label)
            ctx.model_calls += 1
            usage = judge.usage.minus(before)
            if scorer is not None:
                before = scorer.usage.model_copy()
                rows += flag_rate_rows(scorer, answers_of, prompts, cfg.bootstrap, cfg.seed)
                usage = usage.plus(scorer.usage.minus(before))
            if pm is not None:
                rows += pm_accuracy_rows(pm.manifest.summary, cfg.bootstrap, cfg.seed)
            store.commit([], usage=usage)
            store.finalize(
                outputs={"metrics.jsonl": lambda path: atomic_write_jsonl(path, rows)},
                summary={
                    "metrics": len(rows),
                    "policies": list(policies),
                    "seconds": round(timer.seconds, 1),
                    **part.summary(),
                },
            )
    if not part.main:
        return store
    print_metrics(ctx, rows)
    ctx.console.print(
        f"[green]✓[/] eval: {len(rows)} figures for {', '.join(policies)} -> {store.path}", highlight=False
    )
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
    for column in ("metric", "policy", "value", "95% CI", "n", "no verdict"):
        table.add_column(
            column,
            justify="right" if column in {"value", "n", "no verdict"} else "left",
            no_wrap=column == "metric",
        )

    def fmt(value: float) -> str:  # Elo ratings are whole points; rates keep 3 figures
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"

    for row in rows:
        ci = "" if row.ci_low is None else f"[{fmt(row.ci_low)}, {fmt(row.ci_high)}]"
        no_verdict = "" if row.no_verdict is None else str(row.no_verdict)
        table.add_row(row.metric, row.policy, fmt(row.value), ci, str(row.n), no_verdict)
    ctx.console.print(table)
    notes = sorted({f"{row.metric}: {row.note}" for row in rows if row.note and "dropped" in row.note})
    for note in notes:
        ctx.console.print(f"[yellow]note[/] {note}", highlight=False)
    judged = [row for row in rows if row.no_verdict is not None]
    if judged and all(row.no_verdict == row.n for row in judged):
        ctx.console.print(
            "[bold yellow]note[/] the judge gave no verdict on any evaluated item: these figures carry "
            "no measurable signal (see the judge gate of the label stage)",
            highlight=False,
        )


STAGE = Stage(
    name=NAME,
    command="cai eval",
    help="Compare the run's policies: harmless rate, helpful win rate vs base, refusals, Elo, PM accuracy "
    "(and a classifier's flag rate with eval.classifier).",
    reads=("sft", "ppo", "dpo", "rloo", "pm"),
    key=key,
    run=run_eval,
    config=EvalConfig,
    about="Policy comparison with the judge.",
)
