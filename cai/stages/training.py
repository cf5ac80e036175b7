"""Training stages: `sft`, `mix`, `pm`, `dpo`, `rloo` — thin wrappers that find their inputs.

Each stage locates the outputs of the stages it builds on in the run directory, keys its own
folder by its config and those upstream hashes, and skips itself when that folder is complete.
The training itself lives in `cai/train/`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

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


def training_stage(
    ctx: StageContext,
    name: str,
    section,
    model: str,
    upstream: dict[str, str],
    fresh: bool,
    train: Callable[[Path, int], tuple[dict, str]],
) -> StageStore:
    """The shared shape of every training stage: key, skip if done, free engines, train, record.

    `train(output_dir, seed)` returns the summary to store and a one-line description. Under
    `accelerate launch` every rank trains; only rank 0 opens and finalizes the stage folder.
    """
    store = StageStore(
        ctx.run_dir,
        name,
        {name: section.model_dump(mode="json"), "model": model, "seed": ctx.config.seed},
        upstream=upstream,
    )
    if fresh:
        store.discard()
    if store.is_complete:
        skip_message(ctx, store)
        return store
    ctx.release()  # free inference copies before training
    timer = Timer()
    with writer(store) as opened:
        summary, what = train(store.path, _seed(ctx, section))
        ctx.model_calls += 1
        if opened is not None:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            opened.finalize(summary={**summary, "seconds": round(timer.seconds, 1), "world_size": world})
            ctx.console.print(f"[green]✓[/] {name}: {what} -> {store.path}")
    return store


# --------------------------------------------------------------------------- sft


def run_sft(ctx: StageContext, fresh: bool = False) -> StageStore:
    from cai.train.sft import train_sft

    cfg = ctx.config.sft
    sl = ctx.upstream("sl")
    examples = [json.loads(line)["messages"] for line in (sl.path / "sft.jsonl").read_text().splitlines()]
    if not examples:
        raise ValueError(f"{sl.path / 'sft.jsonl'} has no examples: every SL row failed")
    base = cfg.model or ctx.config.model

    def train(output: Path, seed: int) -> tuple[dict, str]:
        result = train_sft(cfg, base, examples, output, seed, ctx.console)
        return result.model_dump(mode="json"), f"{result.steps} steps on {len(examples)} revisions"

    return training_stage(ctx, "sft", cfg, base, {"sl": sl.config_hash}, fresh, train)


# --------------------------------------------------------------------------- mix


def run_mix(ctx: StageContext, fresh: bool = False) -> StageStore:
    from cai.export import write_parquet
    from cai.mix import load_preferences, mix, read_preferences
    from cai.store import atomic_write_jsonl

    cfg = ctx.config.mix
    label = ctx.upstream("label")
    store = StageStore(
        ctx.run_dir,
        "mix",
        {"mix": cfg.model_dump(mode="json"), "seed": ctx.config.seed},
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

    def train(output: Path, seed: int) -> tuple[dict, str]:
        train_rows, held_out = split_by_prompt(rows, cfg.eval_fraction, seed)
        report = train_preference_model(cfg, base, train_rows, held_out, output, seed, ctx.console)
        by_source = ", ".join(f"{k} {v:.2f}" for k, v in report.accuracy_by_source.items())
        return report.model_dump(mode="json"), f"held-out accuracy {report.accuracy:.3f} ({by_source})"

    return training_stage(ctx, "pm", cfg, base, {"mix": mixed.config_hash, **upstream}, fresh, train)


# --------------------------------------------------------------------------- dpo / rloo


def run_dpo(ctx: StageContext, fresh: bool = False) -> StageStore:
    from cai.train.dpo import train_dpo

    cfg = ctx.config.dpo
    rows, mixed = mixed_rows(ctx)
    base, upstream = (cfg.model, {}) if cfg.model else _model_from(ctx, "sft")

    def train(output: Path, seed: int) -> tuple[dict, str]:
        result = train_dpo(cfg, base, rows, output, seed, ctx.console)
        return result.model_dump(mode="json"), f"{result.steps} DPO steps"

    return training_stage(ctx, "dpo", cfg, base, {"mix": mixed.config_hash, **upstream}, fresh, train)


def run_rloo(ctx: StageContext, fresh: bool = False) -> StageStore:
    from cai.sources import load_prompts
    from cai.stages.ppo import stage_model
    from cai.train.rloo import train_rloo

    cfg = ctx.config.rloo
    pm = ctx.upstream("pm")
    policy, upstream = (cfg.model, {}) if cfg.model else _model_from(ctx, "sft")
    prompts = [item.prompt for item in load_prompts(ctx.config.label.prompts)]

    def train(output: Path, seed: int) -> tuple[dict, str]:
        result = train_rloo(cfg, policy, stage_model(pm), prompts, output, seed, ctx.console)
        return result.model_dump(mode="json"), f"{result.steps} RLOO steps"

    return training_stage(ctx, "rloo", cfg, policy, {"pm": pm.config_hash, **upstream}, fresh, train)
