"""What every stage shares: the run config, the console, loaded engines, upstream outputs.

A stage is a function `run(ctx) -> StageStore` that reads its config section, finds the outputs
of the stages it depends on, and writes through a `StageStore` keyed by its config hash and
those upstream hashes. A stage whose store is already complete returns at once, without loading
a model: re-running `cai run` with the same config makes no model calls, and changing a
principle re-runs exactly the stages whose inputs changed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cai.backends.base import Backend, Usage
from cai.store import StageStore, latest


class StageMissingError(RuntimeError):
    """A stage needs the output of another one that has not run (or not finished)."""


STAGE_COMMANDS = {
    "sl": "cai generate sl",
    "sft": "cai train sft",
    "label": "cai label",
    "mix": "cai mix",
    "pm": "cai train pm",
    "ppo": "cai train ppo",
    "dpo": "cai train dpo",
    "rloo": "cai train rloo",
    "eval": "cai eval",
}


class StageContext:
    """Shared state of one command: config, console, engines (loaded once), upstream lookups."""

    def __init__(self, config: Any, console: Console | None = None) -> None:
        self.config = config
        self.console = console or Console()
        self._backends: dict[str, Backend] = {}
        self.model_calls = 0
        self.skipped: set[str] = set()

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)

    @cached_property
    def constitution(self):
        from cai.constitution import load_constitution

        return load_constitution(self.config.constitution)

    @cached_property
    def templates(self):
        from cai.prompts import Templates

        return Templates(self.config.templates.folder)

    @cached_property
    def builder(self):
        from cai.chats import ChatBuilder

        return ChatBuilder(self.templates, self.constitution)

    def backend(self, model: str, engine: Any = None) -> Backend:
        """An engine for `model`, created on first use and reused by later stages of the run."""
        from cai.backends import make_backend

        engine = engine or self.config.engine
        key = f"{model}|{engine.model_dump_json()}"
        if key not in self._backends:
            self.console.print(f"[dim]loading {model} ({engine.kind})[/]")
            self._backends[key] = make_backend(engine, model)
        return self._backends[key]

    def release(self, model: str | None = None) -> None:
        """Drop loaded engines (all, or those of one model) to free memory before training."""
        for key in list(self._backends):
            if model is None or key.startswith(f"{model}|"):
                self._backends.pop(key).close()

    def upstream(self, stage: str) -> StageStore:
        """The latest complete output of `stage` in this run directory."""
        store = latest(self.run_dir, stage)
        if store is None or not store.is_complete:
            raise StageMissingError(
                f"stage {stage!r} has no complete output in {self.run_dir}; "
                f"run `{STAGE_COMMANDS.get(stage, stage)}` "
                f"with the same config first (or `cai run`)"
            )
        return store

    def upstream_or_none(self, stage: str) -> StageStore | None:
        try:
            return self.upstream(stage)
        except StageMissingError:
            return None

    @contextmanager
    def progress(self, description: str, total: int) -> Iterator[Any]:
        """A rich progress bar with count, rate-derived ETA and elapsed time."""
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=self.console, transient=False) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)

    def close(self) -> None:
        self.release()


def usage_since(backend: Backend, before: Usage) -> Usage:
    return backend.usage.minus(before)


def skip_message(ctx: StageContext, store: StageStore) -> None:
    ctx.skipped.add(store.stage)
    manifest = store.manifest
    ctx.console.print(
        f"[green]✓[/] {store.stage}: complete for this config ({manifest.rows} rows, "
        f"{store.config_hash[:12]}), skipped -> {store.path}"
    )


def is_main_process() -> bool:
    """Under `accelerate launch` every rank runs the stage; only rank 0 writes the stage folder."""
    import os

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
