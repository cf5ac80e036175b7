"""Hub-ready stage folders: Parquet files with fixed schemas and a card whose configs load.

    from datasets import load_dataset
    load_dataset("runs/quickstart/label/d74804c0fb03")             # the training view
    load_dataset("runs/quickstart/label/d74804c0fb03", "audit")    # another config, by name

A stage folder is what a user pushes to the Hub (`huggingface-cli upload ... --repo-type dataset`),
and `load_dataset(folder)` is what the Hub, its viewer and users run on it. Four facts of
`datasets` (5.2: `load.py`, `utils/metadata.py`, `packaged_modules/parquet`) shape what is written:

- When the card's YAML lists `configs`, the loader reads only the files they name; anything else
  in the folder (the store's manifest, ledger, rows, lock; `gate.json`; JSON-lines twins) is
  never opened. Without `configs` it tries to merge every data file it finds.
- A config is one dataset: two files with different columns under the same split fail ("Some
  splits are duplicated"). So every file gets a config of its own with one `train` split, and
  the training view is the `default: true` config.
- One reader serves every config of a folder, picked from the first config's file extension.
  So every listed file has one format: Parquet, which also carries its schema. The schema comes
  from cai's row model, not from the values, so a column keeps its type in a run where every
  value is None (the JSON builder would infer arrow's `null` type there, and a different type in
  the next run) and an empty file still has its columns.
- An empty split does not load (Parquet: "BatchSize must be greater than 0"; JSON lines: a bare
  StopIteration). So a config without rows is left out of the card, which says why.
"""

from __future__ import annotations

import io
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml
from pydantic import BaseModel
from typing_extensions import is_typeddict

from cai.atomic import atomic_write_bytes
from cai.store import BOOKKEEPING

if TYPE_CHECKING:
    import pyarrow as pa


# --------------------------------------------------------------------------- Parquet


def write_parquet(path: Path, rows: Sequence[BaseModel], model: type[BaseModel]) -> None:
    """Rows of one model -> one Parquet file with the model's schema, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    plain = [row.model_dump(mode="json") for row in rows]
    schema = arrow_schema(model, plain)
    for row in plain:
        unknown = set(row) - set(schema.names)
        if unknown:  # from_pylist would drop them without a word
            raise ValueError(f"{model.__name__}: columns {sorted(unknown)} are not in its schema")
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(plain, schema=schema), buffer)
    atomic_write_bytes(path, buffer.getvalue())


def arrow_schema(model: type[BaseModel], rows: Sequence[Mapping[str, Any]] = ()) -> pa.Schema:
    """The Arrow schema of a row model: one fixed type per field, None allowed everywhere.

    `rows` (the model's JSON dumps) matter only for a `dict[str, V]` field with open keys (the
    template name -> hash maps): `datasets` has no map type, so such a field becomes a struct of
    the keys the rows carry (one config's rows share them); without rows it is `null`.
    """
    import pyarrow as pa

    return pa.schema(
        [
            pa.field(
                name, _arrow_type(field.annotation, [r.get(name) for r in rows], f"{model.__name__}.{name}")
            )
            for name, field in model.model_fields.items()
        ]
    )


def _arrow_type(annotation: Any, values: list[Any], where: str) -> pa.DataType:
    """`values`: what the rows hold at this place, so open-keyed dicts can name their keys."""
    import pyarrow as pa

    scalars = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}
    origin, args = get_origin(annotation), get_args(annotation)
    present = [v for v in values if v is not None]
    if origin in (Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) != 1:
            raise TypeError(f"{where}: {annotation} mixes types; a Parquet column holds one")
        return _arrow_type(kinds[0], present, where)
    if origin is Literal and all(isinstance(a, str) for a in args):
        return pa.string()
    if annotation in scalars:
        return scalars[annotation]
    if origin is list:
        return pa.list_(_arrow_type(args[0], [item for v in present for item in v], f"{where}[]"))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        fields = {name: field.annotation for name, field in annotation.model_fields.items()}
        return _struct(fields, present, where)
    if is_typeddict(annotation):
        return _struct(get_type_hints(annotation), present, where)
    if origin is dict and args[0] is str:
        keys = sorted({key for v in present for key in v})
        if not keys and present:
            raise ValueError(f"{where}: every row's dict is empty; a Parquet struct needs a key")
        return _struct(dict.fromkeys(keys, args[1]), present, where) if keys else pa.null()
    raise TypeError(f"{where}: no Parquet column type for {annotation!r}")


def _struct(fields: Mapping[str, Any], values: list[Mapping[str, Any]], where: str) -> pa.DataType:
    import pyarrow as pa

    return pa.struct(
        [
            pa.field(name, _arrow_type(kind, [v.get(name) for v in values], f"{where}.{name}"))
            for name, kind in fields.items()
        ]
    )


# --------------------------------------------------------------------------- cards


@dataclass(frozen=True)
class HubConfig:
    """One config of a card: a name, one Parquet file as its `train` split, what it holds."""

    name: str
    file: str
    rows: int
    text: str
    columns: Mapping[str, str]
    default: bool = False


LOADING = (
    "Each config is one Parquet file with a single `train` split; `load_dataset(folder)` loads "
    "the default config and `load_dataset(folder, name)` any other. The files are Parquet because "
    "`datasets` reads every config of a folder with the one reader it picks from the first "
    "config's files, and because a Parquet file carries its schema: each column has the type of "
    "cai's row model (`cai.records`), also where every value is null, so a config loads with the "
    "same features in every run. Files in no config are never read by the loader."
)
EMPTY = (
    "No rows in this run, so no config: `datasets` cannot load an empty split. The file is there "
    "with its columns for other readers (pyarrow, pandas)."
)


def preference_config(rows: int, sources: str) -> HubConfig:
    """The training view of the label and mix stages: `cai.records.PreferenceRow` rows."""
    return HubConfig(
        name="preferences",
        file="preferences.parquet",
        rows=rows,
        default=True,
        text="TRL's conversational preference format with an explicit prompt, for DPOTrainer and "
        "RewardTrainer; the other columns are provenance. RewardTrainer adds a `margin` column to its "
        "loss and cannot batch nulls: rows without a judge (human rows) have none, so fill it with "
        '0.0 (the plain Bradley-Terry loss, as `cai train pm` does: `ds.map(lambda r: {"margin": '
        'r["margin"] or 0.0})`) or drop the column.',
        columns={
            "prompt / chosen / rejected": "conversational messages; chosen is the preferred answer",
            "source": sources,
            "soft_label": "P(chosen is better) from the judge, averaged over the principles with a verdict",
            "margin": "logit of the soft label (null without a judge)",
            "weight / contested": "training weight and whether principles' verdicts disagreed",
            "verdict": "whether any principle gave a verdict on the pair (null for human rows)",
            "label_id": "joins the label stage's `audit` config (null for human rows)",
            "raters": "human pairs rated several times (`rater_column`): n ratings, how many were for "
            "chosen and against, and their summed weights (null otherwise)",
        },
    )


def dataset_card(
    title: str,
    summary: str,
    provenance: Mapping[str, Any],
    configs: Sequence[HubConfig],
    other_files: Mapping[str, str],
    counts: Mapping[str, int] | None = None,
) -> str:
    """A dataset card: YAML `configs` the loader reads, then what shaped the rows, for a human.

    A config without rows is left out of the YAML (it would fail to load) unless none has rows:
    then the default stays listed, so the loader still reads nothing but that one file.
    """
    _check(configs)
    ordered = sorted(configs, key=lambda c: not c.default)  # default first: it picks the reader
    listed = [c for c in ordered if c.rows] or ordered[:1]
    front = {"configs": [_yaml(c) for c in listed], "tags": ["constitutional-ai", "rlaif", "cai"]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {title}", "", summary, ""]
    lines += ["## Loading", "", "```python", "from datasets import load_dataset", ""]
    lines += [f'{listed[0].name} = load_dataset("path/or/hub-id")["train"]  # the default config']
    lines += [f'{c.name} = load_dataset("path/or/hub-id", "{c.name}")["train"]' for c in listed[1:]]
    lines += ["```", "", LOADING, ""]
    for c in ordered:
        default = " (default)" if c.default else ""
        lines += [f"### `{c.name}`{default}: `{c.file}`, {c.rows} rows", "", c.text, ""]
        lines += [EMPTY, ""] if c not in listed else []
        lines += [f"- `{name}`: {text}" for name, text in c.columns.items()] + [""]
    bookkeeping = ", ".join(f"`{name}`" for name in sorted(BOOKKEEPING))
    lines += ["## Other files (in no config)", ""]
    lines += [f"- `{name}`: {text}" for name, text in other_files.items()]
    lines += [f"- {bookkeeping}: cai's run bookkeeping (config, ledger, lock)"]
    lines += ["", "## Provenance", "", "| field | value |", "| --- | --- |"]
    lines += [f"| {key} | `{value}` |" for key, value in provenance.items()]
    if counts:
        lines += ["", "## Counts", ""] + [f"- {key}: {value}" for key, value in counts.items()]
    lines += ["", "Made with [cai](https://github.com/cai-project/cai)."]
    return "\n".join(lines) + "\n"


def _yaml(config: HubConfig) -> dict[str, Any]:
    """The Hub card format of one config (`default: true` marks the one loaded without a name)."""
    entry = {"config_name": config.name, "data_files": [{"split": "train", "path": config.file}]}
    return {**entry, "default": True} if config.default else entry


def _check(configs: Sequence[HubConfig]) -> None:
    """What the loader would reject or misread, caught when the card is written."""
    names = [c.name for c in configs]
    if len(set(names)) != len(names) or sum(c.default for c in configs) != 1:
        raise ValueError(f"configs need unique names and exactly one default: {names}")
    for c in configs:
        if not c.file.endswith(".parquet") or c.file in BOOKKEEPING:
            raise ValueError(
                f"config {c.name!r}: {c.file!r} is not a Parquet data file (one reader reads all)"
            )


def write_card(path: Path, card: str) -> None:
    atomic_write_bytes(path, card.encode("utf-8"))
