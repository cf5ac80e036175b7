"""cai's own PPO (TRL removed its PPOTrainer after 1.12): config, policy + value head, trainer.

Importing this package is cheap; torch and transformers load when a trainer is built.
The arithmetic lives in `core` (losses, GAE, KL estimators) and `kl` (KL controllers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cai.train.ppo.config import KLSection, PPOConfig, PTXSection

if TYPE_CHECKING:
    from cai.train.ppo.trainer import PPOResult, PPOTrainer, train_ppo

__all__ = ["KLSection", "PPOConfig", "PPOResult", "PPOTrainer", "PTXSection", "train_ppo"]


def __getattr__(name: str) -> Any:
    if name in {"PPOResult", "PPOTrainer", "train_ppo"}:
        from cai.train.ppo import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'cai.train.ppo' has no attribute {name!r}")
