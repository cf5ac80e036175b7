"""Social choice across stakeholder groups: whose verdict decides a label when groups disagree.

    from cai.groups import apportion, collective_ranking, normalise_weights

A pluralistic run (`constitutions:` in the run config) has several groups, each with its own
constitution and a weight: the share of the population it speaks for. Inside a group its
principles decide the group's verdict (`label.rule`, as in a one-group run); this module decides
across groups (`label.groups.rule`):

* ``weighted_majority``: each pair goes to the response whose supporting groups weigh most (the
  rules' ``majority`` over group ballots; with K = 2 exactly "largest support weight wins").
  Per-comparison majority lets one majority win every contested comparison: 60/40 becomes 100/0.
* ``maximin``: the response whose least-satisfied group is best off (egalitarian).
* ``borda``, ``copeland``, ``kemeny``, ``ranked_pairs``: `cai.rules` over group ballots, each
  ballot weighted by its group's weight.
* ``proportional``: among the comparisons on which groups disagree, each group decides a number
  proportional to its weight (Sainte-Laguë), taking first those where its preference is
  strongest; comparisons the groups agree on follow the consensus. 60/40 stays 60/40.

Pure: no I/O, no model. `cai.stages.label_groups` applies it to the label stage.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydantic import Field, field_validator

from cai.hashing import derive_seed
from cai.rules import RULES, PrincipleVote, RuleOutcome, check_votes, pref, rounded
from cai.sections import Section

PER_LABEL_RULES = ("weighted_majority", "maximin", "borda", "copeland", "kemeny", "ranked_pairs")
"""Rules that decide each label on its own (at chunk time)."""

GROUP_RULES = (*PER_LABEL_RULES, "proportional")
"""Every rule `label.groups.rule` accepts; `proportional` needs all labels, so it runs at finalize."""

SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


class GroupSpec(Section):
    """One stakeholder group of a pluralistic run: its constitution and its share of the population."""

    name: str = Field(description="A unique slug (lowercase letters, digits, '-' and '_') naming the group.")
    constitution: str = Field(description="The group's constitution file, or a shipped name.")
    weight: float = Field(
        gt=0, description="The share of the population the group speaks for (normalised over the groups)."
    )

    @field_validator("name")
    @classmethod
    def _slug(cls, name: str) -> str:
        if not SLUG.match(name):
            raise ValueError(f"group name {name!r} must be a slug: lowercase letters, digits, '-', '_'")
        return name

    @field_validator("weight")
    @classmethod
    def _finite(cls, weight: float) -> float:
        if not math.isfinite(weight):
            raise ValueError(f"group weight must be finite, got {weight}")
        return weight


class GroupsRule(Section):
    """How the groups' verdicts become one label (`label.groups`, pluralistic runs only)."""

    rule: str = Field(
        "weighted_majority",
        description="Across groups: weighted_majority, proportional, maximin, or a ranking rule over "
        "group ballots (borda, copeland, kemeny, ranked_pairs).",
    )

    @field_validator("rule")
    @classmethod
    def _known(cls, rule: str) -> str:
        if rule not in GROUP_RULES:
            raise ValueError(f"unknown group rule {rule!r}; known: {', '.join(GROUP_RULES)}")
        return rule


def check_groups(groups: Sequence[GroupSpec]) -> None:
    """Refuse an empty list and repeated names (audit rows refer to groups by name)."""
    if not groups:
        raise ValueError("constitutions: list at least one group")
    names = [g.name for g in groups]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"constitutions: group names must be unique; repeated: {', '.join(repeated)}")


def normalise_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Weights as shares of the population (summing to 1); each must be finite and positive."""
    for name, w in weights.items():
        if not (math.isfinite(w) and w > 0):
            raise ValueError(f"group {name!r}: weight must be finite and > 0, got {w}")
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}


# --------------------------------------------------------------------------- one label


def maximin_rule(ballots: list[PrincipleVote]) -> RuleOutcome:
    """The response whose least-satisfied group is best off.

    A group's satisfaction with response r is its mean P(r better) against the other responses it
    answered (K = 2: its probability for r). A response's score is the least satisfaction over the
    groups that answered about it; ranking by score, ties broken by the next-least satisfaction
    (leximin), then by index.
    """
    k = check_votes(ballots)
    satisfaction: list[list[float]] = [[] for _ in range(k)]
    for ballot in ballots:
        for r in range(k):
            answered = [p for o in range(k) if o != r and (p := pref(ballot, r, o)) is not None]
            if answered:
                satisfaction[r].append(sum(answered) / len(answered))
    ordered = [sorted(rounded(s) for s in row) for row in satisfaction]
    scores = [row[0] if row else 0.5 for row in ordered]
    ranking = sorted(range(k), key=lambda r: ([-s for s in ordered[r]] or [-0.5], r))
    return RuleOutcome(rule="maximin", ranking=ranking, scores=scores)


def collective_ranking(ballots: list[PrincipleVote], rule: str) -> RuleOutcome:
    """The groups' collective order of one label's responses.

    ``ballots`` hold one `PrincipleVote` per group (``principle_id`` = group name, ``weight`` =
    its normalised weight, ``prefs`` its verdicts' probabilities, None where it has no verdict).
    ``proportional`` ranks like ``weighted_majority``: the apportionment starts from that order
    and decides the contested pairs later (`apportion`).
    """
    if rule == "maximin":
        return maximin_rule(ballots)
    name = "majority" if rule in ("weighted_majority", "proportional") else rule
    outcome = RULES[name](ballots)
    return RuleOutcome(rule=rule, ranking=outcome.ranking, scores=outcome.scores)


# --------------------------------------------------------------------------- across labels


@dataclass(frozen=True)
class Contest:
    """One comparison on which the groups' verdicts disagree.

    ``sides[g]``: +1 when group g's verdict prefers the pair's first response, -1 the second
    (groups without a verdict are absent); ``strength[g]``: |p - 0.5| of g's verdict.
    """

    key: str
    sides: Mapping[str, int]
    strength: Mapping[str, float]


@dataclass(frozen=True)
class Seat:
    """Who decided a contest: the group, the side it chose, and the seat's place in the order."""

    group: str
    side: int
    seat: int


def _tie(seed: int, *parts: object) -> int:
    return derive_seed(seed, "groups", *parts)


def _priority(contest: Contest, group: str, seed: int) -> tuple[float, float, int]:
    """A group's order of the open contests: where it feels strongest first; among equals, where
    the other groups feel weakest (leaving them what they care most about), then the seeded hash."""
    others = max((s for g, s in contest.strength.items() if g != group), default=0.0)
    return rounded(contest.strength[group]), -rounded(others), _tie(seed, contest.key, group)


def apportion(contests: Sequence[Contest], weights: Mapping[str, float], seed: int) -> dict[str, Seat]:
    """Give each group a number of the contests proportional to its weight (Sainte-Laguë).

    Seats are handed out one at a time to the group with the largest quotient w / (2s + 1)
    (s: seats it holds); the group takes, among the contests still open on which it has a verdict,
    the one where its preference is strongest (largest |p - 0.5|; among equals, the one the
    other groups feel least strongly about). A group with no open contest left passes its turn.
    Equal quotients and equal strengths are broken by a hash of (seed, group) and (seed,
    contest, group): deterministic, seeded, and independent of input order. On 10 contests 60/40
    gives exactly 6/4 and 0.5/0.3/0.2 gives 5/3/2; with two groups every count stays within one
    seat of its quota (with more, Sainte-Laguë can rarely miss it by more).

    Returns the seat of every contest (keyed by `Contest.key`).
    """
    keys = [c.key for c in contests]
    if len(set(keys)) != len(keys):
        raise ValueError("contest keys must be unique")
    shares = normalise_weights(weights)
    held = dict.fromkeys(shares, 0)
    open_ = sorted(contests, key=lambda c: c.key)
    seats: dict[str, Seat] = {}
    number = 0
    while open_:
        able = [g for g in shares if any(g in c.sides for c in open_)]
        if not able:  # no group has a verdict on what is left: not a contest
            raise ValueError(f"contests without any group verdict: {[c.key for c in open_]}")
        group = max(able, key=lambda g: (rounded(shares[g] / (2 * held[g] + 1)), _tie(seed, g)))
        mine = [c for c in open_ if group in c.sides]
        contest = max(mine, key=lambda c: _priority(c, group, seed))
        number += 1
        held[group] += 1
        seats[contest.key] = Seat(group=group, side=contest.sides[group], seat=number)
        open_.remove(contest)
    return seats
