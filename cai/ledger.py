"""The append-only ledger of a stage folder: scanning it, and telling a torn tail from damage.

A batch is appended in one write and fsynced, so after any kill the file is every committed
batch plus at most one torn tail, which `StageStore.open` cuts off (those rows are redone). A bad
line with good lines after it cannot come from a crash, and dropping the good rows after it
would destroy committed work, so it is an error that names the line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson


class StoreError(RuntimeError):
    """A run folder cannot be used as asked; the message says what to do."""


class LedgerCorruptError(StoreError):
    """The ledger is damaged somewhere a crash cannot explain (not at its tail)."""


@dataclass(frozen=True)
class LedgerRepair:
    """What `open()` cut from the ledger's tail; those rows are redone by the resumed run."""

    bytes_dropped: int
    lines_dropped: int
    reason: str

    def __str__(self) -> str:
        return (
            f"dropped {self.lines_dropped} line(s), {self.bytes_dropped} byte(s) "
            f"from the ledger tail ({self.reason})"
        )


@dataclass
class Scan:
    rows: list[tuple[dict[str, Any], bytes]]  # parsed row, its raw line (without "\n")
    good_end: int  # byte offset just after the last good line
    total: int  # file size
    lines_after: int  # lines (torn one included) after the last good line
    reason: str  # why the first dropped line was bad


def _line_problem(line: bytes, config_hash: str) -> tuple[dict[str, Any] | None, str]:
    try:
        row = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None, "not valid JSON"
    if not isinstance(row, dict):
        return None, "not a JSON object"
    if not isinstance(row.get("row_id"), str):
        return None, "no string row_id"
    if row.get("config_hash") != config_hash:
        return None, f"config_hash {row.get('config_hash')!r} is not this stage's {config_hash!r}"
    return row, ""


def scan_ledger(file: Path, config_hash: str) -> Scan:
    """Split the ledger into good rows and a droppable tail; refuse damage anywhere else.

    Appends are single fsynced writes, so a crash can only leave a torn *last* batch. A bad line
    with good lines after it cannot come from a crash, and dropping the good rows after it would
    destroy committed work, so it is an error that names the line.
    """
    data = file.read_bytes() if file.exists() else b""
    rows: list[tuple[dict[str, Any], bytes]] = []
    seen: set[str] = set()
    good_end, lines_after, first_bad, reason = 0, 0, 0, ""
    pos, lineno = 0, 0
    while pos < len(data):
        lineno += 1
        end = data.find(b"\n", pos)
        if end == -1:  # torn: the write never finished its last line
            lines_after += 1
            reason = reason or "last line has no newline"
            break
        line = data[pos:end]
        row, problem = _line_problem(line, config_hash)
        if row is None:
            first_bad, reason, lines_after = first_bad or lineno, reason or problem, lines_after + 1
        elif first_bad:
            raise LedgerCorruptError(
                f"{file}: line {first_bad} is damaged ({reason}) but good rows follow it (line {lineno}); "
                "only a torn last line can come from a crash. Inspect the file, or discard the run "
                "(--fresh) to start over."
            )
        elif row["row_id"] in seen:
            raise LedgerCorruptError(f"{file}: line {lineno}: row_id {row['row_id']!r} appears twice")
        else:
            seen.add(row["row_id"])
            rows.append((row, line))
            good_end = end + 1
        pos = end + 1
    return Scan(rows=rows, good_end=good_end, total=len(data), lines_after=lines_after, reason=reason)
