"""The state one command carries through its stages: config, console, engines, and stage keys.

    ctx = StageContext(load_config("quickstart"), config_source="quickstart")
    ctx.store("label")      # this config's label folder (computed from the config, not looked up)
    ctx.upstream("sft")     # the same for a stage it reads, which must be complete

Stage keys are computed, never followed through "latest" pointers: run config A, then B, then A
again, and the second A reads A's outputs everywhere. A stage the config's `stages:` list does
not name is not read (eval compares only this recipe's policies; labels come from this recipe's
SFT model only when the recipe has an SFT stage).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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

from cai.backends.base import Backend
from cai.stages.base import Stage, StageMissingError
from cai.stages.registry import STAGES
from cai.store import StageStore


class StageContext:
    """Shared state of one command: config, console, engines (loaded once), stage stores."""

    def __init__(self, config: Any, console: Console | None = None, config_source: str | None = None) -> None:
        self.config = config
        self.console = console or Console()
        self.config_source = config_source
        self._backends: dict[str, Backend] = {}
        self._stores: dict[str, StageStore] = {}
        self.model_calls = 0
        self.skipped: set[str] = set()

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)

    @cached_property
    def constitution(self):
        """The run's constitution; in a pluralistic run the first group's (what sl revises with)."""
        from cai.constitution import load_constitution

        groups = self.config.constitutions
        return load_constitution(groups[0].constitution if groups else self.config.constitution)

    @cached_property
    def groups(self) -> list:
        """The stakeholder groups of a pluralistic run (`cai.stages.label_groups.Group`); [] otherwise."""
        from cai.stages.label_groups import load_groups

        return load_groups(self)

    @cached_property
    def templates(self):
        from cai.prompts import Templates

        return Templates(self.config.templates.folder)

    @cached_property
    def builder(self):
        from cai.chats import ChatBuilder

        return ChatBuilder(self.templates, self.constitution)

    # ------------------------------------------------------------------ stages of this config

    def stage(self, name: str) -> Stage:
        return STAGES[name]

    def policies(self) -> list[str]:
        """This recipe's stages that produce a policy (what `cai eval` compares with the base model)."""
        return [name for name, stage in STAGES.items() if stage.policy and self.uses(name)]

    def uses(self, name: str) -> bool:
        """Whether this config's recipe (`stages:`) includes the stage."""
        return name in self.config.stages

    def store(self, name: str) -> StageStore:
        """The stage's folder for this config: its key is computed from the config and the keys of
        the stages it reads, so nothing depends on what ran last in the run directory."""
        if name not in self._stores:
            key = STAGES[name].key
            if key is None:
                raise ValueError(f"stage {name!r} writes no stage folder")
            self._stores[name] = key(self)
        return self._stores[name]

    def command(self, name: str) -> str:
        """The command that produces a stage for this config, for error messages."""
        config = f" -c {self.config_source}" if self.config_source else " -c CONFIG"
        return f"{STAGES[name].command}{config}"

    def upstream(self, name: str) -> StageStore:
        """This config's output of stage `name`, which must be complete."""
        store = self.store(name)
        if not store.is_complete:
            state = "is not finished" if store.path.exists() else "has not run"
            raise StageMissingError(
                f"stage {name!r} {state} for this config (its output would be {store.path}); run "
                f"`{self.command(name)}` first, or `cai run` for the whole recipe"
            )
        return store

    def model_of(self, name: str, complete: bool = False) -> tuple[str, dict[str, str]]:
        """The model folder a training stage of this config produces, and the upstream hash to record.

        With `complete`, the stage must have finished (a stage about to load the model says so)."""
        store = self.upstream(name) if complete else self.store(name)
        model_dir = STAGES[name].model_dir
        assert model_dir is not None, f"stage {name!r} produces no model"
        return str(store.path / model_dir), {name: store.config_hash}

    def starting_model(
        self, explicit: str | None = None, complete: bool = False
    ) -> tuple[str, dict[str, str]]:
        """The model a stage starts from: `explicit`, else this recipe's SFT model when `stages:`
        has an SFT stage, else the run's base model."""
        if explicit:
            return explicit, {}
        if self.uses("sft"):
            return self.model_of("sft", complete)
        return self.config.model, {}

    # ------------------------------------------------------------------ engines

    def backend(self, model: str, engine: Any = None) -> Backend:
        """An engine for `model`, created on first use and reused by later stages of the run."""
        from cai.backends.registry import make_backend

        engine = engine or self.config.engine
        key = f"{model}|{engine.model_dump_json()}"
        if key not in self._backends:
            self.console.print(f"[dim]loading {model} ({engine.kind})[/]", highlight=False)
            self._backends[key] = make_backend(engine, model)
        return self._backends[key]

    def cached_backend(self, key: str, make: Callable[[], Any]) -> Any:
        """An engine-like object (e.g. a classifier scorer) made on first use under `key`, which
        starts with its model name; reused and released like the engines."""
        if key not in self._backends:
            self.console.print(f"[dim]loading {key.partition('|')[0]}[/]", highlight=False)
            self._backends[key] = make()
        return self._backends[key]

    def release(self, model: str | None = None) -> None:
        """Drop loaded engines (all, or those of one model) to free memory before training."""
        for key in list(self._backends):
            if model is None or key.startswith(f"{model}|"):
                self._backends.pop(key).close()

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
