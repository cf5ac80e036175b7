"""Hub-ready dataset files: Parquet data plus a dataset card that says where the data came from.

Every dataset a stage writes gets a `README.md` card naming the constitution and its hash, the
models, the templates and the config hash, so a dataset pushed to a hub (`huggingface-cli
upload`, `datasets.load_dataset("parquet", ...)`) still answers "what shaped these rows?".
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from cai.atomic import atomic_write_bytes


def _plain(row: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
    return row.model_dump(mode="json") if isinstance(row, BaseModel) else dict(row)


def write_parquet(path: Path, rows: Iterable[BaseModel | Mapping[str, Any]]) -> None:
    """Rows -> one Parquet file, atomically (nested messages become list<struct> columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([_plain(r) for r in rows])
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def dataset_card(
    title: str,
    summary: str,
    provenance: Mapping[str, Any],
    files: Mapping[str, str],
    columns: Mapping[str, str],
    counts: Mapping[str, int] | None = None,
) -> str:
    """A dataset card: YAML front matter the hub reads, then provenance a human reads."""
    front = {
        "configs": [
            {"config_name": "default", "data_files": [{"split": "train", "path": name} for name in files]}
        ],
        "tags": ["constitutional-ai", "rlaif", "cai"],
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {title}", "", summary, ""]
    lines += ["## Provenance", "", "| field | value |", "| --- | --- |"]
    lines += [f"| {key} | `{value}` |" for key, value in provenance.items()]
    lines += ["", "## Files", ""] + [f"- `{name}`: {text}" for name, text in files.items()]
    lines += ["", "## Columns", ""] + [f"- `{name}`: {text}" for name, text in columns.items()]
    if counts:
        lines += ["", "## Counts", ""] + [f"- {key}: {value}" for key, value in counts.items()]
    lines += ["", "Made with [cai](https://github.com/cai-project/cai)."]
    return "\n".join(lines) + "\n"


def write_card(path: Path, card: str) -> None:
    atomic_write_bytes(path, card.encode("utf-8"))
