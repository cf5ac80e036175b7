"""Verdicts: when a judge's reading of a pair is an opinion, and when it is noise.

    from cai.verdict import two_order_verdict
    two_order_verdict(0.81, 0.77, min_margin=0.05)   # Reading(p=0.79, side=+1, reason=None)
    two_order_verdict(0.80, 0.21, min_margin=0.05)   # position-inconsistent: no verdict

A judge asked "which response is better?" in both presentation orders gives two readings of
P(first response better). A small judge often picks the same *letter* in both orders; the two
readings then point at different responses and their average sits near 0.5, a residual that
follows length or wording rather than the principle. Counting such residuals as votes makes an
audit report noise as provenance. So a reading is a **verdict** only when both orders prefer
the same response and the averaged probability is at least `min_margin` away from 0.5;
otherwise it is "no verdict", with its reason. The same rule serves labelling, the gold-set
gate and evaluation, so every figure cai prints counts opinions the same way.

Why 0.05 by default (measured with `benchmarks/margin.py`: SmolLM2-135M, the 64 gold pairs x 4
principles, 2026-11-30): scoring in bf16 instead of fp32 moved a single order's probability by up
to 0.058 and the two-order average by up to 0.036 (mean 0.012); and the residual averages of a
position-biased judge sat within 0.019 (fp32) to 0.028 (bf16) of 0.5 for 95% of readings, 0.054 at
most. A verdict 0.05 from 0.5 is therefore clear of what precision alone moves and of nearly all
such residuals; a smaller one is within the numerical noise of the judge itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TIE_TOL = 1e-9
"""A probability this close to 0.5 prefers nothing; a share this close to a threshold is at it."""

DEFAULT_MIN_MARGIN = 0.05
"""Distance from 0.5 a two-order average needs to be a verdict; see the module docstring."""

NoVerdict = Literal["abstained", "position-inconsistent", "below-margin"]
"""Why a reading is not a verdict: an order failed or abstained; the orders preferred different
responses (or one preferred none); or they agreed but too weakly to tell from noise."""

NO_VERDICT_REASONS: tuple[NoVerdict, ...] = ("abstained", "position-inconsistent", "below-margin")


def side(p: float | None) -> int:
    """+1 if the first response of the pair is preferred, -1 the second, 0 no preference."""
    if p is None or abs(p - 0.5) <= TIE_TOL:
        return 0
    return 1 if p > 0.5 else -1


@dataclass(frozen=True)
class Reading:
    """One judgement of one pair: the averaged probability and whether it is a verdict.

    `p` is P(first response better), averaged over the orders that answered (None if none did).
    `side` is the verdict's direction (+1 first, -1 second) and 0 when there is no verdict, in
    which case `reason` says why.
    """

    p: float | None
    side: int
    reason: NoVerdict | None

    @property
    def is_verdict(self) -> bool:
        return self.reason is None


def two_order_verdict(p_first: float | None, p_second: float | None, min_margin: float) -> Reading:
    """Combine the readings of both presentation orders, each already as P(first response better).

    An order that abstained is None. The averaged probability is kept even without a verdict
    (it is the paper's soft label); only the verdict needs both orders, the same direction in
    both, and a distance of at least `min_margin` from 0.5.
    """
    answered = [p for p in (p_first, p_second) if p is not None]
    p = sum(answered) / len(answered) if answered else None
    if len(answered) < 2:
        return Reading(p, 0, "abstained")
    first, second = side(p_first), side(p_second)
    if first == 0 or first != second:
        return Reading(p, 0, "position-inconsistent")
    assert p is not None
    if abs(p - 0.5) < min_margin - TIE_TOL:
        return Reading(p, 0, "below-margin")
    return Reading(p, first, None)


def one_reading_verdict(p: float | None, min_margin: float) -> Reading:
    """A judge with no presentation order (a classifier scoring each response on its own) gives one
    reading of P(first response better); it is a verdict when at least `min_margin` from 0.5.

    There is no position consistency to check, so a reading that prefers nothing (p = 0.5) is
    simply below the margin, never "position-inconsistent".
    """
    if p is None:
        return Reading(None, 0, "abstained")
    direction = side(p)
    if direction == 0 or abs(p - 0.5) < min_margin - TIE_TOL:
        return Reading(p, 0, "below-margin")
    return Reading(p, direction, None)
