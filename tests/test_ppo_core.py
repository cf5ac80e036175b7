"""cai.train.ppo.core / kl against numbers worked by hand.

Every expected value comes from a tensor small enough that the arithmetic is written out in a
comment next to it. float64 is used where the arithmetic is checked to 1e-6, so that a failure
means wrong maths, not float32 rounding.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from cai.train.ppo.core import (
    RunningMoments,
    clip_rewards,
    compute_gae,
    entropy_from_logits,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_loss,
    response_mask,
    token_rewards,
    value_loss,
)
from cai.train.ppo.kl import AdaptiveKLController, FixedKLController, make_kl_controller

TIGHT = {"atol": 1e-6, "rtol": 1e-6}
F64 = torch.float64


def t(values, dtype=F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def bools(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------
# 1. response_mask
# ---------------------------------------------------------------------------------------------

EOS, PAD = 2, 0


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        # EOS in the middle: the EOS is real, the pad after it is not.
        ([[5, 7, 2, 0]], [[True, True, True, False]]),
        # EOS first: only the EOS itself is real.
        ([[2, 0, 0, 0]], [[True, False, False, False]]),
        # No EOS (hit max length): every token is real.
        ([[5, 6, 7, 8]], [[True, True, True, True]]),
        # Tokens after the EOS that are not pad (the engine kept sampling) are still masked.
        ([[5, 2, 7, 8]], [[True, True, False, False]]),
        # Two rows of different lengths in one batch.
        ([[5, 2, 0, 0], [5, 6, 7, 2]], [[True, True, False, False], [True, True, True, True]]),
    ],
)
def test_response_mask(ids, expected):
    mask = response_mask(torch.tensor(ids), EOS, PAD)
    assert mask.dtype == torch.bool
    assert mask.tolist() == expected


def test_response_mask_pad_equals_eos():
    # pad == eos == 2: the first 2 is the EOS (real), the 2s after it are padding.
    ids = torch.tensor([[5, 2, 2, 2], [2, 2, 2, 2]])
    assert response_mask(ids, eos_token_id=2, pad_token_id=2).tolist() == [
        [True, True, False, False],
        [True, False, False, False],
    ]


def test_response_mask_eos_list_and_no_pad():
    # Either 2 or 9 ends the response (chat models often have two end tokens); no pad id.
    ids = torch.tensor([[5, 9, 2, 0], [5, 6, 2, 9]])
    assert response_mask(ids, [2, 9], None).tolist() == [
        [True, True, False, False],
        [True, True, True, False],
    ]
    with pytest.raises(ValueError):
        response_mask(ids, [], None)


# ---------------------------------------------------------------------------------------------
# 2. masked statistics
# ---------------------------------------------------------------------------------------------

# Real values 1, 2, 3 | 4; padding holds 1e6 (and in one test NaN/inf) which must not leak in.
X = t([[1.0, 2.0, 3.0, 1e6], [4.0, 1e6, 1e6, 1e6]])
M = bools([[1, 1, 1, 0], [1, 0, 0, 0]])
# mean = (1+2+3+4)/4 = 2.5; deviations -1.5 -0.5 0.5 1.5, squares 2.25+0.25+0.25+2.25 = 5
# unbiased var = 5/3, biased var = 5/4.


def test_masked_mean_sum_var_ignore_padding():
    assert_close(masked_sum(X, M), t(10.0), **TIGHT)
    assert_close(masked_mean(X, M), t(2.5), **TIGHT)
    # per row: (1+2+3)/3 = 2, 4/1 = 4
    assert_close(masked_mean(X, M, dim=1), t([2.0, 4.0]), **TIGHT)
    assert_close(masked_sum(X, M, dim=1), t([6.0, 4.0]), **TIGHT)
    assert_close(masked_var(X, M), t(5.0 / 3.0), **TIGHT)
    assert_close(masked_var(X, M, unbiased=False), t(5.0 / 4.0), **TIGHT)
    # A float 0/1 mask means the same as the bool one.
    assert_close(masked_var(X, M.double()), t(5.0 / 3.0), **TIGHT)


def test_masked_stats_nan_and_inf_in_padding_do_not_leak():
    x = X.clone()
    x[0, 3], x[1, 1], x[1, 2] = float("nan"), float("inf"), -float("inf")
    assert_close(masked_mean(x, M), t(2.5), **TIGHT)
    assert_close(masked_var(x, M), t(5.0 / 3.0), **TIGHT)
    assert torch.isfinite(masked_whiten(x, M)).all()


def test_masked_mean_empty_rows_are_zero_not_nan():
    # A row with no real token: sum 0 / count clamped to 1 = 0 (a degenerate batch gives loss 0).
    mask = bools([[1, 1, 0, 0], [0, 0, 0, 0]])
    assert_close(masked_mean(X, mask, dim=1), t([1.5, 0.0]), **TIGHT)
    assert_close(masked_mean(X, torch.zeros_like(mask)), t(0.0), **TIGHT)


def test_masked_whiten_by_hand():
    std = math.sqrt(5.0 / 3.0)  # 1.2909944...
    out = masked_whiten(X, M, eps=0.0)
    # (x - 2.5) / sqrt(5/3) on the real tokens, 0 on padding
    expected = t([[-1.5 / std, -0.5 / std, 0.5 / std, 0.0], [1.5 / std, 0.0, 0.0, 0.0]])
    assert_close(out, expected, **TIGHT)
    assert_close(masked_mean(out, M), t(0.0), **TIGHT)
    assert_close(masked_var(out, M), t(1.0), **TIGHT)
    # Default eps=1e-8 changes variance by a factor (5/3) / (5/3 + 1e-8): invisible at 1e-6.
    assert_close(masked_var(masked_whiten(X, M), M), t(1.0), **TIGHT)


def test_masked_whiten_keep_mean():
    std = math.sqrt(5.0 / 3.0)
    out = masked_whiten(X, M, shift_mean=False, eps=0.0)
    # (x - 2.5) / std + 2.5: mean stays 2.5, variance becomes 1
    expected = t([[2.5 - 1.5 / std, 2.5 - 0.5 / std, 2.5 + 0.5 / std, 0.0], [2.5 + 1.5 / std, 0.0, 0.0, 0.0]])
    assert_close(out, expected, **TIGHT)
    assert_close(masked_mean(out, M), t(2.5), **TIGHT)
    assert_close(masked_var(out, M), t(1.0), **TIGHT)


def test_masked_var_single_element_is_zero_not_nan():
    mask = bools([[1, 0, 0, 0], [0, 0, 0, 0]])
    assert_close(masked_var(X, mask), t(0.0), **TIGHT)
    # whitening one token leaves it at its mean: 0 centred, the value itself when keeping the mean
    assert_close(masked_whiten(X, mask)[0, 0], t(0.0), **TIGHT)
    assert_close(masked_whiten(X, mask, shift_mean=False)[0, 0], t(1.0), **TIGHT)


# ---------------------------------------------------------------------------------------------
# 3. KL estimators
# ---------------------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    # token 0: pi = 0.5, ref = 0.25 -> log r = log(ref/pi) = log 0.5 = -0.693147
    # token 1: pi = 0.25, ref = 0.5 -> log r = log 2 = +0.693147
    logprobs = t([[math.log(0.5), math.log(0.25)]])
    ref = t([[math.log(0.25), math.log(0.5)]])
    ln2 = math.log(2.0)
    # k1 = -log r = log pi - log ref:        [ln2, -ln2]          = [0.693147, -0.693147]
    assert_close(kl_penalty(logprobs, ref, "k1"), t([[ln2, -ln2]]), **TIGHT)
    # k2 = 0.5 (log r)^2:                   [0.5 ln2^2, same]    = [0.240227, 0.240227]
    assert_close(kl_penalty(logprobs, ref, "k2"), t([[0.5 * ln2**2, 0.5 * ln2**2]]), **TIGHT)
    # k3 = (r - 1) - log r: token 0 r = 0.5: -0.5 + ln2 = 0.193147; token 1 r = 2: 1 - ln2 = 0.306853
    assert_close(kl_penalty(logprobs, ref, "k3"), t([[-0.5 + ln2, 1.0 - ln2]]), **TIGHT)
    with pytest.raises(ValueError):
        kl_penalty(logprobs, ref, "k4")  # type: ignore[arg-type]


def test_k2_k3_non_negative():
    gen = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(64, 8, generator=gen, dtype=F64) * 5
    ref = -torch.rand(64, 8, generator=gen, dtype=F64) * 5
    assert (kl_penalty(logprobs, ref, "k3") >= 0).all()
    assert (kl_penalty(logprobs, ref, "k2") >= 0).all()
    assert (kl_penalty(logprobs, ref, "k1") < 0).any()  # k1 is unbiased but not per-sample >= 0


def test_k1_k3_monte_carlo_estimate_kl_pi_ref():
    # pi = [0.9, 0.1], ref = [0.5, 0.5]
    # KL(pi || ref) = 0.9 ln(0.9/0.5) + 0.1 ln(0.1/0.5) = 0.9*0.587787 - 0.1*1.609438 = 0.368064
    # KL(ref || pi) = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = 0.510826 (the wrong direction)
    # Sample 200k tokens from pi: k1 per-sample std ~0.66 -> standard error ~0.0015.
    pi, ref = t([0.9, 0.1]), t([0.5, 0.5])
    true_kl = 0.9 * math.log(1.8) + 0.1 * math.log(0.2)
    gen = torch.Generator().manual_seed(1234)
    samples = torch.multinomial(pi, 200_000, replacement=True, generator=gen)  # (N,)
    logprobs, ref_logprobs = pi.log()[samples][None], ref.log()[samples][None]  # (1, N)
    for estimator in ("k1", "k3"):
        estimate = kl_penalty(logprobs, ref_logprobs, estimator).mean().item()
        assert abs(estimate - true_kl) < 0.01, (estimator, estimate)


def test_kl_penalty_bf16_inputs_computed_in_float32():
    lp = torch.tensor([[-1.0, -2.0]], dtype=torch.bfloat16)
    out = kl_penalty(lp, lp - 0.5, "k3")
    assert out.dtype == torch.float32
    # log r = -0.5 -> k3 = e^-0.5 - 1 + 0.5 = 0.106531
    assert_close(out, torch.full((1, 2), math.exp(-0.5) - 0.5), **TIGHT)


# ---------------------------------------------------------------------------------------------
# 4. token_rewards
# ---------------------------------------------------------------------------------------------


def test_token_rewards_by_hand():
    # k1 per token = logprobs - ref. Row 0: 3 real tokens, row 1: EOS at the first position.
    # Padding holds large KL values that must not show up anywhere.
    kl_k1 = t([[0.1, 0.2, -0.1, 5.0], [0.3, 9.0, 9.0, 9.0]])
    logprobs = t([[-1.0, -2.0, -0.5, -3.0], [-0.7, -1.0, -1.0, -1.0]])
    ref = logprobs - kl_k1
    mask = bools([[1, 1, 1, 0], [1, 0, 0, 0]])
    scores = t([1.0, -2.0])
    rewards, kl = token_rewards(scores, logprobs, ref, mask, kl_coef=0.5)
    # row 0: -0.5*[0.1, 0.2, -0.1] = [-0.05, -0.1, 0.05]; score 1.0 on token 2 -> 1.05; pad 0
    # row 1: -0.5*0.3 = -0.15; score -2.0 on token 0 (the EOS) -> -2.15; pads 0
    assert_close(rewards, t([[-0.05, -0.1, 1.05, 0.0], [-2.15, 0.0, 0.0, 0.0]]), **TIGHT)
    assert_close(kl, t([[0.1, 0.2, -0.1, 0.0], [0.3, 0.0, 0.0, 0.0]]), **TIGHT)


def test_token_rewards_k3_and_empty_row():
    # Row 0 all padding: no KL, no score. Row 1: 2 real tokens, log r = ref - logprobs = -0.5, 0.
    logprobs = t([[-1.0, -1.0], [-1.0, -2.0]])
    ref = t([[-9.0, -9.0], [-1.5, -2.0]])
    mask = bools([[0, 0], [1, 1]])
    rewards, kl = token_rewards(t([7.0, 3.0]), logprobs, ref, mask, kl_coef=0.1, estimator="k3")
    k3 = math.exp(-0.5) - 1.0 + 0.5  # 0.106531
    # row 1: [-0.1*k3, -0.1*0 + 3.0]
    assert_close(kl, t([[0.0, 0.0], [k3, 0.0]]), **TIGHT)
    assert_close(rewards, t([[0.0, 0.0], [-0.1 * k3, 3.0]]), **TIGHT)


def test_token_rewards_carry_no_grad():
    logprobs = t([[-1.0, -2.0]]).requires_grad_()
    rewards, kl = token_rewards(t([1.0]), logprobs, t([[-1.0, -1.0]]), bools([[1, 1]]), 0.1)
    assert not rewards.requires_grad and not kl.requires_grad


# ---------------------------------------------------------------------------------------------
# 5. GAE
# ---------------------------------------------------------------------------------------------

R3, V3 = [0.0, 0.0, 1.0], [0.5, 0.4, 0.3]


def test_gae_gamma1_lam1_is_returns_to_go_minus_values():
    # gamma = lam = 1: A_t = sum_{k>=t} r_k - V_t. Returns-to-go = [1, 1, 1]
    # A = [1 - 0.5, 1 - 0.4, 1 - 0.3] = [0.5, 0.6, 0.7]; returns = A + V = [1, 1, 1]
    adv, ret = compute_gae(t([R3]), t([V3]), bools([[1, 1, 1]]), gamma=1.0, lam=1.0)
    assert_close(adv, t([[0.5, 0.6, 0.7]]), **TIGHT)
    assert_close(ret, t([[1.0, 1.0, 1.0]]), **TIGHT)


# gamma = 0.9, lam = 0.8 (gamma*lam = 0.72), value after the last token = 0:
# delta_2 = 1 + 0.9*0   - 0.3 =  0.7
# delta_1 = 0 + 0.9*0.3 - 0.4 = -0.13
# delta_0 = 0 + 0.9*0.4 - 0.5 = -0.14
# A_2 = 0.7
# A_1 = -0.13 + 0.72*0.7   = 0.374
# A_0 = -0.14 + 0.72*0.374 = 0.12928
# returns = A + V = [0.62928, 0.774, 1.0]
ADV_098 = [0.12928, 0.374, 0.7]
RET_098 = [0.62928, 0.774, 1.0]


def test_gae_gamma09_lam08_by_hand():
    adv, ret = compute_gae(t([R3]), t([V3]), bools([[1, 1, 1]]), gamma=0.9, lam=0.8)
    assert_close(adv, t([ADV_098]), **TIGHT)
    assert_close(ret, t([RET_098]), **TIGHT)


def test_gae_padding_gets_zero_and_changes_nothing():
    # Row 0: the 3-token example plus one pad (reward 7, value 1e6: garbage that must not be
    # bootstrapped). Row 1: EOS at the first position: A_0 = 2 - 0.5 = 1.5, return 2.
    rewards = t([R3 + [7.0], [2.0, 5.0, 5.0, 5.0]])
    values = t([V3 + [1e6], [0.5, 1e6, float("nan"), 1e6]])
    mask = bools([[1, 1, 1, 0], [1, 0, 0, 0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert_close(adv, t([ADV_098 + [0.0], [1.5, 0.0, 0.0, 0.0]]), **TIGHT)
    assert_close(ret, t([RET_098 + [0.0], [2.0, 0.0, 0.0, 0.0]]), **TIGHT)
    # The padded row equals the same row computed without padding.
    adv_unpadded, ret_unpadded = compute_gae(t([R3]), t([V3]), bools([[1, 1, 1]]), 0.9, 0.8)
    assert_close(adv[:1, :3], adv_unpadded, **TIGHT)
    assert_close(ret[:1, :3], ret_unpadded, **TIGHT)


def test_gae_carries_no_grad():
    values = t([V3]).requires_grad_()
    adv, ret = compute_gae(t([R3]), values, bools([[1, 1, 1]]), 0.9, 0.8)
    assert not adv.requires_grad and not ret.requires_grad


# ---------------------------------------------------------------------------------------------
# 6. + 11. policy loss
# ---------------------------------------------------------------------------------------------

# clip_range eps = 0.2, band [0.8, 1.2]. Per token: max(-A*r, -A*clip(r)).
#  a) A=+1, r=1.1 (inside):            -1.1 vs -1.1 -> -1.1   (tie: not counted as clipped)
#  b) A=+1, r=1.5 (above):             -1.5 vs -1.2 -> -1.2   clipped
#  c) A=-1, r=0.5 (below):              0.5 vs  0.8 ->  0.8   clipped
#  d) A=-2, r=1.5 (above, A<0):         3.0 vs  2.4 ->  3.0   unclipped (pessimistic side)
#  e) A=+2, r=0.5 (below, A>0):        -1.0 vs -1.6 -> -1.0   unclipped
# loss = (-1.1 - 1.2 + 0.8 + 3.0 - 1.0) / 5 = 0.5 / 5 = 0.1; clipfrac = 2/5 = 0.4
# ratio_mean = (1.1 + 1.5 + 0.5 + 1.5 + 0.5) / 5 = 1.02
# Padding: log-ratio 50 and advantage 1e6, which would dominate if they leaked.
RATIOS = [[1.1, 1.5, 0.5, 1.5], [0.5, math.exp(50.0), 1.0, 1.0]]
ADVS = [[1.0, 1.0, -1.0, -2.0], [2.0, 1e6, 1e6, 1e6]]
PMASK = [[1, 1, 1, 1], [1, 0, 0, 0]]


def _policy_inputs():
    old = t([[-1.0, -2.0, -0.5, -1.5], [-0.3, -1.0, -1.0, -1.0]])
    logprobs = (old + t(RATIOS).log()).requires_grad_()
    return logprobs, old, t(ADVS), bools(PMASK)


def test_policy_loss_by_hand():
    logprobs, old, adv, mask = _policy_inputs()
    loss, stats = policy_loss(logprobs, old, adv, mask, clip_range=0.2)
    assert_close(loss, t(0.1), **TIGHT)
    assert_close(stats["clipfrac"], t(0.4), **TIGHT)
    assert_close(stats["ratio_mean"], t(1.02), **TIGHT)
    # approx_kl = mean of 0.5 * (log r)^2 over the 5 real tokens
    logs = [math.log(1.1), math.log(1.5), math.log(0.5), math.log(1.5), math.log(0.5)]
    assert_close(stats["approx_kl"], t(sum(0.5 * v * v for v in logs) / 5), **TIGHT)
    assert all(not v.requires_grad for v in stats.values())


def test_policy_loss_gradient_zero_where_clipped():
    # d loss / d logprob_t = (1/5) * d(-A r)/d logprob = -A r / 5 where the unclipped term is
    # used (dr/dlogprob = r), and exactly 0 where the clipped (constant) term is used:
    #  a) -1*1.1/5 = -0.22   b) 0   c) 0   d) -(-2)*1.5/5 = 0.6   e) -2*0.5/5 = -0.2   pads 0
    logprobs, old, adv, mask = _policy_inputs()
    loss, _ = policy_loss(logprobs, old, adv, mask, clip_range=0.2)
    loss.backward()
    assert_close(logprobs.grad, t([[-0.22, 0.0, 0.0, 0.6], [-0.2, 0.0, 0.0, 0.0]]), **TIGHT)
    assert logprobs.grad[0, 1].item() == 0.0 and logprobs.grad[0, 2].item() == 0.0


# ---------------------------------------------------------------------------------------------
# 7. value loss
# ---------------------------------------------------------------------------------------------


def test_value_loss_by_hand():
    # c = 0.2, old value 1.0 everywhere, v_clipped = 1 + clamp(v - 1, -0.2, 0.2)
    #  t0: v=1.1, R=2: v_clip=1.1, (1.1-2)^2 = 0.81 both            -> 0.81 (tie, not clipped)
    #  t1: v=1.5, R=2: v_clip=1.2, (1.5-2)^2 = 0.25, (1.2-2)^2 = 0.64 -> 0.64 clipped
    #  t2: v=1.5, R=0: v_clip=1.2, (1.5)^2 = 2.25, (1.2)^2 = 1.44    -> 2.25 unclipped
    #  t3: padding (v=1e6)
    # loss = 0.5 * (0.81 + 0.64 + 2.25) / 3 = 0.5 * 3.7 / 3 = 0.616667; vf_clipfrac = 1/3
    values = t([[1.1, 1.5, 1.5, 1e6]]).requires_grad_()
    old = t([[1.0, 1.0, 1.0, 1.0]])
    returns = t([[2.0, 2.0, 0.0, -1e6]])
    mask = bools([[1, 1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, clip_range_value=0.2)
    assert_close(loss, t(0.5 * 3.7 / 3), **TIGHT)
    assert_close(stats["vf_clipfrac"], t(1.0 / 3.0), **TIGHT)
    # grad = 0.5 * 2 (v - R) / 3 where unclipped: t0: (1.1-2)/3 = -0.3; t2: 1.5/3 = 0.5;
    # t1 clipped branch is flat in v -> 0; padding 0.
    loss.backward()
    assert_close(values.grad, t([[-0.3, 0.0, 0.5, 0.0]]), **TIGHT)


def test_value_clipfrac_counts_only_tokens_outside_the_band():
    # fp32, 1e6 tokens, c = 1: `old + clamp(v - old, -c, c)` rounds twice and does not give back
    # v inside the band, so with returns = v (every unclipped error exactly 0) in-band tokens were
    # counted as clipped. The reported share must equal the true share outside the band (in fp64).
    generator = torch.Generator().manual_seed(0)
    n, c = 1_000_000, 1.0
    old = torch.randn(1, n, generator=generator)
    values = torch.randn(1, n, generator=generator)
    mask = torch.ones(1, n, dtype=torch.bool)
    outside = int(((values.double() - old.double()).abs() > c).sum())
    twice_rounded = old + torch.clamp(values - old, -c, c)
    assert (twice_rounded != torch.clamp(values, old - c, old + c)).any()  # the old form differs
    _, stats = value_loss(values, old, values.clone(), mask, clip_range_value=c)
    # the fp32 mean of 0/1 flags holds the count exactly (its rounding error is << 1 / n)
    assert round(stats["vf_clipfrac"].item() * n) == outside
    # With ordinary returns the loss is the formula's, computed in fp64.
    returns = torch.randn(1, n, generator=generator)
    loss, _ = value_loss(values, old, returns, mask, clip_range_value=c)
    v, o, r = values.double(), old.double(), returns.double()
    clipped = o + torch.clamp(v - o, -c, c)
    expected = 0.5 * torch.maximum((v - r).square(), (clipped - r).square()).mean()
    assert abs(loss.double().item() - expected.item()) < 1e-5 * expected.item()


# ---------------------------------------------------------------------------------------------
# 8. entropy and log-probs from logits
# ---------------------------------------------------------------------------------------------


def test_entropy_by_hand():
    # logits [0, ln 3] -> p = [1/4, 3/4]; H = 0.25 ln 4 + 0.75 ln(4/3) = 0.346574 + 0.215762 = 0.562335
    h2 = 0.25 * math.log(4.0) + 0.75 * math.log(4.0 / 3.0)
    inf, ln3 = math.inf, math.log(3.0)
    two_way = [0.0, ln3, -inf, -inf]  # 2-way, two banned tokens: h2
    uniform4 = [1000.0, 1000.0, 1000.0, 1000.0]  # uniform over 4 with huge logits: ln 4
    shifted = [1000.0, 1000.0 + ln3, -inf, -inf]  # the 2-way shifted by 1000: same h2
    uniform2 = [0.0, 0.0, -inf, -inf]  # uniform over 2: ln 2
    logits = t([[two_way, uniform4], [shifted, uniform2]])  # (B=2, T=2, V=4)
    expected = t([[h2, math.log(4.0)], [h2, math.log(2.0)]])
    assert_close(entropy_from_logits(logits), expected, **TIGHT)


def test_entropy_gradient_finite_with_banned_tokens():
    # -inf logits (banned tokens) must not turn the entropy bonus gradient into NaN.
    logits = t([[[0.0, math.log(3.0), -math.inf]]]).requires_grad_()
    entropy_from_logits(logits).sum().backward()
    assert torch.isfinite(logits.grad).all()
    # dH/dz_i = -p_i (log p_i + H): p = [1/4, 3/4], H = 0.562335
    h2 = 0.25 * math.log(4.0) + 0.75 * math.log(4.0 / 3.0)
    expected = t([[[-0.25 * (math.log(0.25) + h2), -0.75 * (math.log(0.75) + h2), 0.0]]])
    assert_close(logits.grad, expected, **TIGHT)


def test_logprobs_from_logits_by_hand_and_vs_log_softmax():
    # logits [0, ln 3]: p = [1/4, 3/4] -> log p(label 1) = ln 0.75, log p(label 0) = ln 0.25
    logits = t([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    expected = t([[math.log(0.75), math.log(0.25)]])
    assert_close(logprobs_from_logits(logits, torch.tensor([[1, 0]])), expected, **TIGHT)

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 11, generator=gen) * 5  # (B, T, V) float32
    labels = torch.randint(0, 11, (2, 4), generator=gen)  # (B, T)
    reference = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    assert_close(logprobs_from_logits(logits, labels), reference, atol=1e-5, rtol=1e-6)


def test_half_precision_logits_give_float32_results():
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 3, 7, generator=gen) * 4).bfloat16()  # (B, T, V)
    labels = torch.randint(0, 7, (2, 3), generator=gen)  # (B, T)
    lp = logprobs_from_logits(logits, labels)
    ent = entropy_from_logits(logits)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    # Same numbers as doing the whole thing on the float32 upcast of the bf16 logits.
    exact = logits.float()
    reference = torch.log_softmax(exact, -1).gather(-1, labels[..., None]).squeeze(-1)  # (B, T)
    assert_close(lp, reference, atol=1e-5, rtol=1e-5)
    p = torch.softmax(exact, -1)
    assert_close(ent, -(p * p.log()).sum(-1), atol=1e-5, rtol=1e-5)


def test_logprobs_gradient_matches_log_softmax():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(1, 3, 5, generator=gen, dtype=F64, requires_grad=True)
    b = a.detach().clone().requires_grad_()
    labels = torch.tensor([[0, 4, 2]])
    logprobs_from_logits(a, labels).sum().backward()
    torch.log_softmax(b, -1).gather(-1, labels[..., None]).sum().backward()
    assert_close(a.grad, b.grad, **TIGHT)


# ---------------------------------------------------------------------------------------------
# Reward clipping and running moments (10.)
# ---------------------------------------------------------------------------------------------


def test_clip_rewards():
    scores = t([-5.0, -1.0, 0.5, 3.0])
    assert clip_rewards(scores, None) is scores
    assert_close(clip_rewards(scores, 2.0), t([-2.0, -1.0, 0.5, 2.0]), **TIGHT)
    with pytest.raises(ValueError):
        clip_rewards(scores, 0.0)


def test_running_moments_two_batches_equal_concatenation():
    rm = RunningMoments()
    # batch 1 = [1, 2, 3]: mean 2, unbiased std sqrt((1+0+1)/2) = 1
    assert_close(rm.update(t([1.0, 2.0, 3.0])), (2.0, 1.0), **TIGHT)
    # batch 2 = [4..8]: mean 6, unbiased std sqrt((4+1+0+1+4)/4) = sqrt(2.5)
    assert_close(rm.update(t([[4.0, 5.0, 6.0, 7.0, 8.0]])), (6.0, math.sqrt(2.5)), **TIGHT)
    # Chan: delta = 6 - 2 = 4, M2 = 2 + 10 + 4^2 * 3*5/8 = 42, n = 8
    # 1..8: mean 4.5, unbiased var 42/7 = 6, std sqrt(6) = 2.449490
    everything = torch.arange(1.0, 9.0, dtype=F64)
    assert rm.count == 8
    assert_close(rm.mean, 4.5, **TIGHT)
    assert_close(rm.std, math.sqrt(6.0), **TIGHT)
    assert_close(rm.std, everything.std().item(), **TIGHT)


def test_running_moments_state_round_trip():
    rm = RunningMoments()
    rm.update(t([1.0, 2.0, 3.0]))
    restored = RunningMoments()
    restored.load_state_dict(rm.state_dict())
    assert restored.state_dict() == rm.state_dict()
    # Both continue identically after the restore.
    for m in (rm, restored):
        m.update(t([4.0, 5.0, 6.0, 7.0, 8.0]))
    assert restored.state_dict() == rm.state_dict()
    assert_close(restored.std, math.sqrt(6.0), **TIGHT)
    # Single value batch: std 0 rather than NaN; an empty batch is an error.
    assert RunningMoments().update(t([3.0])) == (3.0, 0.0)
    with pytest.raises(ValueError):
        RunningMoments().update(t([]))


# ---------------------------------------------------------------------------------------------
# 9. KL controllers
# ---------------------------------------------------------------------------------------------


def test_adaptive_kl_controller_two_updates_by_hand():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # kl 12: error = 12/6 - 1 = 1 -> clipped to 0.2; 0.1 * (1 + 0.2*256/10000) = 0.1 * 1.00512 = 0.100512
    ctl.update(current_kl=12.0, n_steps=256)
    assert_close(ctl.value, 0.100512, atol=1e-12, rtol=0.0)
    # kl 5.7: error = 5.7/6 - 1 = -0.05 (inside the clip);
    # 0.100512 * (1 - 0.05*256/10000) = 0.100512 * 0.99872 = 0.100512 - 0.00012865536 = 0.10038334464
    ctl.update(current_kl=5.7, n_steps=256)
    assert_close(ctl.value, 0.10038334464, atol=1e-12, rtol=0.0)
    # kl 0: error -1 -> clipped to -0.2; 0.10038334464 * (1 - 0.2*256/10000) = * 0.99488
    ctl.update(current_kl=0.0, n_steps=256)
    assert_close(ctl.value, 0.10038334464 * 0.99488, atol=1e-12, rtol=0.0)


def test_adaptive_kl_controller_rejects_bad_input():
    ctl = AdaptiveKLController(0.1, 6.0, 10000)
    with pytest.raises(ValueError):
        ctl.update(float("nan"), 256)
    with pytest.raises(ValueError):  # 1 - 0.2 * 60000/10000 < 0 would flip the penalty's sign
        ctl.update(0.0, 60000)
    assert ctl.value == 0.1
    for args in ((0.0, 6.0, 10000), (0.1, 0.0, 10000), (0.1, 6.0, 0)):
        with pytest.raises(ValueError):
            AdaptiveKLController(*args)


def test_fixed_kl_controller_never_changes():
    ctl = FixedKLController(0.05)
    for kl in (0.0, 12.0, 1e6):
        ctl.update(kl, 256)
    assert ctl.value == 0.05


def test_kl_controller_state_round_trip():
    ctl = AdaptiveKLController(0.1, 6.0, 10000)
    ctl.update(12.0, 256)
    restored = AdaptiveKLController(0.1, 6.0, 10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value == pytest.approx(0.100512, abs=1e-12)
    fixed = FixedKLController(0.2)
    fixed_restored = FixedKLController(0.0)
    fixed_restored.load_state_dict(fixed.state_dict())
    assert fixed_restored.value == 0.2
    with pytest.raises(ValueError, match="adaptive"):
        FixedKLController(0.2).load_state_dict(ctl.state_dict())


def test_make_kl_controller():
    assert isinstance(make_kl_controller("fixed", 0.1), FixedKLController)
    ctl = make_kl_controller("adaptive", 0.1, target=6.0, horizon=10000)
    assert isinstance(ctl, AdaptiveKLController) and (ctl.target, ctl.horizon) == (6.0, 10000)
    with pytest.raises(ValueError, match="target"):
        make_kl_controller("adaptive", 0.1, horizon=10000)
    with pytest.raises(ValueError, match="target and horizon"):
        make_kl_controller("adaptive", 0.1)
    with pytest.raises(ValueError, match="horizon"):
        make_kl_controller("adaptive", 0.1, target=6.0)
    with pytest.raises(ValueError, match="unknown"):
        make_kl_controller("linear", 0.1)  # type: ignore[arg-type]
