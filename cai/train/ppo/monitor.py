"""Watching a PPO run: experiment trackers, the console line, and reward-hacking warning signs.

Each is a callback with three moments (`on_train_begin`, `on_step_end`, `on_train_end`), in the
manner of trl's trainer callbacks, so the loop stays short and a new observer is one class.
Only the main process reports; every process records warnings, so a resumed run keeps them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Protocol

import torch

from cai.train.ppo.config import PPOConfig


class Callback(Protocol):
    def on_train_begin(self, trainer: Any) -> None: ...

    def on_step_end(self, trainer: Any, row: dict[str, Any]) -> None: ...

    def on_train_end(self, trainer: Any) -> None: ...


def numbers(row: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}


class Trackers:
    """tensorboard and/or trackio (`report_to`), opened on the main process only."""

    def __init__(self, config: PPOConfig, output_dir: Path) -> None:
        for tracker in config.report_to:  # fail when the trainer is built, not after the first rollouts
            if importlib.util.find_spec(tracker) is None:
                raise ImportError(f"report_to={tracker!r} needs the {tracker} package: pip install {tracker}")
        self.config = config
        self.output_dir = Path(output_dir)
        self.open: list[tuple[str, Any]] = []

    def on_train_begin(self, trainer: Any) -> None:
        if not trainer.accelerator.is_main_process:
            return
        for name in self.config.report_to:
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self.open.append(("tensorboard", SummaryWriter(log_dir=str(self.output_dir / "tensorboard"))))
            elif name == "trackio":
                import trackio

                trackio.init(
                    project="cai-ppo", name=self.output_dir.name, config=self.config.model_dump(mode="json")
                )
                self.open.append(("trackio", trackio))

    def on_step_end(self, trainer: Any, row: dict[str, Any]) -> None:
        for name, tracker in self.open:
            if name == "tensorboard":
                for key, value in numbers(row).items():
                    tracker.add_scalar(f"ppo/{key}", value, row["step"])
            else:
                tracker.log({f"ppo/{k}": v for k, v in numbers(row).items()}, step=row["step"])

    def on_train_end(self, trainer: Any) -> None:
        for name, tracker in self.open:
            if name == "tensorboard":
                tracker.close()
            else:
                tracker.finish()
        self.open = []


class ConsoleLine:
    """One line per step on the main process: reward, KL and its coefficient, entropy, clipping."""

    def on_train_begin(self, trainer: Any) -> None:
        pass

    def on_step_end(self, trainer: Any, row: dict[str, Any]) -> None:
        if not trainer.accelerator.is_main_process or row.get("nan_skipped"):
            return
        trainer.console.print(
            f"[bold]ppo {row['step']:>4}/{trainer.config.steps}[/] "
            f"reward {row['reward']:+.3f}±{row['reward_std']:.3f}  "
            f"kl {row['kl']:.3f} (coef {row['kl_coef']:.3g})  "
            f"entropy {row['entropy']:.2f}  clip {row['clipfrac']:.3f}  approx_kl {row['approx_kl']:.4f}  "
            f"vloss {row['value_loss']:.4f}  len {row['response_length']:.1f}  {row['step_s']:.1f}s",
            highlight=False,
            soft_wrap=True,
        )

    def on_train_end(self, trainer: Any) -> None:
        pass


class WarningSigns:
    """Warn once per episode of each reward-hacking sign (again only after it clears)."""

    def __init__(self) -> None:
        self.active: set[str] = set()

    def on_train_begin(self, trainer: Any) -> None:
        pass

    def on_step_end(self, trainer: Any, row: dict[str, Any]) -> None:
        signs = warning_signs(trainer.history, trainer.config)
        for key, message in signs.items():
            if key not in self.active:
                trainer.warn(message)
        self.active = set(signs)

    def on_train_end(self, trainer: Any) -> None:
        pass


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


def callbacks(config: PPOConfig, output_dir: Path) -> list[Callback]:
    """The observers of a run, in the order they see each step: trackers, console, warnings."""
    return [Trackers(config, output_dir), ConsoleLine(), WarningSigns()]
