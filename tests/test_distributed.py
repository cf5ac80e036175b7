"""`accelerate launch --num_processes 2` on CPU (gloo): the PM stage trains under DDP unchanged."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from cai.config import load_config
from cai.pipeline import run_pipeline
from cai.stages.context import StageContext

ROOT = Path(__file__).parent.parent


@pytest.mark.distributed
def test_preference_model_trains_on_two_cpu_processes(tmp_path, tiny_models):
    config = {
        "run_dir": str(tmp_path / "run"),
        "model": str(tiny_models.causal_lm),
        "label": {
            "prompts": {"path": "red_team.jsonl", "limit": 4},
            "gold": None,
            "sampling": {"max_new_tokens": 8},
            "principles": {"count": 2},
        },
        "mix": {"human": [{"path": "hh_helpful.jsonl", "limit": 12}]},
        "pm": {"train": {"max_steps": 2, "batch_size": 2, "max_length": 512}},
        "stages": ["label", "mix"],
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    run_pipeline(StageContext(load_config(path), Console(file=open(os.devnull, "w"))))
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            str(accelerate),
            "launch",
            "--config_file",
            str(ROOT / "configs/accelerate/cpu_ddp.yaml"),
            "-m",
            "cai",
            "train",
            "pm",
            "-c",
            str(path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    store = StageContext(load_config(path)).store("pm")  # this config's PM folder
    assert store is not None and store.is_complete
    summary = store.manifest.summary
    assert summary["steps"] == 2 and 0.0 <= summary["accuracy"] <= 1.0
    assert summary["world_size"] == 2  # recorded by rank 0 of the two processes
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(summary["model_path"])
    assert model.config.num_labels == 1
