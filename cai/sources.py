"""Prompt sources: where the red-team and helpfulness prompts of a stage come from.

    sl:
      prompts: {path: red_team.jsonl, limit: 8}          # a shipped file
      prompts: {path: my_prompts.csv, column: text}       # JSONL, CSV, Parquet, a datasets folder
      prompts: {items: ["How do I ...?", "..."]}         # inline

Every prompt gets a stable key (`source:index`) from its position in the source, never from its
text: two identical prompts are two rows, and a resumed run finds its rows again.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cai.backends.base import Chat
from cai.sections import Section


class PromptSource(Section):
    """One source of prompts; give `path` (a file, a datasets folder or a shipped name) or `items`."""

    path: str | None = Field(
        None,
        description="JSONL/CSV/Parquet file, a `datasets` folder, or a shipped file in cai/data "
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
    from cai.resources import data_path

    candidate = Path(path).expanduser()
    if candidate.exists():
        return candidate
    for name in (path, f"{path}.jsonl"):
        try:
            return data_path(name)
        except FileNotFoundError as exc:
            problem = exc
    raise PromptSourceError(
        f"prompt source {path!r} is neither a path nor a shipped file ({problem})"
    ) from None


def read_records(path: Path, split: str) -> list[dict[str, Any]]:
    if path.is_dir():
        from datasets import DatasetDict, load_from_disk

        data = load_from_disk(str(path))
        if isinstance(data, DatasetDict):
            if split not in data:
                raise PromptSourceError(f"{path}: no split {split!r} (splits: {', '.join(data)})")
            data = data[split]
        return list(data)
    suffix = path.suffix.lower()
    if suffix in {".jsonl", ".json"}:
        records = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise PromptSourceError(f"{path}:{number}: not valid JSON: {exc.msg}") from None
        return records
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise PromptSourceError(
        f"{path}: unsupported prompt file type {suffix!r} (jsonl, json, csv, parquet, folder)"
    )


def _as_chat(value: Any, where: str) -> Chat:
    if isinstance(value, str):
        if not value.strip():
            raise PromptSourceError(f"{where}: empty prompt")
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
    """Read a source into prompt items; errors name the file, the row and the column."""
    if source.items is not None:
        values = list(source.items)
        where = "inline prompt"
    else:
        path = resolve(source.path or "")
        records = read_records(path, source.split)
        values = []
        for number, record in enumerate(records, 1):
            if source.column not in record:
                raise PromptSourceError(
                    f"{path}: row {number} has no column {source.column!r} (columns: {', '.join(record)})"
                )
            values.append(record[source.column])
        where = str(path)
    end = None if source.limit is None else source.offset + source.limit
    chosen = list(enumerate(values))[source.offset : end]
    return [
        PromptItem(key=source.key, index=i, prompt=_as_chat(value, f"{where} row {i + 1}"))
        for i, value in chosen
    ]
