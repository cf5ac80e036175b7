"""cai's PPO trainer: rollouts through the engine protocol, rewards from the preference model, a KL
penalty to the SFT model, GAE and clipped PPO updates, crash-safe checkpoints.

    cai train ppo --config run.yaml
    result = train_ppo(config.ppo, "runs/x/ppo", policy="runs/x/sft/model", reward_fn=scorer.score)

One PPO step:
  1. take the next `rollout_batch_size` prompts (per process; a seeded order, so a resumed run
     sees the prompts an uninterrupted one would), sample responses with the live policy;
  2. score them (`reward_fn`), normalise and clip the scores;
  3. one no-grad pass for the rollout-time log-probs and values and the reference log-probs;
     per-token rewards = score at the last token - kl_coef * KL per token; GAE advantages;
  4. `ppo_epochs` passes of mini-batches: clipped policy loss + vf_coef * clipped value loss
     (- entropy bonus, + ptx_coef * LM loss on plain text), gradient clipping, AdamW;
  5. adapt the KL coefficient, log, look for reward-hacking signs, checkpoint.

The parts live beside this loop: `data` (which prompts and texts when), `rollout` (experience
tensors and the no-grad passes), `update` (the losses), `checkpoint` (crash-safe saves and
resumes), `monitor` (trackers, console, warning signs as callbacks). Every random choice
(prompt order, sampling seeds, mini-batch order) is derived from the config seed and the step
number, so `train()` after a kill resumes from the newest complete checkpoint and ends with the
weights an uninterrupted run would have had. The trainer runs the same under `accelerate
launch` (DDP; each process rolls out its own prompts, gradients are averaged).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console

from cai.atomic import atomic_write_bytes
from cai.backends.base import Chat
from cai.hashing import derive_seed
from cai.train.common import use_bf16
from cai.train.ppo import checkpoint
from cai.train.ppo.config import PPOConfig
from cai.train.ppo.core import (
    RunningMoments,
    clip_rewards,
    compute_gae,
    masked_sum,
    masked_whiten,
    token_rewards,
)
from cai.train.ppo.data import PPOData, load_prompts, load_texts, tokenize_texts
from cai.train.ppo.kl import make_kl_controller
from cai.train.ppo.monitor import callbacks
from cai.train.ppo.policy import HFRollout, PolicyWithValue, RolloutEngine, load_policy, save_policy
from cai.train.ppo.rollout import Rollouts, collate, full_params, score_rollouts
from cai.train.ppo.update import ppo_loss, ptx_loss

log = logging.getLogger("cai.train.ppo")

RESULT_FILE = "ppo_result.json"
POLICY_DIR = "policy"


class RewardFn(Protocol):
    """Scores responses: one float per (prompt, response), aligned with the inputs.

    The preference model's scorer (`cai.train.pm_metrics.PreferenceScorer.score`) is one; tests
    use rules. Each process scores its own rollouts.
    """

    def __call__(self, prompts: list[Chat], responses: list[str]) -> list[float]: ...


class NonFiniteError(RuntimeError):
    """Training stopped on a NaN/inf reward or gradient (nan_policy=halt, or too many in a row)."""


class PPOResult(BaseModel):
    """What a PPO run did: per-step history (one dict per step) and where the policy is."""

    model_config = ConfigDict(extra="forbid")

    output_dir: Path
    policy_path: Path | None = None
    steps: int = 0
    resumed_from_step: int | None = None
    nan_skipped_steps: int = 0
    history: list[dict[str, Any]] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    elapsed_s: float = 0.0


class PPOTrainer:
    """PPO with a KL penalty to the reference; see the module docstring for one step."""

    def __init__(
        self,
        config: PPOConfig,
        *,
        policy: str,
        reward_fn: RewardFn,
        prompts: Sequence[str | Chat],
        output_dir: str | Path,
        reference: str | None = None,
        accelerator: Any = None,
        console: Console | None = None,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from transformers import AutoTokenizer

        from cai.chats import as_chat

        self.config = config
        self.reward_fn = reward_fn
        self.output_dir = Path(output_dir)
        # cpu=True on a machine without CUDA: under a torchrun-style launch (`accelerate launch
        # --multi_gpu --num_processes 2`) accelerate then sets up gloo DDP instead of running
        # every process as an independent rank 0.
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.console = console or Console(stderr=True)
        self.bf16 = use_bf16(config.precision)
        self.tokenizer = AutoTokenizer.from_pretrained(policy)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

        set_seed(config.seed)  # value-head and LoRA init: identical on every process and run
        model, self.reference = load_policy(policy, config.lora, self.accelerator.device, reference)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
        warmup = config.warmup_steps
        # Stepped once per PPO step (not per mini-batch) and kept out of accelerator.prepare, which
        # would step it once per process under DDP.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)) if warmup else 1.0
        )
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.accelerator.register_for_checkpointing(self.scheduler)
        self.policy: PolicyWithValue = self.accelerator.unwrap_model(self.model)
        if self.policy.is_peft:
            checkpoint.save_only_trainable(self.accelerator, self.model)
        self.engine: RolloutEngine = self._make_engine(policy)

        eos = self.policy.lm.generation_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_id = int(eos[0] if isinstance(eos, list) else eos)
        chats = [as_chat(p) for p in prompts]
        kept = [c for c in chats if len(self.engine.encode_chat(c)) <= config.max_prompt_tokens]
        if not kept:
            raise ValueError(f"every prompt is longer than max_prompt_tokens={config.max_prompt_tokens}")
        if len(kept) < len(chats):
            log.warning(
                "dropped %d prompts longer than %d tokens", len(chats) - len(kept), config.max_prompt_tokens
            )
        ptx_ids = []
        if config.ptx is not None:
            ptx_ids = tokenize_texts(
                load_texts(config.ptx.source), self.tokenizer, self.eos_id, config.ptx.max_length
            )
            if not ptx_ids:
                raise ValueError(f"ptx source {config.ptx.source!r} has no usable text")
        self.data = PPOData(
            config,
            kept,
            ptx_ids,
            self.tokenizer.pad_token_id,
            self.accelerator.num_processes,
            self.accelerator.process_index,
        )
        self.callbacks = callbacks(config, self.output_dir)
        self.kl_ctl = make_kl_controller(
            config.kl.kind, config.kl.init_coef, config.kl.target, config.kl.horizon
        )
        self.moments = RunningMoments()
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.nan_skipped = 0
        self.nan_streak = 0
        self.warnings: list[str] = []

    def _make_engine(self, policy_path: str) -> RolloutEngine:
        if self.config.rollout_engine == "hf":
            return HFRollout(self.policy, self.tokenizer, self.bf16)
        from cai.train.ppo.policy import VLLMRollout

        return VLLMRollout(
            policy_path,
            self.tokenizer,
            seed=self.config.seed + self.accelerator.process_index,
            gpu_memory_utilization=self.config.vllm_gpu_memory_utilization,
        )

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning(message)
        if self.accelerator.is_main_process:
            self.console.print(f"[bold yellow]warning[/] {message}")

    # ------------------------------------------------------------------ one PPO step

    def _global_mean(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(tensor, reduction="mean").tolist()

    def _process_scores(self, raw: torch.Tensor, batch: Rollouts) -> torch.Tensor:  # (B,) -> (B,)
        cfg = self.config
        scores = raw.clone()
        if cfg.missing_eos_penalty is not None:
            scores = torch.where(batch.ended, scores, scores - cfg.missing_eos_penalty)
        if cfg.normalize_rewards:
            # Statistics of every score so far, from all processes, so each process normalises
            # the same way and a step's scale does not depend on its own batch alone.
            self.moments.update(self.accelerator.gather(scores))
            std = self.moments.std if self.moments.std > 1e-8 else 1.0
            scores = (scores - self.moments.mean) / std
        return clip_rewards(scores, cfg.reward_clip)

    def ppo_step(self, step: int) -> dict[str, Any]:
        """Roll out, score and train on one batch; returns the step's history row."""
        cfg = self.config
        started = time.perf_counter()
        chats = self.data.prompts_for(step)
        params = cfg.sampling.model_copy(
            update={"seed": derive_seed(cfg.seed, "rollout", step, self.accelerator.process_index)}
        )
        with full_params(self.accelerator, self.model):
            self.engine.sync(self.policy)
            completions = self.engine.generate(chats, params)
            batch = collate(
                chats,
                completions,
                cfg.sampling.n,
                self.engine.encode_chat,
                self.tokenizer,
                self.eos_id,
                self.accelerator.device,
            )
            raw = self.reward_fn(batch.chats, batch.texts)
            if len(raw) != len(batch.texts):
                raise ValueError(f"reward_fn returned {len(raw)} scores for {len(batch.texts)} responses")
            raw_scores = torch.tensor(
                [float(x) for x in raw], dtype=torch.float32, device=self.accelerator.device
            )
            bad = int(self.accelerator.reduce((~torch.isfinite(raw_scores)).sum(), reduction="sum"))
            if bad:
                return self._non_finite(
                    step, f"the reward function returned {bad} non-finite scores", started
                )
            score_rollouts(
                self.policy, self.reference, batch, cfg.mini_batch_size, cfg.sampling.temperature, self.bf16
            )
        rollout_s = time.perf_counter() - started
        assert (
            batch.old_logprobs is not None and batch.ref_logprobs is not None and batch.old_values is not None
        )

        scores = self._process_scores(raw_scores, batch)  # (B,)
        kl_coef = self.kl_ctl.value
        rewards, kl = token_rewards(
            scores, batch.old_logprobs, batch.ref_logprobs, batch.mask, kl_coef, cfg.kl.estimator
        )
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, batch.mask, shift_mean=False)  # (B, R)
        advantages, returns = compute_gae(rewards, batch.old_values, batch.mask, cfg.gamma, cfg.lam)
        batch.advantages = masked_whiten(advantages, batch.mask)  # (B, R)
        batch.returns = returns  # (B, R)

        sums: dict[str, float] = {}
        skipped = 0
        size = batch.input_ids.shape[0]
        updates_per_step = cfg.ppo_epochs * (size // cfg.mini_batch_size)
        order = torch.Generator().manual_seed(
            derive_seed(cfg.seed, "minibatch", step, self.accelerator.process_index)
        )
        for epoch in range(cfg.ppo_epochs):
            permutation = torch.randperm(size, generator=order)
            for k, start in enumerate(range(0, size, cfg.mini_batch_size)):
                index = permutation[start : start + cfg.mini_batch_size].to(self.accelerator.device)
                update = step * updates_per_step + epoch * (size // cfg.mini_batch_size) + k
                stats = self._update(batch.rows(index), batch.response_width, update)
                skipped += stats.pop("skipped")
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value
        self.scheduler.step()
        if skipped == updates_per_step:  # every update of the step was non-finite
            return self._non_finite(step, "every mini-batch had a non-finite loss or gradient", started)
        self.nan_streak = 0

        seq_kl = masked_sum(kl, batch.mask, dim=1)  # (B,) KL per response
        lengths = batch.mask.sum(dim=1).float()  # (B,)
        local = [
            raw_scores.mean().item(),
            raw_scores.square().mean().item(),
            seq_kl.mean().item(),
            lengths.mean().item(),
            batch.ended.float().mean().item(),
            scores.mean().item(),
        ]
        reward, reward_sq, mean_kl, length, ended, score = self._global_mean(local)
        averaged = self._global_mean([sums[k] / updates_per_step for k in sorted(sums)])
        self.kl_ctl.update(mean_kl, size * self.accelerator.num_processes)
        elapsed = time.perf_counter() - started
        return {
            "step": step + 1,
            "reward": reward,
            "reward_std": math.sqrt(max(reward_sq - reward * reward, 0.0)),
            "score": score,
            "kl": mean_kl,
            "kl_coef": kl_coef,
            "response_length": length,
            "rollouts": size * self.accelerator.num_processes,
            "ended_with_eos": ended,
            **dict(zip(sorted(sums), averaged, strict=True)),
            "lr": self.optimizer.param_groups[0]["lr"],
            "skipped_updates": skipped,
            "nan_skipped": False,
            "rollout_s": rollout_s,
            "step_s": elapsed,
            "samples_per_s": size * self.accelerator.num_processes / elapsed,
        }

    def _update(self, rows: dict[str, torch.Tensor], width_r: int, update: int) -> dict[str, float]:
        """One optimizer step on a mini-batch (plus its ptx batch); skipped if non-finite."""
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        ptx = None
        if cfg.ptx is not None:
            # Its own backward, without the DDP all-reduce: the PPO backward below reduces the
            # accumulated gradient of both (DDP does not allow two forwards before one backward).
            with self.accelerator.no_sync(self.model):
                ptx = ptx_loss(self.model, self.data.ptx_batch(update, self.accelerator.device), self.bf16)
                if cfg.ptx.coef > 0:
                    self.accelerator.backward(cfg.ptx.coef * ptx)
        loss, stats = ppo_loss(self.model, rows, width_r, cfg, self.bf16)
        self.accelerator.backward(loss)
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        # The gradient is all-reduced, so every process sees the same norm and skips together.
        finite = bool(torch.isfinite(torch.as_tensor(grad_norm)))
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        out = {k: float(v) for k, v in stats.items()}
        out["grad_norm"] = float(grad_norm) if finite else 0.0
        if ptx is not None:
            out["ptx_loss"] = float(ptx.detach())
            out["loss"] = out["loss"] + cfg.ptx.coef * out["ptx_loss"]
        out["skipped"] = 0 if finite else 1
        return out

    def _non_finite(self, step: int, what: str, started: float) -> dict[str, Any]:
        """Skip the step (counted) or stop, per nan_policy; checkpoints on disk are untouched."""
        self.nan_skipped += 1
        self.nan_streak += 1
        message = f"step {step + 1}: {what}"
        if self.config.nan_policy == "halt" or self.nan_streak >= self.config.max_nan_steps:
            why = (
                "nan_policy=halt" if self.config.nan_policy == "halt" else f"{self.nan_streak} steps in a row"
            )
            where = checkpoint.latest_checkpoint(self.output_dir)
            raise NonFiniteError(f"{message} ({why}); last checkpoint: {where or 'none'}")
        self.warn(f"{message}; step skipped ({self.nan_skipped} so far)")
        return {"step": step + 1, "nan_skipped": True, "step_s": time.perf_counter() - started}

    # ------------------------------------------------------------------ the loop

    def train(self) -> PPOResult:
        """Train to `config.steps`, resuming from the newest complete checkpoint if there is one."""
        started = time.perf_counter()
        resumed = self.resume()
        for callback in self.callbacks:
            callback.on_train_begin(self)
        try:
            while self.step < self.config.steps:
                row = self.ppo_step(self.step)
                self.step += 1
                self.history.append(row)
                for callback in self.callbacks:
                    callback.on_step_end(self, row)
                every = self.config.save_every
                if (every and self.step % every == 0) or self.step == self.config.steps:
                    self.save_checkpoint()
        finally:
            for callback in self.callbacks:
                callback.on_train_end(self)
            self.engine.close()
        policy_path = self.output_dir / POLICY_DIR
        if self.accelerator.is_main_process:
            save_policy(self.policy, self.tokenizer, policy_path)
        self.accelerator.wait_for_everyone()
        result = PPOResult(
            output_dir=self.output_dir,
            policy_path=policy_path,
            steps=self.step,
            resumed_from_step=resumed,
            nan_skipped_steps=self.nan_skipped,
            history=self.history,
            warnings=self.warnings,
            elapsed_s=time.perf_counter() - started,
        )
        if self.accelerator.is_main_process:
            atomic_write_bytes(self.output_dir / RESULT_FILE, result.model_dump_json(indent=2).encode())
        return result

    def latest_checkpoint(self) -> Path | None:
        return checkpoint.latest_checkpoint(self.output_dir)

    def save_checkpoint(self) -> Path:
        state = {
            "step": self.step,
            "data_position": self.step * self.data.prompts_per_step,
            "num_processes": self.accelerator.num_processes,
            "config_hash": checkpoint.config_hash(self.config),
            "kl_controller": self.kl_ctl.state_dict(),
            "running_moments": self.moments.state_dict(),
            "nan_skipped": self.nan_skipped,
            "nan_streak": self.nan_streak,
            "history": self.history,
            "warnings": self.warnings,
        }
        return checkpoint.save_checkpoint(
            self.accelerator, self.output_dir, self.step, state, self.config.keep_checkpoints
        )

    def resume(self) -> int | None:
        """Load the newest complete checkpoint, if any; returns its step."""
        found = self.latest_checkpoint()
        if found is None:
            return None
        state = checkpoint.read_state(found, self.config, self.accelerator.num_processes)
        if self.policy.is_peft:
            checkpoint.check_trained_weights(found, self.model)
        self.accelerator.load_state(str(found), strict=not self.policy.is_peft)
        self.step = int(state["step"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.moments.load_state_dict(state["running_moments"])
        self.nan_skipped = int(state["nan_skipped"])
        self.nan_streak = int(state["nan_streak"])
        self.history = list(state["history"])
        self.warnings = list(state["warnings"])
        if self.accelerator.is_main_process:
            self.console.print(f"[bold]Resuming PPO[/] from {found} (step {self.step}/{self.config.steps})")
        return self.step


def train_ppo(
    config: PPOConfig,
    output_dir: str | Path,
    *,
    policy: str | None = None,
    reward_model: str | None = None,
    reward_fn: RewardFn | None = None,
    prompts: Sequence[str | Chat] | None = None,
) -> PPOResult:
    """The `cai train ppo` stage: resolve models and prompts from the config, train, resume.

    `policy` / `reward_model` fill in `config.model` / `config.reward_model` when those are
    None (the pipeline passes the run's SFT model and PM); `reward_fn` overrides the PM.
    """
    from cai.models import resolve_model

    policy_name = config.model or policy
    if policy_name is None:
        raise ValueError("no policy model: set ppo.model or pass the run's SFT model")
    if reward_fn is None:
        reward_name = config.reward_model or reward_model
        if reward_name is None:
            raise ValueError("no reward: set ppo.reward_model or pass the run's preference model")
        from cai.train.pm_metrics import PreferenceScorer

        scorer = PreferenceScorer(  # a label index the model lacks fails here, before training
            resolve_model(reward_name),
            label_index=config.reward_label_index,
            label_field="ppo.reward_label_index",
        )
        reward_fn = scorer.score
    trainer = PPOTrainer(
        config,
        policy=resolve_model(policy_name),
        reward_fn=reward_fn,
        prompts=list(prompts) if prompts is not None else load_prompts(config.prompts),
        output_dir=output_dir,
    )
    return trainer.train()
