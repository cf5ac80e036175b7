"""Data-parallel generation stages: each rank of a launch does its share of the chunks.

    accelerate launch --num_processes 8 -m cai generate sl -c my.yaml

    part = DataParallel(ctx, store)
    with part:                                    # rank 0 opens the store, the others a shard
        for number, chunk in part.pending_chunks(rows, row_id, size, "rows"):
            part.commit(make_rows(chunk), usage)
        if part.gather():                         # rank 0, once every row is in its ledger
            store.finalize(..., summary={..., **part.summary()})

Under one process (no `WORLD_SIZE`) this is the stage as it always was: the store's ledger, the
same files, the same bytes, and no `ranks` in the summary. Under N processes:

- **What is done** is read by rank 0 from the ledger and every shard present, whatever launch
  wrote them (a killed rank's committed rows count), and broadcast, so every rank plans from
  the same snapshot before any of them commits.
- **Who does what**: the pending chunks (numbered as in a fresh run, so seeds and batches are
  an uninterrupted run's) are dealt round-robin, pending chunk i to rank i mod N. Whole chunks,
  never single rows: engines whose numbers depend on batch composition give the same rows.
- **The end** is a barrier on the data: each rank polls the ledgers until every planned row is
  committed. A rank whose lock is free while its rows are missing has died, and a launch where
  nothing is committed for `CAI_RANK_TIMEOUT` seconds (default 1800) has hung: either way the
  error names the ranks and their missing rows; committed work is kept and relaunching, with
  any number of processes, redoes only what is missing.
- Rank 0 then merges the shards into the ledger (`cai.shards`), adds the other ranks' token
  usage to the manifest and finalizes alone; the others wait for it at a last barrier, so a
  `cai run` goes on to the next stage on every rank with this one complete.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from cai.backends.base import Usage
from cai.ledger import StoreError, scan_ledger
from cai.shards import LedgerShard, held, lock_file, merge_shards, read_shards, shard_files
from cai.stages.base import pending_chunks
from cai.store import LEDGER, StageStore
from cai.world import Comm, World, comm, rank_timeout, world

if TYPE_CHECKING:
    from cai.stages.context import StageContext

T = TypeVar("T")
R = TypeVar("R")

POLL_S = (0.2, 5.0)  # first and longest pause between looks at the ledgers


class RankFailedError(StoreError):
    """Another rank of the launch failed or never arrived; committed rows are kept."""


def deal(pending: Sequence[T], ranks: int) -> list[list[T]]:
    """Pending chunk i to rank i mod `ranks`: shares differ by at most one chunk."""
    return [list(pending[rank::ranks]) for rank in range(ranks)]


def tokens(usage: Usage) -> int:
    return usage.prompt_tokens + usage.completion_tokens + usage.scored_tokens


class DataParallel:
    """One rank's part in a data-parallel stage (see the module docstring)."""

    def __init__(self, ctx: StageContext, store: StageStore, here: World | None = None) -> None:
        self.ctx = ctx
        self.store = store
        self.world = here or world()
        self._comm: Comm | None = None
        self._shard: LedgerShard | None = None
        self._plan: list[set[str]] = [set() for _ in range(self.world.size)]
        self.rows = 0
        self.usage = Usage()
        self.ranks: list[dict[str, int]] = []

    @property
    def main(self) -> bool:
        return self.world.main

    @property
    def comm(self) -> Comm:
        if self._comm is None:
            self._comm = comm()
        return self._comm

    # ----------------------------------------------------------------- agreeing

    def on_main(self, fn: Callable[[], R]) -> R | None:
        """`fn()` on rank 0 only (None elsewhere); the others wait, and fail with rank 0's error."""
        if self.world.size == 1:
            return fn()
        if self.main:
            try:
                result = fn()
            except BaseException as error:
                self.comm.broadcast(f"{type(error).__name__}: {error}")
                raise
            self.comm.broadcast(None)
            return result
        failure = self.comm.broadcast(None)
        if failure is not None:
            raise RankFailedError(f"rank 0 stopped stage {self.store.stage!r}: {failure}")
        return None

    def _everywhere(self, fn: Callable[[], None]) -> None:
        """`fn()` on every rank; if it fails anywhere, every rank stops (naming the ranks that failed)."""
        failure, own = None, None
        try:
            fn()
        except Exception as error:
            failure, own = f"{type(error).__name__}: {error}", error
        failures = self.comm.all_gather(failure) if self.world.size > 1 else [failure]
        if own is not None:
            raise own
        failed = {rank: text for rank, text in enumerate(failures) if text is not None}
        if failed:
            raise RankFailedError(f"stage {self.store.stage!r} stopped on rank(s) {sorted(failed)}: {failed}")

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> DataParallel:
        self.on_main(self.store.open)  # first: under --fresh rank 0 has discarded the folder by now
        try:
            self._everywhere(self._open_shard)
        except BaseException:
            self._close()
            raise
        return self

    def _open_shard(self) -> None:
        if not self.main:
            self._shard = LedgerShard(self.store, self.world.rank)
            self._shard.open()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._close()
        if kind is None:
            self.comm.barrier()  # the others leave once rank 0 has finalized

    def _close(self) -> None:
        if self._shard is not None:
            self._shard.close()
        if self.main:
            self.store.close()

    # ----------------------------------------------------------------- the work

    def _done(self) -> set[str]:
        """Row ids committed in the ledger or any shard of this config (rank 0 reads, all agree)."""
        if not self.main:
            return set(self.comm.broadcast(None))
        for rank, file in shard_files(self.store.path, self.store.config_hash).items():
            if rank >= self.world.size and held(lock_file(self.store.path, rank)):
                raise StoreError(
                    f"{file} is still being written by rank {rank} of an earlier launch; stop that "
                    "launch, then run again"
                )
        done = self.store.committed()
        for rows in read_shards(self.store).values():
            done.update(row["row_id"] for row, _ in rows)
        if self.world.size > 1:
            self.comm.broadcast(sorted(done))
        return done

    def pending_chunks(
        self, rows: Sequence[T], row_id: Callable[[T], str], size: int, what: str
    ) -> list[tuple[int, list[T]]]:
        """This rank's share of the chunks still to do (all of them in a one-process run)."""
        pending = pending_chunks(
            self.ctx, self.store, rows, row_id, size, what, done=self._done(), announce=self.main
        )
        shares = deal(pending, self.world.size)
        self._plan = [{row_id(row) for _, chunk in share for row in chunk} for share in shares]
        if self.main and self.world.size > 1:
            counts = ", ".join(f"rank {r}: {len(ids)}" for r, ids in enumerate(self._plan))
            self.ctx.console.print(
                f"{self.store.stage}: {len(pending)} chunks over {self.world.size} ranks ({counts} {what})"
            )
        return shares[self.world.rank]

    def commit(self, rows: Sequence[Any], usage: Usage | None = None) -> None:
        """Commit a chunk durably: to the stage's ledger on rank 0, to this rank's shard elsewhere."""
        if self._shard is None:
            self.store.commit(rows, usage=usage)
        else:
            self._shard.commit(list(rows))
        self.rows += len(rows)
        if usage is not None:
            self.usage = self.usage.plus(usage)

    def gather(self) -> bool:
        """Wait until every rank's rows are in; on rank 0 merge them into the ledger and return True."""
        if self.world.size > 1:
            self._wait_for_plan()
        figures = {"rank": self.world.rank, "rows": self.rows, "usage": self.usage.model_dump()}
        everyone = self.comm.all_gather(figures) if self.world.size > 1 else [figures]
        if not self.main:
            return False
        merge_shards(self.store)  # also the shards a killed launch left to a one-process rerun
        others = Usage()
        for figure in everyone[1:]:
            others = others.plus(Usage(**figure["usage"]))
        if self.world.size > 1:
            self.store.commit([], usage=others)
            self.ranks = [
                {"rank": one["rank"], "rows": one["rows"], "tokens": tokens(Usage(**one["usage"]))}
                for one in everyone
            ]
        return True

    def summary(self) -> dict[str, Any]:
        """`ranks`: per rank, the rows it committed and the tokens it used (absent in one process)."""
        return {"ranks": self.ranks} if self.ranks else {}

    def _committed_now(self) -> set[str]:
        ledger = scan_ledger(self.store.path / LEDGER, self.store.config_hash)
        done = {row["row_id"] for row, _ in ledger.rows}
        for rows in read_shards(self.store).values():
            done.update(row["row_id"] for row, _ in rows)
        return done

    def _wait_for_plan(self) -> None:
        """The barrier on the data: every planned row committed, or an error naming the missing ranks."""
        timeout, pause = rank_timeout(), POLL_S[0]
        last_sizes: dict[str, int] | None = None
        last_change = time.monotonic()
        missing: dict[int, set[str]] = {}
        while True:
            files = [self.store.path / LEDGER, *shard_files(self.store.path, self.store.config_hash).values()]
            sizes = {str(f): f.stat().st_size for f in files if f.exists()}
            if sizes != last_sizes:
                last_sizes, last_change = sizes, time.monotonic()
                done = self._committed_now()
                missing = {r: ids - done for r, ids in enumerate(self._plan) if ids - done}
                if not missing:
                    return
            dead = [r for r in missing if r != self.world.rank and not held(lock_file(self.store.path, r))]
            if dead:
                self._fail(missing, dead, "the process is gone (its lock is free)")
            if time.monotonic() - last_change > timeout:
                self._fail(missing, sorted(missing), f"nothing was committed for {timeout:g} s")
            time.sleep(pause)
            pause = min(pause * 2, POLL_S[1])

    def _fail(self, missing: dict[int, set[str]], ranks: list[int], why: str) -> None:
        rows = sum(len(missing[r]) for r in ranks)
        raise RankFailedError(
            f"stage {self.store.stage!r}: rank(s) {', '.join(map(str, ranks))} did not finish their share "
            f"({why}); {rows} of their rows are not committed. Every committed row is kept in "
            f"{self.store.path}: launch the same command again, with any number of processes, and only "
            "the missing rows are redone. (CAI_RANK_TIMEOUT sets how long ranks wait without progress.)"
        )
