"""Atomic, durable file writes: a reader (or a crash) sees the old file or the new one, never half.

    atomic_write_jsonl(path, rows)      # serialise all, temp file, fsync, rename, fsync the folder

Every file cai writes outside an append-only ledger goes through here: stage outputs,
manifests, checkpoints' state, reports. One implementation, so every writer gets the same
guarantees (permissions as a plain `open` would give, temp files that a restart can recognise
by their suffix and remove).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel

TMP_SUFFIX = ".tmp"
"""Temp files are `.<name>.<random>.tmp` next to their target."""


@cache
def new_file_mode() -> int:
    """The mode an ordinary `open(path, "w")` would give; mkstemp's 0600 would surprise users."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in `folder` survive a power cut, not just a process kill."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that readers (and crashes) see the old or the new file only.

    The temp file lives in the same folder because `os.replace` is only atomic within one
    filesystem; a kill leaves at most a `.<name>.*.tmp` file, which `StageStore.open` removes.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        try:
            os.fchmod(fd, path.stat().st_mode & 0o7777 if path.exists() else new_file_mode())
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def jsonable(obj: Any) -> Any:
    return obj.model_dump(mode="json") if isinstance(obj, BaseModel) else obj


def atomic_write_json(path: Path, obj: Any) -> None:
    """Indented and key-sorted so that manifests diff cleanly and equal content is equal bytes."""
    data = orjson.dumps(jsonable(obj), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    atomic_write_bytes(path, data + b"\n")


def dump_line(row: Mapping[str, Any]) -> bytes:
    """One canonical JSON line (sorted keys): the same row is the same bytes in every run."""
    return orjson.dumps(row, option=orjson.OPT_SORT_KEYS)


def atomic_write_jsonl(path: Path, rows: Iterable[BaseModel | dict[str, Any]]) -> None:
    """Serialise everything first, so a row that fails to serialise leaves the old file alone."""
    data = b"".join(dump_line(jsonable(row)) + b"\n" for row in rows)
    atomic_write_bytes(path, data)


def write_all(fd: int, data: bytes) -> None:
    """One write call in practice; loops only if the kernel accepts part of it (disk nearly full)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
