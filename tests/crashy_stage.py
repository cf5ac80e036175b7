"""A stand-in stage for the crash tests: a deterministic "generation" committed in batches.

    python tests/crashy_stage.py --root DIR --n 200 --batch 7 --seed 3 [--dup] [--sleep 0.02]

It behaves like a real cai stage (skip committed rows, one engine request per batch, commit,
finalize) without a model, so tests can `kill -9` it anywhere and compare the result with an
uninterrupted run. Every engine request appends `<attempt>\\t<row ids>` to `<root>/calls.log`
before the "engine" works, which is how tests prove nothing committed is requested again.
It prints nothing except errors.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path

from cai.atomic import atomic_write_bytes
from cai.backends.base import Usage
from cai.store import StageStore

STAGE = "crashy"
CALLS_LOG = "calls.log"


def row_id(index: int) -> str:
    """Keyed by input position, never by prompt text: duplicate prompts stay two rows."""
    return f"row-{index:06d}"


def prompt(index: int, dup: bool) -> str:
    # With --dup every third prompt repeats the one before it, word for word.
    source = index - 1 if dup and index % 3 == 2 else index
    return f"Tell me about topic {source}."


def generate(seed: int, index: int, text: str) -> str:
    """A pseudo sample: a pure function of (seed, row index), like seeded per-row sampling."""
    return hashlib.sha256(f"{seed}:{index}:{text}".encode()).hexdigest()[:24]


def log_request(root: Path, attempt: int, ids: Sequence[str]) -> None:
    """One short O_APPEND write per line, so lines from killed attempts never interleave."""
    fd = os.open(root / CALLS_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{attempt}\t{','.join(ids)}\n".encode())
    finally:
        os.close(fd)


def run(root: Path, n: int, batch: int, seed: int, dup: bool, sleep: float) -> None:
    store = StageStore(root, STAGE, {"n": n, "seed": seed, "dup": dup})
    if store.is_complete:
        return
    with store:
        done = store.committed()
        attempt = store.manifest.attempts
        todo = [index for index in range(n) if row_id(index) not in done]
        # Real engines finish work in an order that differs between runs (async completion,
        # length bucketing): model that, so only the store's canonical order makes outputs equal.
        random.Random(attempt).shuffle(todo)
        for start in range(0, len(todo), batch):
            indices = todo[start : start + batch]
            log_request(root, attempt, [row_id(i) for i in indices])
            time.sleep(sleep)  # the "engine" at work: where most kills land
            rows = [
                {
                    "row_id": row_id(i),
                    "index": i,
                    "prompt": prompt(i, dup),
                    "response": generate(seed, i, prompt(i, dup)),
                }
                for i in indices
            ]
            store.commit(
                rows,
                usage=Usage(generate_calls=1, prompt_tokens=5 * len(rows), completion_tokens=24 * len(rows)),
            )

        def write_responses(path: Path) -> None:
            rows = sorted(store.rows(), key=lambda row: row["index"])
            atomic_write_bytes(path, "".join(f"{row['response']}\n" for row in rows).encode())

        store.finalize(outputs={"responses.txt": write_responses}, summary={"n": n})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--batch", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dup", action="store_true", help="make some prompts identical texts")
    parser.add_argument("--sleep", type=float, default=0.02, help="seconds per engine request")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # ledger repairs are expected here; tests check the files
    args.root.mkdir(parents=True, exist_ok=True)
    run(args.root, args.n, args.batch, args.seed, args.dup, args.sleep)


if __name__ == "__main__":
    main()
