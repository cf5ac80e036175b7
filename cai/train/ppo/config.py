"""PPO settings: one pydantic section, documented once (`cai config schema` prints it).

    cai train ppo --config configs/quickstart.yaml --set ppo.steps=20 --set ppo.kl.kind=adaptive

The defaults are sized for the quickstart (SmolLM2-135M, LoRA, 2 CPU cores): a handful of
prompts per step and short responses. GPU recipes raise `rollout_batch_size`,
`sampling.max_new_tokens` and `steps`, and switch `rollout_engine` to vllm.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cai.sections import SamplingParams, Section
from cai.train.common import LoraSection


class KLSection(Section):
    """The KL penalty to the reference (SFT) model: what keeps reward hacking in check."""

    kind: Literal["fixed", "adaptive"] = Field(
        "fixed",
        description="fixed = constant coefficient; adaptive = steer the KL to `target` (Ziegler et al.).",
    )
    init_coef: float = Field(0.05, ge=0, description="KL coefficient (the initial one when adaptive).")
    target: float = Field(
        6.0, gt=0, description="Adaptive only: target KL per response (sum over its tokens), in nats."
    )
    horizon: float = Field(
        10000, gt=0, description="Adaptive only: samples over which a 20% KL error is corrected."
    )
    estimator: Literal["k1", "k2", "k3"] = Field(
        "k1",
        description="Per-token KL estimate: k1 = log(pi/ref) (unbiased), k3 (unbiased, >=0), k2 = 0.5 log^2.",
    )

    @model_validator(mode="after")
    def _adaptive_needs_positive_coef(self) -> KLSection:
        if self.kind == "adaptive" and self.init_coef <= 0:
            raise ValueError(
                "an adaptive KL controller needs init_coef > 0 (a multiplicative update never leaves 0)"
            )
        return self


class PTXSection(Section):
    """PPO-ptx (InstructGPT): add coef * LM loss on plain text, to limit regressions elsewhere."""

    coef: float = Field(0.0, ge=0, description="Weight of the language-modelling loss (0 = off).")
    source: str = Field(
        "hh_helpful",
        description="Shipped data name (hh_helpful: chosen demonstrations) or a .jsonl/.txt path; jsonl rows "
        "give `text`, `messages` (chat), `chosen` or `prompt` + `response`.",
    )
    batch_size: int = Field(2, ge=1, description="Texts per PPO mini-batch.")
    max_length: int = Field(256, ge=8, description="Texts are truncated to this many tokens.")


class PPOConfig(Section):
    """PPO against the preference model, with a KL penalty to the SFT (reference) model."""

    model: str | None = Field(None, description="Policy initialisation; None = the run's SFT model.")
    reward_model: str | None = Field(
        None,
        description="Preference model, or any sequence-classification model (safetensors); None = the "
        "run's PM.",
    )
    reward_label_index: int | None = Field(
        None,
        ge=0,
        description="For a reward_model with several labels: the label meaning 'acceptable'; reward = "
        "log p / (1 - p) of it. null = a scalar head (a PM), read as it is.",
    )
    prompts: list[str] = Field(
        default_factory=lambda: ["red_team", "helpful"],
        description="Prompt sources: shipped data names or .jsonl paths (rows with a `prompt`, text or chat)",
    )
    max_prompt_tokens: int = Field(
        256, ge=8, description="Prompts longer than this (chat-templated) are dropped."
    )
    lora: LoraSection | None = Field(
        default_factory=LoraSection,
        description="LoRA (reference = adapter disabled: one copy of the base); null = full fine-tune.",
    )
    steps: int = Field(8, ge=1, description="PPO steps (one rollout batch + its PPO epochs each).")
    rollout_batch_size: int = Field(4, ge=1, description="Prompts per step per process.")
    mini_batch_size: int = Field(
        4, ge=1, description="Rollouts per optimizer step; divides the rollouts of a step."
    )
    ppo_epochs: int = Field(2, ge=1, description="Passes over each rollout batch.")
    learning_rate: float = Field(
        1e-5, gt=0, description="AdamW learning rate (linear warmup, then constant)."
    )
    warmup_steps: int = Field(0, ge=0, description="PPO steps of linear learning-rate warmup.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount (1 = none, usual for text).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    clip_range: float = Field(0.2, gt=0, description="Policy ratio clip (epsilon).")
    clip_range_value: float = Field(0.2, gt=0, description="Value clip around the rollout-time values.")
    vf_coef: float = Field(
        0.1, ge=0, description="Weight of the value loss (the critic shares the policy's trunk)."
    )
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus weight (0 = only logged).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    whiten_rewards: bool = Field(False, description="Scale per-token rewards to unit variance per batch.")
    normalize_rewards: bool = Field(
        True, description="Standardise scores with running mean/std over all steps (RunningMoments)."
    )
    reward_clip: float | None = Field(
        5.0, gt=0, description="Clamp (normalised) scores to +-this; null = off."
    )
    missing_eos_penalty: float | None = Field(
        None, description="Subtract this from the score of responses cut at max_new_tokens (null = off)."
    )
    kl: KLSection = Field(default_factory=KLSection)
    ptx: PTXSection | None = Field(None, description="Pretraining-mix term; null = off.")
    sampling: SamplingParams = Field(
        default_factory=lambda: SamplingParams(max_new_tokens=48, temperature=1.0, top_p=1.0, seed=0),
        description="Rollout sampling; temperature also scales the log-probs; top_p must be 1 (log-probs are "
        "read from the full softmax). Its seed is unused (`seed`).",
    )
    rollout_engine: Literal["hf", "vllm"] = Field(
        "hf", description="hf = generate with the live policy; vllm = sync weights into vLLM each step (GPU)."
    )
    vllm_gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="vllm rollouts: share of GPU memory."
    )
    save_every: int = Field(1, ge=0, description="Checkpoint every N steps (0 = only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Newest checkpoints kept on disk.")
    nan_policy: Literal["skip", "halt"] = Field(
        "skip", description="On a non-finite reward, loss or gradient: skip the step (counted) or stop."
    )
    max_nan_steps: int = Field(3, ge=1, description="Stop anyway after this many consecutive skipped steps.")
    kl_warn: float = Field(20.0, gt=0, description="Warn when the KL per response stays above this (nats).")
    warn_patience: int = Field(3, ge=1, description="Consecutive steps a warning sign must persist.")
    report_to: list[Literal["tensorboard", "trackio"]] = Field(
        default_factory=list, description="Experiment trackers besides the rich console."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="auto = bf16 autocast on GPUs and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32; "
        "bf16 = always autocast; fp32 = full precision.",
    )
    seed: int = Field(0, description="Seeds data order, rollouts and mini-batch order (reproducible resume).")

    @model_validator(mode="after")
    def _consistent(self) -> PPOConfig:
        rollouts = self.rollout_batch_size * self.sampling.n
        if rollouts % self.mini_batch_size:
            raise ValueError(
                f"mini_batch_size ({self.mini_batch_size}) must divide the rollouts of a step "
                f"(rollout_batch_size x sampling.n = {rollouts})"
            )
        if self.sampling.stop:
            # Stop strings trim the text but not Sample.token_ids, so the tokens trained on would not
            # be the text that was rewarded.
            raise ValueError(
                "sampling.stop is not supported for PPO rollouts; the model's EOS ends a response"
            )
        if self.sampling.repetition_penalty != 1.0:
            raise ValueError("sampling.repetition_penalty must be 1 for PPO: it makes rollouts off-policy")
        if self.sampling.temperature == 0:
            raise ValueError("PPO needs sampled rollouts: sampling.temperature must be > 0")
        if self.sampling.top_p < 1.0:
            # Log-probs, ratios and the KL are read from the full (tempered) softmax; samples drawn
            # from the truncated nucleus come from another distribution, which biases them.
            raise ValueError(
                f"ppo.sampling.top_p must be 1 (got {self.sampling.top_p}): PPO computes log-probs and "
                "the KL on the full softmax, so rollouts sampled from a truncated nucleus would make "
                "every ratio biased; lower sampling.temperature instead"
            )
        return self
