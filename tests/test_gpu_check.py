"""`benchmarks/gpu_check.py` (make gpu-check) as a CPU dry run: every part reports a status.

On the GPU image trl and datasets are missing unless carried as wheels; the first test hides
them (a sitecustomize that makes their imports fail) to check that SFT and PM are skipped with
the reason while the rest runs. No GPU here: this exercises the code, not CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
PARTS = ("generate", "score_choices", "score_continuations", "sft", "pm", "ppo_full", "ppo_lora")


def run_check(
    tmp_path: Path, *args: str, hide: tuple[str, ...] = ()
) -> tuple[subprocess.CompletedProcess, Path]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    if hide:
        site = tmp_path / "site"
        site.mkdir()
        lines = [f"sys.modules[{name!r}] = None" for name in hide]
        (site / "sitecustomize.py").write_text("import sys\n" + "\n".join(lines) + "\n")
        env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO)])
    out = tmp_path / "gpu-check.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), *args], capture_output=True, text=True, env=env, timeout=600
    )
    return done, out


def test_without_cuda_it_refuses_unless_allowed(tmp_path):
    done, out = run_check(tmp_path)
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr and "--allow-cpu" in done.stderr
    assert not out.exists()


def test_cpu_dry_run_on_the_gpu_image_skips_what_needs_trl(tmp_path):
    done, out = run_check(tmp_path, "--allow-cpu", hide=("trl", "datasets"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["precision"] == "fp32" and result["ok"] is True
    parts = result["parts"]
    assert set(parts) == {*PARTS, "accelerate_launch"}
    for name in ("sft", "pm"):
        assert parts[name]["status"] == "skipped"
        assert "trl, datasets not installed" in parts[name]["reason"]
    for name in (
        "generate",
        "score_choices",
        "score_continuations",
        "ppo_full",
        "ppo_lora",
        "accelerate_launch",
    ):
        assert parts[name]["status"] == "ok", parts[name]
        assert parts[name]["seconds"] > 0
    assert parts["ppo_full"]["details"]["steps"] == 3 and parts["ppo_lora"]["details"]["steps"] == 3
    assert parts["generate"]["details"]["samples"] == 16
    assert parts["generate"]["peak_rss_bytes"] > 0 and parts["generate"]["peak_cuda_bytes"] is None


@pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(m) is None for m in ("trl", "datasets")),
    reason="trl and datasets are cai dependencies; this environment lacks them",
)
def test_cpu_dry_run_trains_sft_and_pm_when_trl_is_there(tmp_path):
    done, out = run_check(tmp_path, "--allow-cpu", "--parts", "sft,pm")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    parts = json.loads(out.read_text())["parts"]
    assert set(parts) == {"sft", "pm"}
    for name in ("sft", "pm"):
        assert parts[name]["status"] == "ok", parts[name]
        assert parts[name]["details"]["steps"] == 2 and len(parts[name]["details"]["loss"]) == 2
