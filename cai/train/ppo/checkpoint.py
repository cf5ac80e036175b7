"""Crash-safe PPO checkpoints: written to a temp folder and renamed only once complete.

    checkpoints/step-000004/   accelerate state (model or adapter + value head, optimizer,
                               scheduler, RNG per process) + trainer_state.json

A checkpoint folder only gets its final name when everything in it is written, so the newest
`step-*` folder with a state file is always a complete one; a kill during a save leaves a
`.step-*.tmp` folder that the next save removes. A resume refuses a checkpoint written with a
different PPO config or number of processes: the data order would differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from cai.atomic import atomic_write_bytes, fsync_dir
from cai.train.ppo.config import PPOConfig

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"

FREE_FIELDS = {
    "steps",
    "save_every",
    "keep_checkpoints",
    "report_to",
    "kl_warn",
    "warn_patience",
    "max_nan_steps",
}
"""PPO config fields that may change between a run and its resumption without changing its meaning."""


def config_hash(config: PPOConfig) -> str:
    data = config.model_dump(mode="json", exclude=FREE_FIELDS)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint (a folder only gets its final name once complete)."""
    folder = Path(output_dir) / CHECKPOINTS
    done = sorted(p for p in folder.glob("step-*") if (p / STATE_FILE).is_file()) if folder.is_dir() else []
    return done[-1] if done else None


def save_checkpoint(accelerator: Any, output_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Everything a resumed run needs, written to a temp folder and renamed when complete.

    Every process calls this (accelerate saves each one's RNG); the main one writes the state
    file, renames the folder and drops checkpoints beyond the newest `keep`.
    """
    folder = Path(output_dir) / CHECKPOINTS
    final = folder / f"step-{step:06d}"
    staging = folder / f".step-{step:06d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left by a kill during an earlier save
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(
        str(staging)
    )  # model (adapter) + value head, optimizer, scheduler, RNG per process
    if accelerator.is_main_process:
        atomic_write_bytes(staging / STATE_FILE, json.dumps(state, indent=1).encode("utf-8"))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        fsync_dir(folder)
        for old in sorted(folder.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_state(checkpoint: Path, config: PPOConfig, num_processes: int) -> dict[str, Any]:
    """The trainer state of a checkpoint, refused when it cannot continue this run."""
    state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    if state["config_hash"] != config_hash(config):
        raise ValueError(
            f"{checkpoint} was written with a different PPO config; resume with the same config "
            f"(only steps, save_every and logging may change) or use a new output folder"
        )
    if state["num_processes"] != num_processes:
        raise ValueError(
            f"{checkpoint} was written by {state['num_processes']} processes, this run has "
            f"{num_processes}: the data order would differ; use the same launch"
        )
    return state


def check_trained_weights(checkpoint: Path, model: Any) -> None:
    """LoRA loads non-strictly (the base is not in the file): make sure nothing trained is missing."""
    from safetensors import safe_open

    file = checkpoint / "model.safetensors"
    if not file.is_file():
        return  # FSDP/DeepSpeed layouts: their loaders check
    with safe_open(str(file), framework="pt") as handle:
        saved = set(handle.keys())
    missing = {n for n, p in model.named_parameters() if p.requires_grad} - saved
    if missing:
        raise ValueError(f"{checkpoint} lacks trained weights: {sorted(missing)[:5]}")


def save_only_trainable(accelerator: Any, model: Any) -> None:
    """With LoRA, checkpoints hold only the adapter and value head, not a copy of the base.

    accelerate's save_state writes the whole state dict; for a 7B base that is 28 GB per
    checkpoint for a few MB of trainable weights. FSDP/DeepSpeed save through their own paths,
    so they are left to accelerate.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type not in (
        DistributedType.NO,
        DistributedType.MULTI_CPU,
        DistributedType.MULTI_GPU,
    ):
        return
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}

    def keep_trainable(models: list, weights: list[dict], output_dir: str) -> None:
        for i, state in enumerate(weights):
            weights[i] = {k: v for k, v in state.items() if k in trainable}

    accelerator.register_save_state_pre_hook(keep_trainable)
