"""The PPO arithmetic that cai's RLHF trainer calls: masks, masked statistics, KL estimators,
per-token rewards, GAE, the clipped losses and a few log-prob helpers.

TRL no longer ships a PPOTrainer, so cai owns this. Everything here is a small pure function of
tensors (no models, no optimiser, no distributed state), so each piece can be checked against
numbers worked by hand (tests/test_ppo_core.py).

Shapes: B = rollouts in the batch, T = response length (tokens the policy generated, right
padded), V = vocabulary. ``mask`` is a (B, T) bool or 0/1 float tensor that is 1 for real response
tokens and 0 for padding and for everything after the first EOS; build it with `response_mask`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch

__all__ = [
    "KLEstimator",
    "RunningMoments",
    "clip_rewards",
    "compute_gae",
    "entropy_from_logits",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "response_mask",
    "token_rewards",
    "value_loss",
]

KLEstimator = Literal["k1", "k2", "k3"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision log-probs lose the small differences PPO is made of (a ratio of 1.01 is
    a log-prob gap of 0.01, below bf16's resolution at typical magnitudes), so do that
    arithmetic in float32; float32/float64 inputs are used as they are."""
    return x.float() if x.dtype in _LOW_PRECISION else x


# --------------------------------------------------------------------------------------------
# Masks and masked statistics
# --------------------------------------------------------------------------------------------


def response_mask(
    response_ids: torch.Tensor,  # (B, T) long
    eos_token_id: int | Sequence[int],
    pad_token_id: int | None,
) -> torch.Tensor:  # (B, T) bool
    """True for the tokens a rollout really produced: everything up to and including the first
    EOS, and nothing after it.

    Generation keeps sampling (or pads) after a row has finished, so anything past the first EOS
    is not part of the episode. The first EOS itself is kept because emitting it was an action
    the policy took and must be rewarded or penalised. Pad positions are False even before any
    EOS; when ``pad_token_id`` is also an EOS id the first occurrence still counts as the EOS.
    """
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not eos_ids:
        raise ValueError("response_mask needs at least one eos_token_id")
    eos_tensor = torch.tensor(eos_ids, dtype=response_ids.dtype, device=response_ids.device)  # (E,)
    is_eos = torch.isin(response_ids, eos_tensor)  # (B, T)
    # Number of EOS tokens strictly before each position: 0 means "still inside the episode".
    eos_before = is_eos.long().cumsum(dim=1) - is_eos.long()  # (B, T)
    in_episode = eos_before == 0  # (B, T)
    if pad_token_id is None:
        return in_episode
    first_eos = is_eos & in_episode  # (B, T)
    not_pad = (response_ids != pad_token_id) | first_eos  # (B, T)
    return in_episode & not_pad


def masked_sum(
    x: torch.Tensor,  # (B, T) or any shape matching mask
    mask: torch.Tensor,  # same shape as x, bool or 0/1
    dim: int | tuple[int, ...] | None = None,
) -> torch.Tensor:  # scalar, or x reduced over dim
    """Sum over masked positions only.

    `torch.where` rather than ``x * mask``: padding may hold inf or NaN (garbage logits, values
    of positions the model never saw) and ``nan * 0`` is still NaN.
    """
    selected = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))  # like x
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_mean(
    x: torch.Tensor,  # (B, T) or any shape matching mask
    mask: torch.Tensor,  # same shape as x, bool or 0/1
    dim: int | tuple[int, ...] | None = None,
) -> torch.Tensor:  # scalar, or x reduced over dim
    """Mean over masked positions only.

    A reduction with no masked element returns 0, not NaN: a degenerate batch (every response
    empty) should yield a zero loss instead of writing NaN into the parameters.
    """
    total = masked_sum(x, mask, dim)  # scalar or reduced
    count = masked_sum(torch.ones_like(x), mask, dim)  # scalar or reduced
    return total / count.clamp(min=1)


def masked_var(
    x: torch.Tensor,  # (B, T) or any shape matching mask
    mask: torch.Tensor,  # same shape as x, bool or 0/1
    unbiased: bool = True,
) -> torch.Tensor:  # scalar
    """Variance over all masked positions (one number for the whole batch).

    With fewer than two masked elements the unbiased estimate is undefined; we return the
    biased one (0) instead of NaN so that whitening a one-token batch leaves it at its mean
    rather than poisoning the update.
    """
    mean = masked_mean(x, mask)  # scalar
    centred_sq = (x - mean) ** 2  # like x
    count = mask.bool().sum().to(x.dtype)  # scalar
    sum_sq = masked_sum(centred_sq, mask)  # scalar
    if unbiased and count >= 2:
        return sum_sq / (count - 1)
    return sum_sq / count.clamp(min=1)


def masked_whiten(
    x: torch.Tensor,  # (B, T)
    mask: torch.Tensor,  # (B, T), bool or 0/1
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:  # (B, T), 0 at padding
    """Normalise x to unit variance over the masked positions (statistics of the whole batch).

    shift_mean=True also centres it (advantages: their sign is what matters and a zero mean
    halves the variance of the gradient). shift_mean=False keeps the mean, for rewards, whose
    mean level is information (a shift would turn every good batch into half penalties).
    Padding positions are set to 0 so that no garbage flows on to the caller.
    """
    mask_b = mask.bool()  # (B, T)
    mean = masked_mean(x, mask_b)  # scalar
    var = masked_var(x, mask_b, unbiased=True)  # scalar
    whitened = (x - mean) * torch.rsqrt(var + eps)  # (B, T)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask_b, whitened, torch.zeros((), dtype=whitened.dtype, device=x.device))


# --------------------------------------------------------------------------------------------
# KL penalty and per-token rewards
# --------------------------------------------------------------------------------------------


def kl_penalty(
    logprobs: torch.Tensor,  # (B, T) log pi(a_t | s_t) of the sampled tokens
    ref_logprobs: torch.Tensor,  # (B, T) log ref(a_t | s_t) of the same tokens
    estimator: KLEstimator = "k1",
) -> torch.Tensor:  # (B, T)
    """Per-token sample estimate of KL(pi || ref), for tokens sampled from pi (the policy).

    With log r = log ref(a) - log pi(a) (J. Schulman, "Approximating KL Divergence", 2020):
      k1 = -log r = log pi - log ref     unbiased; a single sample can be negative.
      k2 = 0.5 (log r)^2                 biased (exact only to second order), always >= 0, low
                                         variance; symmetric in pi and ref.
      k3 = (r - 1) - log r               unbiased (E_pi[r - 1] = 0) and always >= 0, because
                                         e^u - 1 - u >= 0; lower variance than k1 when pi ~ ref.
    Note the sign of k1: it is log(pi/ref), i.e. minus log r. Half-precision inputs are computed
    in float32. No clamping: r is exp(log r), so keep log-probs finite.
    """
    log_r = _upcast(ref_logprobs) - _upcast(logprobs)  # (B, T)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r.square()
    if estimator == "k3":
        # expm1 keeps (r - 1) accurate when r ~ 1, which is where the policy usually is.
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1', 'k2' or 'k3'")


def _last_true_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the last True per row, whether the row has any True); (B,) each. A row with no
    True gets index 0 and has_any False, so callers must gate on has_any."""
    mask_b = mask.bool()  # (B, T)
    positions = torch.arange(mask_b.shape[1], device=mask_b.device).expand_as(mask_b)  # (B, T)
    last = torch.where(mask_b, positions, torch.zeros_like(positions)).amax(dim=1)  # (B,)
    return last, mask_b.any(dim=1)


@torch.no_grad()
def token_rewards(
    scores: torch.Tensor,  # (B,) sequence-level score from the preference/reward model
    logprobs: torch.Tensor,  # (B, T) policy log-probs of the sampled tokens (at rollout time)
    ref_logprobs: torch.Tensor,  # (B, T) reference log-probs of the same tokens
    mask: torch.Tensor,  # (B, T) bool or 0/1
    kl_coef: float,
    estimator: KLEstimator = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:  # rewards (B, T), kl (B, T)
    """Per-token rewards: -kl_coef * KL at every real token, plus the score at the last one.

    The KL penalty is per token so the critic can attribute drift to the token that caused it;
    the score is a judgement of the whole response, so it arrives when the episode ends (the
    last real token). A row with no real token gets no reward at all. Both outputs are 0 at
    padding. Rewards are targets, never differentiated through, hence no_grad.
    """
    mask_b = mask.bool()  # (B, T)
    raw_kl = kl_penalty(logprobs, ref_logprobs, estimator)  # (B, T)
    kl = torch.where(mask_b, raw_kl, torch.zeros_like(raw_kl))  # (B, T)
    rewards = -kl_coef * kl  # (B, T)
    last, has_any = _last_true_index(mask_b)  # (B,), (B,)
    final = torch.where(has_any, scores.to(rewards.dtype), torch.zeros_like(rewards[:, 0]))  # (B,)
    rewards = rewards.scatter_add(1, last.unsqueeze(1), final.unsqueeze(1))  # (B, T)
    return rewards, kl


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def compute_gae(
    rewards: torch.Tensor,  # (B, T)
    values: torch.Tensor,  # (B, T) critic values at rollout time
    mask: torch.Tensor,  # (B, T) bool or 0/1
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # advantages (B, T), returns (B, T)
    """Generalised advantage estimation (Schulman et al., 2016), computed backwards in time.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, with
    V = 0 and A = 0 after the last real token (the episode ends there, so nothing is
    bootstrapped from padding). Masked-out positions get advantage and return 0 and are skipped
    over: the running V_{t+1}, A_{t+1} pass through them unchanged, so padding (or a hole in the
    mask) never alters earlier advantages. Returns = advantages + values are the critic's
    targets. Targets are never differentiated through, hence no_grad.
    """
    mask_b = mask.bool()  # (B, T)
    dtype = torch.promote_types(_upcast(rewards).dtype, _upcast(values).dtype)
    rewards = rewards.to(dtype)  # (B, T)
    values = values.to(dtype)  # (B, T)
    zeros = torch.zeros_like(rewards[:, 0])  # (B,)
    next_value = zeros  # (B,) V_{t+1}; 0 past the end of the episode
    next_advantage = zeros  # (B,) A_{t+1}
    advantages = torch.zeros_like(rewards)  # (B, T)
    for t in reversed(range(rewards.shape[1])):
        real = mask_b[:, t]  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        advantage = delta + gamma * lam * next_advantage  # (B,)
        advantages[:, t] = torch.where(real, advantage, zeros)
        # Only real tokens move the recursion; padding leaves it as it was.
        next_value = torch.where(real, values[:, t], next_value)
        next_advantage = torch.where(real, advantage, next_advantage)
    returns = torch.where(mask_b, advantages + values, torch.zeros_like(advantages))  # (B, T)
    return advantages, returns


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def policy_loss(
    logprobs: torch.Tensor,  # (B, T) current policy log-probs (with grad)
    old_logprobs: torch.Tensor,  # (B, T) log-probs of the policy that sampled the rollouts
    advantages: torch.Tensor,  # (B, T)
    mask: torch.Tensor,  # (B, T) bool or 0/1
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # loss scalar, stats
    """PPO clipped surrogate (Schulman et al., 2017), as a loss to minimise.

    Per token: max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)); the max is the pessimistic
    bound, so once a ratio has moved past the band in the direction the advantage rewards, the
    token gives no gradient and the update cannot run away from the sampling policy.
    Averaged over every real token of the batch (each token weighs the same).

    Stats (detached 0-dim tensors, so logging does not force a device sync per micro-batch):
      clipfrac   share of real tokens where the clipped term is strictly larger, i.e. was used.
      approx_kl  mean of 0.5 * (logprobs - old_logprobs)^2: the k2 estimator of the KL between
                 the sampling policy and the current one, on samples of the sampling policy
                 (k2 is symmetric in log r, so it reads the same in either direction).
      ratio_mean mean ratio over real tokens.
    """
    mask_b = mask.bool()  # (B, T)
    log_ratio = _upcast(logprobs) - _upcast(old_logprobs)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    advantages = _upcast(advantages)  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # (B, T)
    per_token = torch.maximum(unclipped, clipped)  # (B, T)
    loss = masked_mean(per_token, mask_b)  # scalar
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask_b),
            "approx_kl": masked_mean(0.5 * log_ratio.square(), mask_b),
            "ratio_mean": masked_mean(ratio, mask_b),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,  # (B, T) current critic values (with grad)
    old_values: torch.Tensor,  # (B, T) critic values at rollout time
    returns: torch.Tensor,  # (B, T) GAE returns (targets)
    mask: torch.Tensor,  # (B, T) bool or 0/1
    clip_range_value: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # loss scalar, stats
    """Clipped value loss: 0.5 * mean of max((v - R)^2, (v_clipped - R)^2).

    v_clipped = clamp(values, old_values - c, old_values + c). Taking the max (the pessimistic
    choice, as for the policy) means the critic gains nothing from moving further than c from
    its rollout-time prediction in one PPO epoch. Stats: vf_clipfrac, the share of real tokens
    where the clipped error is strictly larger (detached 0-dim tensor).

    Clamping `values` itself, not `old + clamp(values - old, -c, c)`: the latter rounds twice in
    float32, so inside the band it does not give back `values` exactly and unclipped tokens were
    counted as clipped (1e6 standard-normal fp32 tokens, c = 1, returns = values: 59.8% reported
    against 48.0% truly outside the band; this form reports 48.0%).
    """
    mask_b = mask.bool()  # (B, T)
    values = _upcast(values)  # (B, T)
    old_values = _upcast(old_values)  # (B, T)
    returns = _upcast(returns)  # (B, T)
    low, high = old_values - clip_range_value, old_values + clip_range_value  # (B, T) each
    values_clipped = torch.clamp(values, low, high)  # (B, T), exactly `values` inside the band
    err_unclipped = (values - returns).square()  # (B, T)
    err_clipped = (values_clipped - returns).square()  # (B, T)
    loss = 0.5 * masked_mean(torch.maximum(err_unclipped, err_clipped), mask_b)  # scalar
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((err_clipped > err_unclipped).to(values.dtype), mask_b)}
    return loss, stats


# --------------------------------------------------------------------------------------------
# Log-probs and entropy from logits
# --------------------------------------------------------------------------------------------


def _rowwise_float32(
    fn: Callable[..., torch.Tensor], logits: torch.Tensor, *others: torch.Tensor
) -> torch.Tensor:
    """Apply fn in float32 one batch row at a time when logits are half precision.

    logsumexp over a 50k-150k vocabulary in bf16 is visibly wrong, but upcasting all of (B, T, V)
    at once doubles the largest tensor of the step; a (T, V) float32 slice at a time keeps the
    peak small. float32/float64 logits are processed in one vectorised call.
    """
    if logits.dtype not in _LOW_PRECISION or logits.shape[0] == 0:
        return fn(_upcast(logits), *others)
    rows = [fn(logits[b].float(), *(o[b] for o in others)) for b in range(logits.shape[0])]
    return torch.stack(rows)


def _logprobs_of_labels(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # log_softmax(z)[y] = z[y] - logsumexp(z): gather first so no (..., V) log-softmax exists.
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (..., )
    return picked - torch.logsumexp(logits, dim=-1)


def logprobs_from_logits(
    logits: torch.Tensor,  # (B, T, V)
    labels: torch.Tensor,  # (B, T) long, valid token ids (pad ids included, mask them later)
) -> torch.Tensor:  # (B, T); float32 for half-precision logits
    """Log-probability of each label under softmax(logits), without a (B, T, V) log-softmax.

    Computed as logit[label] - logsumexp(logits). Half-precision logits are upcast one row at a
    time (see `_rowwise_float32`) and give float32 log-probs, since PPO ratios are exponentials
    of small log-prob differences. Differentiable.
    """
    return _rowwise_float32(_logprobs_of_labels, logits, labels)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    # H = logsumexp(z) - sum_i p_i z_i. Logits with p = 0 (z = -inf, a banned token) are replaced
    # by 0 BEFORE the product: their true contribution is 0, and 0 * -inf would be NaN in the
    # forward pass and, even if masked afterwards, in the backward pass.
    probs = torch.softmax(logits, dim=-1)  # (..., V)
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    safe_logits = torch.where(probs > 0, logits, zero)  # (..., V)
    return torch.logsumexp(logits, dim=-1) - (probs * safe_logits).sum(dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:  # (B, T, V) -> (B, T)
    """Entropy of softmax(logits) per position, stable for large or -inf logits.

    Uses logsumexp(z) - E_p[z], which never takes the log of an underflowed probability.
    Half-precision logits are processed in float32 row by row and return float32.
    """
    return _rowwise_float32(_entropy, logits)


# --------------------------------------------------------------------------------------------
# Reward scaling
# --------------------------------------------------------------------------------------------


def clip_rewards(scores: torch.Tensor, clip: float | None) -> torch.Tensor:  # (B,) -> (B,)
    """Clamp scores to [-clip, clip]; None leaves them as they are.

    A reward model can give a few wild scores on out-of-distribution text; clipping keeps a
    single rollout from dominating the advantage scale of a batch.
    """
    if clip is None:
        return scores
    if not clip > 0:
        raise ValueError(f"reward clip must be positive or None, got {clip}")
    return scores.clamp(-clip, clip)


class RunningMoments:
    """Mean and standard deviation of every value seen so far, across batches.

    Used to normalise scores with statistics that are stable from step to step instead of
    per-batch ones. Batches are merged with Chan et al.'s parallel update, which is exact (the
    result equals the statistics of the concatenation) and does not lose precision as the count
    grows. State is kept in Python floats (float64) so a checkpoint round trip is exact.
    """

    def __init__(self) -> None:
        self.mean: float = 0.0
        self.m2: float = 0.0  # sum of squared deviations from the mean
        self.count: int = 0

    @property
    def var(self) -> float:
        """Unbiased variance of everything seen (0 with fewer than two values)."""
        return self.m2 / (self.count - 1) if self.count >= 2 else 0.0

    @property
    def std(self) -> float:
        """Unbiased standard deviation of everything seen (0 with fewer than two values)."""
        return math.sqrt(self.var)

    def update(self, x: torch.Tensor) -> tuple[float, float]:  # any shape, all elements used
        """Fold in a batch; returns that batch's (mean, unbiased std), std 0 for one value."""
        flat = x.detach().reshape(-1).double()  # (N,)
        n = flat.numel()
        if n == 0:
            raise ValueError("RunningMoments.update got an empty tensor")
        batch_mean = flat.mean().item()
        batch_m2 = (flat - batch_mean).square().sum().item()
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total
        batch_std = math.sqrt(batch_m2 / (n - 1)) if n >= 2 else 0.0
        return batch_mean, batch_std

    def state_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "m2": self.m2, "count": self.count}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])
        self.count = int(state["count"])
