"""Several human ratings of one pair -> one preference row, by a voting rule.

    rows, summary = aggregate_ratings(rows, raters, lines, rule="weighted_majority", weights={"r3": 3.0})

A human preference file may rate one pair several times, one line per rater or group (the
`rater_column` of a `mix.human` entry). Flattened, a 3-vs-2 split would be five rows pulling the
PM both ways; here each pair is one row whose chosen side is the one with more rater weight, and
`PreferenceRow.raters` records the split. A tie is no consensus and the pair is dropped (counted):
a row with an arbitrary chosen side at soft label 0.5 would be read as a full preference by the
hard, margin and DPO losses and by PM accuracy.

The same pair is the same prompt and the same two responses, either way round: a rating that
swaps chosen and rejected is a vote for the other side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict

from cai.hashing import content_hash
from cai.judge import margin_from_soft_label
from cai.preferences import PreferenceDataError
from cai.records import PreferenceRow, RaterSplit

RatersRule = Literal["weighted_majority", "soft"]

TIE_TOL = 1e-9
"""Relative tolerance on the two sides' weights: 0.1 + 0.2 against 0.3 is a tie, as written."""


class RaterSummary(BaseModel):
    """What aggregation did to one source; stored per source in the mix stage summary."""

    model_config = ConfigDict(extra="forbid")

    rule: RatersRule
    ratings: int = 0
    pairs: int = 0
    unanimous: int = 0
    split: int = 0
    ties_dropped: int = 0
    rows: int = 0

    def line(self) -> str:
        return (
            f"{self.ratings} ratings -> {self.pairs} pairs ({self.unanimous} unanimous, {self.split} split, "
            f"{self.ties_dropped} ties dropped), {self.rows} rows by {self.rule}"
        )


def pair_key(row: PreferenceRow) -> str:
    """The pair a rating is about: its prompt and the set of its two responses."""
    sides = sorted(content_hash(side) for side in (row.chosen, row.rejected))
    return content_hash({"prompt": row.prompt, "responses": sides})


def aggregate_ratings(
    rows: Sequence[PreferenceRow],
    raters: Sequence[str],
    lines: Sequence[str],
    rule: RatersRule = "weighted_majority",
    weights: Mapping[str, float] | None = None,
) -> tuple[list[PreferenceRow], RaterSummary]:
    """One row per pair, in the order pairs first appear; `raters[i]` rated `rows[i]` at `lines[i]`.

    Raters missing from `weights` weigh 1. Under `soft` the row's soft label is the chosen side's
    share of the weight and its margin the (capped) logit of that; under `weighted_majority` both
    stay None, a hard label, as for any human row.
    """
    weights = weights or {}
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(pair_key(row), []).append(i)
    summary = RaterSummary(rule=rule, ratings=len(rows), pairs=len(groups))
    out: list[PreferenceRow] = []
    for members in groups.values():
        _no_double_votes(members, raters, lines)
        first = rows[members[0]]
        a, b = first.chosen, first.rejected
        votes_a = [i for i in members if rows[i].chosen == a]
        votes_b = [i for i in members if rows[i].chosen != a]
        weight_a = sum(weights.get(raters[i], 1.0) for i in votes_a)
        weight_b = sum(weights.get(raters[i], 1.0) for i in votes_b)
        if abs(weight_a - weight_b) <= TIE_TOL * (weight_a + weight_b):  # weights are positive
            summary.ties_dropped += 1
            continue
        if votes_a and votes_b:
            summary.split += 1
        else:
            summary.unanimous += 1
        a_wins = weight_a > weight_b
        split = RaterSplit(
            n=len(members),
            for_chosen=len(votes_a if a_wins else votes_b),
            against=len(votes_b if a_wins else votes_a),
            weight_for=weight_a if a_wins else weight_b,
            weight_against=weight_b if a_wins else weight_a,
        )
        soft = split.weight_for / (split.weight_for + split.weight_against) if rule == "soft" else None
        out.append(
            PreferenceRow(
                prompt=first.prompt,
                chosen=a if a_wins else b,
                rejected=b if a_wins else a,
                source=first.source,
                soft_label=soft,
                margin=None if soft is None else margin_from_soft_label(soft),
                raters=split,
            )
        )
    summary.rows = len(out)
    return out, summary


def _no_double_votes(members: list[int], raters: Sequence[str], lines: Sequence[str]) -> None:
    """One vote per rater and pair: a second rating is a copy or a changed mind, never a vote."""
    seen: dict[str, int] = {}
    for i in members:
        if raters[i] in seen:
            raise PreferenceDataError(
                f"{lines[i]}: rater {raters[i]!r} already rated this pair at {lines[seen[raters[i]]]}; "
                "keep one rating per rater and pair"
            )
        seen[raters[i]] = i


def check_weights(weights: Mapping[str, float] | None, raters: Sequence[str], where: str) -> None:
    """A weight for a rater the file never names is a typo until proven otherwise."""
    unknown = sorted(set(weights or {}) - set(raters))
    if unknown:
        known = ", ".join(sorted(set(raters))[:20]) or "none"
        raise PreferenceDataError(
            f"config error: {where}: rater_weights names raters the file does not have: {unknown} "
            f"(it has: {known})"
        )
