"""Prove the CUDA paths on the tiny models: generation, scoring, SFT, PM, PPO, accelerate launch.

    make gpu-check                                     # = python benchmarks/gpu_check.py gpu-check.json
    python benchmarks/gpu_check.py out.json --wheels wheels/   # install carried trl/datasets first
    python benchmarks/gpu_check.py out.json --allow-cpu        # dry run on CPU (fp32), for tests

Every part runs on `cai.testing.build_tiny_models` (built in-process: nothing is downloaded) and
records its status (ok / skipped with the reason / error with the message), its seconds and its
peak memory: `torch.cuda.max_memory_allocated` on CUDA (reset before each part), the process's
peak RSS so far on CPU. The JSON is rewritten after every part, so a run cut short still says
how far it got. On CUDA everything runs in bf16; with --allow-cpu on a machine without CUDA
everything runs in fp32 and the JSON says device "cpu". Without CUDA and without --allow-cpu
the script exits with status 2 before doing anything.

The GPU image this was written for has torch (CUDA), transformers, accelerate and peft, but not
trl, datasets or vllm, and no network. SFT and PM need trl and datasets: with --wheels DIR they
are installed from DIR (`pip install --no-index --find-links DIR ...`, see `make gpu-wheels`),
else those parts are skipped with the reason. vLLM is never needed here.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runs from a plain checkout, cai not installed
    sys.path.insert(0, str(REPO))

PARTS = (
    "generate",
    "score_choices",
    "score_continuations",
    "sft",
    "pm",
    "ppo_full",
    "ppo_lora",
    "accelerate_launch",
)
NEEDS = {"sft": ("trl", "datasets"), "pm": ("trl", "datasets")}
# What `make gpu-wheels` downloads (with --no-deps): trl and datasets, and the packages of theirs
# and cai's that the GPU image lacks (its package list: /work/.library/device/KINDS.md).
CARRIED = (
    "trl",
    "datasets",
    "dill",
    "multiprocess",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "orjson",
    "tenacity",
)
CHATS = [[{"role": "user", "content": f"How do I bake bread, step {i}?"}] for i in range(8)]


def install_wheels(folder: Path) -> dict[str, Any]:
    """pip-install the CARRIED packages that are missing, from `folder` only (no index)."""
    missing = [name for name in CARRIED if importlib.util.find_spec(name.replace("-", "_")) is None]
    report: dict[str, Any] = {"dir": str(folder), "missing_before": missing}
    if not missing:
        return report | {"installed": []}
    available = {p.name.split("-")[0].lower().replace("_", "-") for p in folder.glob("*.whl")}
    wanted = [name for name in missing if name in available]
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--find-links",
        str(folder),
        *wanted,
    ]
    done = subprocess.run(command, capture_output=True, text=True) if wanted else None
    importlib.invalidate_caches()
    report["not_in_folder"] = sorted(set(missing) - set(wanted))
    report["installed"] = wanted if done is not None and done.returncode == 0 else []
    if done is not None and done.returncode != 0:
        report["error"] = (done.stdout + done.stderr)[-2000:]
    return report


def download_wheels(folder: Path, python_version: str) -> int:
    """`pip download` the CARRIED packages at this environment's versions, as wheels for the GPU
    image (CPython `python_version`, manylinux x86-64), without their dependencies."""
    from importlib.metadata import version

    platforms = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(folder)]
    command += ["--python-version", python_version, "--implementation", "cp"]
    command += [arg for name in platforms for arg in ("--platform", name)]
    command += [f"{name}=={version(name)}" for name in CARRIED]
    print(" ".join(command[1:]), flush=True)
    return subprocess.run(command).returncode


def missing_modules(part: str) -> list[str]:
    return [name for name in NEEDS.get(part, ()) if importlib.util.find_spec(name) is None]


class Check:
    """Runs the parts on one device and keeps the JSON up to date."""

    def __init__(self, out: Path, device: str, work: Path, wheels: dict[str, Any] | None) -> None:
        import torch

        self.out, self.device, self.work = out, device, work
        self.cuda = device == "cuda"
        self.bf16 = self.cuda  # bf16 on the GPU; the CPU dry run stays in fp32
        self.result: dict[str, Any] = {
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "device": device,
            "gpu": torch.cuda.get_device_name(0) if self.cuda else None,
            "precision": "bf16" if self.bf16 else "fp32",
            "python": platform.python_version(),
            "versions": versions(),
            "wheels": wheels,
            "parts": {},
        }
        self.models: Any = None

    def write(self) -> None:
        temp = self.out.with_name(self.out.name + ".tmp")
        temp.write_text(json.dumps(self.result, indent=2) + "\n")
        temp.replace(self.out)

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        import torch

        missing = missing_modules(name)
        if missing:
            entry: dict[str, Any] = {
                "status": "skipped",
                "reason": f"{', '.join(missing)} not installed (pass --wheels DIR; see `make gpu-wheels`)",
                "seconds": 0.0,
            }
        else:
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            try:
                details = fn()
                if self.cuda:
                    torch.cuda.synchronize()
                entry = {"status": "ok", "details": details}
            except Exception as exc:  # noqa: BLE001 - recorded in the JSON and in the exit status
                entry = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
                entry["traceback"] = traceback.format_exc()[-3000:]
            entry["seconds"] = round(time.perf_counter() - started, 3)
            entry["peak_cuda_bytes"] = torch.cuda.max_memory_allocated() if self.cuda else None
            # ru_maxrss never goes down: the process's peak so far, not this part's alone
            entry["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.result["parts"][name] = entry
        self.write()
        print(f"{name:20s} {entry['status']:8s} {entry['seconds']:8.2f}s", entry.get("error", ""), flush=True)

    # ------------------------------------------------------------------ the parts

    def backend(self) -> Any:
        from cai.backends.hf import HFBackend
        from cai.sections import HFEngine

        dtype = "bfloat16" if self.bf16 else "float32"
        engine = HFEngine(device=self.device, dtype=dtype, score_dtype=dtype, batch_size=8)
        return HFBackend(str(self.models.causal_lm), engine)

    def generate(self) -> dict[str, Any]:
        from cai.sections import SamplingParams

        params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=1.0, n=2, seed=0)
        completions = self.backend().generate(CHATS, params)
        failed = [c.error for c in completions if not c.ok]
        if failed:
            raise RuntimeError(f"{len(failed)} generations failed: {failed[0]}")
        return {"chats": len(CHATS), "samples": sum(len(c.samples) for c in completions)}

    def score_choices(self) -> dict[str, Any]:
        from cai.backends.base import ScorePrompt

        prompts = [ScorePrompt(chat=c, assistant_prefix="The answer is: (") for c in CHATS]
        scores = self.backend().score_choices(prompts, ["A", "B"])
        if not all(s.ok for s in scores):
            raise RuntimeError("a score_choices item failed")
        return {"prompts": len(prompts)}

    def score_continuations(self) -> dict[str, Any]:
        from cai.backends.base import ContinuationPrompt

        items = [ContinuationPrompt(chat=c, continuation="Mix flour, water and yeast.") for c in CHATS]
        scores = self.backend().score_continuations(items)
        if not all(s.ok for s in scores):
            raise RuntimeError("a score_continuations item failed")
        return {"items": len(items), "tokens": sum(s.tokens for s in scores)}

    def train_section(self) -> Any:
        from cai.train.common import TrainSection

        precision = "bf16" if self.bf16 else "fp32"
        return TrainSection(
            max_steps=2, batch_size=2, learning_rate=1e-3, precision=precision, max_length=256
        )

    def sft(self) -> dict[str, Any]:
        from cai.train.sft import SFTConfig, train_sft

        examples = [
            c + [{"role": "assistant", "content": "Mix, knead, let it rise and bake."}] for c in CHATS
        ]
        config = SFTConfig(lora=None, train=self.train_section(), helpful_demos=0)
        result = train_sft(config, str(self.models.causal_lm), examples, self.work / "sft", seed=0)
        return {"steps": result.steps, "loss": result.train_loss}

    def pm(self) -> dict[str, Any]:
        from cai.records import PreferenceRow
        from cai.train.reward import PMConfig, train_preference_model

        rows = [
            PreferenceRow(
                prompt=c,
                chosen=[{"role": "assistant", "content": "Mix, knead, let it rise and bake."}],
                rejected=[{"role": "assistant", "content": "No."}],
                source="ai-harmless",
                label_id=f"gpu-check-{i}",
            )
            for i, c in enumerate(CHATS)
        ]
        config = PMConfig(lora=None, train=self.train_section())
        report = train_preference_model(
            config, str(self.models.classifier), rows, [], self.work / "pm", seed=0
        )
        return {"steps": report.steps, "loss": report.train_loss}

    def ppo(self, lora: bool) -> dict[str, Any]:
        from accelerate.state import AcceleratorState

        from cai.sections import SamplingParams
        from cai.train.common import LoraSection
        from cai.train.ppo.config import PPOConfig
        from cai.train.ppo.trainer import train_ppo

        AcceleratorState._reset_state(True)  # each PPO part gets its own accelerator
        config = PPOConfig(
            steps=3,
            rollout_batch_size=4,
            mini_batch_size=2,
            ppo_epochs=1,
            learning_rate=1e-3,
            lora=LoraSection(r=4, alpha=8, dropout=0.0) if lora else None,
            sampling=SamplingParams(max_new_tokens=12, temperature=1.0, top_p=1.0, seed=0),
            precision="bf16" if self.bf16 else "fp32",
            save_every=0,
        )
        result = train_ppo(
            config,
            self.work / ("ppo-lora" if lora else "ppo-full"),
            policy=str(self.models.causal_lm),
            reward_fn=lambda chats, texts: [len(t) / 10.0 for t in texts],
            prompts=[c[0]["content"] for c in CHATS],
        )
        AcceleratorState._reset_state(True)
        return {"steps": result.steps, "kl": [round(h["kl"], 5) for h in result.history]}

    def accelerate_launch(self) -> dict[str, Any]:
        """`accelerate launch` (1 process) of the PPO stage from a run config, in a child process."""
        import yaml

        precision = "bf16" if self.bf16 else "fp32"
        config = {
            "run_dir": str(self.work / "launch-run"),
            "model": str(self.models.causal_lm),
            "ppo": {
                "model": str(self.models.causal_lm),
                "reward_model": str(self.models.classifier),
                "steps": 2,
                "rollout_batch_size": 2,
                "mini_batch_size": 2,
                "ppo_epochs": 1,
                "lora": None,
                "sampling": {"max_new_tokens": 8, "temperature": 1.0},
                "precision": precision,
                "save_every": 0,
            },
            "stages": ["ppo"],
        }
        path = self.work / "launch.yaml"
        path.write_text(yaml.safe_dump(config))
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1"]
        launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if not self.cuda:
            launch.append("--cpu")
        command = [*launch, "-m", "cai", "train", "ppo", "-c", str(path)]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=self.work, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"exit {done.returncode}: {(done.stdout + done.stderr)[-1500:]}")
        return {
            "command": " ".join(command[1:]),
            # the largest descendant's peak RSS; the child's CUDA memory is not visible from here
            "child_peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
            "peak_cuda_bytes": "in the child process: not measured",
        }

    def all(self, parts: list[str]) -> bool:
        from cai.testing import build_tiny_models

        self.models = build_tiny_models(self.work / "tiny")
        table: dict[str, Callable[[], dict[str, Any]]] = {
            "generate": self.generate,
            "score_choices": self.score_choices,
            "score_continuations": self.score_continuations,
            "sft": self.sft,
            "pm": self.pm,
            "ppo_full": lambda: self.ppo(lora=False),
            "ppo_lora": lambda: self.ppo(lora=True),
            "accelerate_launch": self.accelerate_launch,
        }
        for name in parts:
            self.run(name, table[name])
        statuses = [entry["status"] for entry in self.result["parts"].values()]
        self.result["ok"] = "error" not in statuses
        self.result["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        self.write()
        return self.result["ok"]


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "vllm", "pydantic"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    import torch

    out["cuda"] = torch.version.cuda
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", default="gpu-check.json", help="JSON file to write")
    parser.add_argument("--wheels", type=Path, help="folder of wheels for trl, datasets and friends")
    parser.add_argument("--allow-cpu", action="store_true", help="without CUDA: a dry run on CPU in fp32")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}"
    )
    parser.add_argument("--download-wheels", type=Path, metavar="DIR", help="only fetch the wheels to carry")
    parser.add_argument("--python-version", default="3.12", help="with --download-wheels: the GPU's Python")
    args = parser.parse_args(argv)
    if args.download_wheels:
        return download_wheels(args.download_wheels, args.python_version)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; known: {', '.join(PARTS)}")

    wheels = install_wheels(args.wheels) if args.wheels else None  # before cai imports pydantic
    import torch

    if torch.cuda.is_available():
        device = "cuda"
    elif args.allow_cpu:
        device = "cpu"
    else:
        print(
            "gpu_check: no CUDA device (torch.cuda.is_available() is False, torch "
            f"{torch.__version__}); this check proves the CUDA paths. Use --allow-cpu for a CPU dry run.",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cai-gpu-check-") as work:
        ok = Check(out, device, Path(work), wheels).all(parts)
    print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
