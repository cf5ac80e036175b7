"""SL stage throughput vs the raw engine on the very same requests.

    HF_HUB_OFFLINE=1 python benchmarks/sl.py [--prompts 16 --rounds 1 --new-tokens 64]

The stage is run once on the default model while every engine call it makes (chats + sampling
params, seeds included) is recorded; then the same calls are replayed straight on a fresh
engine. Same seeds, same batches, same outputs: the only difference is the stage's own work
(templating, principle sampling, crash-safe commits, progress). Target: stage tokens/s >= 0.85
of the raw engine's.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class Recording:
    """Wraps a backend and records every generate call (and its wall time)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.usage = inner.usage
        self.calls: list[tuple[list, object]] = []
        self.seconds = 0.0

    def generate(self, chats, params):
        self.calls.append((list(chats), params))
        started = time.perf_counter()
        out = self.inner.generate(chats, params)
        self.seconds += time.perf_counter() - started
        return out

    def score_choices(self, prompts, options):
        return self.inner.score_choices(prompts, options)

    def close(self) -> None:
        self.inner.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()

    from rich.console import Console

    from cai.backends.hf import HFBackend
    from cai.config import load_config
    from cai.stages.context import StageContext
    from cai.stages.sl import run_sl

    with tempfile.TemporaryDirectory() as run_dir:
        config = load_config(
            "quickstart",
            [
                f"run_dir={run_dir}",
                f"model={args.model}",
                f"sl.prompts.limit={args.prompts}",
                f"sl.rounds={args.rounds}",
                f"sl.chunk_size={args.prompts}",
                f"sl.sampling.max_new_tokens={args.new_tokens}",
            ],
        )
        console = Console()
        ctx = StageContext(config, console)
        engine = Recording(HFBackend(args.model, config.engine))
        ctx._backends[f"{args.model}|{config.engine.model_dump_json()}"] = engine
        # load and run once outside the timed region: first calls pay for allocator and oneDNN
        # set-up, which would otherwise land on whichever side runs first
        warm = config.sl.sampling.model_copy(update={"max_new_tokens": 8})
        hello = [[{"role": "user", "content": "Hello there, how are you?"}]] * 4
        engine.inner.generate(hello, warm)
        started = time.perf_counter()
        run_sl(ctx)
        stage_seconds = time.perf_counter() - started
        tokens = engine.usage.completion_tokens

        raw = HFBackend(args.model, config.engine)
        raw.generate(hello, warm)
        started = time.perf_counter()
        for chats, params in engine.calls:
            raw.generate(chats, params)
        raw_seconds = time.perf_counter() - started

    stage_rate, raw_rate = tokens / stage_seconds, raw.usage.completion_tokens / raw_seconds
    ratio = stage_rate / raw_rate
    print(
        f"\nprompts={args.prompts} rounds={args.rounds} new_tokens<={args.new_tokens} "
        f"engine calls={len(engine.calls)}"
    )
    print(f"{'':24}{'seconds':>10}{'gen tokens':>12}{'tok/s':>10}")
    print(f"{'SL stage (end to end)':24}{stage_seconds:>10.1f}{tokens:>12}{stage_rate:>10.1f}")
    print(f"{'  of which engine':24}{engine.seconds:>10.1f}")
    print(f"{'raw engine replay':24}{raw_seconds:>10.1f}{raw.usage.completion_tokens:>12}{raw_rate:>10.1f}")
    print(
        f"\nstage / raw engine tokens/s = {ratio:.2f}  "
        f"(target >= 0.85: {'met' if ratio >= 0.85 else 'MISSED'})"
    )
    print(f"rows/s: {args.prompts / stage_seconds:.3f}")
    overhead = (stage_seconds - engine.seconds) / stage_seconds
    print(f"the stage's own work (outside engine calls): {overhead:.1%} of its time")


if __name__ == "__main__":
    main()
