"""The shared shape of the training stages (sft, pm, ppo, dpo, rloo): key, skip if done, train.

Each training stage's folder is keyed by its config section, the model it starts from, the run
seed and the keys of the stages it reads; the training itself lives in `cai/train/`. Under
`accelerate launch` every rank trains and rank 0 alone opens and finalizes the folder.
`training_stage_def` builds a training stage's `Stage` from the two things that differ between
them: where it starts and what it trains, so a training stage module holds only those.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cai.stages.base import Stage, Timer, open_or_skip, writer
from cai.store import StageStore

if TYPE_CHECKING:
    from cai.stages.context import StageContext


StartFn = Callable[["StageContext", bool], tuple[str, dict[str, str]]]
TrainFn = Callable[["StageContext", Any, Path, int], tuple[dict, str]]


def training_key(
    ctx: StageContext, name: str, section: Any, model: str, upstream: dict[str, str]
) -> StageStore:
    return StageStore(
        ctx.run_dir,
        name,
        {name: section.model_dump(mode="json"), "model": model, "seed": ctx.config.seed},
        upstream=upstream,
    )


def _seed(ctx: StageContext, section: Any) -> int:
    train = getattr(section, "train", None)
    return train.seed if train is not None and train.seed is not None else ctx.config.seed


def training_stage(
    ctx: StageContext,
    name: str,
    section: Any,
    fresh: bool,
    train: Callable[[Path, int], tuple[dict, str]],
) -> StageStore:
    """Skip if this config's folder is complete; else free engines, train, record.

    `train(output_dir, seed)` returns the summary to store and a one-line description.
    """
    store, done = open_or_skip(ctx, name, fresh)
    if done:
        return store
    ctx.release()  # free inference copies before training
    timer = Timer()
    with writer(store) as opened:
        summary, what = train(store.path, _seed(ctx, section))
        ctx.model_calls += 1
        if opened is not None:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            opened.finalize(summary={**summary, "seconds": round(timer.seconds, 1), "world_size": world})
            ctx.console.print(f"[green]✓[/] {name}: {what} -> {store.path}", highlight=False)
    return store


def training_stage_def(
    name: str,
    *,
    config: type[Any],
    reads: tuple[str, ...],
    train: TrainFn,
    help: str,
    about: str,
    start: StartFn | None = None,
    model_dir: str = "model",
    policy: bool = False,
    default: bool = True,
) -> Stage:
    """A training stage run as `cai train NAME`, configured by the run config's `NAME` section.

    `start(ctx, complete)` gives the model the stage starts from and the keys of the stages it
    reads; by default the section's `model`, else this recipe's SFT model, plus the keys of every
    other stage in `reads`. `train(ctx, section, output_dir, seed)` trains and returns the summary
    to store and a one-line description.
    """

    def default_start(ctx: StageContext, complete: bool) -> tuple[str, dict[str, str]]:
        model, upstream = ctx.starting_model(getattr(ctx.config, name).model, complete)
        return model, {**{r: ctx.store(r).config_hash for r in reads if r != "sft"}, **upstream}

    begin = start or default_start

    def key(ctx: StageContext) -> StageStore:
        model, upstream = begin(ctx, False)
        return training_key(ctx, name, getattr(ctx.config, name), model, upstream)

    def run(ctx: StageContext, fresh: bool = False) -> StageStore:
        section = getattr(ctx.config, name)
        return training_stage(
            ctx, name, section, fresh, lambda output, seed: train(ctx, section, output, seed)
        )

    return Stage(
        name=name,
        command=f"cai train {name}",
        help=help,
        reads=reads,
        key=key,
        run=run,
        config=config,
        about=about,
        default=default,
        model_dir=model_dir,
        policy=policy,
    )
