"""Crash-safe, resumable run storage: every stage of cai writes its rows through a `StageStore`.

    with StageStore(root, "sl", config, upstream={"prompts": prompts_hash}) as store:
        todo = [item for item in items if item.row_id not in store.committed()]
        for batch in batched(todo, 32):
            store.commit(generate_rows(batch), usage=backend.usage.minus(before))
        store.finalize(outputs={"sft.jsonl": write_sft})

Stages are long and get killed (Ctrl-C, OOM, `kill -9`, preemption), so the store is built so
that running the same command again resumes and produces the output an uninterrupted run with
the same seed would have produced:

- **Folders are keyed by the config hash.** A stage lives in `<root>/<stage>/<hash[:12]>/`,
  where the hash covers the stage name, its config and the hashes of the upstream outputs it
  consumed. Changing the constitution, a template or the sampling params therefore starts a new
  folder (a new run) instead of silently mixing rows made under two configs in one file; the
  old run stays where it was. A stage finds its inputs by computing their keys from its own
  config (`cai.stages.context`), never by asking which folder was written last.
- **The ledger is append-only.** `ledger.jsonl` holds one JSON row per line, each carrying a
  stable `row_id` (chosen by the stage from its input, e.g. the input index, never the prompt
  text, so two identical prompts stay two rows) and the `config_hash`. A batch is appended in
  one write and fsynced before `commit` returns, so after any kill the file is every committed
  batch plus at most one torn tail, which `open()` cuts off; those rows are simply redone.
- **Everything else is written atomically** (temp file in the same folder, fsync, rename,
  fsync the folder): the manifest, `rows.jsonl` and the stage's own outputs are either the old
  version or the new one, never half of each.
- **Output order never depends on the crash history.** `finalize` sorts the ledger rows
  canonically (by `row_id` unless told otherwise), so batches redone after a resume land where
  they would have been.
- **One writer per stage folder**: `open()` takes an exclusive file lock, so a second process
  started on the same stage fails with a clear error instead of interleaving ledger lines. The
  operating system drops the lock when its holder dies, even by `kill -9`.

The manifest's running figures (`usage`, `elapsed_s`) are saved after each commit; a kill
loses at most what happened since the last one. They are bookkeeping, never used to decide
what to redo: only the ledger is.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, overload

import orjson
from filelock import FileLock, Timeout
from pydantic import BaseModel

from cai.atomic import (
    TMP_SUFFIX,
    atomic_write_bytes,
    atomic_write_json,
    dump_line,
    fsync_dir,
    jsonable,
    new_file_mode,
    write_all,
)
from cai.backends.base import Usage
from cai.hashing import content_hash
from cai.ledger import LedgerRepair, StoreError, scan_ledger
from cai.manifest import MANIFEST, StageManifest, now, read_manifest, versions

log = logging.getLogger("cai.store")

M = TypeVar("M", bound=BaseModel)

LEDGER = "ledger.jsonl"
ROWS = "rows.jsonl"
_LOCK = ".lock"
BOOKKEEPING = frozenset({MANIFEST, LEDGER, ROWS, _LOCK})
"""The store's own files in a stage folder: no stage output may take these names, and no dataset
card lists them, so `datasets.load_dataset(folder)` never reads them."""


class StageLockedError(StoreError):
    """Another process (or another StageStore object) has this stage folder open."""


# --------------------------------------------------------------------------- the store


def _normalise_config(config: Mapping[str, Any] | BaseModel) -> dict[str, Any]:
    """Round-trip through JSON so the hash we compute now is the hash a reloaded manifest gives."""
    try:
        return orjson.loads(orjson.dumps(jsonable(config)))
    except TypeError as error:
        raise TypeError(f"stage config must be JSON-able (str keys, plain values): {error}") from None


class StageStore:
    """One stage's folder: `<root>/<stage>/<config_hash[:12]>/` with manifest.json, ledger.jsonl, outputs.

    Write through it only between `open()` and `close()` (or inside `with`); reading a finished
    stage (`rows`, `manifest`, `is_complete`) needs no open.
    """

    def __init__(
        self,
        root: Path,
        stage: str,
        config: Mapping[str, Any] | BaseModel,
        upstream: Mapping[str, str] | None = None,
    ) -> None:
        if not stage or "/" in stage or stage.startswith("."):
            raise ValueError(f"stage name {stage!r} must be a plain folder name")
        self.root = Path(root)
        self.stage = stage
        self.config = _normalise_config(config)
        self.upstream = dict(upstream or {})
        self.config_hash = content_hash({"stage": stage, "config": self.config, "upstream": self.upstream})
        self.path = self.root / stage / self.config_hash[:12]
        self.repair: LedgerRepair | None = None
        self._manifest: StageManifest | None = None
        self._lock: FileLock | None = None
        self._ledger_fd: int | None = None
        self._ledger_size = 0
        self._committed: set[str] = set()
        self._elapsed_base = 0.0
        self._started = 0.0

    def __repr__(self) -> str:
        return f"StageStore({self.stage!r}, {self.config_hash[:12]}, {str(self.path)!r})"

    # ----------------------------------------------------------------- reading

    @property
    def is_open(self) -> bool:
        return self._lock is not None

    @property
    def manifest(self) -> StageManifest:
        """The live manifest while open, else the one on disk."""
        if self._manifest is not None:
            return self._manifest
        manifest = read_manifest(self.path)
        if manifest is None:
            raise StoreError(f"{self.path} has no {MANIFEST}: the stage was never opened")
        return manifest

    @property
    def is_complete(self) -> bool:
        try:
            return self.manifest.status == "complete"
        except StoreError:
            return False

    def committed(self) -> set[str]:
        """Row ids already durable; a stage skips these on resume."""
        if self.is_open:
            return set(self._committed)
        return {row["row_id"] for row, _ in scan_ledger(self.path / LEDGER, self.config_hash).rows}

    @overload
    def rows(self, model: None = None) -> Iterator[dict[str, Any]]: ...
    @overload
    def rows(self, model: type[M]) -> Iterator[M]: ...

    def rows(self, model: type[BaseModel] | None = None) -> Iterator[Any]:
        """Committed rows in ledger (commit) order; `rows.jsonl` holds the canonical order.

        `config_hash` is dropped before validating into a model that has no such field, so row
        schemas with extra="forbid" need not declare the store's bookkeeping.
        """
        keep_hash = model is None or "config_hash" in model.model_fields
        for row, _ in scan_ledger(self.path / LEDGER, self.config_hash).rows:
            if not keep_hash:
                row = {k: v for k, v in row.items() if k != "config_hash"}
            yield row if model is None else model.model_validate(row)

    # ----------------------------------------------------------------- lifecycle

    def open(self) -> set[str]:
        """Create or resume the stage; returns the committed row ids.

        Takes the folder's lock, repairs the ledger tail and bumps `attempts`.
        """
        if self.is_open:
            raise StoreError(f"{self} is already open")
        self.path.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        try:
            self._remove_stale_temp_files()
            manifest = self._load_or_create_manifest()
            self._repair_ledger()
            self._started = time.monotonic()
            self._elapsed_base = manifest.elapsed_s
            manifest.attempts += 1
            manifest.rows = len(self._committed)
            self._manifest = manifest
            self._save_manifest()
            self._ledger_fd = os.open(
                self.path / LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, new_file_mode()
            )
            fsync_dir(self.path)  # the ledger file itself must survive, not only its bytes
        except BaseException:
            self._manifest = None
            self._release()
            raise
        return set(self._committed)

    def close(self) -> None:
        """Save the elapsed time of this attempt and release the lock; safe to call twice."""
        if not self.is_open:
            return
        try:
            self._save_manifest()
        finally:
            self._release()

    def __enter__(self) -> StageStore:
        self.open()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def discard(self) -> None:
        """Delete this stage folder (a `--fresh` rerun); refuses while another process has it open."""
        if not self.path.exists():
            return
        held = self.is_open
        if not held:
            self._acquire_lock()
        try:
            shutil.rmtree(self.path)
        finally:
            self._release()
        self._manifest, self._committed, self.repair = None, set(), None

    # ----------------------------------------------------------------- writing

    def add_elapsed(self, seconds: float) -> None:
        """Count work done for this stage before it was opened (a measurement that must not write)."""
        self._require_open()
        self._elapsed_base += seconds
        self._save_manifest()

    def commit(self, rows: Sequence[BaseModel | dict[str, Any]], usage: Usage | None = None) -> None:
        """Append one batch durably: when this returns, a `kill -9` cannot lose these rows.

        The batch is one write of whole lines followed by fsync, so a crash tears at most this
        batch's tail, which the next `open()` drops. A row id already committed is an error:
        silently writing it twice would duplicate a row in the output.
        """
        self._require_open()
        if self.manifest.status == "complete":
            raise StoreError(f"{self} is complete; discard() it to redo the stage")
        lines: list[bytes] = []
        ids: set[str] = set()
        for row in rows:
            record = self.record(row)
            if record["row_id"] in self._committed or record["row_id"] in ids:
                raise ValueError(f"row_id {record['row_id']!r} is already committed in {self}")
            ids.add(record["row_id"])
            lines.append(dump_line(record) + b"\n")
        if lines:
            self._append(b"".join(lines))
            self._committed.update(ids)
        if lines or usage is not None:
            manifest = self.manifest
            manifest.rows = len(self._committed)
            if usage is not None:
                for key, value in usage.counts().items():
                    manifest.usage[key] = manifest.usage.get(key, 0) + value
                for url, count in usage.per_server.items():
                    total = manifest.servers.setdefault(url, {})
                    for key, value in count.model_dump().items():
                        total[key] = total.get(key, 0) + value
            self._save_manifest()

    def finalize(
        self,
        outputs: Mapping[str, Callable[[Path], None]] | None = None,
        order: Callable[[dict[str, Any]], Any] | None = None,
        summary: Mapping[str, Any] | None = None,
    ) -> None:
        """Write rows.jsonl in canonical order, run the output writers, then mark the stage complete.

        Rows are sorted by `order(row)` then `row_id`, so ties never fall back on commit order
        (which depends on where earlier attempts were killed). `outputs` maps a file name in the
        stage folder to a writer that receives the target path and must write it atomically.
        The manifest is marked complete last: a crash before that leaves the stage running and
        the rerun finalizes again, overwriting the same files with the same bytes.
        """
        self._require_open()
        outputs = dict(outputs or {})
        for name in outputs:
            if name in BOOKKEEPING or Path(name).name != name or name.startswith("."):
                raise ValueError(
                    f"output name {name!r} must be a plain file name other than {sorted(BOOKKEEPING)}"
                )
        key = order or (lambda row: row["row_id"])
        scan = scan_ledger(self.path / LEDGER, self.config_hash)
        ranked = sorted(scan.rows, key=lambda item: (key(item[0]), item[0]["row_id"]))
        atomic_write_bytes(self.path / ROWS, b"".join(line + b"\n" for _, line in ranked))
        for name, writer in outputs.items():
            writer(self.path / name)
        manifest = self.manifest
        manifest.rows = len(ranked)
        manifest.outputs = {"rows": ROWS, **{name: name for name in outputs}}
        manifest.summary = dict(summary or {})
        manifest.status = "complete"
        self._save_manifest()

    # ----------------------------------------------------------------- internals

    def _require_open(self) -> None:
        if not self.is_open:
            raise StoreError(f"{self} is not open; call open() or use `with StageStore(...) as store:`")

    def _acquire_lock(self) -> None:
        lock = FileLock(self.path / _LOCK, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise StageLockedError(
                f"stage {self.stage!r} at {self.path} is already open in another process (or another "
                "StageStore); wait for it to finish or stop it, then run again"
            ) from None
        self._lock = lock

    def _release(self) -> None:
        if self._ledger_fd is not None:
            os.close(self._ledger_fd)
            self._ledger_fd = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _remove_stale_temp_files(self) -> None:
        """Temp files of atomic writes killed before their rename; we hold the lock, so none is live."""
        for tmp in self.path.glob(f".*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)

    def _load_or_create_manifest(self) -> StageManifest:
        manifest = read_manifest(self.path)
        stamp = now()
        if manifest is None:
            return StageManifest(
                stage=self.stage,
                config=self.config,
                upstream=self.upstream,
                config_hash=self.config_hash,
                status="running",
                created_at=stamp,
                updated_at=stamp,
                versions=versions(),
            )
        if manifest.config_hash != self.config_hash or manifest.stage != self.stage:
            raise StoreError(
                f"{self.path} belongs to stage {manifest.stage!r} with config hash {manifest.config_hash}, "
                f"not {self.stage!r} {self.config_hash}: a hash prefix collision or a moved folder"
            )
        now_versions = versions()
        changed = {
            k: (v, now_versions.get(k)) for k, v in manifest.versions.items() if now_versions.get(k) != v
        }
        if changed:
            # Kept as recorded at the first attempt (most rows come from it); the warning is the record.
            log.warning("%s: resuming with different versions (was, now): %s", self, changed)
        return manifest

    def _repair_ledger(self) -> None:
        file = self.path / LEDGER
        scan = scan_ledger(file, self.config_hash)
        self.repair = None
        if scan.good_end < scan.total:
            self.repair = LedgerRepair(scan.total - scan.good_end, scan.lines_after, scan.reason)
            with open(file, "r+b") as handle:
                handle.truncate(scan.good_end)
                handle.flush()
                os.fsync(handle.fileno())
            log.warning("%s: %s; those rows will be redone", self, self.repair)
        self._ledger_size = scan.good_end
        self._committed = {row["row_id"] for row, _ in scan.rows}

    def record(self, row: BaseModel | dict[str, Any]) -> dict[str, Any]:
        """The row as it goes into the ledger: JSON-able, with a string row_id and our config_hash.

        Public because the ledger shards of other ranks (`cai.shards`) check their rows the same way.
        """
        record = dict(jsonable(row))
        if not isinstance(record.get("row_id"), str):
            raise ValueError(f"every committed row needs a string row_id; got {record.get('row_id')!r}")
        if "config_hash" not in record:
            record["config_hash"] = self.config_hash
        elif record["config_hash"] != self.config_hash:
            raise ValueError(
                f"row {record['row_id']!r} has config_hash {record['config_hash']!r}, but this stage's is "
                f"{self.config_hash!r}: it was made under another config"
            )
        return record

    def _append(self, data: bytes) -> None:
        """Append + fsync; on failure cut back, so a half-written batch never sits under later ones."""
        assert self._ledger_fd is not None
        try:
            write_all(self._ledger_fd, data)
            os.fsync(self._ledger_fd)
        except BaseException:
            os.ftruncate(self._ledger_fd, self._ledger_size)
            raise
        self._ledger_size += len(data)

    def _save_manifest(self) -> None:
        manifest = self.manifest
        if self.is_open:
            manifest.elapsed_s = round(self._elapsed_base + time.monotonic() - self._started, 3)
        manifest.updated_at = now()
        atomic_write_json(self.path / MANIFEST, manifest)
