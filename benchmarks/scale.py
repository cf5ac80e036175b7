"""The SL stage on 1 process vs N data-parallel processes (`accelerate launch`), wall time.

    HF_HUB_OFFLINE=1 python benchmarks/scale.py [--processes 2 --prompts 16 --new-tokens 32]
    HF_HUB_OFFLINE=1 python benchmarks/scale.py --model tiny      # the in-process tiny model

Runs `cai generate sl` on one process, then under `accelerate launch --num_processes N`
(configs/accelerate/cpu_ddp.yaml on CPU: gloo), each in a fresh run folder, and prints the wall
time of each command (start-up and model loads included) and the stage's own seconds from its
manifest, and whether rows.jsonl came out identical. The cores are split evenly: one process
gets them all, each of N gets cores/N threads. On a 2-core machine expect little: N engines
share the same cores, so the figure that matters is one on N GPUs (each rank takes cuda:LOCAL_RANK).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent


def run(command: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.perf_counter() - started


def stage_folder(run_dir: Path) -> Path:
    (manifest,) = (run_dir / "sl").glob("*/manifest.json")
    return manifest.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=4)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a model name or path, or 'tiny'")
    args = parser.parse_args()

    import yaml

    from cai.models import resolve_model

    work = Path(tempfile.mkdtemp(prefix="cai-scale-"))
    if args.model == "tiny":
        from cai.testing import build_tiny_models

        model = str(build_tiny_models(work / "tiny").causal_lm)
    else:
        model = resolve_model(args.model)  # converted once here, not by every rank
    cores = os.cpu_count() or 1
    accelerate = Path(sys.executable).with_name("accelerate")
    results = {}
    for processes in (1, args.processes):
        config = {
            "run_dir": str(work / f"run{processes}"),
            "model": model,
            "sl": {
                "prompts": {"path": "red_team.jsonl", "limit": args.prompts},
                "rounds": args.rounds,
                "chunk_size": args.chunk_size,
                "sampling": {"max_new_tokens": args.new_tokens},
            },
            "stages": ["sl"],
        }
        path = work / f"run{processes}.yaml"
        path.write_text(yaml.safe_dump(config))
        cai = ["-m", "cai", "generate", "sl", "-c", str(path)]
        if processes == 1:
            command = [sys.executable, *cai]
        else:
            launch = ["launch", "--config_file", str(ROOT / "configs/accelerate/cpu_ddp.yaml")]
            command = [str(accelerate), *launch, "--num_processes", str(processes), *cai]
        wall = run(command, max(1, cores // processes))
        folder = stage_folder(work / f"run{processes}")
        summary = json.loads((folder / "manifest.json").read_text())["summary"]
        results[processes] = (wall, summary, (folder / "rows.jsonl").read_bytes())

    print(f"sl, {args.prompts} prompts x {args.rounds} round(s), {args.new_tokens} new tokens, {model}")
    print(f"{'processes':>9} {'threads each':>12} {'wall s':>8} {'stage s':>8} {'rows by rank':>14}")
    for processes, (wall, summary, _) in results.items():
        ranks = "/".join(str(r["rows"]) for r in summary.get("ranks", [])) or str(summary["rows"])
        threads = max(1, cores // processes)
        print(f"{processes:>9} {threads:>12} {wall:>8.1f} {summary['seconds']:>8.1f} {ranks:>14}")
    (one_wall, one, one_rows), (many_wall, many, many_rows) = results[1], results[args.processes]
    print(f"speed-up, wall: {one_wall / many_wall:.2f}x; stage: {one['seconds'] / many['seconds']:.2f}x")
    print(f"rows.jsonl identical: {one_rows == many_rows} (thread counts differ, so floats may too)")


if __name__ == "__main__":
    main()
