"""Training stages: `sft`, `mix`, `pm`, `dpo`, `rloo` — thin wrappers that find their inputs.

Each stage locates the outputs of the stages it builds on in the run directory, keys its own
folder by its config and those upstream hashes, and skips itself when that folder is complete.
The training itself lives in `cai/train/`.
"""

from __future__ import annotations

import json

from cai.records import PreferenceRow
from cai.stages.base import StageContext, Timer, skip_message, writer
from cai.store import StageStore


def _seed(ctx: StageContext, section) -> int:
    train = getattr(section, "train", None)
    return train.seed if train is not None and train.seed is not None else ctx.config.seed


def _model_from(ctx: StageContext, stage: str) -> tuple[str, dict[str, str]]:
    """The model a stage produced in this run, or the run's base model when it has not run."""
    from cai.stages.ppo import stage_model

    store = ctx.upstream_or_none(stage)
    if store is None:
        return ctx.config.model, {}
    return stage_model(store), {stage: store.config_hash}


def _finish(ctx: StageContext, store: StageStore, opened: StageStore | None, summary: dict, what: str) -> StageStore:
    if opened is not None:  # the main process records the result; other ranks only trained
        import os

        opened.finalize(summary={**summary, "world_size": int(os.environ.get("WORLD_SIZE", "1"))})
        ctx.console.print(f"[green]✓[/] {store.stage}: {what} -> {store.path}")
    return store


# --------------------------------------------------------------------------- sft


def run_sft(ctx: StageContext, fresh: bool = False) -> StageStore:
    from cai.train.sft import train_sft

    cfg = ctx.config.sft
    sl = ctx.upstream("sl")
    base = cfg.model or ctx.config.model
    store = StageStore(
        ctx.run_dir, "sft", {"sft": cfg.model_dump(mode="json"), "base": base, "seed": ctx.config.seed},
        upstream={"sl": sl.config_hash},
    )
    if fresh:
        store.discard()
    if store.is_complete:
        skip_message(ctx, store)
        return store
    examples = [json.loads(line)["messages"] for line in (sl.path / "sft.jsonl").read_text().splitlines()]
    if not examples:
        raise ValueError(f"{sl.path / 'sft.jsonl'} has no examples: every SL row failed")
    ctx.release()  # free inference copies before training
    timer = Timer()
    with writer(store) as opened:
        result = train_sft(cfg, base, examples, store.path, _seed(ctx, cfg), ctx.console)
        ctx.model_calls += 1
        summary = {**result.model_dump(mode="json"), "seconds": round(timer.seconds, 1)}
        return _finish(ctx, store, opened, summary, f"{result.steps} steps on {len(examples)} revisions")


# --------------------------------------------------------------------------- mix


def run_mix(ctx: StageContext, fresh: bool = False) -> StageStore:
    from cai.export import write_parquet
    from cai.mix import load_preferences, mix, read_preferences
    from cai.store import atomic_write_jsonl

    cfg = ctx.config.mix
    label = ctx.upstream("label")
    store = StageStore(
        ctx.run_dir, "mix", {"mix": cfg.model_dump(mode="json"), "seed": ctx.config.seed},
        upstream={"label": label.config_hash},
    )
    if fresh:
        store.discard()
    if store.is_complete:
        skip_message(ctx, store)
        return store
    ai = read_preferences(label.path / "preferences.jsonl")
    groups: dict[str, list[PreferenceRow]] = {"ai-harmless": ai}
    reports = []
    for source in cfg.human:
        rows, report = load_preferences(source)
        reports.append(report.model_dump(mode="json"))
        groups.setdefault(source.source, []).extend(rows)
        if report.malformed:
            ctx.console.print(
                f"[yellow]{report.path}: {report.malformed} malformed pairs skipped[/] "
                f"(first: {report.problems[0] if report.problems else '?'})"
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
    ctx.console.print(f"[green]✓[/] mix: {len(mixed)} rows {counts} -> {store.path}")
    return store


def mixed_rows(ctx: StageContext) -> tuple[list[PreferenceRow], StageStore]:
    from cai.mix import read_preferences

    store = ctx.upstream("mix")
    return read_preferences(store.path / "preferences.jsonl"), store


# --------------------------------------------------------------------------- pm


def run_pm(ctx: StageContext, fresh: bool = False) -> StageStore:
    from cai.train.reward import split_by_prompt, train_preference_model

    cfg = ctx.config.pm
    rows, mixed = mixed_rows(ctx)
    base, upstream = (cfg.model, {}) if cfg.model else _model_from(ctx, "sft")
    store = StageStore(
        ctx.run_dir, "pm", {"pm": cfg.model_dump(mode="json"), "base": base, "seed": ctx.config.seed},
        upstream={"mix": mixed.config_hash, **upstream},
    )
    if fresh:
        store.discard()
    if store.is_complete:
        skip_message(ctx, store)
        return store
    seed = _seed(ctx, cfg)
    train, held_out = split_by_prompt(rows, cfg.eval_fraction, seed)
    ctx.release()
    timer = Timer()
    with writer(store) as opened:
        report = train_preference_model(cfg, base, train, held_out, store.path, seed, ctx.console)
        ctx.model_calls += 1
        summary = {**report.model_dump(mode="json"), "seconds": round(timer.seconds, 1)}
        by_source = ", ".join(f"{k} {v:.2f}" for k, v in report.accuracy_by_source.items())
        return _finish(ctx, store, opened, summary, f"held-out accuracy {report.accuracy:.3f} ({by_source})")


# --------------------------------------------------------------------------- dpo / rloo


def run_dpo(ctx: StageContext, fresh: bool = False) -> StageStore:
    from cai.train.dpo import train_dpo

    cfg = ctx.config.dpo
    rows, mixed = mixed_rows(ctx)
    base, upstream = (cfg.model, {}) if cfg.model else _model_from(ctx, "sft")
    store = StageStore(
        ctx.run_dir, "dpo", {"dpo": cfg.model_dump(mode="json"), "base": base, "seed": ctx.config.seed},
        upstream={"mix": mixed.config_hash, **upstream},
    )
    if fresh:
        store.discard()
    if store.is_complete:
        skip_message(ctx, store)
        return store
    ctx.release()
    timer = Timer()
    with writer(store) as opened:
        result = train_dpo(cfg, base, rows, store.path, _seed(ctx, cfg), ctx.console)
        ctx.model_calls += 1
        summary = {**result.model_dump(mode="json"), "seconds": round(timer.seconds, 1)}
        return _finish(ctx, store, opened, summary, f"{result.steps} DPO steps")


def run_rloo(ctx: StageContext, fresh: bool = False) -> StageStore:
    from cai.sources import load_prompts
    from cai.stages.ppo import stage_model
    from cai.train.rloo import train_rloo

    cfg = ctx.config.rloo
    pm = ctx.upstream("pm")
    policy, upstream = (cfg.model, {}) if cfg.model else _model_from(ctx, "sft")
    store = StageStore(
        ctx.run_dir, "rloo", {"rloo": cfg.model_dump(mode="json"), "policy": policy, "seed": ctx.config.seed},
        upstream={"pm": pm.config_hash, **upstream},
    )
    if fresh:
        store.discard()
    if store.is_complete:
        skip_message(ctx, store)
        return store
    prompts = [item.prompt for item in load_prompts(ctx.config.label.prompts)]
    ctx.release()
    timer = Timer()
    with writer(store) as opened:
        result = train_rloo(cfg, policy, stage_model(pm), prompts, store.path, _seed(ctx, cfg), ctx.console)
        ctx.model_calls += 1
        summary = {**result.model_dump(mode="json"), "seconds": round(timer.seconds, 1)}
        return _finish(ctx, store, opened, summary, f"{result.steps} RLOO steps")
