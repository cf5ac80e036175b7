"""Constitutions: the YAML file of principles that every stage of cai is driven by.

    cai constitution validate constitutions/harmless.yaml

A constitution is user-edited text, so loading it must fail loudly and precisely: every error
names the file, the line, the principle id and the field. Texts are inserted into prompt
templates as data, and template syntax inside them is rejected outright (a constitution copied
from the internet must not be able to run code in our template engine).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from cai.hashing import content_hash
from cai.yamlfile import (
    YAMLFileError,
    describe,
    line_of,
    load_yaml_with_lines,
    read_yaml_file,
    yaml_error_line,
)

Stage = Literal["critique", "revision", "compare"]

_SLUG = r"^[a-z0-9][a-z0-9_.-]*$"
SLUG_WORDS = "lowercase letters, digits, '-', '_' or '.', starting with a letter or digit (e.g. 'no-doxxing')"
_TEMPLATE_SYNTAX = re.compile(r"\{\{|\{%|\{#")
SECURITY_MESSAGE = (
    "template syntax ({{ }}, {% %}, {# #}) is not allowed in constitution text: texts are "
    "inserted literally, never evaluated"
)


def _text(value: str) -> str:
    """Strip a text field, refuse it when empty and refuse template syntax (see module doc)."""
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    if _TEMPLATE_SYNTAX.search(value):
        raise ValueError(SECURITY_MESSAGE)
    return value


Text = Annotated[str, AfterValidator(_text)]
Slug = Annotated[str, Field(pattern=_SLUG, max_length=80)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)


class Principle(_Strict):
    """One principle; a stage that needs a text the principle lacks simply never samples it."""

    id: Slug = Field(description="Stable id, recorded in every row this principle shapes.")
    description: Text | None = Field(None, description="A note for humans; never sent to a model.")
    critique: Text | None = Field(None, description="Critique request (SL stage).")
    revision: Text | None = Field(None, description="Revision request (SL stage).")
    compare: Text | None = Field(None, description="Multiple-choice comparison question (RL stage).")
    follows: Text | None = Field(
        None,
        description="Likelihood judge: describes an assistant that follows this principle (a system turn). "
        "Written together with `violates`; without both, they are derived from `compare`.",
    )
    violates: Text | None = Field(
        None, description="Likelihood judge: describes an assistant that violates this principle."
    )
    tags: list[Slug] = Field(default_factory=list, description="Labels used to filter principles.")
    weight: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="Sampling weight and vote weight in ensembles."
    )

    def text(self, stage: Stage) -> str | None:
        return getattr(self, stage)

    @model_validator(mode="after")
    def _has_a_stage(self) -> Principle:
        if self.critique is None and self.revision is None and self.compare is None:
            raise ValueError("a principle needs at least one of critique, revision, compare")
        if (self.follows is None) != (self.violates is None):
            raise ValueError(
                "follows and violates come together: write both, or neither (then they are derived)"
            )
        if self.follows is not None and self.compare is None:
            raise ValueError("follows/violates need a compare question too: the judge picks principles by it")
        return self


class CritiqueRevisionExample(_Strict):
    """A few-shot demonstration of one critique -> revision round."""

    principle: Slug | None = None
    prompt: Text
    response: Text
    critique: Text
    revision: Text


class CompareExample(_Strict):
    """A few-shot demonstration of the multiple-choice comparison (with its reasoning for CoT)."""

    principle: Slug | None = None
    prompt: Text
    response_a: Text
    response_b: Text
    answer: Literal["A", "B"]
    reasoning: Text | None = None


class Examples(_Strict):
    critique_revision: list[CritiqueRevisionExample] = Field(default_factory=list)
    compare: list[CompareExample] = Field(default_factory=list)


def _version_text(value: Any) -> Any:
    """`version: 1` or `version: 1.2` in YAML is a number; a version is text, so take it as written."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


class Constitution(_Strict):
    name: Slug
    version: Annotated[str, BeforeValidator(_version_text)] = Field(min_length=1, max_length=40)
    description: Text | None = None
    principles: list[Principle] = Field(min_length=1)
    examples: Examples = Field(default_factory=Examples)

    @model_validator(mode="after")
    def _ids_unique_and_referenced(self) -> Constitution:
        seen: set[str] = set()
        for index, principle in enumerate(self.principles):
            if principle.id in seen:
                raise _LocatedError(("principles", index, "id"), f"duplicate principle id {principle.id!r}")
            seen.add(principle.id)
        groups: list[tuple[str, Sequence[CritiqueRevisionExample | CompareExample]]] = [
            ("critique_revision", self.examples.critique_revision),
            ("compare", self.examples.compare),
        ]
        for group, examples in groups:
            for index, example in enumerate(examples):
                if example.principle is not None and example.principle not in seen:
                    raise _LocatedError(
                        ("examples", group, index, "principle"),
                        f"example refers to unknown principle {example.principle!r}",
                    )
        return self

    @property
    def hash(self) -> str:
        """Canonical content hash: the same principles give the same hash whatever the YAML layout."""
        return content_hash(self.model_dump(mode="json"))

    def stage_hash(self, stage: Literal["sl", "compare"], judge: str = "choice") -> str:
        """Hash of only what a stage reads, so editing a comparison question re-runs labelling
        but not the supervised stage (and a critique edit leaves existing labels alone). A
        likelihood judge also reads each principle's follows/violates texts."""
        fields = {"critique", "revision"} if stage == "sl" else {"compare"}
        if stage == "compare" and judge == "likelihood":
            fields |= {"follows", "violates"}
        examples = self.examples.critique_revision if stage == "sl" else self.examples.compare
        return content_hash(
            {
                "principles": [
                    p.model_dump(include={"id", "tags", "weight", *fields}) for p in self.principles
                ],
                "examples": [e.model_dump(mode="json") for e in examples],
            }
        )

    def principle(self, principle_id: str) -> Principle:
        for principle in self.principles:
            if principle.id == principle_id:
                return principle
        raise KeyError(
            f"constitution {self.name!r} has no principle {principle_id!r} "
            f"(ids: {', '.join(p.id for p in self.principles)})"
        )

    def select(
        self,
        stages: Iterable[Stage] = (),
        tags: Iterable[str] = (),
        ids: Iterable[str] = (),
    ) -> list[Principle]:
        """Principles usable for `stages`, optionally restricted to any of `tags` and to `ids`."""
        stages, tags, ids = list(stages), set(tags), list(ids)
        for principle_id in ids:
            self.principle(principle_id)  # unknown ids are an error, not an empty selection
        chosen = [
            p
            for p in self.principles
            if all(p.text(s) is not None for s in stages)
            and (not tags or tags & set(p.tags))
            and (not ids or p.id in ids)
        ]
        if not chosen:
            raise ValueError(
                f"no principle of constitution {self.name!r} fits stages={stages or 'any'} "
                f"tags={sorted(tags) or 'any'} ids={ids or 'any'}"
            )
        return chosen


# --------------------------------------------------------------------------- errors and loading


class _LocatedError(ValueError):
    """Raised inside validators that know a more precise location than pydantic would give."""

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    principle: str | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        who = f" principle {self.principle!r}" if self.principle else ""
        return f"{where}:{who} field '{self.field}': {self.message}"


class ConstitutionError(ValueError):
    """All problems found in one constitution file, each with file, line, principle and field."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class ConstitutionSecurityError(ConstitutionError):
    """The file tried to smuggle template syntax into a text; nothing from it is used."""


def _principle_id(data: Any, loc: tuple) -> str | None:
    if len(loc) >= 2 and loc[0] == "principles" and isinstance(loc[1], int):
        try:
            value = data["principles"][loc[1]].get("id")
        except (TypeError, KeyError, IndexError, AttributeError):
            return None
        return value if isinstance(value, str) else None
    return None


def parse_constitution(text: str, source: str = "<string>") -> Constitution:
    """Validate constitution YAML text; `source` names it in errors."""
    try:
        data, lines = load_yaml_with_lines(text)
    except yaml.YAMLError as exc:
        raise ConstitutionError(
            [Problem(source, yaml_error_line(exc), None, "<yaml>", describe(exc))]
        ) from None
    if not isinstance(data, dict):
        raise ConstitutionError(
            [Problem(source, 1, None, "<root>", "a constitution is a mapping with name, version, principles")]
        )
    try:
        return Constitution.model_validate(data)
    except ValidationError as exc:
        problems = []
        security = False
        for error in exc.errors():
            loc = tuple(error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            context = error.get("ctx", {}).get("error")
            if isinstance(context, _LocatedError):
                loc = context.loc
            security |= SECURITY_MESSAGE in message
            if error["type"] == "extra_forbidden":
                message = f"unknown key {loc[-1]!r}"
            elif error["type"] == "string_pattern_mismatch":
                message = f"{error['input']!r} does not match the id pattern: it must be {SLUG_WORDS}"
            problems.append(
                Problem(
                    source,
                    line_of(lines, loc),
                    _principle_id(data, loc),
                    ".".join(str(part) for part in loc) or "<root>",
                    message,
                )
            )
        raise (ConstitutionSecurityError if security else ConstitutionError)(problems) from None


def load_constitution(path: str | Path) -> Constitution:
    """Load a constitution from a path or a shipped name (`harmless`, `hhh`)."""
    from cai.resources import resolve_shipped

    resolved = resolve_shipped(path, "constitutions", (".yaml", ".yml"))
    try:
        text = read_yaml_file(resolved)
    except YAMLFileError as exc:
        raise ConstitutionError([Problem(str(resolved), None, None, "<file>", str(exc))]) from None
    return parse_constitution(text, str(resolved))


# --------------------------------------------------------------------------- sampling


def sample_principles(
    principles: Sequence[Principle],
    k: int,
    seed: int,
    replace: bool = False,
    weighted: bool = True,
) -> list[Principle]:
    """Draw `k` principles, honouring weights; without replacement by Efraimidis-Spirakis keys.

    Without replacement, asking for more principles than exist is an error rather than a silent
    short draw: an ensemble size is a promise about every label.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not principles:
        raise ValueError("no principles to sample from")
    rng = random.Random(seed)
    weights = [p.weight if weighted else 1.0 for p in principles]
    if replace:
        return rng.choices(list(principles), weights=weights, k=k)
    if k > len(principles):
        raise ValueError(f"cannot draw {k} distinct principles from {len(principles)}")
    keys = [math.log(rng.random() or 1e-300) / w for w in weights]
    order = sorted(range(len(principles)), key=lambda i: keys[i], reverse=True)
    return [principles[i] for i in order[:k]]
