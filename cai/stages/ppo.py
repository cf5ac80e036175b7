"""Stage `ppo`: our own PPO against the run's preference model, from its SFT model.

    cai train ppo --config configs/quickstart.yaml

Checkpoints live inside the stage folder; killing the command and running it again resumes
from the newest one (model, optimizer, scheduler, RNG, KL controller, data position).
"""

from __future__ import annotations

from pathlib import Path

from cai.stages.base import StageContext
from cai.store import StageStore


def stage_model(store: StageStore) -> str:
    """The model folder a training stage produced (its summary says where)."""
    return str(store.manifest.summary.get("model_path") or store.path / "model")


def run_ppo(ctx: StageContext, fresh: bool = False) -> StageStore:
    from cai.stages.training import training_stage
    from cai.train.ppo.trainer import train_ppo

    cfg = ctx.config.ppo
    upstream: dict[str, str] = {}
    reward = cfg.reward_model
    if reward is None:
        pm = ctx.upstream("pm")
        reward, upstream["pm"] = stage_model(pm), pm.config_hash
    policy = cfg.model
    if policy is None:
        sft = ctx.upstream_or_none("sft")
        if sft is not None:
            policy, upstream["sft"] = stage_model(sft), sft.config_hash
        else:
            policy = ctx.config.model

    def train(output: Path, seed: int) -> tuple[dict, str]:
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
        first, last = (result.history[0], result.history[-1]) if result.history else ({}, {})
        what = (
            f"{result.steps} steps, reward {first.get('reward', float('nan')):.3f} -> "
            f"{last.get('reward', float('nan')):.3f}, KL {last.get('kl', float('nan')):.3f}"
        )
        return summary, what

    return training_stage(ctx, "ppo", cfg, policy, upstream, fresh, train)
