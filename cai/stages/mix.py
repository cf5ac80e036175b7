"""Stage `mix`: this config's AI harmlessness labels + human helpfulness preferences, for the PM.

cai mix --config configs/quickstart.yaml

Writes `preferences.jsonl` (what `cai train pm` / `cai train dpo` read), `preferences.parquet`
and a dataset card whose one config loads the Parquet file (`cai.export`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cai.export import dataset_card, preference_config, write_card, write_parquet
from cai.mix import MixConfig
from cai.records import PreferenceRow
from cai.stages.base import Stage, open_or_skip
from cai.store import StageStore

if TYPE_CHECKING:
    from cai.stages.context import StageContext


def key(ctx: StageContext) -> StageStore:
    cfg = ctx.config.mix
    mix_json = cfg.model_dump(mode="json")
    for source in mix_json["human"]:
        if source["rater_column"] is None:  # so runs from before raters existed keep their folders
            for name in ("rater_column", "rater_weights", "raters_rule"):
                del source[name]
    return StageStore(
        ctx.run_dir,
        "mix",
        {"mix": mix_json, "seed": ctx.config.seed},
        upstream={"label": ctx.store("label").config_hash},
    )


def run_mix(ctx: StageContext, fresh: bool = False) -> StageStore:
    from rich.markup import escape

    from cai.atomic import atomic_write_jsonl
    from cai.mix import load_source, mix
    from cai.preferences import read_preferences

    cfg = ctx.config.mix
    store, done = open_or_skip(ctx, "mix", fresh)
    if done:
        return store
    label = ctx.upstream("label")
    ai = read_preferences(label.path / "preferences.jsonl")
    groups: dict[str, list[PreferenceRow]] = {"ai-harmless": ai}
    reports = []
    for source in cfg.human:
        rows, report, raters = load_source(source)
        reports.append(report.model_dump(mode="json"))
        if raters is not None:
            reports[-1]["raters"] = raters.model_dump(mode="json")
            ctx.console.print(f"mix: {escape(report.path)}: {escape(raters.line())}", highlight=False)
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
        card = mix_card(ctx, store, label, summary)
        store.finalize(
            outputs={
                "preferences.jsonl": lambda path: atomic_write_jsonl(path, mixed),
                "preferences.parquet": lambda path: write_parquet(path, mixed, PreferenceRow),
                "README.md": lambda path: write_card(path, card),
            },
            summary=summary,
        )
    ctx.console.print(f"[green]✓[/] mix: {len(mixed)} rows {counts} -> {store.path}", highlight=False)
    return store


def mix_card(ctx: StageContext, store: StageStore, label: StageStore, summary: dict) -> str:
    """Where every row came from: the exact label stage read, each human file and its counts."""
    cfg = ctx.config.mix
    if cfg.counts is not None:
        selection = "counts " + ", ".join(f"{k}={v}" for k, v in cfg.counts.items())
    elif cfg.ratios is not None:
        selection = "ratios " + ", ".join(f"{k}={v}" for k, v in cfg.ratios.items())
        selection += f", total {cfg.total if cfg.total is not None else 'the most possible'}"
    else:
        selection = "every row of every source"
    human = [
        f"{source.source}: {source.path} ({source.format}, {report['rows']} read, "
        f"{report['malformed']} malformed{_raters_note(report)})"
        for source, report in zip(cfg.human, summary["sources"], strict=True)
    ]
    return dataset_card(
        title=f"Constitutional AI preference mix ({label.config['constitution']})",
        summary=(
            "Preference pairs for the preference model (or DPO): the AI harmlessness labels of this "
            "config's label stage mixed with human helpfulness comparisons, as in Bai et al. (2022). "
            "Rows are drawn per source (all, or by the configured counts or ratios) with a fixed seed, "
            "then shuffled; AI rows keep the `label_id` that joins that label stage's `audit` config."
        ),
        provenance={
            "label_stage": f"label/{store.upstream['label'][:12]}",
            "label_config_hash": store.upstream["label"],
            "constitution": label.config["constitution"],
            "judge_model": label.config["judge_model"],
            "human_sources": "; ".join(human) or "none",
            "selection": selection,
            "seed": ctx.config.seed,
            "config_hash": store.config_hash,
        },
        configs=[preference_config(summary["rows"], ", ".join(sorted(summary["by_source"])) or "none")],
        other_files={
            "preferences.jsonl": "the same rows as JSON lines (what `cai train pm` and `cai train dpo` read)"
        },
        counts={"rows": summary["rows"], **{f"rows from {k}": v for k, v in summary["by_source"].items()}},
    )


def _raters_note(report: dict) -> str:
    """The split of a rated source, for the card: how many ratings became how many pairs."""
    r = report.get("raters")
    if r is None:
        return ""
    return (
        f"; {r['ratings']} ratings -> {r['pairs']} pairs by {r['rule']}: {r['unanimous']} unanimous, "
        f"{r['split']} split, {r['ties_dropped']} ties dropped"
    )


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
