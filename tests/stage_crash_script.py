"""Run a real stage (sl or label) with the deterministic echo engine, for the crash tests.

    python tests/stage_crash_script.py RUN_DIR CALL_LOG [--stage sl] [--n 40] [--chunk 4] [--delay 0.02]

The echo engine logs every request to CALL_LOG (one JSON line per engine call) and sleeps a
little per call, so a SIGKILL lands at a random point: between calls, mid-chunk, or mid-commit.
"""

from __future__ import annotations

import argparse
import os

from cai.config import load_config
from cai.stages.context import StageContext
from cai.stages.label import run_label
from cai.stages.sl import run_sl
from cai.testing import EchoBackend


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("call_log")
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--chunk", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--delay", type=float, default=0.02)
    parser.add_argument("--stage", choices=["sl", "label"], default="sl")
    args = parser.parse_args()
    # every prompt appears twice: duplicate texts must both be kept as separate rows
    prompts = [f"prompt number {i // 2}" for i in range(args.n)]
    config = load_config(
        None,
        [
            f"run_dir={args.run_dir}",
            "model=echo",
            f"sl.rounds={args.rounds}",
            f"sl.chunk_size={args.chunk}",
            "sl.prompts.path=null",
            f"sl.prompts.items={prompts!r}",
            f"label.chunk_size={args.chunk}",
            "label.principles.count=2",
            "label.gold=null",
            "stages=[sl, label]",  # labels from the base model: no SFT stage in this recipe
            "label.prompts.path=null",
            f"label.prompts.items={prompts!r}",
        ],
    )
    from rich.console import Console

    ctx = StageContext(config, Console(file=open(os.devnull, "w")))
    # a judge whose verdict depends on the text, so labels differ from row to row
    engine = EchoBackend(
        log_path=args.call_log,
        delay=args.delay,
        score_fn=lambda prompt, options: [0.3, 0.7] if hash_of(prompt) % 2 else [0.8, 0.2],
    )
    ctx._backends[f"echo|{config.engine.model_dump_json()}"] = engine
    (run_sl if args.stage == "sl" else run_label)(ctx)


def hash_of(prompt) -> int:
    import hashlib

    return int(hashlib.sha256(prompt.chat[-1]["content"].encode()).hexdigest(), 16)


if __name__ == "__main__":
    main()
