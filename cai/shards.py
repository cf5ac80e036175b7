"""Per-rank ledger shards in a stage folder: where data-parallel ranks commit, and how rank 0 merges.

    shard = LedgerShard(store, rank=1); shard.open(); shard.commit(rows); shard.close()
    read_shards(store)        # rank -> committed rows of every shard of this config in the folder

In a launch of N processes rank 0 writes the stage's own ledger (`ledger.jsonl`, under `.lock`)
and rank r > 0 appends to `ledger.rank{r}.jsonl` under `.lock.rank{r}`, with the ledger's own
crash safety: one fsynced write per batch, a torn tail cut when the shard is opened again. The
rows carry the stage's config hash like the ledger's. When every row is in, rank 0 commits the
shards' rows to `ledger.jsonl` and deletes the shards, so a finished folder is the one a single
process leaves and `finalize` writes the same bytes.

Shards stay valid across launches: a relaunch with any number of processes reads every shard
present (a dead rank's committed rows count as done) and the folder's shards are merged at the
end whatever rank wrote them. A shard whose rows name another config's hash (copied in, or a
hash-prefix collision of the folder name) is never read or merged; a rank that would write to
such a file moves it aside first (`ledger.rank{r}.foreign-<hash>.jsonl`) and says so.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import orjson
from filelock import FileLock, Timeout

from cai.atomic import dump_line, fsync_dir, new_file_mode, write_all
from cai.ledger import StoreError, scan_ledger
from cai.store import LEDGER, StageStore

log = logging.getLogger("cai.shards")

SHARD_NAME = re.compile(r"ledger\.rank(\d+)\.jsonl")
MAIN_LOCK = ".lock"  # the stage folder's own lock (cai.store), held by rank 0

Rows = list[tuple[dict[str, Any], bytes]]  # parsed row, its raw line (without "\n")


def shard_file(folder: Path, rank: int) -> Path:
    return folder / f"ledger.rank{rank}.jsonl"


def lock_file(folder: Path, rank: int) -> Path:
    """The lock rank `rank` holds while it runs: the folder's own for rank 0, its shard's for others."""
    return folder / (MAIN_LOCK if rank == 0 else f".lock.rank{rank}")


def held(lock: Path) -> bool:
    """Whether a live process holds `lock` (the OS drops a lock when its holder dies, even by kill -9)."""
    if not lock.exists():
        return False
    probe = FileLock(lock, timeout=0)
    try:
        probe.acquire()
    except Timeout:
        return True
    probe.release()
    return False


def foreign_hash(file: Path, config_hash: str) -> str | None:
    """The other config hash a shard's rows carry, or None when they are this config's (or unreadable,
    which only a torn first line can be: that is cut like any torn tail)."""
    with open(file, "rb") as handle:
        first = handle.readline()
    try:
        row = orjson.loads(first)
    except orjson.JSONDecodeError:
        return None
    other = row.get("config_hash") if isinstance(row, dict) else None
    return other if isinstance(other, str) and other != config_hash else None


def shard_files(folder: Path, config_hash: str) -> dict[int, Path]:
    """rank -> shard file of this config in `folder`; shards of another config are left out (logged)."""
    found: dict[int, Path] = {}
    for file in sorted(folder.glob("ledger.rank*.jsonl")):
        match = SHARD_NAME.fullmatch(file.name)
        if match is None:
            continue
        other = foreign_hash(file, config_hash)
        if other is not None:
            log.warning("%s: rows of another config (%s), ignored", file, other[:12])
            continue
        found[int(match[1])] = file
    return found


def read_shards(store: StageStore) -> dict[int, Rows]:
    """rank -> committed rows of each shard of this config (a torn tail, e.g. a live rank's, is left out)."""
    return {
        rank: scan_ledger(file, store.config_hash).rows
        for rank, file in shard_files(store.path, store.config_hash).items()
    }


def merge_shards(store: StageStore) -> int:
    """Commit every shard row missing from the open store's ledger, then delete the shards.

    Returns the rows added. A crash in between leaves rows in both places; the rerun adds none
    of them twice. The same row id committed with different bytes in two places cannot come from
    a deterministic stage and is an error.
    """
    shards = read_shards(store)
    if not shards:  # every one-process run: nothing to read twice
        return 0
    ledger = {row["row_id"]: line for row, line in scan_ledger(store.path / LEDGER, store.config_hash).rows}
    added: dict[str, bytes] = {}
    for rank, rows in sorted(shards.items()):
        new = []
        for row, line in rows:
            earlier = ledger.get(row["row_id"], added.get(row["row_id"]))
            if earlier is None:
                new.append(row)
                added[row["row_id"]] = line
            elif earlier != line:
                raise StoreError(
                    f"{shard_file(store.path, rank)}: row {row['row_id']!r} differs from the one already "
                    "committed; the stage is not deterministic across ranks, so its shards cannot be merged"
                )
        if new:
            store.commit(new)
    for rank in shards:
        shard_file(store.path, rank).unlink()
    fsync_dir(store.path)
    return len(added)


class LedgerShard:
    """Rank `rank`'s append-only ledger in the stage folder, under its own lock."""

    def __init__(self, store: StageStore, rank: int) -> None:
        if rank < 1:
            raise ValueError("rank 0 writes the stage's own ledger, not a shard")
        self.store = store
        self.rank = rank
        self.path = shard_file(store.path, rank)
        self._lock: FileLock | None = None
        self._fd: int | None = None
        self._size = 0
        self._ids: set[str] = set()

    def open(self) -> None:
        """Take the shard's lock, set a foreign file aside, cut a torn tail, open for appending."""
        self.store.path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(lock_file(self.store.path, self.rank), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise StoreError(
                f"rank {self.rank}'s shard of stage {self.store.stage!r} at {self.path} is open in another "
                "process: is an earlier launch still running? Stop it, then launch again"
            ) from None
        self._lock = lock
        try:
            self._open_file()
        except BaseException:
            self.close()
            raise

    def _open_file(self) -> None:
        if self.path.exists():
            other = foreign_hash(self.path, self.store.config_hash)
            if other is not None:
                aside = self.path.with_name(f"ledger.rank{self.rank}.foreign-{other[:12]}.jsonl")
                log.warning("%s holds rows of another config; moved to %s, never merged", self.path, aside)
                os.replace(self.path, aside)
        scan = scan_ledger(self.path, self.store.config_hash)
        if scan.good_end < scan.total:
            with open(self.path, "r+b") as handle:
                handle.truncate(scan.good_end)
                handle.flush()
                os.fsync(handle.fileno())
            cut = scan.total - scan.good_end
            log.warning("%s: cut %d byte(s) of a torn tail; those rows will be redone", self.path, cut)
        self._size = scan.good_end
        self._ids = {row["row_id"] for row, _ in scan.rows}
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, new_file_mode())
        fsync_dir(self.store.path)

    def commit(self, rows: list[Any]) -> None:
        """Append one batch durably (one write + fsync), exactly as `StageStore.commit` does."""
        if self._fd is None:
            raise StoreError(f"{self.path} is not open")
        lines, ids = [], set()
        for row in rows:
            record = self.store.record(row)
            if record["row_id"] in self._ids or record["row_id"] in ids:
                raise ValueError(f"row_id {record['row_id']!r} is already committed in {self.path}")
            ids.add(record["row_id"])
            lines.append(dump_line(record) + b"\n")
        if not lines:
            return
        data = b"".join(lines)
        try:
            write_all(self._fd, data)
            os.fsync(self._fd)
        except BaseException:
            os.ftruncate(self._fd, self._size)
            raise
        self._size += len(data)
        self._ids.update(ids)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
