"""Stage `mix`: this config's AI harmlessness labels + human helpfulness preferences, for the PM.

cai mix --config configs/quickstart.yaml
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cai.mix import MixConfig
from cai.records import PreferenceRow
from cai.stages.base import Stage, skip_message
from cai.store import StageStore

if TYPE_CHECKING:
    from cai.stages.context import StageContext


def key(ctx: StageContext) -> StageStore:
    cfg = ctx.config.mix
    return StageStore(
        ctx.run_dir,
        "mix",
        {"mix": cfg.model_dump(mode="json"), "seed": ctx.config.seed},
        upstream={"label": ctx.store("label").config_hash},
    )


def run_mix(ctx: StageContext, fresh: bool = False) -> StageStore:
    from rich.markup import escape

    from cai.atomic import atomic_write_jsonl
    from cai.export import write_parquet
    from cai.mix import load_preferences, mix
    from cai.preferences import read_preferences

    cfg = ctx.config.mix
    store = ctx.store("mix")
    if fresh:
        store.discard()
    if store.is_complete:
        skip_message(ctx, store)
        return store
    label = ctx.upstream("label")
    ai = read_preferences(label.path / "preferences.jsonl")
    groups: dict[str, list[PreferenceRow]] = {"ai-harmless": ai}
    reports = []
    for source in cfg.human:
        rows, report = load_preferences(source)
        reports.append(report.model_dump(mode="json"))
        groups.setdefault(source.source, []).extend(rows)
        if report.malformed:
            first = report.problems[0] if report.problems else "?"
            stopped = f"; reading stopped early: {report.stopped}" if report.stopped else ""
            ctx.console.print(
                f"[yellow]{escape(report.path)}: {report.malformed} malformed pairs skipped[/] "
                f"(first: {escape(first)}){escape(stopped)}",
                highlight=False,
            )
    if not ai:
        ctx.console.print(
            "[yellow]mix: the label stage produced no AI training rows[/] (see its judge gate and "
            "no-verdict counts); the mix holds human preferences only",
            highlight=False,
        )
    mixed = mix(groups, cfg.counts, cfg.ratios, cfg.total, seed=ctx.config.seed)
    counts: dict[str, int] = {}
    for row in mixed:
        counts[row.source] = counts.get(row.source, 0) + 1
    with store:
        summary = {"rows": len(mixed), "by_source": counts, "sources": reports}
        store.finalize(
            outputs={
                "preferences.jsonl": lambda path: atomic_write_jsonl(path, mixed),
                "preferences.parquet": lambda path: write_parquet(path, mixed),
            },
            summary=summary,
        )
    ctx.console.print(f"[green]✓[/] mix: {len(mixed)} rows {counts} -> {store.path}", highlight=False)
    return store


STAGE = Stage(
    name="mix",
    command="cai mix",
    help="Mix the AI harmlessness labels with human helpfulness preferences (for the PM).",
    reads=("label",),
    key=key,
    run=run_mix,
    config=MixConfig,
    about="AI harmlessness + human helpfulness mix.",
)
