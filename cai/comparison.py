"""One (label, pair, principle) comparison judged in both orders, and one order's raw numbers.

`cai.judge` asks the questions; this module turns the engine's option scores of each order into
an `OrderVote` and both orders into one `PairVote` (a verdict only when they agree, `cai.verdict`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cai.backends.base import ChoiceScores
from cai.constitution import Principle
from cai.records import OrderVote, PairVote
from cai.verdict import side, two_order_verdict


@dataclass
class Comparison:
    """One (label, pair, principle) judged in both orders."""

    label: int
    i: int
    j: int
    principle: Principle
    orders: dict[str, OrderVote] = field(default_factory=dict)

    def combined(self, min_margin: float, weighted: bool = True) -> PairVote:
        """Average P(i better) over the orders that did not abstain; a verdict needs both (cai.verdict)."""

        def p_i(order: str) -> float | None:
            vote = self.orders.get(order)
            if vote is None or vote.abstained:
                return None
            return vote.probs[0] if order == "ab" else vote.probs[1]

        first, second = p_i("ab"), p_i("ba")
        reading = two_order_verdict(first, second, min_margin)
        a, b = side(first), side(second)  # 0: abstained or no preference, so consistency is unknown
        consistent = a == b if a and b else None
        return PairVote(
            principle_id=self.principle.id,
            weight=self.principle.weight if weighted else 1.0,
            i=self.i,
            j=self.j,
            orders=[self.orders[k] for k in ("ab", "ba") if k in self.orders],
            p_i_better=reading.p,
            position_consistent=consistent,
            verdict=None if not reading.is_verdict else (self.i if reading.side > 0 else self.j),
            no_verdict=reading.reason,
        )


def _clamp(probs: list[float], band: tuple[float, float]) -> list[float]:
    low, high = band
    first = min(max(probs[0], low), high)
    return [first, 1.0 - first]


def _order_vote(
    order: str, scores: ChoiceScores, reasoning: str | None, band: tuple[float, float] | None
) -> OrderVote:
    if not scores.ok:
        return OrderVote(
            order=order, logprobs=[], probs=[], reasoning=reasoning, abstained=True, error=scores.error
        )
    probs = _clamp(scores.probs, band) if band else scores.probs
    return OrderVote(order=order, logprobs=scores.logprobs, probs=probs, reasoning=reasoning)
