"""Run the real SL stage with the deterministic echo engine, for the crash tests.

    python tests/sl_stage_script.py RUN_DIR CALL_LOG [--n 40] [--chunk 4] [--delay 0.02]

The echo engine logs every request to CALL_LOG (one JSON line per engine call) and sleeps a
little per call, so a SIGKILL lands at a random point: between calls, mid-chunk, or mid-commit.
"""

from __future__ import annotations

import argparse
import os

from cai.config import load_config
from cai.stages.base import StageContext
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
        ],
    )
    from rich.console import Console

    ctx = StageContext(config, Console(file=open(os.devnull, "w")))
    engine = EchoBackend(log_path=args.call_log, delay=args.delay)
    ctx._backends[f"echo|{config.engine.model_dump_json()}"] = engine
    run_sl(ctx)


if __name__ == "__main__":
    main()
