"""cai's own PPO (TRL removed its PPOTrainer after 1.12): config, policy + value head, trainer.

    from cai.train.ppo.trainer import PPOTrainer, train_ppo

The arithmetic lives in `core` (losses, GAE, KL estimators) and `kl` (KL controllers); the
trainer's parts in `data`, `rollout`, `update`, `checkpoint` and `monitor` around the loop in
`trainer`. Importing this package is cheap: torch and transformers load when a trainer is built.
"""
