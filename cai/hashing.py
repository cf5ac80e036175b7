"""Content hashes and derived seeds: the two ways cai turns data into stable numbers.

    content_hash({"stage": "sl", "config": {...}})   # sha256 of canonical JSON
    derive_seed(run_seed, row_id, round_number)      # a 63-bit seed, the same in every process

A leaf module (it imports nothing of cai), so stores, stages, engines and trainers share one
definition of each: a resumed run, another process, or another rank derives exactly the seeds
and keys the first one did.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson


def content_hash(payload: Any) -> str:
    """sha256 of canonical JSON (sorted keys); used for constitutions, templates and configs alike."""
    return hashlib.sha256(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)).hexdigest()


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (run seed, row id, round): stable across runs and processes.

    Seeds keyed by what they are for (a row and its round, a PPO step and its purpose), rather
    than drawn from a shared RNG stream, are what let a resumed run redo exactly the work an
    uninterrupted run would have done.
    """
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
