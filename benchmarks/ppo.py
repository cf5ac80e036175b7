"""Cost of one RL step on SmolLM2-135M: cai's PPO (full fine-tune and LoRA) next to trl's RLOO.

    HF_HUB_OFFLINE=1 python benchmarks/ppo.py [--samples 4 --new-tokens 32 --steps 2]

Each variant runs in its own process (so peak memory is its own): one warm-up step, then
--steps timed steps (median); with --rounds N the variants run N times interleaved and each
keeps its fastest round. A row reports samples/s (completions per second of whole steps: rollout,
scoring, reference and old-policy passes, update) and the process's peak RSS.
  ppo-full / ppo-lora: cai's PPOTrainer, --samples prompts x 1 sample, 1 PPO epoch, one
                       mini-batch, precision "auto" (the trainer default: bf16 autocast where
                       the hardware has native bf16, else fp32).
  rloo-full / rloo-lora: trl's RLOOTrainer on the same model, --samples completions per step
                       (--samples / 2 prompts x 2 generations, RLOO's minimum), 1 iteration,
                       the same precision, KL beta 0.05.
Both use the same rule reward (response length), so no reward model is timed, and the same
LoRA settings (cai's LoraSection defaults: r=16, q/v). Responses are sampled at temperature 1;
the mean length is printed because a step's cost follows it. Workers use --threads torch
threads (default 1): on a shared 2-core machine, 2 threads stall whenever another process runs
(we saw 10-50x slowdowns), while 1 thread degrades gracefully; both trainers get the same.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VARIANTS = ("ppo-full", "ppo-lora", "rloo-full", "rloo-lora")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _length_reward(texts: list[str]) -> list[float]:
    return [min(len(t), 400) / 100.0 for t in texts]


def run_ppo(variant: str, model: str, samples: int, new_tokens: int, steps: int) -> dict:
    from cai.sections import SamplingParams
    from cai.train.common import LoraSection
    from cai.train.ppo.config import PPOConfig
    from cai.train.ppo.data import load_prompts
    from cai.train.ppo.trainer import PPOTrainer

    config = PPOConfig(
        steps=steps + 1,
        rollout_batch_size=samples,
        mini_batch_size=samples,
        ppo_epochs=1,
        learning_rate=1e-5,
        lora=LoraSection() if variant == "ppo-lora" else None,
        sampling=SamplingParams(max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, seed=0),
        save_every=0,
    )
    trainer = PPOTrainer(
        config,
        policy=model,
        reward_fn=lambda chats, texts: _length_reward(texts),
        prompts=load_prompts(["red_team", "helpful"]),
        output_dir=tempfile.mkdtemp(prefix="cai-bench-ppo-"),
    )
    times, lengths = [], []
    for step in range(steps + 1):
        started = time.perf_counter()
        row = trainer.ppo_step(step)
        if step:  # step 0 warms up allocators and kernels
            times.append(time.perf_counter() - started)
            lengths.append(row["response_length"])
    return {"step_s": statistics.median(times), "samples": samples, "length": statistics.mean(lengths)}


def run_rloo(variant: str, model: str, samples: int, new_tokens: int, steps: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    from cai.train.common import LoraSection, use_bf16
    from cai.train.ppo.data import load_prompts

    chats = load_prompts(["red_team", "helpful"])
    dataset = Dataset.from_list([{"prompt": chat} for chat in chats])

    def reward(completions, **kwargs) -> list[float]:
        return _length_reward([c[-1]["content"] if isinstance(c, list) else c for c in completions])

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.lengths: list[float] = []
            self.started = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.started)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(logs["completions/mean_length"])

    lora = LoraSection()
    timer = Timer()
    args = RLOOConfig(
        output_dir=tempfile.mkdtemp(prefix="cai-bench-rloo-"),
        per_device_train_batch_size=samples,
        num_generations=2,
        max_completion_length=new_tokens,
        max_steps=steps + 1,
        learning_rate=1e-5,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        bf16=use_bf16("auto"),
        use_cpu=not torch.cuda.is_available(),
        beta=0.05,
        num_iterations=1,
        temperature=1.0,
        disable_dropout=True,
        seed=0,
    )
    trainer = RLOOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=dataset,
        callbacks=[timer],
        peft_config=LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules), task_type="CAUSAL_LM",
        ) if variant == "rloo-lora" else None,
    )  # fmt: skip
    trainer.train()
    return {
        "step_s": statistics.median(timer.times[1:]),
        "samples": samples,
        "length": statistics.mean(timer.lengths[1:]) if len(timer.lengths) > 1 else float("nan"),
    }


def worker(variant: str, model: str, samples: int, new_tokens: int, steps: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    run = run_ppo if variant.startswith("ppo") else run_rloo
    result = run(variant, model, samples, new_tokens, steps)
    result["peak_rss_mb"] = _peak_rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--samples", type=int, default=4, help="completions per step (even: RLOO needs 2 per prompt)"
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=1, help="repeat all variants, keep each one's best")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: robust when the 2 cores are shared)"
    )
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help="model folder (default: the built-in SmolLM2)")
    args = parser.parse_args()

    from cai.models import DEFAULT_MODEL, resolve_model

    model = args.model or resolve_model(DEFAULT_MODEL)
    if args.worker:
        worker(args.worker, model, args.samples, args.new_tokens, args.steps, args.threads)
        return

    import torch
    import transformers
    import trl

    from cai.train.common import use_bf16

    print(
        f"# SmolLM2-135M, {args.samples} samples/step, <= {args.new_tokens} new tokens, "
        f"median of {args.steps} steps; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
        f"{args.threads} torch thread(s), cuda={torch.cuda.is_available()}, "
        f"bf16 autocast={use_bf16('auto')}"
    )
    print(f"{'variant':<10} {'step s':>8} {'samples/s':>10} {'mean len':>9} {'peak RSS MB':>12}")
    rows: dict[str, dict] = {}
    for _ in range(args.rounds):  # interleaved, best of rounds: background load hits all alike
        for variant in args.variants.split(","):
            command = [sys.executable, __file__, "--worker", variant, "--model", model]
            command += ["--samples", str(args.samples), "--new-tokens", str(args.new_tokens)]
            command += ["--steps", str(args.steps), "--threads", str(args.threads)]
            proc = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(f"{variant:<10} failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
                continue
            row = json.loads(lines[-1][len("RESULT ") :])
            if variant not in rows or row["step_s"] < rows[variant]["step_s"]:
                rows[variant] = row
    for variant, row in rows.items():
        rate = row["samples"] / row["step_s"]
        print(
            f"{variant:<10} {row['step_s']:>8.2f} {rate:>10.2f} {row['length']:>9.1f} "
            f"{row['peak_rss_mb']:>12.0f}"
        )
    print(f"# load average after the runs: {os.getloadavg()[0]:.1f} (2 cores: above ~2 means contention)")
    for kind in ("full", "lora"):
        ppo, rloo = rows.get(f"ppo-{kind}"), rows.get(f"rloo-{kind}")
        if ppo and rloo:
            print(
                f"# {kind}: ppo/rloo samples/s ratio {rloo['step_s'] / ppo['step_s']:.2f}, "
                f"peak memory ratio {ppo['peak_rss_mb'] / rloo['peak_rss_mb']:.2f}"
            )


if __name__ == "__main__":
    main()
