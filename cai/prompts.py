"""The one jinja2 environment cai renders prompts with.

    cai prompts render --constitution harmless --principle harmful-content --stage critique

Templates are files (never YAML strings) in `prompts/`, or in a user folder searched first.
The environment is jinja2's immutable sandbox with StrictUndefined: a template cannot reach
Python internals, cannot mutate the data it is given, and a misspelt variable is an error
rather than an empty string. Data values (prompts, responses) are inserted as text and never
evaluated, whatever braces they contain.
"""

from __future__ import annotations

import hashlib
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from cai.resources import shipped_dir

SPEAKERS = {"user": "Human", "assistant": "Assistant", "system": "System"}


def _speaker(role: str) -> str:
    return SPEAKERS.get(role, role.title())


class TemplateError(ValueError):
    """A template is missing, does not parse, or needs a variable that was not given."""


class Templates:
    """Templates from an optional user folder, falling back to the shipped ones."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folders = [Path(folder).expanduser()] if folder else []
        self.folders.append(shipped_dir("prompts"))
        for path in self.folders:
            if not path.is_dir():
                raise TemplateError(f"template folder {path} does not exist")

    @cached_property
    def env(self) -> ImmutableSandboxedEnvironment:
        env = ImmutableSandboxedEnvironment(
            loader=jinja2.FileSystemLoader([str(f) for f in self.folders]),
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            keep_trailing_newline=False,
        )
        env.filters["speaker"] = _speaker
        return env

    def path(self, name: str) -> Path:
        for folder in self.folders:
            if (folder / name).is_file():
                return folder / name
        raise TemplateError(f"no template {name!r} in {', '.join(map(str, self.folders))}")

    def source(self, name: str) -> str:
        return self.path(name).read_text(encoding="utf-8")

    def hash(self, name: str) -> str:
        """Hash of the template source, recorded with every row the template produced."""
        return hashlib.sha256(self.source(name).encode()).hexdigest()

    def render(self, name: str, /, **variables: Any) -> str:
        self.path(name)  # a clear error naming the folders searched
        try:
            template = self.env.get_template(name)
            return template.render(**variables).strip()
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"{exc.filename or name}:{exc.lineno}: {exc.message}") from None
        except jinja2.UndefinedError as exc:
            raise TemplateError(f"template {name}: {exc.message}") from None
