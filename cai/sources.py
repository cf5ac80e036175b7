"""Prompt sources: where the red-team and helpfulness prompts of a stage come from.

    sl:
      prompts: {path: red_team.jsonl, limit: 8}          # a shipped file
      prompts: {path: my_prompts.csv, column: text}       # JSONL, JSON array, TXT (a prompt per
                                                          # line), CSV, Parquet, a datasets folder
      prompts: {items: ["How do I ...?", "..."]}         # inline

Every prompt gets a stable key (`source:index`) from its position in the source, never from its
text: two identical prompts are two rows, and a resumed run finds its rows again.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cai.backends.base import Chat
from cai.sections import Section
from cai.textfile import decode_text

MAX_PROMPT_CHARS = 200_000
"""A prompt longer than this is a mistake (a whole file pasted into one cell), not a prompt."""


class PromptSource(Section):
    """One source of prompts; give `path` (a file, a datasets folder or a shipped name) or `items`."""

    path: str | None = Field(
        None,
        description="JSONL, JSON array, TXT (one prompt per line), CSV or Parquet file, a `datasets` "
        "folder, or a shipped file in cai/data "
        "(default, when `items` is not given either: the shipped red_team.jsonl).",
    )
    items: list[str] | None = Field(None, description="Prompts given inline instead of a path.")
    column: str = Field("prompt", description="Column holding the prompt (a string or a list of messages).")
    split: str = Field("train", description="Split to use when `path` is a DatasetDict folder.")
    limit: int | None = Field(None, ge=1, description="Use only the first N prompts.")
    offset: int = Field(0, ge=0, description="Skip the first N prompts (e.g. to hold some out).")

    @model_validator(mode="before")
    @classmethod
    def _default_path(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("path") is None and data.get("items") is None:
            return {**data, "path": "red_team.jsonl"}
        return data

    @model_validator(mode="after")
    def _one_of(self) -> PromptSource:
        if self.path is not None and self.items is not None:
            raise ValueError("give either `path` or `items`, not both")
        return self

    @property
    def key(self) -> str:
        return "inline" if self.items is not None else Path(self.path or "").name


class PromptItem(BaseModel):
    """A prompt with its stable position-based key."""

    model_config = ConfigDict(frozen=True)

    key: str
    index: int
    prompt: Chat


class PromptSourceError(ValueError):
    """The source is missing, unreadable, or a row does not hold a usable prompt."""


def resolve(path: str) -> Path:
    """A real path, or a file shipped in cai/data (`red_team`, `red_team.jsonl`)."""
    from cai.resources import resolve_data

    return resolve_data(path, "prompt source", PromptSourceError, suffixes=(".jsonl",))


def _text(path: Path) -> str:
    return decode_text(path, path.read_bytes(), kind="a prompt file", error=PromptSourceError)


def _json_lines(path: Path, text: str) -> list[tuple[str, Any]]:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise PromptSourceError(
                f"{path}:{number}: not valid JSON ({exc.msg}); a .jsonl file holds one JSON object per line"
            ) from None
    return records


def located_records(path: Path, split: str = "train") -> list[tuple[str, Any]]:
    """(where, record) for every record of a prompt file: `where` names the file and line (or row).

    .jsonl: one JSON value per line; .json: a JSON array (a file of JSON lines is read as such);
    .txt: one prompt per line; .csv, .parquet, or a `datasets` folder (split `split`).
    """
    if path.is_dir():
        from datasets import DatasetDict, load_from_disk

        data = load_from_disk(str(path))
        if isinstance(data, DatasetDict):
            if split not in data:
                raise PromptSourceError(f"{path}: no split {split!r} (splits: {', '.join(data)})")
            data = data[split]
        return [(f"{path} row {n}", record) for n, record in enumerate(data, 1)]
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _json_lines(path, _text(path))
    if suffix == ".json":
        text = _text(path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return _json_lines(path, text)  # JSON lines under a .json name
        if not isinstance(data, list):
            raise PromptSourceError(
                f"{path}: a .json prompt file holds a JSON array of prompts (strings, or objects with the "
                f"prompt column), not a {type(data).__name__}; for one object per line name it .jsonl"
            )
        return [(f"{path} item {n}", record) for n, record in enumerate(data, 1)]
    if suffix == ".txt":
        lines = _text(path).splitlines()
        return [(f"{path}:{n}", line) for n, line in enumerate(lines, 1) if line.strip()]
    if suffix == ".csv":
        with io.StringIO(_text(path), newline="") as handle:
            return [(f"{path} row {n}", record) for n, record in enumerate(csv.DictReader(handle), 1)]
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            raise PromptSourceError(f"{path}: not a readable Parquet file ({exc})") from None
        return [(f"{path} row {n}", record) for n, record in enumerate(table.to_pylist(), 1)]
    raise PromptSourceError(
        f"{path}: unsupported prompt file type {suffix!r} "
        "(jsonl, json, txt, csv, parquet, or a datasets folder)"
    )


def read_records(path: Path, split: str = "train") -> list[Any]:
    """The records of a prompt (or text) file, without their locations."""
    return [record for _, record in located_records(path, split)]


def _as_chat(value: Any, where: str) -> Chat:
    if isinstance(value, str):
        if not value.strip():
            raise PromptSourceError(f"{where}: empty prompt")
        if len(value) > MAX_PROMPT_CHARS:
            raise PromptSourceError(
                f"{where}: a prompt of {len(value):,} characters (at most {MAX_PROMPT_CHARS:,})"
            )
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        chat: Chat = []
        for message in value:
            if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
                raise PromptSourceError(f"{where}: messages need string 'role' and 'content'")
            chat.append({"role": message["role"], "content": message["content"]})
        if chat[-1]["role"] != "user":
            raise PromptSourceError(f"{where}: a conversation prompt must end with a user turn")
        return chat
    raise PromptSourceError(
        f"{where}: a prompt is a string or a list of messages, got {type(value).__name__}"
    )


def load_prompts(source: PromptSource) -> list[PromptItem]:
    """Read a source into prompt items; errors name the file, the line (or row) and the column."""
    if source.items is not None:
        located = [(f"inline prompt {n}", value) for n, value in enumerate(source.items, 1)]
    else:
        located = []
        for where, record in located_records(resolve(source.path or ""), source.split):
            if isinstance(record, dict):
                if source.column not in record:
                    columns = ", ".join(map(str, record)) or "none"
                    raise PromptSourceError(
                        f"{where}: no column {source.column!r} (columns: {columns}); set prompts.column"
                    )
                record = record[source.column]
            located.append((where, record))
    end = None if source.limit is None else source.offset + source.limit
    chosen = list(enumerate(located))[source.offset : end]
    return [
        PromptItem(key=source.key, index=i, prompt=_as_chat(value, where)) for i, (where, value) in chosen
    ]
