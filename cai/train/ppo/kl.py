"""KL-coefficient controllers for the per-token KL penalty of PPO-RLHF.

The penalty -kl_coef * KL(pi || ref) keeps the policy close to the reference model. A fixed
coefficient is simplest; the adaptive controller of Ziegler et al. (2019), "Fine-Tuning Language
Models from Human Preferences", steers the measured KL towards a target instead, which is more
robust to the reward scale. Both are plain Python objects with a state_dict so a resumed run
continues with the coefficient it had, not the initial one.
"""

from __future__ import annotations

import math
from typing import Any, Literal

__all__ = ["AdaptiveKLController", "FixedKLController", "KLController", "make_kl_controller"]


class FixedKLController:
    """A constant KL coefficient; `update` is accepted and ignored so the trainer need not care
    which controller it holds."""

    kind = "fixed"

    def __init__(self, kl_coef: float) -> None:
        if not (math.isfinite(kl_coef) and kl_coef >= 0):
            raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef}")
        self.value: float = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient is fixed."""

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller on the KL coefficient (Ziegler et al., 2019).

    error = clip(current_kl / target - 1, -0.2, 0.2); value *= 1 + error * n_steps / horizon.
    The clip bounds how fast the coefficient can move on one noisy KL measurement; the
    n_steps / horizon factor makes the speed independent of the batch size (horizon is roughly
    how many samples it takes to correct a 20% error). ``current_kl`` must be measured in the
    same unit as ``target``, normally the batch mean of each response's summed per-token KL.
    """

    kind = "adaptive"

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if not (math.isfinite(init_kl_coef) and init_kl_coef > 0):
            # A multiplicative update can never leave 0, so 0 would silently mean "no KL".
            raise ValueError(f"adaptive init_kl_coef must be a finite number > 0, got {init_kl_coef}")
        if not (math.isfinite(target) and target > 0):
            raise ValueError(f"adaptive KL target must be a finite number > 0, got {target}")
        if not (math.isfinite(horizon) and horizon > 0):
            raise ValueError(f"adaptive KL horizon must be a finite number > 0, got {horizon}")
        self.value: float = float(init_kl_coef)
        self.target: float = float(target)
        self.horizon: float = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move the coefficient after a batch of ``n_steps`` samples whose KL was ``current_kl``."""
        if not math.isfinite(current_kl):
            # A NaN/inf KL would stick in the coefficient forever; fail where the cause is visible.
            raise ValueError(f"current_kl must be finite, got {current_kl}")
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        multiplier = 1.0 + error * n_steps / self.horizon
        if multiplier <= 0:
            raise ValueError(
                f"KL controller step would make the coefficient <= 0 (n_steps={n_steps} is more than "
                f"5 x horizon={self.horizon}); use a larger horizon"
            )
        self.value *= multiplier

    def state_dict(self) -> dict[str, Any]:
        # target/horizon are saved for inspection only; on resume the configured ones apply.
        return {"kind": self.kind, "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        self.value = float(state["value"])


KLController = FixedKLController | AdaptiveKLController


def _check_kind(state: dict[str, Any], kind: str) -> None:
    # Restoring an adaptive coefficient into a fixed controller (or back) is almost certainly a
    # changed config, and silently taking the other controller's value would hide that.
    saved = state.get("kind", kind)
    if saved != kind:
        raise ValueError(f"KL controller state is for a {saved!r} controller, not a {kind!r} one")


def make_kl_controller(
    kind: Literal["fixed", "adaptive"],
    init_kl_coef: float,
    target: float | None = None,
    horizon: float | None = None,
) -> KLController:
    """Build the controller named by the config. ``target``/``horizon`` are required for
    "adaptive" and ignored for "fixed"."""
    if kind == "fixed":
        return FixedKLController(init_kl_coef)
    if kind == "adaptive":
        missing = [name for name, v in (("target", target), ("horizon", horizon)) if v is None]
        if missing:
            raise ValueError(
                f"adaptive KL controller needs {' and '.join(missing)} (e.g. target=6.0, horizon=10000)"
            )
        assert target is not None and horizon is not None
        return AdaptiveKLController(init_kl_coef, target, horizon)
    raise ValueError(f"unknown KL controller kind {kind!r}; expected 'fixed' or 'adaptive'")
