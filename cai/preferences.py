"""Preference data in the formats it is published in, as `PreferenceRow`s, and back out.

    rows, report = load_hh(Path("helpful-base.jsonl.gz"))

* Anthropic HH-RLHF files (`.jsonl` / `.jsonl.gz`, `chosen` / `rejected` transcripts in the
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` form), parsed into conversations;
* TRL preference datasets (a `save_to_disk` folder, parquet or JSON), explicit prompt
  (`prompt`/`chosen`/`rejected`) or implicit prompt (`chosen`/`rejected` only);
* plain JSONL with one preference per line, in any of those shapes (our own files included).

Public data is messy (HH-RLHF has empty turns and doubled Human turns), so loaders never stop
at a bad row: they count it and say where it was (`LoadReport`). Only a missing file raises.
Every row becomes a `PreferenceRow` (TRL's conversational, explicit-prompt format plus
provenance); `to_dataset` turns rows into a `datasets.Dataset` that trl's RewardTrainer and
DPOTrainer take as is. `cai.mix` mixes them with the AI labels.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cai.backends.base import Chat, Message
from cai.records import PreferenceRow

if TYPE_CHECKING:
    import datasets


MAX_PROBLEMS = 20
"""A report keeps this many problem lines: enough to see a pattern, not a copy of a bad file."""

OPTIONAL_FIELDS = ("label_id", "soft_label", "margin", "weight", "contested", "verdict", "raters")
"""PreferenceRow fields a JSONL or TRL row may carry through (e.g. our own exported rows)."""


# --------------------------------------------------------------------------------------------
# HH-RLHF transcripts
# --------------------------------------------------------------------------------------------


class PreferenceDataError(ValueError):
    """A preference file that gives no usable pair at all, or cannot be read as its format."""


class MissingSplitError(PreferenceDataError, KeyError):
    """A datasets folder without the split asked for (a KeyError too: it is a missing key)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


class HHParseError(ValueError):
    """A transcript or pair that is not a well-formed HH-RLHF conversation; says what is wrong."""


# Only a role word right after a blank line starts a turn: "the Human: label" inside a turn's
# text is content, which is how HH-RLHF's own data reads.
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _message(role: str, content: str) -> Message:
    return {"role": role, "content": content}


def parse_hh_transcript(text: str) -> Chat:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> [user a, assistant b], validated.

    A PM pair needs a shared prompt and one final answer per side, so a transcript must start
    with Human, alternate, have no empty turn and end with Assistant.
    """
    if not isinstance(text, str):
        raise HHParseError(f"transcript is not a string (got {type(text).__name__})")
    body = text.replace("\r\n", "\n").lstrip()
    if not body.startswith(("Human:", "Assistant:")):
        if _HH_TURN.search(body) is None:
            raise HHParseError("no turns: expected '\\n\\nHuman: ...\\n\\nAssistant: ...'")
        raise HHParseError("text before the first turn: a transcript must start with 'Human:'")
    parts = _HH_TURN.split("\n\n" + body)[1:]  # ['Human', ' a', 'Assistant', ' b', ...]
    chat: Chat = []
    for number, (label, content) in enumerate(zip(parts[::2], parts[1::2], strict=True), start=1):
        if number == 1 and label != "Human":
            raise HHParseError("first turn is Assistant: a transcript must start with 'Human:'")
        if chat and chat[-1]["role"] == _HH_ROLES[label]:
            raise HHParseError(
                f"roles not alternating: two {label} turns in a row (turns {number - 1}-{number})"
            )
        if not content.strip():
            raise HHParseError(f"empty {label} turn (turn {number})")
        chat.append(_message(_HH_ROLES[label], content.strip()))
    if chat[-1]["role"] != "assistant":
        raise HHParseError("ends with a Human turn: missing final Assistant turn")
    return chat


def _split_pair(prompt: Chat, chosen: Chat, rejected: Chat, source: str) -> PreferenceRow:
    """The checks every loader shares: a prompt to condition on, and two different answers."""
    if not prompt:
        raise HHParseError("no shared prompt: chosen and rejected differ from the first message")
    if not chosen or not rejected:
        raise HHParseError(f"{'chosen' if not chosen else 'rejected'} has no answer after the prompt")
    if chosen == rejected:
        # Identical answers give the PM a zero gradient and a free "correct" in its accuracy.
        raise HHParseError("chosen and rejected are identical")
    return PreferenceRow(prompt=prompt, chosen=chosen, rejected=rejected, source=source)


def hh_pair_to_row(chosen: str, rejected: str, source: str) -> PreferenceRow:
    """One HH-RLHF comparison -> a PreferenceRow: shared turns as prompt, final answers as sides."""
    sides = {}
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        try:
            sides[name] = parse_hh_transcript(text)
        except HHParseError as err:
            raise HHParseError(f"{name}: {err}") from None
    prompt, other = sides["chosen"][:-1], sides["rejected"][:-1]
    if prompt != other:
        turn = next(
            (i for i, (a, b) in enumerate(zip(prompt, other, strict=False)) if a != b),
            min(len(prompt), len(other)),
        )
        raise HHParseError(f"chosen and rejected prompts differ (from turn {turn + 1})")
    return _split_pair(prompt, sides["chosen"][-1:], sides["rejected"][-1:], source)


# --------------------------------------------------------------------------------------------
# Load reports
# --------------------------------------------------------------------------------------------


class LoadReport(BaseModel):
    """What a loader kept and what it skipped; stages log it and store it in the run directory."""

    model_config = ConfigDict(extra="forbid")

    path: str
    rows: int = 0
    malformed: int = 0
    problems: list[str] = Field(
        default_factory=list, description=f"First {MAX_PROBLEMS}: 'file:line: reason'."
    )
    stopped: str | None = Field(None, description="Where reading stopped before the end, and why.")
    # With a rater_column: the rater of each kept row and where it was, in row order. Left out
    # of dumps, so a stage summary is what it was before raters existed.
    raters: list[str] = Field(default_factory=list, exclude=True)
    rater_lines: list[str] = Field(default_factory=list, exclude=True)

    def problem(self, where: int | str, reason: str) -> None:
        """Count one bad row; remember its location while there is room."""
        self.malformed += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(f"{self.path}:{where}: {reason}")

    def __str__(self) -> str:
        return f"{self.path}: {self.rows} rows, {self.malformed} malformed"


def _existing(path: Path | str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"preference data not found: {path}")
    return path


def _json_lines(path: Path, report: LoadReport) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) for each non-blank line; bad JSON goes to the report.

    Lines are read as bytes so one line of broken UTF-8 is one malformed row, not a crash, and
    gzip is recognised by its magic bytes rather than trusted to the file name.
    """
    with path.open("rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    number = 0
    with gzip.open(path, "rb") if gzipped else path.open("rb") as handle:
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield number, orjson.loads(line)
                except orjson.JSONDecodeError as err:
                    report.problem(number, f"bad JSON ({err})")
        except (EOFError, OSError) as err:  # truncated or corrupt gzip stream
            report.problem(number + 1, f"unreadable from here on ({err})")
            report.stopped = f"{path}:{number + 1}: unreadable from here on ({err})"


# --------------------------------------------------------------------------------------------
# Row shapes (TRL formats and plain JSONL)
# --------------------------------------------------------------------------------------------


def _as_chat(value: Any, name: str, default_role: str) -> Chat:
    """A string (one message of `default_role`) or a list of {role, content} messages."""
    if isinstance(value, str):
        if not value.strip():
            raise HHParseError(f"{name} is an empty string")
        return [_message(default_role, value)]
    if not isinstance(value, list):
        raise HHParseError(f"{name} is neither a string nor a list of messages (got {type(value).__name__})")
    chat: Chat = []
    for i, message in enumerate(value):
        if not (isinstance(message, Mapping) and isinstance(message.get("role"), str)):
            raise HHParseError(f"{name}[{i}] is not a message with a 'role'")
        if not isinstance(message.get("content"), str):
            raise HHParseError(f"{name}[{i}] has no text content")
        chat.append(_message(message["role"], message["content"]))
    return chat


def _common_prefix(a: Chat, b: Chat) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _row_from_example(example: Mapping[str, Any], source: str) -> PreferenceRow:
    """Any accepted shape -> PreferenceRow; HHParseError says why a row does not fit."""
    missing = [key for key in ("chosen", "rejected") if example.get(key) is None]
    if missing:
        raise HHParseError(f"missing key {missing[0]!r}")
    if example.get("prompt") is not None:  # explicit prompt
        row = _split_pair(
            _as_chat(example["prompt"], "prompt", "user"),
            _as_chat(example["chosen"], "chosen", "assistant"),
            _as_chat(example["rejected"], "rejected", "assistant"),
            source,
        )
    elif isinstance(example["chosen"], str) and isinstance(example["rejected"], str):
        # Implicit prompt in plain strings is how HH-RLHF itself is published (e.g. as parquet).
        if "Human:" not in example["chosen"]:
            raise HHParseError("implicit-prompt strings must be HH transcripts ('\\n\\nHuman: ...')")
        row = hh_pair_to_row(example["chosen"], example["rejected"], source)
    else:  # implicit prompt, conversational: the shared turns are the prompt
        chosen = _as_chat(example["chosen"], "chosen", "assistant")
        rejected = _as_chat(example["rejected"], "rejected", "assistant")
        n = _common_prefix(chosen, rejected)
        row = _split_pair(chosen[:n], chosen[n:], rejected[n:], source)
    extras = {key: example[key] for key in OPTIONAL_FIELDS if example.get(key) is not None}
    if extras:
        row = PreferenceRow.model_validate({**row.model_dump(), **extras})
    return row


def _hh_example(example: Mapping[str, Any], source: str) -> PreferenceRow:
    for key in ("chosen", "rejected"):
        if key not in example:
            raise HHParseError(f"missing key {key!r}")
    return hh_pair_to_row(example["chosen"], example["rejected"], source)


def _collect(
    items: Iterator[tuple[int | str, Any]],
    report: LoadReport,
    source: str,
    limit: int | None,
    own_source: bool = False,
    convert: Callable[[Mapping[str, Any], str], PreferenceRow] = _row_from_example,
    rater_column: str | None = None,
) -> list[PreferenceRow]:
    """Convert each item, counting (never raising on) the ones that do not fit.

    With `rater_column`, a pair without a rater is an error, not a skipped row: the file's
    ratings are then votes, and a vote silently dropped could change which side wins.
    """
    rows: list[PreferenceRow] = []
    for where, example in items:
        if limit is not None and len(rows) >= limit:
            break
        if not isinstance(example, Mapping):
            report.problem(where, f"expected a JSON object, got {type(example).__name__}")
            continue
        row_source = (
            example.get("source") if own_source and isinstance(example.get("source"), str) else source
        )
        try:
            row = convert(example, row_source)
        except (HHParseError, ValidationError) as err:
            reason = (
                str(err) if isinstance(err, HHParseError) else f"invalid field ({err.errors()[0]['msg']})"
            )
            report.problem(where, reason)
            continue
        if rater_column is not None:
            report.raters.append(_rater(example, rater_column, f"{report.path}:{where}"))
            report.rater_lines.append(f"{report.path}:{where}")
        rows.append(row)
    report.rows = len(rows)
    return rows


def _rater(example: Mapping[str, Any], column: str, where: str) -> str:
    value = example.get(column)
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        got = "it is missing" if value is None else f"got {value!r}"
        raise PreferenceDataError(
            f"{where}: no rater in field {column!r} ({got}); with rater_column every pair needs a "
            "rater or group id (a string or an integer)"
        )
    return str(value)


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


def load_hh(
    path: Path, source: str = "human-helpful", limit: int | None = None, rater_column: str | None = None
) -> tuple[list[PreferenceRow], LoadReport]:
    """Anthropic HH-RLHF `.jsonl` / `.jsonl.gz` -> rows, plus a report of the lines skipped.

    With `rater_column` the report lists each row's rater (`LoadReport.raters`), as do the others.
    """
    path = _existing(path)
    report = LoadReport(path=str(path))
    items = _json_lines(path, report)
    return _collect(items, report, source, limit, convert=_hh_example, rater_column=rater_column), report


def load_jsonl(
    path: Path,
    source: str = "human-helpful",
    limit: int | None = None,
    keep_row_source: bool = True,
    rater_column: str | None = None,
) -> tuple[list[PreferenceRow], LoadReport]:
    """One preference per line, in any accepted shape; extra PreferenceRow fields are kept.

    With `keep_row_source` a row's own `source` wins over `source`, so re-reading a file of AI
    rows cannot silently relabel them as human ones.
    """
    path = _existing(path)
    report = LoadReport(path=str(path))
    items = _json_lines(path, report)
    return _collect(items, report, source, limit, keep_row_source, rater_column=rater_column), report


def _read_dataset(path: Path, split: str) -> datasets.Dataset:
    import datasets

    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise MissingSplitError(f"{path} has no split {split!r}; it has {', '.join(loaded)}")
            loaded = loaded[split]
        return loaded
    suffixes = "".join(path.suffixes[-2:])
    if path.suffix == ".parquet":
        return datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    if path.suffix in (".json", ".jsonl") or suffixes in (".json.gz", ".jsonl.gz"):
        return datasets.Dataset.from_json(str(path), keep_in_memory=True)
    raise ValueError(f"{path}: expected a datasets folder, .parquet, .json or .jsonl")


def load_trl_preferences(
    path: Path, source: str, split: str = "train", limit: int | None = None, rater_column: str | None = None
) -> tuple[list[PreferenceRow], LoadReport]:
    """A TRL preference dataset (explicit or implicit prompt, strings or conversations) -> rows.

    Problems are located by row index ("path:row 12: ..."), since a dataset has no lines.
    """
    path = _existing(path)
    report = LoadReport(path=str(path))
    try:
        dataset = _read_dataset(path, split)
    except MissingSplitError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets/arrow errors share no base; re-raised naming the file
        problem = f"{type(exc).__name__}: {exc}"
        raise PreferenceDataError(f"{path}: not a readable TRL preference dataset ({problem})") from exc
    items = ((f"row {i}", example) for i, example in enumerate(dataset))
    return _collect(items, report, source, limit, rater_column=rater_column), report


# --------------------------------------------------------------------------------------------
# Output: datasets and files
# --------------------------------------------------------------------------------------------


def _features() -> datasets.Features:
    """Fixed column types, those of the Parquet files (`cai.export.arrow_schema`): an all-None
    column (no AI rows) must not become arrow's null type."""
    from datasets import Features

    from cai.export import arrow_schema

    return Features.from_arrow_schema(arrow_schema(PreferenceRow))


def to_dataset(rows: list[PreferenceRow]) -> datasets.Dataset:
    """Rows -> a conversational explicit-prompt Dataset for trl's RewardTrainer / DPOTrainer.

    RewardTrainer feeds a `margin` column straight into its loss (-log sigmoid(r_c - r_r - m))
    and cannot batch None, so rows without a margin (human rows) get 0.0: the plain
    Bradley-Terry loss. The other provenance columns are dropped by the trainers themselves.
    """
    from datasets import Dataset

    columns: dict[str, list[Any]] = {name: [] for name in _features()}
    for row in rows:
        data = row.model_dump()
        data["margin"] = 0.0 if row.margin is None else row.margin
        for name, values in columns.items():
            values.append(data.get(name))  # `raters` is left out of dumps when None
    return Dataset.from_dict(columns, features=_features())


def write_preferences(rows: list[PreferenceRow], path: Path) -> None:
    """JSONL, written atomically (`cai.atomic`): a crash never leaves half a file behind."""
    from cai.atomic import atomic_write_jsonl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(path, rows)


def read_preferences(path: Path) -> list[PreferenceRow]:
    """Our own JSONL back; strict, because a bad line here is a bug, not messy public data."""
    path = _existing(path)
    rows: list[PreferenceRow] = []
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(PreferenceRow.model_validate_json(line))
            except ValidationError as err:
                raise ValueError(f"{path}:{number}: not a preference row: {err}") from None
    return rows
