"""Stage `ppo`: our own PPO against this config's preference model, from its SFT model.

    cai train ppo --config configs/quickstart.yaml

Checkpoints live inside the stage folder; killing the command and running it again resumes
from the newest one (model, optimizer, scheduler, RNG, KL controller, data position).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cai.stages.training import training_stage_def
from cai.train.ppo.config import PPOConfig

if TYPE_CHECKING:
    from cai.stages.context import StageContext


def _models(ctx: StageContext, complete: bool = False) -> tuple[str, str, dict[str, str]]:
    """(policy, reward model, upstream hashes) for this config."""
    cfg = ctx.config.ppo
    upstream: dict[str, str] = {}
    reward = cfg.reward_model
    if reward is None:
        reward, pm = ctx.model_of("pm", complete)
        upstream.update(pm)
    policy, sft = ctx.starting_model(cfg.model, complete)
    return policy, reward, {**upstream, **sft}


def _start(ctx: StageContext, complete: bool) -> tuple[str, dict[str, str]]:
    policy, _, upstream = _models(ctx, complete)
    return policy, upstream


def _train(ctx: StageContext, cfg: PPOConfig, output: Path, seed: int) -> tuple[dict, str]:
    from cai.train.ppo.trainer import train_ppo

    policy, reward, _ = _models(ctx, complete=True)
    result = train_ppo(cfg, output, policy=policy, reward_model=reward)
    history = result.history
    summary = {
        "rollouts": sum(h["rollouts"] for h in history),
        # mean response length x rollouts, per step: the tokens sampled
        "generated_tokens": round(sum(h["response_length"] * h["rollouts"] for h in history)),
        "model_path": str(result.policy_path) if result.policy_path else None,
        "reward_model": reward,
        "steps": result.steps,
        "resumed_from_step": result.resumed_from_step,
        "nan_skipped_steps": result.nan_skipped_steps,
        "warnings": result.warnings,
        "history": result.history,
    }
    first, last = (history[0], history[-1]) if history else ({}, {})
    what = (
        f"{result.steps} steps, reward {first.get('reward', float('nan')):.3f} -> "
        f"{last.get('reward', float('nan')):.3f}, KL {last.get('kl', float('nan')):.3f}, "
        f"KL coefficient {first.get('kl_coef', float('nan')):.4g} -> "
        f"{last.get('kl_coef', float('nan')):.4g}"
    )
    return summary, what


STAGE = training_stage_def(
    "ppo",
    config=PPOConfig,
    reads=("pm", "sft"),
    start=_start,
    train=_train,
    model_dir="policy",
    policy=True,
    help="PPO against the preference model with a KL penalty to the SFT model (resumable).",
    about="Our PPO against the PM, KL to the SFT model.",
)
