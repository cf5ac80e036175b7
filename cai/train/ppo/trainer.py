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

Every random choice (prompt order, sampling seeds, mini-batch order) is derived from the config
seed and the step number, so `train()` after a kill resumes from the newest complete checkpoint
and ends with the weights an uninterrupted run would have had. The trainer runs the same under
`accelerate launch` (DDP; each process rolls out its own prompts, gradients are averaged).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console

from cai.backends.base import Chat, Completion
from cai.hashing import derive_seed
from cai.train.common import use_bf16
from cai.train.ppo.config import PPOConfig
from cai.train.ppo.core import (
    RunningMoments,
    clip_rewards,
    compute_gae,
    entropy_from_logits,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)
from cai.train.ppo.kl import make_kl_controller
from cai.train.ppo.policy import HFRollout, PolicyWithValue, RolloutEngine, load_policy, save_policy

log = logging.getLogger("cai.train.ppo")

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
RESULT_FILE = "ppo_result.json"
POLICY_DIR = "policy"


class RewardFn(Protocol):
    """Scores responses: one float per (prompt, response), aligned with the inputs.

    The preference model's scorer (`cai.train.reward.PreferenceScorer.score`) is one; tests use
    rules. Each process scores its own rollouts.
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


@dataclass
class Rollouts:
    """One step's experience. B = rollouts on this process, P = prompt width, R = response width."""

    chats: list[Chat]  # B prompts (repeated n times for n samples per prompt)
    texts: list[str]  # B decoded responses
    input_ids: torch.Tensor  # (B, P + R) left-padded prompt, right-padded response
    attention_mask: torch.Tensor  # (B, P + R)
    position_ids: torch.Tensor  # (B, P + R)
    response_ids: torch.Tensor  # (B, R)
    mask: torch.Tensor  # (B, R) bool, real response tokens (EOS included)
    ended: torch.Tensor  # (B,) bool, the response ended with EOS (not cut at max_new_tokens)
    old_logprobs: torch.Tensor | None = None  # (B, R) policy at rollout time
    ref_logprobs: torch.Tensor | None = None  # (B, R) reference
    old_values: torch.Tensor | None = None  # (B, R) critic at rollout time
    advantages: torch.Tensor | None = None  # (B, R) whitened
    returns: torch.Tensor | None = None  # (B, R) critic targets

    @property
    def response_width(self) -> int:
        return self.response_ids.shape[1]

    def rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        names = ("input_ids", "attention_mask", "position_ids", "response_ids", "mask")
        names += ("old_logprobs", "old_values", "advantages", "returns")
        return {name: getattr(self, name)[index] for name in names}


# --------------------------------------------------------------------------------------- data


def _jsonl_rows(source: str) -> list[dict]:
    from cai.resources import data_path

    path = Path(source).expanduser()
    if not path.exists():
        path = data_path(source if source.endswith(".jsonl") else f"{source}.jsonl")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_prompts(sources: Sequence[str]) -> list[Chat]:
    """Prompts from shipped data names or jsonl paths; a row's `prompt` is a string or a chat."""
    from cai.chats import as_chat

    chats = [as_chat(row["prompt"]) for source in sources for row in _jsonl_rows(source)]
    if not chats:
        raise ValueError(f"no prompts found in {list(sources)}")
    return chats


def load_texts(source: str) -> list[str | Chat]:
    """Plain texts or demonstration chats for the PPO-ptx term (see PTXSection.source)."""
    path = Path(source).expanduser()
    if path.suffix == ".txt" and path.exists():
        return [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    texts: list[str | Chat] = []
    for row in _jsonl_rows(source):
        if "text" in row:
            texts.append(row["text"])
        elif "messages" in row:
            texts.append(row["messages"])
        elif "chosen" in row:
            chosen = row["chosen"]
            texts.append(chosen if isinstance(chosen, str) else list(row.get("prompt", [])) + list(chosen))
        elif "prompt" in row and ("response" in row or "completion" in row):
            answer = row.get("response", row.get("completion"))
            texts.append(
                [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": answer}]
            )
        else:
            raise ValueError(f"ptx source {source}: a row has none of text/messages/chosen/prompt+response")
    return texts


# --------------------------------------------------------------------------------------- trainer


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
        self._register_lora_checkpoint_hook()
        self.engine: RolloutEngine = self._make_engine(policy)

        eos = self.policy.lm.generation_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_id = int(eos[0] if isinstance(eos, list) else eos)
        chats = [as_chat(p) for p in prompts]
        self.prompts = [c for c in chats if len(self.engine.encode_chat(c)) <= config.max_prompt_tokens]
        if not self.prompts:
            raise ValueError(f"every prompt is longer than max_prompt_tokens={config.max_prompt_tokens}")
        if len(self.prompts) < len(chats):
            log.warning(
                "dropped %d prompts longer than %d tokens",
                len(chats) - len(self.prompts),
                config.max_prompt_tokens,
            )
        self.ptx_ids = self._tokenize_ptx() if config.ptx is not None else []

        for tracker in config.report_to:  # fail now, not after the first rollouts
            if importlib.util.find_spec(tracker) is None:
                raise ImportError(f"report_to={tracker!r} needs the {tracker} package: pip install {tracker}")
        self.kl_ctl = make_kl_controller(
            config.kl.kind, config.kl.init_coef, config.kl.target, config.kl.horizon
        )
        self.moments = RunningMoments()
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.nan_skipped = 0
        self.nan_streak = 0
        self.warnings: list[str] = []
        self._active_signs: set[str] = set()
        self._trackers: list[Any] = []

    # ------------------------------------------------------------------ setup helpers

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

    def _tokenize_ptx(self) -> list[list[int]]:
        assert self.config.ptx is not None
        ids = []
        for text in load_texts(self.config.ptx.source):
            if isinstance(text, str):
                tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos_id]
            else:
                rendered = self.tokenizer.apply_chat_template(text, tokenize=False)
                tokens = self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
            if len(tokens) >= 2:
                ids.append(tokens[: self.config.ptx.max_length])
        if not ids:
            raise ValueError(f"ptx source {self.config.ptx.source!r} has no usable text")
        return ids

    def _register_lora_checkpoint_hook(self) -> None:
        """With LoRA, checkpoints hold only the adapter and value head, not a copy of the base.

        accelerate's save_state writes the whole state dict; for a 7B base that is 28 GB per
        checkpoint for a few MB of trainable weights. FSDP/DeepSpeed save through their own
        paths, so they are left to accelerate.
        """
        from accelerate.utils import DistributedType

        if not self.policy.is_peft or self.accelerator.distributed_type not in (
            DistributedType.NO,
            DistributedType.MULTI_CPU,
            DistributedType.MULTI_GPU,
        ):
            return
        trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}

        def keep_trainable(models: list, weights: list[dict], output_dir: str) -> None:
            for i, state in enumerate(weights):
                weights[i] = {k: v for k, v in state.items() if k in trainable}

        self.accelerator.register_save_state_pre_hook(keep_trainable)

    # ------------------------------------------------------------------ data

    @property
    def prompts_per_step(self) -> int:
        """Prompts consumed per step by all processes together (the data position unit)."""
        return self.config.rollout_batch_size * self.accelerator.num_processes

    def prompts_for(self, step: int) -> list[Chat]:
        """This process's prompts of `step`: a fresh seeded permutation per pass over the data."""
        n = len(self.prompts)
        start = step * self.prompts_per_step + self.accelerator.process_index * self.config.rollout_batch_size
        chats = []
        for i in range(start, start + self.config.rollout_batch_size):
            epoch, offset = divmod(i, n)
            order = torch.randperm(
                n, generator=torch.Generator().manual_seed(derive_seed(self.config.seed, "data", epoch))
            )
            chats.append(self.prompts[int(order[offset])])
        return chats

    def _ptx_batch(self, update: int) -> dict[str, torch.Tensor]:
        """The `update`-th ptx batch of this process (right-padded), chosen like the prompts."""
        assert self.config.ptx is not None
        size = self.config.ptx.batch_size
        n = len(self.ptx_ids)
        start = (update * self.accelerator.num_processes + self.accelerator.process_index) * size
        rows = []
        for i in range(start, start + size):
            epoch, offset = divmod(i, n)
            order = torch.randperm(
                n, generator=torch.Generator().manual_seed(derive_seed(self.config.seed, "ptx", epoch))
            )
            rows.append(self.ptx_ids[int(order[offset])])
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.accelerator.device)
        mask = torch.tensor(
            [[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.accelerator.device
        )
        return {"input_ids": ids, "attention_mask": mask}  # (N, L) each

    # ------------------------------------------------------------------ rollouts

    def _full_params(self) -> contextlib.AbstractContextManager:
        """Whole weights for generation and no-grad passes through the unwrapped module.

        DDP keeps full weights on every process; FSDP and DeepSpeed ZeRO-3 shard them, and
        generating outside their forward needs the shards gathered first.
        """
        from accelerate.utils import DistributedType

        kind = self.accelerator.distributed_type
        if kind == DistributedType.FSDP:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            return FSDP.summon_full_params(self.model, writeback=False, recurse=True)
        if kind == DistributedType.DEEPSPEED:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.model.parameters()))
        return contextlib.nullcontext()

    def _collate(self, chats: list[Chat], completions: list[Completion]) -> Rollouts:
        """Token tensors of a rollout batch; a failed completion becomes an empty (masked) row."""
        n = self.config.sampling.n
        prompts, responses, texts, ended, row_chats = [], [], [], [], []
        for chat, completion in zip(chats, completions, strict=True):
            prompt = self.engine.encode_chat(chat)
            samples = completion.samples if completion.ok else []
            for k in range(n):
                sample = samples[k] if k < len(samples) else None
                if sample is None:
                    ids, text, stop = [], "", False
                else:
                    ids = sample.token_ids
                    if ids is None:  # an engine without token ids: re-tokenise the text
                        ids = self.tokenizer(sample.text, add_special_tokens=False)["input_ids"]
                    ids, text, stop = list(ids), sample.text, sample.finish_reason == "stop"
                    if stop:  # the engines cut the EOS off; emitting it was an action, keep it
                        ids.append(self.eos_id)
                prompts.append(prompt)
                responses.append(ids)
                texts.append(text)
                ended.append(stop)
                row_chats.append(chat)
        width_p = max(len(p) for p in prompts)
        width_r = max(1, max(len(r) for r in responses))
        pad = self.tokenizer.pad_token_id
        rows = [
            [pad] * (width_p - len(p)) + p + r + [pad] * (width_r - len(r))
            for p, r in zip(prompts, responses, strict=True)
        ]
        real = [
            [0] * (width_p - len(p)) + [1] * (len(p) + len(r)) + [0] * (width_r - len(r))
            for p, r in zip(prompts, responses, strict=True)
        ]
        device = self.accelerator.device
        input_ids = torch.tensor(rows, device=device)  # (B, P + R)
        attention = torch.tensor(real, device=device)  # (B, P + R)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # (B, P + R)
        lengths = torch.tensor([len(r) for r in responses], device=device)  # (B,)
        mask = torch.arange(width_r, device=device)[None, :] < lengths[:, None]  # (B, R)
        return Rollouts(
            chats=row_chats,
            texts=texts,
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            response_ids=input_ids[:, width_p:],
            mask=mask,
            ended=torch.tensor(ended, device=device),
        )

    def _response_forward(
        self, model: Any, batch: dict[str, torch.Tensor], width_r: int
    ) -> tuple[torch.Tensor, torch.Tensor]:  # logits (B, R, V) tempered, values (B, R)
        """Logits and values at the positions that predict each response token.

        The token at column P + t is predicted from column P + t - 1, which is also where the
        critic values the state before that token. Only the last R + 1 positions go through the
        vocabulary projection (`logits_to_keep`), the prompt's never.
        """
        with torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits, values = model(
                batch["input_ids"], batch["attention_mask"], batch["position_ids"], logits_to_keep=width_r + 1
            )  # (B, R + 1, V), (B, P + R)
        logits = logits[:, :-1].float() / self.config.sampling.temperature  # (B, R, V)
        values = values[:, -width_r - 1 : -1]  # (B, R)
        return logits, values

    @torch.no_grad()
    def _score_rollouts(self, batch: Rollouts) -> None:
        """Rollout-time log-probs and values, and the reference log-probs, in mini-batches."""
        width_r = batch.response_width
        old_lp, ref_lp, old_v = [], [], []
        for start in range(0, batch.input_ids.shape[0], self.config.mini_batch_size):
            index = torch.arange(start, min(start + self.config.mini_batch_size, batch.input_ids.shape[0]))
            rows = {k: getattr(batch, k)[index] for k in ("input_ids", "attention_mask", "position_ids")}
            logits, values = self._response_forward(self.policy, rows, width_r)  # (b, R, V), (b, R)
            old_lp.append(logprobs_from_logits(logits, batch.response_ids[index]))
            old_v.append(values)
            with torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                ref_logits = self.reference.logits(**rows, logits_to_keep=width_r + 1)  # (b, R + 1, V)
            ref_logits = ref_logits[:, :-1].float() / self.config.sampling.temperature
            ref_lp.append(logprobs_from_logits(ref_logits, batch.response_ids[index]))
        batch.old_logprobs = torch.cat(old_lp)  # (B, R)
        batch.ref_logprobs = torch.cat(ref_lp)  # (B, R)
        batch.old_values = torch.cat(old_v)  # (B, R)

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

    # ------------------------------------------------------------------ one PPO step

    def _global_mean(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(tensor, reduction="mean").tolist()

    def ppo_step(self, step: int) -> dict[str, Any]:
        """Roll out, score and train on one batch; returns the step's history row."""
        cfg = self.config
        started = time.perf_counter()
        chats = self.prompts_for(step)
        params = cfg.sampling.model_copy(
            update={"seed": derive_seed(cfg.seed, "rollout", step, self.accelerator.process_index)}
        )
        with self._full_params():
            self.engine.sync(self.policy)
            completions = self.engine.generate(chats, params)
            batch = self._collate(chats, completions)
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
            self._score_rollouts(batch)
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
        row: dict[str, Any] = {
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
        return row

    def _update(self, rows: dict[str, torch.Tensor], width_r: int, update: int) -> dict[str, float]:
        """One optimizer step on a mini-batch (plus its ptx batch); skipped if non-finite."""
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        ptx_loss = None
        if cfg.ptx is not None:
            ptx = self._ptx_batch(update)
            # Its own backward, without the DDP all-reduce: the PPO backward below reduces the
            # accumulated gradient of both (DDP does not allow two forwards before one backward).
            with self.accelerator.no_sync(self.model):
                ptx_loss = self.ptx_loss(self.model, ptx)
                if cfg.ptx.coef > 0:
                    self.accelerator.backward(cfg.ptx.coef * ptx_loss)
        loss, stats = self.ppo_loss(self.model, rows, width_r)
        self.accelerator.backward(loss)
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        # The gradient is all-reduced, so every process sees the same norm and skips together.
        finite = bool(torch.isfinite(torch.as_tensor(grad_norm)))
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        out = {k: float(v) for k, v in stats.items()}
        out["grad_norm"] = float(grad_norm) if finite else 0.0
        if ptx_loss is not None:
            out["ptx_loss"] = float(ptx_loss.detach())
            out["loss"] = out["loss"] + cfg.ptx.coef * out["ptx_loss"]
        out["skipped"] = 0 if finite else 1
        return out

    def ppo_loss(
        self, model: Any, rows: dict[str, torch.Tensor], width_r: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """pg_loss + vf_coef * vf_loss - entropy_coef * entropy, and detached stats."""
        cfg = self.config
        logits, values = self._response_forward(model, rows, width_r)  # (b, R, V), (b, R)
        mask = rows["mask"]  # (b, R)
        logprobs = logprobs_from_logits(logits, rows["response_ids"])  # (b, R)
        pg, pg_stats = policy_loss(logprobs, rows["old_logprobs"], rows["advantages"], mask, cfg.clip_range)
        vf, vf_stats = value_loss(values, rows["old_values"], rows["returns"], mask, cfg.clip_range_value)
        with torch.set_grad_enabled(cfg.entropy_coef > 0 and torch.is_grad_enabled()):
            entropy = masked_mean(entropy_from_logits(logits), mask)
        loss = pg + cfg.vf_coef * vf - cfg.entropy_coef * entropy
        stats = {
            "loss": loss.detach(),
            "policy_loss": pg.detach(),
            "value_loss": vf.detach(),
            "entropy": entropy.detach(),
            **pg_stats,
            **vf_stats,
        }
        return loss, stats

    def ptx_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token NLL of plain text under the policy (the PPO-ptx term, before coef)."""
        ids, mask = batch["input_ids"], batch["attention_mask"]  # (N, L)
        with torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits, _ = model(ids, mask)  # (N, L, V)
        logprobs = logprobs_from_logits(logits[:, :-1].float(), ids[:, 1:])  # (N, L - 1)
        return -masked_mean(logprobs, mask[:, 1:])

    def _non_finite(self, step: int, what: str, started: float) -> dict[str, Any]:
        """Skip the step (counted) or stop, per nan_policy; checkpoints on disk are untouched."""
        self.nan_skipped += 1
        self.nan_streak += 1
        where = self.latest_checkpoint()
        message = f"step {step + 1}: {what}"
        if self.config.nan_policy == "halt" or self.nan_streak >= self.config.max_nan_steps:
            why = (
                "nan_policy=halt" if self.config.nan_policy == "halt" else f"{self.nan_streak} steps in a row"
            )
            raise NonFiniteError(f"{message} ({why}); last checkpoint: {where or 'none'}")
        self._warn("nan", f"{message}; step skipped ({self.nan_skipped} so far)")
        return {"step": step + 1, "nan_skipped": True, "step_s": time.perf_counter() - started}

    # ------------------------------------------------------------------ the loop

    def train(self) -> PPOResult:
        """Train to `config.steps`, resuming from the newest complete checkpoint if there is one."""
        started = time.perf_counter()
        resumed = self.resume()
        self._open_trackers()
        try:
            while self.step < self.config.steps:
                row = self.ppo_step(self.step)
                self.step += 1
                self.history.append(row)
                self._report(row)
                self._check_signs()
                every = self.config.save_every
                if (every and self.step % every == 0) or self.step == self.config.steps:
                    self.save_checkpoint()
        finally:
            self._close_trackers()
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
            _atomic_write(self.output_dir / RESULT_FILE, result.model_dump_json(indent=2))
        return result

    # ------------------------------------------------------------------ checkpoints

    def _config_hash(self) -> str:
        # Fields that may change between a run and its resumption without changing its meaning.
        free = {
            "steps",
            "save_every",
            "keep_checkpoints",
            "report_to",
            "kl_warn",
            "warn_patience",
            "max_nan_steps",
        }
        data = self.config.model_dump(mode="json", exclude=free)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint (a folder only gets its final name once complete)."""
        folder = self.output_dir / CHECKPOINTS
        done = (
            sorted(p for p in folder.glob("step-*") if (p / STATE_FILE).is_file()) if folder.is_dir() else []
        )
        return done[-1] if done else None

    def save_checkpoint(self) -> Path:
        """Everything a resumed run needs, written to a temp folder and renamed when complete."""
        acc = self.accelerator
        folder = self.output_dir / CHECKPOINTS
        final = folder / f"step-{self.step:06d}"
        staging = folder / f".step-{self.step:06d}.tmp"
        if acc.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)  # left by a kill during an earlier save
            staging.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(staging))  # model (adapter) + value head, optimizer, scheduler, RNG per process
        if acc.is_main_process:
            state = {
                "step": self.step,
                "data_position": self.step * self.prompts_per_step,
                "num_processes": acc.num_processes,
                "config_hash": self._config_hash(),
                "kl_controller": self.kl_ctl.state_dict(),
                "running_moments": self.moments.state_dict(),
                "nan_skipped": self.nan_skipped,
                "nan_streak": self.nan_streak,
                "history": self.history,
                "warnings": self.warnings,
            }
            _atomic_write(staging / STATE_FILE, json.dumps(state, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            _fsync_dir(folder)
            for old in sorted(folder.glob("step-*"))[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def resume(self) -> int | None:
        """Load the newest complete checkpoint, if any; returns its step."""
        checkpoint = self.latest_checkpoint()
        if checkpoint is None:
            return None
        state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
        if state["config_hash"] != self._config_hash():
            raise ValueError(
                f"{checkpoint} was written with a different PPO config; resume with the same config "
                f"(only steps, save_every and logging may change) or use a new output folder"
            )
        if state["num_processes"] != self.accelerator.num_processes:
            raise ValueError(
                f"{checkpoint} was written by {state['num_processes']} processes, this run has "
                f"{self.accelerator.num_processes}: the data order would differ; use the same launch"
            )
        if self.policy.is_peft:
            self._check_checkpoint_weights(checkpoint)
        self.accelerator.load_state(str(checkpoint), strict=not self.policy.is_peft)
        self.step = int(state["step"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.moments.load_state_dict(state["running_moments"])
        self.nan_skipped = int(state["nan_skipped"])
        self.nan_streak = int(state["nan_streak"])
        self.history = list(state["history"])
        self.warnings = list(state["warnings"])
        if self.accelerator.is_main_process:
            self.console.print(
                f"[bold]Resuming PPO[/] from {checkpoint} (step {self.step}/{self.config.steps})"
            )
        return self.step

    def _check_checkpoint_weights(self, checkpoint: Path) -> None:
        """LoRA loads non-strictly (the base is not in the file): make sure nothing trained is missing."""
        from safetensors import safe_open

        file = checkpoint / "model.safetensors"
        if not file.is_file():
            return  # FSDP/DeepSpeed layouts: their loaders check
        with safe_open(str(file), framework="pt") as handle:
            saved = set(handle.keys())
        missing = {n for n, p in self.model.named_parameters() if p.requires_grad} - saved
        if missing:
            raise ValueError(f"{checkpoint} lacks trained weights: {sorted(missing)[:5]}")

    # ------------------------------------------------------------------ reporting

    def _open_trackers(self) -> None:
        if not self.accelerator.is_main_process:
            return
        for name in self.config.report_to:
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self._trackers.append(
                    ("tensorboard", SummaryWriter(log_dir=str(self.output_dir / "tensorboard")))
                )
            elif name == "trackio":
                import trackio

                trackio.init(
                    project="cai-ppo", name=self.output_dir.name, config=self.config.model_dump(mode="json")
                )
                self._trackers.append(("trackio", trackio))

    def _close_trackers(self) -> None:
        for name, tracker in self._trackers:
            if name == "tensorboard":
                tracker.close()
            else:
                tracker.finish()
        self._trackers = []

    def _report(self, row: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        numbers = {k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        for name, tracker in self._trackers:
            if name == "tensorboard":
                for key, value in numbers.items():
                    tracker.add_scalar(f"ppo/{key}", value, row["step"])
            else:
                tracker.log({f"ppo/{k}": v for k, v in numbers.items()}, step=row["step"])
        if row.get("nan_skipped"):
            return
        self.console.print(
            f"[bold]ppo {row['step']:>4}/{self.config.steps}[/] "
            f"reward {row['reward']:+.3f}±{row['reward_std']:.3f}  "
            f"kl {row['kl']:.3f} (coef {row['kl_coef']:.3g})  "
            f"entropy {row['entropy']:.2f}  clip {row['clipfrac']:.3f}  approx_kl {row['approx_kl']:.4f}  "
            f"vloss {row['value_loss']:.4f}  len {row['response_length']:.1f}  {row['step_s']:.1f}s",
            highlight=False,
            soft_wrap=True,
        )

    def _warn(self, key: str, message: str) -> None:
        self.warnings.append(message)
        log.warning(message)
        if self.accelerator.is_main_process:
            self.console.print(f"[bold yellow]warning[/] {message}")

    def _check_signs(self) -> None:
        """Warn once per episode of each reward-hacking sign (again only after it clears)."""
        signs = warning_signs(self.history, self.config)
        for key, message in signs.items():
            if key not in self._active_signs:
                self._warn(key, message)
        self._active_signs = set(signs)


def warning_signs(history: list[dict[str, Any]], config: PPOConfig) -> dict[str, str]:
    """Reward-hacking and collapse signs in the latest steps of a history, by kind.

    - kl: the policy keeps drifting far from the reference (the penalty is losing; raise
      kl.init_coef or use an adaptive controller);
    - reward_collapse: every response gets the same reward, so there is no signal left (often
      one degenerate response the reward model likes);
    - reward_jump: the mean reward leaps far outside its recent range, more often an exploit
      found than a skill learned;
    - length: responses collapse to almost nothing.
    """
    rows = [r for r in history if not r.get("nan_skipped")]
    n = config.warn_patience
    recent = rows[-n:]
    signs: dict[str, str] = {}
    if len(recent) == n and all(r["kl"] > config.kl_warn for r in recent):
        signs["kl"] = (
            f"KL to the reference has been above {config.kl_warn} for {n} steps "
            f"(now {recent[-1]['kl']:.2f}): the policy is drifting; possible reward hacking"
        )
    if len(recent) == n and all(r["reward_std"] < 1e-6 for r in recent):
        signs["reward_collapse"] = (
            f"every response got the same reward for {n} steps ({recent[-1]['reward']:.4f}): "
            "no learning signal; possible reward hacking or mode collapse"
        )
    if len(rows) >= 6:
        before = torch.tensor([r["reward"] for r in rows[-11:-1]], dtype=torch.float64)
        spread = max(float(before.std()), float(before.abs().mean()) * 0.05, 1e-6)
        jump = rows[-1]["reward"] - float(before.mean())
        if jump > 6 * spread:
            signs["reward_jump"] = (
                f"mean reward jumped to {rows[-1]['reward']:.3f} from ~{float(before.mean()):.3f} "
                f"({jump / spread:.0f}x its recent spread): check the samples for an exploit"
            )
    if len(recent) == n and all(r["response_length"] < 2 for r in recent):
        signs["length"] = f"responses have collapsed to under 2 tokens for {n} steps"
    return signs


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------- stage


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

        reward_fn = PreferenceScorer(resolve_model(reward_name)).score
    trainer = PPOTrainer(
        config,
        policy=resolve_model(policy_name),
        reward_fn=reward_fn,
        prompts=list(prompts) if prompts is not None else load_prompts(config.prompts),
        output_dir=output_dir,
    )
    return trainer.train()
