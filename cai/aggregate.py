"""Turn per-principle AI-judge preferences into one collective preference label, explained.

    from cai.aggregate import aggregate
    aggregate(votes, rule="mean").pairs[0].decisive

Constitutional AI asks the feedback model about each response pair under several principles.
The paper averages those judgements into one "mean soft label"; that is the default rule
(`cai.rules` holds them all). Averaging hides two things an audit needs, so this module also
reports them:

* whether the label is *contested* (a sizeable weight of principles preferred the other
  response), because a contested label is a weaker training signal and worth a human look;
* which principles were *decisive*, because "which principle shaped this label" is the question
  reviewers ask when a preference model learns something surprising.

Only **verdicts** count as opinions (`cai.verdict`): a judgement whose two presentation orders
disagreed, or agreed too weakly, is kept for the soft label but is not a vote. A
``PrincipleVote`` says which of its entries are verdicts (``verdicts``); rules, agreement,
contested flags and decisive principles see verdicts only. A label without any verdict has no
signal: its ranking is then the paper's mean over every answered probability, and nothing in it
is contested or decisive.
"""

import itertools
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict

from cai.rules import RULES, PrincipleVote, Rule, RuleOutcome, check_votes, mean_rule, pref, rounded
from cai.verdict import TIE_TOL, side


class DerivedPair(BaseModel):
    """One (chosen, rejected) pair with the evidence behind it, as written to audit rows.

    ``soft_label`` is the weighted mean of P(chosen better) over the principles with a verdict on
    the pair; when none has one, over every principle that answered (the paper's average, which
    then carries no verdict); 0.5 when nobody answered. It can fall below 0.5 when a rule other
    than the mean, or the mean over K > 2 responses, put ``chosen`` first against the pair's own
    probabilities: a *rule conflict*, which is always contested and never a training row.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    chosen: int
    rejected: int
    soft_label: float
    agree_weight: float
    disagree_weight: float
    abstain_weight: float
    contested: bool
    decisive: list[str]

    @property
    def has_verdict(self) -> bool:
        """Some principle gave a verdict on this very pair (agree and disagree count verdicts only)."""
        return self.agree_weight + self.disagree_weight > 0

    @property
    def rule_conflict(self) -> bool:
        """The rule ranked ``chosen`` first although the pair's probability favours ``rejected``."""
        return self.soft_label < 0.5 - TIE_TOL

    @property
    def decided(self) -> int | None:
        """The response this pair's label decides for (`chosen`), or None when it decides nothing:
        no principle gave a verdict on it, or the rule's choice contradicts its probability."""
        return self.chosen if self.has_verdict and not self.rule_conflict else None


class Aggregate(BaseModel):
    """The collective label for one prompt, with what an auditor needs to trust or question it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rule: str
    ranking: list[int]
    scores: list[float]
    pairs: list[DerivedPair]
    contested: bool
    principle_agreement: float | None
    has_verdict: bool = True


# --------------------------------------------------------------------------------------------
# From a collective ranking to labelled, explained pairs
# --------------------------------------------------------------------------------------------


def derive_pairs(ranking: list[int], mode: Literal["best_worst", "all"]) -> list[tuple[int, int]]:
    """The (chosen, rejected) pairs to train on.

    ``best_worst`` keeps only the clearest contrast, one pair per prompt as in the paper;
    ``all`` yields every ordered pair (ranking[a], ranking[b]) with a < b, in ranking order,
    for preference models trained on full rankings.
    """
    if len(ranking) < 2 or len(set(ranking)) != len(ranking):
        raise ValueError(f"ranking must list at least 2 distinct responses, got {ranking}")
    if mode == "best_worst":
        return [(ranking[0], ranking[-1])]
    if mode == "all":
        return [(ranking[a], ranking[b]) for a, b in itertools.combinations(range(len(ranking)), 2)]
    raise ValueError(f"unknown pairs mode {mode!r}; use 'best_worst' or 'all'")


def _ranks_above(ranking: list[int], chosen: int, rejected: int) -> bool:
    return ranking.index(chosen) < ranking.index(rejected)


def _largest_contributors(votes: Sequence[PrincipleVote], chosen: int, rejected: int) -> list[str]:
    """The fewest agreeing principles that carry most of the agreement, for consensus labels.

    Contribution is weight * |p - 0.5|: how much, and how confidently, a principle pushed toward
    the outcome. Principles tied with the last one kept are kept too, so the report never picks
    between equals arbitrarily.
    """
    contributions: list[tuple[float, str]] = []
    for vote in votes:
        p = pref(vote, chosen, rejected)
        if p is not None and side(p) > 0:
            contributions.append((vote.weight * abs(p - 0.5), vote.principle_id))
    if not contributions:
        return []
    contributions.sort(key=lambda c: -rounded(c[0]))  # stable: equal contributions keep input order
    half = sum(c for c, _ in contributions) / 2
    kept: list[str] = []
    running = 0.0
    cut: float | None = None
    for contribution, principle_id in contributions:
        if cut is not None and rounded(contribution) != cut:
            break
        kept.append(principle_id)
        running += contribution
        if cut is None and rounded(running) > rounded(half):
            cut = rounded(contribution)
    return kept


def _decisive(
    votes: Sequence[PrincipleVote],
    chosen: int,
    rejected: int,
    rankings_without: Sequence[list[int]],
    has_opinions: bool,
) -> list[str]:
    """Principles that shaped the order of this pair; see ``aggregate`` for the reported rule."""
    if not has_opinions:
        return []
    pivotal = [
        vote.principle_id
        for vote, ranking in zip(votes, rankings_without, strict=True)
        if not _ranks_above(ranking, chosen, rejected)
    ]
    return pivotal or _largest_contributors(votes, chosen, rejected)


def _mean_pref(votes: Sequence[PrincipleVote], chosen: int, rejected: int) -> float | None:
    """Weighted mean P(chosen better) over the votes that answered the pair (None if none did)."""
    answered = [(v.weight, p) for v in votes if (p := pref(v, chosen, rejected)) is not None]
    total = sum(w for w, _ in answered)
    return sum(w * p for w, p in answered) / total if total > 0 else None


def _derived_pair(
    counted: Sequence[PrincipleVote],
    answered: Sequence[PrincipleVote],
    chosen: int,
    rejected: int,
    rankings_without: Sequence[list[int]],
    contested_threshold: float,
) -> DerivedPair:
    """Collect the evidence for one pair: who agreed, who did not, and who tipped it.

    `counted` holds verdicts only (everything else abstains); `answered` every probability, for
    the soft label of a pair on which no principle has a verdict.
    """
    agree = disagree = abstain = 0.0
    for vote in counted:
        direction = side(pref(vote, chosen, rejected))
        if direction > 0:
            agree += vote.weight
        elif direction < 0:
            disagree += vote.weight
        else:
            abstain += vote.weight
    opinionated = agree + disagree
    soft = (
        _mean_pref(counted, chosen, rejected) if opinionated > 0 else _mean_pref(answered, chosen, rejected)
    )
    soft = 0.5 if soft is None else soft
    contested = opinionated > 0 and (
        disagree / opinionated >= contested_threshold - TIE_TOL or soft < 0.5 - TIE_TOL
    )
    return DerivedPair(
        chosen=chosen,
        rejected=rejected,
        soft_label=soft,
        agree_weight=agree,
        disagree_weight=disagree,
        abstain_weight=abstain,
        contested=contested,
        decisive=_decisive(counted, chosen, rejected, rankings_without, opinionated > 0),
    )


def _run_rule(name: str, fn: Rule, votes: list[PrincipleVote], k: int) -> RuleOutcome:
    """Run a rule and make sure it ranked the K responses it was given (user rules included)."""
    outcome = fn(votes)
    if len(outcome.ranking) != k:
        raise ValueError(f"rule {name!r} ranked {len(outcome.ranking)} responses, expected K={k}")
    return outcome


def aggregate(
    votes: list[PrincipleVote],
    rule: str = "mean",
    pairs: Literal["best_worst", "all"] = "best_worst",
    contested_threshold: float = 0.25,
) -> Aggregate:
    """Decide the collective label for one prompt and explain it for the audit trail.

    How to read the result:

    * Only verdicts count (``PrincipleVote.verdicts``; every answered entry when it is None).
      ``ranking``/``scores`` come from the named rule (``RULES[rule]``) over the verdicts. A label
      with no verdict at all (``has_verdict`` False) carries no signal: its ranking is then the
      paper's mean over every answered probability, and none of its pairs is contested or has a
      decisive principle.
    * Each derived pair reports the weight of principles whose verdict preferred ``chosen``
      (``agree_weight``), preferred ``rejected`` (``disagree_weight``), or that gave no verdict on
      it (``abstain_weight``). It is ``contested`` when it has verdicts and either
      disagree / (agree + disagree) >= ``contested_threshold`` or its soft label favours
      ``rejected`` (a rule conflict, see ``DerivedPair``).
    * ``decisive`` names the principles that shaped the pair. A principle is decisive when
      re-running the same rule without it would no longer rank ``chosen`` above ``rejected``
      (listed in input order). When no single principle is decisive, as in a broad consensus,
      the list instead holds the largest contributors: principles whose verdict preferred
      ``chosen``, ordered by weight * |p - 0.5| descending, keeping the fewest whose
      contributions add up to more than half of all agreeing contributions (at least one, plus
      any tied with the last one kept). It is empty when no principle gave a verdict on the pair,
      since naming one would suggest it judged a pair it did not; with a single principle,
      nothing can be removed, so the contributor list is reported.
    * ``principle_agreement`` is the weighted share of (principle, derived pair) verdicts that
      agree with the collective direction; None when there is no verdict on any derived pair.

    Principle ids must be unique, since ``decisive`` refers to principles by id.
    """
    k = check_votes(votes)
    ids = [v.principle_id for v in votes]
    if len(set(ids)) != len(ids):
        raise ValueError(f"principle ids must be unique, got {ids}")
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; known rules: {', '.join(sorted(RULES))}")
    if not 0.0 < contested_threshold <= 1.0:
        raise ValueError(f"contested_threshold must be in (0, 1], got {contested_threshold}")
    counted = [v.counted() for v in votes]
    has_verdict = any(v.has_verdict for v in counted)
    if has_verdict:
        fn = RULES[rule]
        outcome = _run_rule(rule, fn, counted, k)
        if len(counted) == 1:
            rankings_without = [outcome.ranking]  # nothing to remove it against: never pivotal
        else:
            rankings_without = [
                _run_rule(rule, fn, counted[:n] + counted[n + 1 :], k).ranking for n in range(len(counted))
            ]
    else:  # no opinion anywhere: the paper's mean of the answered probabilities, nothing decisive
        outcome = mean_rule(votes)
        rankings_without = [outcome.ranking] * len(votes)
    derived = [
        _derived_pair(counted, votes, chosen, rejected, rankings_without, contested_threshold)
        for chosen, rejected in derive_pairs(outcome.ranking, pairs)
    ]
    agreeing = sum(p.agree_weight for p in derived)
    opinionated = sum(p.agree_weight + p.disagree_weight for p in derived)
    return Aggregate(
        rule=rule,
        ranking=outcome.ranking,
        scores=outcome.scores,
        pairs=derived,
        contested=any(p.contested for p in derived),
        principle_agreement=agreeing / opinionated if opinionated > 0 else None,
        has_verdict=has_verdict,
    )
