"""What every stage shares: how a stage is declared, and the small helpers stages use.

A stage is one module that declares a `Stage`: its name, the command that runs it, the stages
it reads, its key function and its run function. The key function computes the stage's
`StageStore` (its folder, keyed by its config and the keys of the stages it reads) from the run
config alone, without running anything: so each stage reads exactly the upstream outputs of
*its own config*, never "the most recent ones", and a stage whose store is complete returns at
once without loading a model. `cai.stages.registry` lists the stages in pipeline order;
`cai.stages.context.StageContext` is the state one command carries through them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel

from cai.backends.base import Backend, Usage
from cai.store import StageStore

if TYPE_CHECKING:
    from cai.stages.context import StageContext


T = TypeVar("T")


class StageMissingError(RuntimeError):
    """A stage needs the output of another one that has not run (or not finished) for this config."""


@dataclass(frozen=True)
class Stage:
    """One stage of the recipe, as the pipeline, the CLI, eval and the report see it.

    `key(ctx)` returns the stage's store for the context's config (computed, never looked up);
    `run(ctx, fresh)` produces it. `config` is the stage's section of the run config (under the
    stage's name, described by `about`); `default` stages are in the default recipe. `model_dir`
    names the sub-folder of a training stage's output that holds its model; `policy` stages are
    compared by `cai eval` against the base model.
    """

    name: str
    command: str
    help: str
    reads: tuple[str, ...]
    key: Callable[[StageContext], StageStore] | None
    run: Callable[..., object]
    config: type[BaseModel] | None = None
    about: str = ""
    default: bool = True
    model_dir: str | None = None
    policy: bool = False


def usage_since(backend: Backend, before: Usage) -> Usage:
    return backend.usage.minus(before)


def open_or_skip(ctx: StageContext, name: str, fresh: bool) -> tuple[StageStore, bool]:
    """This config's store for stage `name` (discarded first under --fresh), and whether it is
    already complete, in which case the skip is announced and the caller returns the store as is."""
    store = ctx.store(name)
    if fresh and is_main_process():  # under a launch rank 0 alone discards; the others find it gone
        store.discard()
    if fresh:
        return store, False
    if not store.is_complete:
        return store, False
    ctx.skipped.add(store.stage)
    manifest = store.manifest
    ctx.console.print(
        f"[green]✓[/] {store.stage}: complete for this config ({manifest.rows} rows, "
        f"{store.config_hash[:12]}), skipped -> {store.path}",
        highlight=False,
    )
    return store, True


def pending_chunks(
    ctx: StageContext,
    store: StageStore,
    rows: Sequence[T],
    row_id: Callable[[T], str],
    size: int,
    what: str,
    done: set[str] | None = None,
    announce: bool = True,
) -> list[tuple[int, list[T]]]:
    """The chunks of `rows` (numbered as in a fresh run) still to do in this open store.

    Chunk numbers never change on resume, so per-chunk seeds and keys stay those of a run that
    was never interrupted; rows already committed (`done`, else the store's) are left out and a
    resume says what it found (when `announce`).
    """
    if store.repair and announce:
        ctx.console.print(f"[yellow]resuming {store.stage}: {store.repair}[/]")
    done = store.committed() if done is None else done
    chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
    todo = [(n, [r for r in chunk if row_id(r) not in done]) for n, chunk in enumerate(chunks)]
    if done and announce:
        ctx.console.print(f"resuming {store.stage}: {len(done)} of {len(rows)} {what} already committed")
    return [(n, chunk) for n, chunk in todo if chunk]


def is_main_process() -> bool:
    """Under `accelerate launch` every rank runs the stage; only rank 0 writes the stage folder."""
    return int(os.environ.get("RANK", "0")) == 0


@contextmanager
def writer(store: StageStore) -> Iterator[StageStore | None]:
    """Open the store on the main process only; other ranks train without touching it."""
    if not is_main_process():
        store.path.mkdir(parents=True, exist_ok=True)
        yield None
        return
    with store:
        yield store


class Timer:
    def __init__(self) -> None:
        self.started = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started
