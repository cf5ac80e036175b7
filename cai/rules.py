"""Voting rules: how per-principle judgements of K responses become one collective ranking.

    from cai.rules import RULES, PrincipleVote
    RULES["kemeny"](votes).ranking

With more than two responses per prompt an average of probabilities is one way among several to
decide the collective order, and the classic voting rules disagree on some profiles (Borda can
rank a Condorcet winner second; Copeland ties on cycles that ranked pairs resolves by margin).
The rules are therefore kept in a small registry so a run can choose, and record, its rule
(`@rule("name")`). `cai.aggregate` runs a rule and explains its label for the audit trail.

Conventions used throughout, chosen so results are reproducible and free of positional bias:

* A pair is always read from its upper triangle, ``prefs[i][j]`` with ``i < j``, and the other
  direction is ``1 - prefs[i][j]``. The validator only guarantees complementarity within 1e-6, and
  reading both triangles could let one pair look like a vote for both sides.
* Scores are compared after rounding to ``SCORE_DECIMALS`` decimals, so that floating-point noise
  in sums (0.1 + 0.2 != 0.3) cannot turn a tie into a win; true ties go to the lower index, the
  only deterministic choice that needs no extra information.
* A probability within ``TIE_TOL`` of 0.5 is "no preference", for the same reason.
* A ballot (a principle's ranking, used by Borda, Copeland, Kemeny and ranked pairs) keeps the
  principle's ties. ``principle_ranking`` must return a strict list and breaks ties by index
  for display, but that tie-break is not an opinion of the judge; counting it as one would give
  the lower-indexed response a vote from every abstaining or indifferent principle. So a tied pair
  in a ballot gets no pairwise vote, and Borda splits the tied positions' points evenly.

No I/O and no torch: the module runs inside labelling jobs and in audit notebooks alike.
"""

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Self

from pydantic import BaseModel, ConfigDict, model_validator

from cai.verdict import side

COMPLEMENT_TOL = 1e-6
"""How far prefs[i][j] + prefs[j][i] may stray from 1: judges emit rounded probabilities."""

SCORE_DECIMALS = 9
"""Scores, margins and distances are compared at this many decimals, so float noise never
decides an order."""

KEMENY_MAX_K = 8
"""Kemeny enumerates K! orders; 8! = 40,320 is still quick, 9! is not worth it per prompt."""


# --------------------------------------------------------------------------------------------
# Inputs and outputs
# --------------------------------------------------------------------------------------------


class PrincipleVote(BaseModel):
    """One principle's judgement of all pairs of K responses to one prompt.

    ``prefs[i][j]`` is P(response i is better than response j) under this principle, already
    averaged over both presentation orders by the caller. ``None`` on a pair means the judge
    abstained there (e.g. its chain of thought could not be parsed); an abstention is left out
    of that pair's weights entirely rather than counted as 0.5, because "no answer" is not
    "equally good". Validated eagerly because a malformed matrix would otherwise surface as a
    silently wrong label far downstream.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    principle_id: str
    weight: float
    prefs: list[list[float | None]]
    verdicts: list[list[bool]] | None = None
    """Which answered entries are verdicts (both orders agree, clear of the margin); None: all are."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not self.principle_id:
            raise ValueError("principle_id must be a non-empty string")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"{self.principle_id}: weight must be finite and > 0, got {self.weight}")
        k = len(self.prefs)
        if k < 2:
            raise ValueError(f"{self.principle_id}: need at least 2 responses, got K={k}")
        for i, row in enumerate(self.prefs):
            if len(row) != k:
                raise ValueError(
                    f"{self.principle_id}: prefs must be square; row {i} has {len(row)} entries, K={k}"
                )
            for j, p in enumerate(row):
                if p is not None and not 0.0 <= p <= 1.0:  # also rejects NaN
                    raise ValueError(f"{self.principle_id}: prefs[{i}][{j}]={p} is not in [0, 1]")
        for i in range(k):
            if self.prefs[i][i] is None or abs(self.prefs[i][i] - 0.5) > COMPLEMENT_TOL:
                raise ValueError(f"{self.principle_id}: diagonal prefs[{i}][{i}] must be 0.5")
            for j in range(i + 1, k):
                p, q = self.prefs[i][j], self.prefs[j][i]
                if (p is None) != (q is None):
                    raise ValueError(
                        f"{self.principle_id}: prefs[{i}][{j}] and prefs[{j}][{i}] must both be "
                        "None (abstention) or both be numbers"
                    )
                if p is not None and q is not None and abs(p + q - 1.0) > COMPLEMENT_TOL:
                    raise ValueError(
                        f"{self.principle_id}: prefs[{i}][{j}]={p} and prefs[{j}][{i}]={q} are not "
                        f"complementary (sum {p + q}, tolerance {COMPLEMENT_TOL})"
                    )
        if self.verdicts is not None:
            if len(self.verdicts) != k or any(len(row) != k for row in self.verdicts):
                raise ValueError(f"{self.principle_id}: verdicts must be a K x K matrix like prefs")
            for i in range(k):
                for j in range(k):
                    if self.verdicts[i][j] != self.verdicts[j][i]:
                        raise ValueError(f"{self.principle_id}: verdicts[{i}][{j}] and [{j}][{i}] differ")
                    if self.verdicts[i][j] and (i == j or self.prefs[i][j] is None):
                        raise ValueError(
                            f"{self.principle_id}: verdicts[{i}][{j}] marks a verdict where "
                            "nothing was answered"
                        )
        return self

    def counted(self) -> Self:
        """The same vote with every entry that is not a verdict turned into an abstention."""
        if self.verdicts is None:
            return self
        k = len(self.prefs)
        prefs = [
            [self.prefs[i][j] if i == j or self.verdicts[i][j] else None for j in range(k)] for i in range(k)
        ]
        return PrincipleVote(principle_id=self.principle_id, weight=self.weight, prefs=prefs)

    @property
    def has_verdict(self) -> bool:
        if self.verdicts is None:
            return any(p is not None for i, row in enumerate(self.prefs) for j, p in enumerate(row) if i != j)
        return any(any(row) for row in self.verdicts)


class RuleOutcome(BaseModel):
    """What a rule decides: the collective order, plus its own scores so reports can show why.

    Validated because user-registered rules produce it and a ranking that is not a permutation
    would corrupt every derived pair.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    rule: str
    ranking: list[int]
    scores: list[float]

    @model_validator(mode="after")
    def _check(self) -> Self:
        k = len(self.ranking)
        if sorted(self.ranking) != list(range(k)):
            raise ValueError(f"rule {self.rule!r}: ranking {self.ranking} is not a permutation of 0..{k - 1}")
        if len(self.scores) != k:
            raise ValueError(f"rule {self.rule!r}: {len(self.scores)} scores for {k} responses")
        return self


Rule = Callable[[list[PrincipleVote]], RuleOutcome]


# --------------------------------------------------------------------------------------------
# Small shared helpers
# --------------------------------------------------------------------------------------------


def rounded(x: float) -> float:
    """Round for comparison, so float noise cannot separate values that are equal in exact math."""
    return round(x, SCORE_DECIMALS)


def _rank_by_scores(scores: Sequence[float]) -> list[int]:
    """Best first; ties to the lower index so every rule breaks ties the same documented way."""
    return sorted(range(len(scores)), key=lambda i: (-rounded(scores[i]), i))


def check_votes(votes: Sequence[PrincipleVote]) -> int:
    """Return K, refusing inputs on which no rule is meaningful."""
    if not votes:
        raise ValueError("need at least one PrincipleVote")
    sizes = {len(v.prefs) for v in votes}
    if len(sizes) != 1:
        by_id = {v.principle_id: len(v.prefs) for v in votes}
        raise ValueError(f"all votes must rank the same K responses; got K per principle {by_id}")
    return sizes.pop()


def pref(vote: PrincipleVote, i: int, j: int) -> float | None:
    """P(i better than j), always read from the upper triangle so both directions agree exactly."""
    if i == j:
        return 0.5
    if i < j:
        return vote.prefs[i][j]
    p = vote.prefs[j][i]
    return None if p is None else 1.0 - p


def _expected_wins(vote: PrincipleVote) -> list[float]:
    """Sum of win probabilities against the others; abstained pairs add nothing either way."""
    k = len(vote.prefs)
    wins = [0.0] * k
    for i in range(k):
        for j in range(k):
            p = pref(vote, i, j)
            if i != j and p is not None:
                wins[i] += p
    return wins


def _ballot_support(votes: Sequence[PrincipleVote], k: int) -> list[list[float]]:
    """support[a][b] = total weight of ballots that rank a strictly above b.

    Ballot ties (equal expected wins) count for neither side; see the module docstring.
    """
    support = [[0.0] * k for _ in range(k)]
    for vote in votes:
        wins = [rounded(w) for w in _expected_wins(vote)]
        for a in range(k):
            for b in range(k):
                if wins[a] > wins[b]:
                    support[a][b] += vote.weight
    return support


def _margins(votes: Sequence[PrincipleVote], k: int) -> list[list[float]]:
    """Weighted pairwise margin of a over b among the ballots, the input of every Condorcet rule."""
    support = _ballot_support(votes, k)
    return [[support[a][b] - support[b][a] for b in range(k)] for a in range(k)]


# --------------------------------------------------------------------------------------------
# A single principle's view
# --------------------------------------------------------------------------------------------


def principle_ranking(vote: PrincipleVote) -> list[int]:
    """A principle's own order of the responses, best first, to serve as its ballot.

    Expected wins (sum of its win probabilities, abstentions skipped) rather than hard wins,
    because a 0.95 and a 0.55 judgement should not weigh the same when K > 2. Ties go to the lower
    index only so that the result is a list; ballot rules treat such ties as ties.
    For K=2 this is simply the side with p > 0.5, index 0 first on a tie.
    """
    return _rank_by_scores(_expected_wins(vote))


# --------------------------------------------------------------------------------------------
# Rule registry
# --------------------------------------------------------------------------------------------

RULES: dict[str, Rule] = {}
"""Registered rules by name; ``aggregate(rule=name)`` looks them up here."""


def rule(name: str) -> Callable[[Rule], Rule]:
    """Register a rule under ``name`` so ``aggregate`` and audit rows can refer to it by name.

    Re-registering an existing name is refused: silently replacing a rule would make two runs
    that record the same rule name mean different things.
    """

    def register(fn: Rule) -> Rule:
        if name in RULES:
            raise ValueError(f"rule {name!r} is already registered")
        RULES[name] = fn
        return fn

    return register


def _mean_matrix(votes: Sequence[PrincipleVote], k: int) -> list[list[float]]:
    """Per pair, the weighted mean probability over principles that answered it (0.5 if none did,
    the only value that claims nothing)."""
    mean = [[0.5] * k for _ in range(k)]
    for i in range(k):
        for j in range(k):
            if i == j:
                continue
            answered = [(v.weight, p) for v in votes if (p := pref(v, i, j)) is not None]
            total = sum(w for w, _ in answered)
            if total > 0:
                mean[i][j] = sum(w * p for w, p in answered) / total
    return mean


@rule("mean")
def mean_rule(votes: list[PrincipleVote]) -> RuleOutcome:
    """The paper's default: average the principles' probabilities, so confidence counts.

    Scores are the row sums of the weighted mean matrix (expected wins of each response under the
    averaged judge, diagonal excluded). With K=2 this is exactly the "mean soft label".
    """
    k = check_votes(votes)
    mean = _mean_matrix(votes, k)
    scores = [sum(mean[i][j] for j in range(k) if j != i) for i in range(k)]
    return RuleOutcome(rule="mean", ranking=_rank_by_scores(scores), scores=scores)


@rule("majority")
def majority_rule(votes: list[PrincipleVote]) -> RuleOutcome:
    """Each principle votes hard on each pair, so one very confident principle cannot outvote two.

    p > 0.5 is a vote for i, p < 0.5 for j, 0.5 or None no vote. Each pair goes to the weighted
    majority; scores count pairwise majority wins only (a tied pair scores nothing for either).
    With K=2 this is plain weighted majority.
    """
    k = check_votes(votes)
    scores = [0.0] * k
    for i, j in itertools.combinations(range(k), 2):
        margin = sum(v.weight * side(pref(v, i, j)) for v in votes)
        if rounded(margin) > 0:
            scores[i] += 1.0
        elif rounded(margin) < 0:
            scores[j] += 1.0
    return RuleOutcome(rule="majority", ranking=_rank_by_scores(scores), scores=scores)


@rule("borda")
def borda_rule(votes: list[PrincipleVote]) -> RuleOutcome:
    """Positional scoring: rewards responses every principle ranks fairly high.

    Position p (0-based) of a K-ballot earns K-1-p points times the weight. Tied responses in a
    ballot share their positions' points evenly (so an indifferent principle favours nobody).
    Not Condorcet consistent: a response that beats every other head to head can lose to one
    that is a broad second choice.
    """
    k = check_votes(votes)
    scores = [0.0] * k
    for vote in votes:
        wins = [rounded(w) for w in _expected_wins(vote)]
        for a in range(k):
            below = sum(1 for b in range(k) if wins[b] < wins[a])
            tied = sum(1 for b in range(k) if b != a and wins[b] == wins[a])
            scores[a] += vote.weight * (below + 0.5 * tied)
    return RuleOutcome(rule="borda", ranking=_rank_by_scores(scores), scores=scores)


@rule("copeland")
def copeland_rule(votes: list[PrincipleVote]) -> RuleOutcome:
    """Count head-to-head victories between ballots' orders: robust to how strongly each prefers.

    +1 for a weighted pairwise win, +0.5 for a tie, 0 for a loss. On a Condorcet cycle every
    response can score the same, and the lower index then wins; ranked pairs resolves such cycles
    by margin instead.
    """
    k = check_votes(votes)
    margins = _margins(votes, k)
    scores = [0.0] * k
    for a, b in itertools.permutations(range(k), 2):
        m = rounded(margins[a][b])
        scores[a] += 1.0 if m > 0 else 0.5 if m == 0 else 0.0
    return RuleOutcome(rule="copeland", ranking=_rank_by_scores(scores), scores=scores)


@rule("kemeny")
def kemeny_rule(votes: list[PrincipleVote]) -> RuleOutcome:
    """The order that disagrees least with the ballots: the maximum-likelihood consensus ranking.

    Minimises the weighted Kendall-tau distance (weight of ballots that order a pair the other
    way, summed over pairs; a pair a ballot ties costs every order the same, so it is left out).
    All K! orders are enumerated, hence K <= KEMENY_MAX_K. Among equally good orders the
    lexicographically smallest wins. Scores are K-1-position in the chosen order: the distance
    belongs to the whole order, not to a response.

    Condorcet consistent: a response that beats every other in weighted pairwise majority is
    ranked first, because moving it up past anyone always shortens the distance.
    """
    k = check_votes(votes)
    if k > KEMENY_MAX_K:
        raise ValueError(f"kemeny enumerates K! orders and allows K <= {KEMENY_MAX_K}, got K={k}")
    support = _ballot_support(votes, k)
    best: tuple[int, ...] = tuple(range(k))
    best_distance = math.inf
    for order in itertools.permutations(range(k)):  # lexicographic order, so ties keep the first
        distance = rounded(sum(support[order[y]][order[x]] for x in range(k) for y in range(x + 1, k)))
        if distance < best_distance:
            best, best_distance = order, distance
    scores = [0.0] * k
    for position, candidate in enumerate(best):
        scores[candidate] = float(k - 1 - position)
    return RuleOutcome(rule="kemeny", ranking=list(best), scores=scores)


def _reaches(graph: list[set[int]], start: int, goal: int) -> bool:
    """Whether goal is reachable from start; used to refuse a lock that would close a cycle."""
    seen, stack = {start}, [start]
    while stack:
        node = stack.pop()
        if node == goal:
            return True
        for nxt in graph[node] - seen:
            seen.add(nxt)
            stack.append(nxt)
    return False


def _topological_order(graph: list[set[int]]) -> list[int]:
    """Kahn's algorithm taking the lowest-index available node, so unforced order follows index."""
    k = len(graph)
    indegree = [0] * k
    for targets in graph:
        for t in targets:
            indegree[t] += 1
    order: list[int] = []
    available = [n for n in range(k) if indegree[n] == 0]
    while available:
        node = min(available)
        available.remove(node)
        order.append(node)
        for t in graph[node]:
            indegree[t] -= 1
            if indegree[t] == 0:
                available.append(t)
    return order


@rule("ranked_pairs")
def ranked_pairs_rule(votes: list[PrincipleVote]) -> RuleOutcome:
    """Tideman's ranked pairs: trust the strongest head-to-head majorities first.

    Pairs with a positive weighted margin are sorted by margin, largest first (equal margins by
    (winner, loser) index), and each is locked in unless it would close a cycle with those
    already locked. The ranking is the topological order of the locked graph, lower index first
    where the graph leaves the order open. Scores are the number of locked wins.

    Condorcet consistent: a Condorcet winner has no winning pair against it, so nothing can point
    at it and every one of its own wins is locked; it is the graph's only source.
    """
    k = check_votes(votes)
    margins = _margins(votes, k)
    pairs = [(a, b) for a, b in itertools.permutations(range(k), 2) if rounded(margins[a][b]) > 0]
    pairs.sort(key=lambda ab: (-rounded(margins[ab[0]][ab[1]]), ab[0], ab[1]))
    locked: list[set[int]] = [set() for _ in range(k)]
    for winner, loser in pairs:
        if not _reaches(locked, loser, winner):
            locked[winner].add(loser)
    scores = [float(len(locked[n])) for n in range(k)]
    return RuleOutcome(rule="ranked_pairs", ranking=_topological_order(locked), scores=scores)
