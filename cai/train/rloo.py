"""`cai train rloo`: RL from AI feedback with trl's RLOOTrainer, the preference model as reward.

    cai train rloo configs/quickstart.yaml

An alternative to cai's own PPO: RLOO samples `num_generations` answers per prompt and uses the
mean reward of the *other* answers as each one's baseline, so it needs no value head. The
objective is the same, maximise E[r_PM(x, y)] - beta * KL(pi || pi_ref), with the starting model
as reference (with LoRA: the model with its adapter disabled; trl loads no second copy).

trl calls a custom reward function as `f(prompts=..., completions=..., completion_ids=...,
**dataset_columns)`; for conversational prompts each completion is `[{"role": "assistant",
"content": text}]`. `PMReward` adapts `PreferenceScorer` to that call.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from cai.backends.base import Chat
from cai.train.common import (
    PolicyTrainingSection,
    TrainResult,
    TrainSection,
    build_trainer,
    default_console,
    no_progress_bars,
    train_and_save,
    trainer_arguments,
)

__all__ = ["PMReward", "RLOOConfig", "train_rloo"]

LOG_COLUMNS = {
    "loss": "loss",
    "reward": "reward",
    "reward_std": "reward_std",
    "kl": "kl",
    "completions/mean_length": "length",
    "grad_norm": "grad_norm",
}


class RLOOConfig(PolicyTrainingSection):
    """REINFORCE leave-one-out (trl's RLOOTrainer) against the preference model."""

    train: TrainSection = Field(
        default_factory=TrainSection,
        description="Optimisation settings; batch_size counts completions (prompts x num_generations).",
    )
    num_generations: int = Field(2, ge=2, description="Answers sampled per prompt (the leave-one-out group).")
    max_completion_length: int = Field(64, ge=1, description="Longest sampled answer in tokens.")
    beta: float = Field(0.05, ge=0, description="KL penalty towards the reference model (0: no reference).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")

    @model_validator(mode="after")
    def _whole_groups(self) -> RLOOConfig:
        completions = self.train.batch_size * self.train.gradient_accumulation_steps
        if completions % self.num_generations:
            raise ValueError(
                f"train.batch_size x train.gradient_accumulation_steps ({completions}) must be a multiple of "
                f"num_generations ({self.num_generations}): each step scores whole groups of answers"
            )
        return self


class PMReward:
    """RLOO reward function: the preference model's score of each sampled answer."""

    __name__ = "pm"  # trl names the reward's log columns after it (rewards/pm/mean)

    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer

    def __call__(self, prompts: list[Chat], completions: list[Any], **kwargs: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else str(c) for c in completions]
        return self.scorer.score(prompts, texts)


def train_rloo(
    config: RLOOConfig,
    policy_model: str,
    reward_model_path: str | Path,
    prompts: list[Chat],
    output_dir: Path,
    seed: int,
    console: Any = None,
) -> TrainResult:
    """Optimise the policy on `prompts` against the PM at `reward_model_path`; save to output_dir/model.

    Re-running with the same `output_dir` resumes from output_dir/checkpoints.
    """
    from datasets import Dataset
    from trl import RLOOConfig as TrlRLOOConfig
    from trl import RLOOTrainer

    from cai.models import resolve_model
    from cai.train.pm_metrics import PreferenceScorer

    if not prompts:
        raise ValueError("no prompts to train RLOO on")
    started = time.perf_counter()
    console = console or default_console()
    model_path = resolve_model(config.model or policy_model)
    args = TrlRLOOConfig(
        **trainer_arguments(config.train, Path(output_dir) / "checkpoints", seed),
        num_generations=config.num_generations,
        max_completion_length=config.max_completion_length,
        beta=config.beta,
        temperature=config.temperature,
    )
    with no_progress_bars():
        reward = PMReward(PreferenceScorer(reward_model_path, max_length=config.train.max_length))
        trainer = build_trainer(
            RLOOTrainer,
            model_path,
            args,
            config.lora,
            console,
            LOG_COLUMNS,
            reward_funcs=reward,
            train_dataset=Dataset.from_list([{"prompt": list(p)} for p in prompts]),
        )
        console.print(
            f"[bold]RLOO[/] on {len(prompts)} prompts x {config.num_generations} answers, "
            f"beta {config.beta}, {'LoRA' if config.lora else 'full'}, {config.train.max_steps} steps"
        )
        return train_and_save(trainer, output_dir, config.lora, started)
