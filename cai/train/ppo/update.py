"""The losses of one PPO update: clipped policy and value losses, entropy, and the ptx LM term.

Pure functions of a model and a mini-batch (shapes in comments); the arithmetic itself is in
`cai.train.ppo.core`, tested against numbers worked by hand.
"""

from __future__ import annotations

from typing import Any

import torch

from cai.train.ppo.config import PPOConfig
from cai.train.ppo.core import entropy_from_logits, logprobs_from_logits, masked_mean, policy_loss, value_loss
from cai.train.ppo.rollout import autocast, response_forward


def ppo_loss(
    model: Any, rows: dict[str, torch.Tensor], width_r: int, config: PPOConfig, bf16: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """pg_loss + vf_coef * vf_loss - entropy_coef * entropy, and detached stats."""
    logits, values = response_forward(
        model, rows, width_r, config.sampling.temperature, bf16
    )  # (b, R, V), (b, R)
    mask = rows["mask"]  # (b, R)
    logprobs = logprobs_from_logits(logits, rows["response_ids"])  # (b, R)
    pg, pg_stats = policy_loss(logprobs, rows["old_logprobs"], rows["advantages"], mask, config.clip_range)
    vf, vf_stats = value_loss(values, rows["old_values"], rows["returns"], mask, config.clip_range_value)
    with torch.set_grad_enabled(config.entropy_coef > 0 and torch.is_grad_enabled()):
        entropy = masked_mean(entropy_from_logits(logits), mask)
    loss = pg + config.vf_coef * vf - config.entropy_coef * entropy
    stats = {
        "loss": loss.detach(),
        "policy_loss": pg.detach(),
        "value_loss": vf.detach(),
        "entropy": entropy.detach(),
        **pg_stats,
        **vf_stats,
    }
    return loss, stats


def ptx_loss(model: Any, batch: dict[str, torch.Tensor], bf16: bool) -> torch.Tensor:
    """Mean next-token NLL of plain text under the policy (the PPO-ptx term, before coef)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]  # (N, L)
    with autocast(ids.device, bf16):
        logits, _ = model(ids, mask)  # (N, L, V)
    logprobs = logprobs_from_logits(logits[:, :-1].float(), ids[:, 1:])  # (N, L - 1)
    return -masked_mean(logprobs, mask[:, 1:])
