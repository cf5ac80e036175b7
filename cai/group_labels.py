"""Labels of a pluralistic run: each group's verdict, the decision across groups, and who made it.

    audit, rows = group_label(row_id, prompt, responses, votes, heads, config, meta)
    settled = settle(audits, seed)       # the proportional pass over all labels (at finalize)

Inside each group its principles' votes are aggregated by `label.rule` exactly as in a one-group
run (over every pair of the K responses), giving the group's verdict on each pair: the response
its rule puts first where the group has a verdict on the pair and its probability agrees, else
none (a group without a verdict takes no part in that pair's decision). Across groups,
`label.groups.rule` (`cai.groups`) ranks the responses from the group ballots, and the label's
training pairs are derived from that ranking as in a one-group run (`label.pairs`).

K > 2: the decision is made per derived pair (best_worst: the one (best, worst) pair of the
collective ranking; all: each pair). Each group's verdict on a derived pair is its own verdict on
those two responses. Under `proportional` the collective ranking is the weighted-majority one and
each derived pair on which the groups disagree is one contest of the apportionment; the
apportioned group's side wins the pair (its `outcome.ranking` stays the weighted-majority order).

The soft label of a pair is the weighted mean P(chosen better) over the groups with a verdict on
it, or the deciding group's own under apportionment (a minority's pair is otherwise always a
rule conflict); without any verdict, the mean over the groups that answered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cai.aggregate import DerivedPair, aggregate, derive_pairs
from cai.backends.base import Chat
from cai.groups import PER_LABEL_RULES, Contest, GroupsRule, Seat, apportion, collective_ranking
from cai.judge import LabelConfig, LabelMeta, audit_provenance, preference_rows, principle_votes, training_use
from cai.records import DecidedBy, GroupVerdict, LabelAudit, LabelResult, PairVote, PreferenceRow
from cai.rules import PrincipleVote, RuleOutcome, mean_rule
from cai.verdict import TIE_TOL


@dataclass(frozen=True)
class GroupHead:
    """What a label records of a group before its verdict: name, weights, constitution, principles."""

    name: str
    weight: float
    raw_weight: float
    constitution: str
    constitution_hash: str
    principles: tuple[str, ...]


@dataclass
class _View:
    """One group's verdicts on the unordered pairs (a, b), a < b, of one label."""

    head: GroupHead
    ranking: list[int] | None
    p: dict[tuple[int, int], float | None]  # P(a better)
    decided: dict[tuple[int, int], int | None]
    decisive: dict[tuple[int, int], list[str]]

    def p_of(self, chosen: int, rejected: int) -> float | None:
        p = self.p.get((min(chosen, rejected), max(chosen, rejected)))
        return None if p is None else (p if chosen < rejected else 1.0 - p)

    def side(self, chosen: int, rejected: int) -> int:
        decided = self.decided.get((min(chosen, rejected), max(chosen, rejected)))
        return 1 if decided == chosen else -1 if decided == rejected else 0


def _view(head: GroupHead, votes: Sequence[PairVote], k: int, config: LabelConfig) -> _View:
    if not votes:
        return _View(head, None, {}, {}, {})
    result = aggregate(principle_votes(votes, k), config.rule, "all", config.contested.threshold)
    view = _View(head, result.ranking if result.has_verdict else None, {}, {}, {})
    for pair in result.pairs:
        key = (min(pair.chosen, pair.rejected), max(pair.chosen, pair.rejected))
        answered = any(v.p_i_better is not None and {v.i, v.j} == set(key) for v in votes)
        soft = pair.soft_label if pair.chosen == key[0] else 1.0 - pair.soft_label
        view.p[key] = soft if answered else None
        view.decided[key] = pair.decided
        view.decisive[key] = list(pair.decisive)
    return view


def _ballot(view: _View, k: int, verdicts_only: bool) -> PrincipleVote:
    prefs: list[list[float | None]] = [[0.5 if a == b else None for b in range(k)] for a in range(k)]
    for (a, b), p in view.p.items():
        if p is not None and (view.decided[(a, b)] is not None or not verdicts_only):
            prefs[a][b], prefs[b][a] = p, 1.0 - p
    return PrincipleVote(principle_id=view.head.name, weight=view.head.weight, prefs=prefs)


def _ranking(views: Sequence[_View], k: int, rule: str) -> tuple[RuleOutcome, bool]:
    """The collective order across groups, and whether any group had a verdict."""
    ballots = [_ballot(v, k, True) for v in views if v.ranking is not None]
    if ballots:
        return collective_ranking(ballots, rule), True
    # no group has a verdict: the paper's mean over what was answered, as a one-group label does
    outcome = mean_rule([_ballot(v, k, False) for v in views])
    return RuleOutcome(rule=rule, ranking=outcome.ranking, scores=outcome.scores), False


def _weighted_mean(items: Sequence[tuple[float, float | None]]) -> float | None:
    answered = [(w, p) for w, p in items if p is not None]
    total = sum(w for w, _ in answered)
    return sum(w * p for w, p in answered) / total if total > 0 else None


def _decide(
    views: Sequence[_View], chosen: int, rejected: int, rule: str, key: str, seats: dict[str, Seat] | None
) -> tuple[int, int, DecidedBy]:
    """Orient one derived pair and say who decided it."""
    sides = {v.head.name: v.side(chosen, rejected) for v in views}
    voting = {name: s for name, s in sides.items() if s}
    if not voting:
        return chosen, rejected, DecidedBy(group=None, reason="no-verdict")
    if len(set(voting.values())) == 1:
        side = next(iter(voting.values()))
        if rule == "proportional" and side < 0:  # the consensus decides, whatever the majority order
            chosen, rejected = rejected, chosen
        reason = "consensus" if rule == "proportional" or side > 0 else "rule"
    elif rule == "proportional":
        seat = (seats or {}).get(key)
        if seat is None:
            return chosen, rejected, DecidedBy(group=None, reason="pending")
        if seat.side < 0:
            chosen, rejected = rejected, chosen
        return chosen, rejected, DecidedBy(group=seat.group, reason="apportioned", seat=seat.seat)
    else:
        reason = "rule"
    agreeing = [v for v in views if v.side(chosen, rejected) > 0]
    heaviest = max(agreeing, key=lambda v: v.head.weight, default=None)  # first of equals
    return chosen, rejected, DecidedBy(group=heaviest.head.name if heaviest else None, reason=reason)


def _pair(views: Sequence[_View], chosen: int, rejected: int, decided: DecidedBy, threshold: float):
    weights = {v.head.name: v.head.weight for v in views}
    agree = sum(weights[v.head.name] for v in views if v.side(chosen, rejected) > 0)
    disagree = sum(weights[v.head.name] for v in views if v.side(chosen, rejected) < 0)
    decider = next((v for v in views if v.head.name == decided.group), None)
    if decided.reason == "apportioned" and decider is not None:
        soft = decider.p_of(chosen, rejected)
    else:  # the groups with a verdict; without any, every group that answered
        voting = [v for v in views if v.side(chosen, rejected)] if agree + disagree > 0 else views
        soft = _weighted_mean([(v.head.weight, v.p_of(chosen, rejected)) for v in voting])
    soft = 0.5 if soft is None else soft
    opinionated = agree + disagree
    key = (min(chosen, rejected), max(chosen, rejected))
    return DerivedPair(
        chosen=chosen,
        rejected=rejected,
        soft_label=soft,
        agree_weight=agree,
        disagree_weight=disagree,
        abstain_weight=sum(weights.values()) - opinionated,
        contested=opinionated > 0 and (disagree / opinionated >= threshold - TIE_TOL or soft < 0.5 - TIE_TOL),
        decisive=decider.decisive.get(key, []) if decider is not None else [],
    )


def group_label(
    row_id: str,
    conversation: Chat,
    responses: list[str],
    votes: list[PairVote],
    heads: Sequence[GroupHead],
    config: LabelConfig,
    meta: LabelMeta,
    seats: dict[str, Seat] | None = None,
) -> tuple[LabelAudit, list[PreferenceRow]]:
    """One label of a pluralistic run: its audit row (with every group's verdict) and its rows.

    `votes` carry their group (`PairVote.group`). Under `proportional` a pair the groups disagree
    on is decided by `seats` (from `settle`); without them it is "pending" (ledger rows only).
    """
    k = len(responses)
    rule = (config.groups or GroupsRule()).rule
    views = [_view(head, [v for v in votes if v.group == head.name], k, config) for head in heads]
    outcome, has_verdict = _ranking(views, k, rule)
    label_id = f"label:{row_id}"
    pairs: list[DerivedPair] = []
    decided_by: list[DecidedBy] = []
    for n, (chosen, rejected) in enumerate(derive_pairs(outcome.ranking, config.pairs)):
        chosen, rejected, decided = _decide(views, chosen, rejected, rule, f"{label_id}#{n}", seats)
        pairs.append(_pair(views, chosen, rejected, decided, config.contested.threshold))
        decided_by.append(decided)
    groups = [
        GroupVerdict(
            name=v.head.name,
            weight=v.head.weight,
            raw_weight=v.head.raw_weight,
            constitution=v.head.constitution,
            constitution_hash=v.head.constitution_hash,
            principles=list(v.head.principles),
            ranking=v.ranking,
            p=[v.p_of(p.chosen, p.rejected) for p in pairs],
            verdict=[v.decided.get((min(p.chosen, p.rejected), max(p.chosen, p.rejected))) for p in pairs],
        )
        for v in views
    ]
    uses = [training_use(pair, responses, votes, config) for pair in pairs]
    agreeing = sum(p.agree_weight for p in pairs)
    opinionated = sum(p.agree_weight + p.disagree_weight for p in pairs)
    audit = LabelAudit(
        label_id=label_id,
        row_id=row_id,
        prompt=conversation,
        responses=responses,
        principles=sorted({v.principle_id for v in votes}),
        votes=votes,
        rule=config.rule,
        outcome={"rule": rule, "ranking": outcome.ranking, "scores": outcome.scores},
        pairs=pairs,
        training=uses,
        contested=any(p.contested for p in pairs),
        has_verdict=has_verdict,
        principle_agreement=agreeing / opinionated if opinionated > 0 else None,
        **audit_provenance(config, meta),
        groups=groups,
        decided_by=decided_by,
    )
    groups = [decided.group for decided in decided_by]
    return audit, preference_rows(conversation, responses, pairs, uses, label_id, config, groups)


# --------------------------------------------------------------------------- the proportional pass


def contests(audit: LabelAudit) -> list[Contest]:
    """The pairs of one label still waiting for the apportionment, as contests."""
    out = []
    for n, (pair, decided) in enumerate(zip(audit.pairs, audit.decided_by or [], strict=True)):
        if decided.reason != "pending":
            continue
        sides, strength = {}, {}
        for group in audit.groups or []:
            verdict, p = group.verdict[n], group.p[n]
            if verdict is None or p is None:
                continue
            sides[group.name] = 1 if verdict == pair.chosen else -1
            strength[group.name] = abs(p - 0.5)
        out.append(Contest(key=f"{audit.label_id}#{n}", sides=sides, strength=strength))
    return out


def rebuild(audit: LabelAudit, config: LabelConfig, seats: dict[str, Seat]):
    """The same label built again from its audit row alone, with the apportioned seats."""
    heads = [
        GroupHead(g.name, g.weight, g.raw_weight, g.constitution, g.constitution_hash, tuple(g.principles))
        for g in audit.groups or []
    ]
    meta = LabelMeta(
        judge_model_id=audit.judge_model_id,
        policy_model_id=audit.policy_model_id,
        constitution=audit.constitution,
        constitution_hash=audit.constitution_hash,
        template_hashes=audit.template_hashes,
        config_hash=audit.config_hash,
        weighting=audit.weighting,
    )
    return group_label(audit.row_id, audit.prompt, audit.responses, audit.votes, heads, config, meta, seats)


def settle(results: Sequence[LabelResult], config: LabelConfig, seed: int) -> list[LabelResult]:
    """The proportional pass: apportion every contested pair of the committed labels.

    A pure function of the rows and the seed (the order of `results` does not matter), so a
    stage killed and resumed settles exactly as an uninterrupted one. Per-label rules have
    nothing to settle and come back unchanged.
    """
    rule = (config.groups or GroupsRule()).rule
    if rule in PER_LABEL_RULES:
        return list(results)
    audits = [r.audit for r in results if r.audit is not None]
    weights = {g.name: g.weight for a in audits[:1] for g in a.groups or []}
    seats = apportion([c for a in audits for c in contests(a)], weights, seed) if audits else {}
    settled = []
    for result in results:
        if result.audit is None or not contests(result.audit):
            settled.append(result)
            continue
        audit, rows = rebuild(result.audit, config, seats)
        settled.append(result.model_copy(update={"audit": audit, "preferences": rows}))
    return settled
