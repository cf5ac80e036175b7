"""Stage `ppo`: our own PPO against the run's preference model, from its SFT model.

    cai train ppo --config configs/quickstart.yaml

Checkpoints live inside the stage folder; killing the command and running it again resumes
from the newest one (model, optimizer, scheduler, RNG, KL controller, data position).
"""

from __future__ import annotations

from cai.stages.base import StageContext, Timer, skip_message, writer
from cai.store import StageStore


def stage_model(store: StageStore) -> str:
    """The model folder a training stage produced (its summary says where)."""
    return str(store.manifest.summary.get("model_path") or store.path / "model")


def run_ppo(ctx: StageContext, fresh: bool = False) -> StageStore:
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
    store = StageStore(
        ctx.run_dir,
        "ppo",
        {"ppo": cfg.model_dump(mode="json"), "policy": policy, "reward_model": reward},
        upstream=upstream,
    )
    if fresh:
        store.discard()
    if store.is_complete:
        skip_message(ctx, store)
        return store
    ctx.release()
    timer = Timer()
    with writer(store) as opened:
        result = train_ppo(cfg, store.path, policy=policy, reward_model=reward)
        ctx.model_calls += 1
        summary = {
            "model_path": str(result.policy_path) if result.policy_path else None,
            "steps": result.steps,
            "resumed_from_step": result.resumed_from_step,
            "nan_skipped_steps": result.nan_skipped_steps,
            "warnings": result.warnings,
            "history": result.history,
            "seconds": round(timer.seconds, 1),
        }
        if opened is None:  # another rank of a distributed run: rank 0 records the result
            return store
        opened.finalize(summary=summary)
    first, last = (result.history[0], result.history[-1]) if result.history else ({}, {})
    ctx.console.print(
        f"[green]✓[/] ppo: {result.steps} steps, reward {first.get('reward', float('nan')):.3f} -> "
        f"{last.get('reward', float('nan')):.3f}, KL {last.get('kl', float('nan')):.3f} -> {store.path}"
    )
    return store
