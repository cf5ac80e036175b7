"""Tests for cai.aggregate: every expected number is worked by hand in a comment.

Notation: principles are named a, b, c, ...; for K=2 "p" is P(response 0 better than 1).
"""

import itertools
import random

import pytest
from pydantic import ValidationError

from cai.aggregate import Aggregate, aggregate, derive_pairs
from cai.rules import RULES, PrincipleVote, RuleOutcome, principle_ranking, rule

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def pair_vote(pid: str, p: float | None, weight: float = 1.0) -> PrincipleVote:
    """K=2 vote with P(0 better than 1) = p (None = abstained)."""
    q = None if p is None else 1.0 - p
    return PrincipleVote(principle_id=pid, weight=weight, prefs=[[0.5, p], [q, 0.5]])


def ballot_vote(pid: str, order: list[int], weight: float = 1.0) -> PrincipleVote:
    """A vote whose ranking is `order`: 0.9 for every pair in ballot order, 0.1 against."""
    k = len(order)
    position = {c: n for n, c in enumerate(order)}
    prefs: list[list[float | None]] = [
        [0.5 if i == j else (0.9 if position[i] < position[j] else 0.1) for j in range(k)] for i in range(k)
    ]
    return PrincipleVote(principle_id=pid, weight=weight, prefs=prefs)


def random_vote(rng: random.Random, pid: str, k: int) -> PrincipleVote:
    prefs: list[list[float | None]] = [[0.5] * k for _ in range(k)]
    for i, j in itertools.combinations(range(k), 2):
        p = rng.random()
        prefs[i][j], prefs[j][i] = p, 1.0 - p
    return PrincipleVote(principle_id=pid, weight=rng.choice([0.5, 1.0, 2.0, 3.0]), prefs=prefs)


def ranking_of(votes: list[PrincipleVote], rule_name: str) -> list[int]:
    return aggregate(votes, rule=rule_name).ranking


# ---------------------------------------------------------------------------------------------
# 1. K=2 mean, the paper's default
# ---------------------------------------------------------------------------------------------


def test_k2_mean_worked_example() -> None:
    # weights 1, 1, 2; p(0>1) = 0.9, 0.6, 0.2
    # mean p(0>1) = (1*0.9 + 1*0.6 + 2*0.2) / 4 = 1.9 / 4 = 0.475 -> response 1 wins
    votes = [pair_vote("a", 0.9, 1), pair_vote("b", 0.6, 1), pair_vote("c", 0.2, 2)]
    result = aggregate(votes)
    assert result.rule == "mean"
    assert result.ranking == [1, 0]
    assert result.scores == pytest.approx([0.475, 0.525])
    (pair,) = result.pairs
    assert (pair.chosen, pair.rejected) == (1, 0)
    assert pair.soft_label == pytest.approx(0.525)  # 1 - 0.475
    # prefers 1 (p < 0.5): c (weight 2); prefers 0: a, b (1 + 1 = 2)
    assert pair.agree_weight == 2.0
    assert pair.disagree_weight == 2.0
    assert pair.abstain_weight == 0.0
    # disagree share 2 / (2 + 2) = 0.5 >= 0.25
    assert pair.contested and result.contested
    # leave one out: without a: (0.6 + 0.4) / 3 = 0.333 -> 1 still wins
    #                without b: (0.9 + 0.4) / 3 = 0.433 -> 1 still wins
    #                without c: (0.9 + 0.6) / 2 = 0.75  -> 0 wins: c is pivotal
    assert pair.decisive == ["c"]
    # agreement 2 / 4
    assert result.principle_agreement == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------
# 2. Abstention
# ---------------------------------------------------------------------------------------------


def test_abstention_is_left_out_not_counted_as_half() -> None:
    # a: 0.9 (w1), b: abstains (w1), c: 0.2 (w2)
    # mean over a, c only: (0.9 + 2*0.2) / 3 = 1.3 / 3 = 0.4333 -> 1 wins, soft label 0.5667
    # (had b counted as 0.5: (0.9 + 0.5 + 0.4) / 4 = 0.45 -> soft label 0.55)
    votes = [pair_vote("a", 0.9, 1), pair_vote("b", None, 1), pair_vote("c", 0.2, 2)]
    result = aggregate(votes)
    assert result.scores == pytest.approx([1.3 / 3, 1 - 1.3 / 3])
    (pair,) = result.pairs
    assert (pair.chosen, pair.rejected) == (1, 0)
    assert pair.soft_label == pytest.approx(1 - 1.3 / 3)
    assert pair.soft_label != pytest.approx(0.55)
    assert (pair.agree_weight, pair.disagree_weight, pair.abstain_weight) == (2.0, 1.0, 1.0)
    # disagree share 1 / 3 >= 0.25
    assert pair.contested
    # without c only a (0.9) is left -> 0 wins; without a or b, 1 still wins
    assert pair.decisive == ["c"]
    # abstentions are out of the agreement share too: 2 / (2 + 1)
    assert result.principle_agreement == pytest.approx(2 / 3)


def test_exact_half_is_in_the_soft_label_but_counts_as_abstain_weight() -> None:
    # a: 0.8, b: 0.5 (answered, indifferent). soft label (0.8 + 0.5) / 2 = 0.65
    result = aggregate([pair_vote("a", 0.8), pair_vote("b", 0.5)])
    (pair,) = result.pairs
    assert (pair.chosen, pair.rejected) == (0, 1)
    assert pair.soft_label == pytest.approx(0.65)
    assert (pair.agree_weight, pair.disagree_weight, pair.abstain_weight) == (1.0, 0.0, 1.0)


def test_every_principle_abstains() -> None:
    # no information: mean stays 0.5, tie -> lower index first; nobody decisive, not contested
    result = aggregate([pair_vote("a", None), pair_vote("b", None, 2)])
    (pair,) = result.pairs
    assert result.ranking == [0, 1]
    assert pair.soft_label == 0.5
    assert pair.abstain_weight == 3.0
    assert pair.decisive == []
    assert not pair.contested
    # no verdict anywhere: no agreement to report (not a perfect 1.0) and no signal
    assert result.principle_agreement is None and result.has_verdict is False


def test_pair_nobody_judged_has_no_decisive_principle() -> None:
    # K=3, both principles abstain on (0, 2):
    #   a (w2): p01 = 0.9, p12 = 0.9      b (w1): p01 = 0.1, p12 = 0.1
    # mean: m01 = (1.8 + 0.1)/3 = 0.633, m12 = 0.633, m02 = 0.5 (nobody answered)
    # row sums: 0 -> 0.633 + 0.5 = 1.133, 1 -> 0.367 + 0.633 = 1.0, 2 -> 0.5 + 0.367 = 0.867
    # best/worst pair (0, 2). Without a the order would flip (b alone: 2 > 1 > 0), but no
    # principle judged this pair, so none is named for it.
    a = PrincipleVote(principle_id="a", weight=2, prefs=[[0.5, 0.9, None], [0.1, 0.5, 0.9], [None, 0.1, 0.5]])
    b = PrincipleVote(principle_id="b", weight=1, prefs=[[0.5, 0.1, None], [0.9, 0.5, 0.1], [None, 0.9, 0.5]])
    assert aggregate([b], rule="mean").ranking == [2, 1, 0]
    result = aggregate([a, b])
    assert result.ranking == [0, 1, 2]
    (pair,) = result.pairs
    assert (pair.chosen, pair.rejected, pair.soft_label, pair.abstain_weight) == (0, 2, 0.5, 3.0)
    assert pair.decisive == []


# ---------------------------------------------------------------------------------------------
# principle_ranking
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("p", "expected"), [(0.7, [0, 1]), (0.3, [1, 0]), (0.5, [0, 1]), (None, [0, 1])])
def test_principle_ranking_k2(p: float | None, expected: list[int]) -> None:
    assert principle_ranking(pair_vote("a", p)) == expected


def test_principle_ranking_uses_expected_wins_and_skips_abstentions() -> None:
    # prefs[0][1] = 0.6, prefs[0][2] = None, prefs[1][2] = 0.2
    # expected wins: 0 -> 0.6; 1 -> 0.4 + 0.2 = 0.6; 2 -> 0.8
    # 2 first; 0 and 1 tie at 0.6 -> lower index first
    vote = PrincipleVote(
        principle_id="a", weight=1, prefs=[[0.5, 0.6, None], [0.4, 0.5, 0.2], [None, 0.8, 0.5]]
    )
    assert principle_ranking(vote) == [2, 0, 1]


def test_principle_ranking_ties_survive_float_noise() -> None:
    # prefs[0][1] = 0.5, prefs[0][2] = 0.1, prefs[1][2] = 0.7
    # expected wins: 0 -> 0.5 + 0.1 = 0.6; 1 -> 0.5 + 0.7 = 1.2; 2 -> 0.9 + 0.3 = 1.2
    # in floats 2 gets 0.9 + (1 - 0.7) = 1.2000000000000002 > 1.2, which must still be a tie
    vote = PrincipleVote(
        principle_id="a", weight=1, prefs=[[0.5, 0.5, 0.1], [0.5, 0.5, 0.7], [0.9, 0.3, 0.5]]
    )
    assert 0.9 + (1 - 0.7) > 0.5 + 0.7  # the float noise being guarded against
    assert principle_ranking(vote) == [1, 2, 0]


# ---------------------------------------------------------------------------------------------
# 3. Rules that disagree
# ---------------------------------------------------------------------------------------------

CLASSIC_UNIT = [ballot_vote(f"v{n}", [0, 1, 2]) for n in range(3)] + [
    ballot_vote(f"w{n}", [1, 2, 0]) for n in range(2)
]
CLASSIC_WEIGHTED = [ballot_vote("a", [0, 1, 2], 3), ballot_vote("b", [1, 2, 0], 2)]


@pytest.mark.parametrize("votes", [CLASSIC_UNIT, CLASSIC_WEIGHTED], ids=["5 unit voters", "weights 3+2"])
def test_condorcet_winner_that_borda_ranks_second(votes: list[PrincipleVote]) -> None:
    # 3 x (0>1>2), 2 x (1>2>0)
    # head to head: 0 vs 1: 3-2, 0 vs 2: 3-2, 1 vs 2: 5-0 -> 0 is the Condorcet winner
    # Borda: 0 -> 3*2 + 2*0 = 6; 1 -> 3*1 + 2*2 = 7; 2 -> 3*0 + 2*1 = 2 -> 1 wins
    borda = aggregate(votes, rule="borda")
    assert borda.ranking == [1, 0, 2]
    assert borda.scores == pytest.approx([6, 7, 2])
    # Copeland: 0 wins both (2), 1 beats 2 (1), 2 nothing (0)
    copeland = aggregate(votes, rule="copeland")
    assert copeland.ranking == [0, 1, 2]
    assert copeland.scores == [2.0, 1.0, 0.0]
    # Kemeny: 0>1>2 disagrees with 2 (0 vs 1) + 2 (0 vs 2) + 0 = 4;
    # 1>0>2: 3 + 2 + 0 = 5, 1>2>0: 3 + 3 + 0 = 6, others worse
    assert aggregate(votes, rule="kemeny").ranking == [0, 1, 2]
    # ranked pairs: lock 1>2 (margin 5), then 0>1 (1), 0>2 (1)
    ranked = aggregate(votes, rule="ranked_pairs")
    assert ranked.ranking == [0, 1, 2]
    assert ranked.scores == [2.0, 1.0, 0.0]
    # Borda is not Condorcet consistent: its winner is not the Condorcet winner 0
    assert borda.ranking[0] != 0


# Condorcet cycle, weights 4, 9, 7 on the three cyclic orders (total 20):
#   a (w4): 0>1>2    b (w9): 1>2>0    c (w7): 2>0>1
# support 0 over 1: a + c = 11 vs 9  -> margin 2
#         1 over 2: a + b = 13 vs 7  -> margin 6
#         2 over 0: b + c = 16 vs 4  -> margin 12
CYCLE = [
    ballot_vote("a", [0, 1, 2], 4),
    ballot_vote("b", [1, 2, 0], 9),
    ballot_vote("c", [2, 0, 1], 7),
]


def test_condorcet_cycle_gives_three_different_winners() -> None:
    # Borda: 0 -> 4*2 + 9*0 + 7*1 = 15; 1 -> 4*1 + 9*2 + 7*0 = 22; 2 -> 4*0 + 9*1 + 7*2 = 23
    borda = aggregate(CYCLE, rule="borda")
    assert borda.ranking == [2, 1, 0]
    assert borda.scores == pytest.approx([15, 22, 23])
    # Copeland: every response wins once -> 1, 1, 1 -> index order
    copeland = aggregate(CYCLE, rule="copeland")
    assert copeland.ranking == [0, 1, 2]
    assert copeland.scores == [1.0, 1.0, 1.0]
    # Ranked pairs: lock 2>0 (12), lock 1>2 (6), 0>1 (2) would close 0>1>2>0 -> skipped.
    # Locked graph 1 -> 2 -> 0: ranking 1, 2, 0; locked wins 0: 0, 1: 1, 2: 1
    ranked = aggregate(CYCLE, rule="ranked_pairs")
    assert ranked.ranking == [1, 2, 0]
    assert ranked.scores == [0.0, 1.0, 1.0]
    # Kemeny distances (weight of ballots ordering each pair the other way):
    #   012: 9+16+7 = 32   021: 16+9+13 = 38   102: 11+7+16 = 34
    #   120: 7+11+4 = 22   201: 4+13+9 = 26    210: 4+13+11 = 28   -> 1>2>0
    kemeny = aggregate(CYCLE, rule="kemeny")
    assert kemeny.ranking == [1, 2, 0]
    assert kemeny.scores == [0.0, 2.0, 1.0]  # K-1-position
    assert len({borda.ranking[0], copeland.ranking[0], ranked.ranking[0]}) == 3


def test_majority_on_cycle_and_on_k2_tie() -> None:
    # hard votes on the cycle are the ballots' pairwise majorities: each response wins once
    majority = aggregate(CYCLE, rule="majority")
    assert majority.ranking == [0, 1, 2]
    assert majority.scores == [1.0, 1.0, 1.0]
    # K=2, the example of test 1: hard votes for 0: a + b = 2, for 1: c = 2 -> tie -> 0 first.
    votes = [pair_vote("a", 0.9, 1), pair_vote("b", 0.6, 1), pair_vote("c", 0.2, 2)]
    result = aggregate(votes, rule="majority")
    assert result.ranking == [0, 1]
    (pair,) = result.pairs
    # the rule chose 0 although the mean is 0.475: the soft label stays honest, below 0.5
    assert pair.soft_label == pytest.approx(0.475)
    # without a: 1 vs 2 -> 1 wins (flip); without b: same; without c: 2 vs 0 -> 0 stays
    assert pair.decisive == ["a", "b"]


def test_indifferent_principle_gives_no_ballot_vote() -> None:
    # a is indifferent (p = 0.5, weight 5), b mildly prefers 1 (p = 0.3).
    # a's ranking breaks its tie as [0, 1], but that is not an opinion: its ballot ties 0 and 1
    # and Borda splits its point: 0 -> 5*0.5 + 0 = 2.5, 1 -> 5*0.5 + 1 = 3.5 -> 1 wins.
    votes = [pair_vote("a", 0.5, 5), pair_vote("b", 0.3, 1)]
    assert principle_ranking(votes[0]) == [0, 1]
    borda = aggregate(votes, rule="borda")
    assert borda.ranking == [1, 0]
    assert borda.scores == pytest.approx([2.5, 3.5])
    for name in ("copeland", "kemeny", "ranked_pairs", "majority", "mean"):
        assert ranking_of(votes, name) == [1, 0], name


def test_kemeny_refuses_more_than_eight_responses() -> None:
    vote = ballot_vote("a", list(range(9)))
    with pytest.raises(ValueError, match="K <= 8"):
        aggregate([vote], rule="kemeny")
    reverse = [7, 6, 5, 4, 3, 2, 1, 0]
    assert aggregate([ballot_vote("a", reverse)], rule="kemeny").ranking == reverse


@pytest.mark.parametrize("name", ["mean", "majority", "borda", "copeland", "kemeny", "ranked_pairs"])
def test_perfectly_split_profile_falls_back_to_index_order(name: str) -> None:
    # 0>1>2 and 2>1>0 with equal weight: every pairwise margin is 0, every score ties
    votes = [ballot_vote("a", [0, 1, 2]), ballot_vote("b", [2, 1, 0])]
    result = aggregate(votes, rule=name)
    assert result.ranking == [0, 1, 2]
    expected_scores = {
        "mean": [1.0, 1.0, 1.0],  # every mean probability is 0.5, two per row
        "majority": [0.0, 0.0, 0.0],  # no pairwise majority wins
        "borda": [2.0, 2.0, 2.0],  # 0: 2 + 0, 1: 1 + 1, 2: 0 + 2
        "copeland": [1.0, 1.0, 1.0],  # two ties each, 0.5 per tie
        "kemeny": [2.0, 1.0, 0.0],  # all orders at distance 3: the first, 0 1 2, is kept
        "ranked_pairs": [0.0, 0.0, 0.0],  # nothing to lock
    }[name]
    assert result.scores == pytest.approx(expected_scores)


def test_kemeny_ties_go_to_the_lexicographically_smallest_order() -> None:
    # two equal ballots 0>1 and 1>0: both orders have distance 1 -> [0, 1]
    votes = [ballot_vote("a", [1, 0]), ballot_vote("b", [0, 1])]
    assert aggregate(votes, rule="kemeny").ranking == [0, 1]


# ---------------------------------------------------------------------------------------------
# 4. Condorcet consistency on random profiles
# ---------------------------------------------------------------------------------------------


def condorcet_winner(votes: list[PrincipleVote], k: int) -> int | None:
    """Independent reference: the response beating each other one by strict weighted majority."""
    ballots = [(principle_ranking(v), v.weight) for v in votes]

    def support(a: int, b: int) -> float:
        return sum(w for order, w in ballots if order.index(a) < order.index(b))

    for c in range(k):
        if all(support(c, x) > support(x, c) for x in range(k) if x != c):
            return c
    return None


def test_kemeny_and_ranked_pairs_are_condorcet_consistent() -> None:
    rng = random.Random(20221215)
    with_winner = 0
    borda_misses = 0
    for _ in range(300):
        k = rng.randint(3, 5)
        votes = [random_vote(rng, f"p{n}", k) for n in range(rng.randint(1, 7))]
        winner = condorcet_winner(votes, k)
        if winner is None:
            continue
        with_winner += 1
        assert ranking_of(votes, "kemeny")[0] == winner
        assert ranking_of(votes, "ranked_pairs")[0] == winner
        assert ranking_of(votes, "copeland")[0] == winner
        borda_misses += ranking_of(votes, "borda")[0] != winner
    assert with_winner > 100  # the property was actually exercised
    assert borda_misses > 0  # and Borda, which is not Condorcet consistent, did miss


# ---------------------------------------------------------------------------------------------
# 5. Contested threshold
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("threshold", "contested"),
    [(0.25 - 1e-6, True), (0.25, True), (0.25 + 1e-6, False)],
    ids=["share above threshold", "share at threshold", "share below threshold"],
)
def test_contested_threshold_boundary(threshold: float, contested: bool) -> None:
    # a prefers 0 with weight 3, b prefers 1 with weight 1: mean (3*0.8 + 0.3)/4 = 0.675 -> 0
    # disagree share 1 / (3 + 1) = 0.25 exactly
    votes = [pair_vote("a", 0.8, 3), pair_vote("b", 0.3, 1)]
    result = aggregate(votes, contested_threshold=threshold)
    assert result.pairs[0].contested is contested
    assert result.contested is contested


def test_contested_share_with_float_noise_counts_as_at_threshold() -> None:
    # agree weight 1.2, disagree 0.3: share 0.3 / 1.5 = 0.2 exactly, but 0.19999999999999998 in
    # floats; a share at the threshold is contested, float noise must not change that
    votes = [pair_vote("a", 0.8, 1.2), pair_vote("b", 0.3, 0.3)]
    assert 0.3 / (1.2 + 0.3) < 0.2
    assert aggregate(votes, contested_threshold=0.2).contested


def test_unanimous_label_is_not_contested() -> None:
    result = aggregate([pair_vote("a", 0.9), pair_vote("b", 0.6)], contested_threshold=0.01)
    assert not result.contested


# ---------------------------------------------------------------------------------------------
# 6. Decisive principles
# ---------------------------------------------------------------------------------------------


def test_decisive_falls_back_to_largest_contributors_in_a_consensus() -> None:
    # all prefer 0: a 0.9, b 0.7, c 0.6 (w1). Removing any one leaves 0 ahead -> nobody pivotal.
    # contributions |p - 0.5|: a 0.4, b 0.2, c 0.1; total 0.7, half 0.35; a alone (0.4) > 0.35
    votes = [pair_vote("a", 0.9), pair_vote("b", 0.7), pair_vote("c", 0.6)]
    assert aggregate(votes).pairs[0].decisive == ["a"]
    # weights change contributions: c with weight 5 -> 5*0.1 = 0.5; total 1.1, half 0.55
    # c 0.5, then a 0.4 -> 0.9 > 0.55 -> [c, a]
    votes = [pair_vote("a", 0.9), pair_vote("b", 0.7), pair_vote("c", 0.6, 5)]
    assert aggregate(votes).pairs[0].decisive == ["c", "a"]
    # "more than half", not "at least half": a 0.3, b 0.2, c 0.1; half 0.3 -> a alone is not enough
    votes = [pair_vote("a", 0.8), pair_vote("b", 0.7), pair_vote("c", 0.6)]
    assert aggregate(votes).pairs[0].decisive == ["a", "b"]


def test_contributors_exclude_dissenters_and_keep_ties_at_the_cut() -> None:
    # a 0.9, b 0.8 agree, c 0.3 dissents; mean 2.0/3 = 0.667 -> 0.
    # leave one out: (0.8+0.3)/2 = 0.55, (0.9+0.3)/2 = 0.6, (0.9+0.8)/2 = 0.85 -> nobody pivotal
    # agreeing contributions a 0.4, b 0.3: half 0.35 -> [a]; c never listed
    votes = [pair_vote("a", 0.9), pair_vote("b", 0.8), pair_vote("c", 0.3)]
    assert aggregate(votes).pairs[0].decisive == ["a"]
    # a 0.8 (0.3), b 0.7 (0.2), c 0.7 (0.2), d 0.6 (0.1): total 0.8, half 0.4
    # a 0.3, +b 0.5 > 0.4 -> cut at 0.2; c ties b so it is kept too; d is not
    votes = [pair_vote("a", 0.8), pair_vote("b", 0.7), pair_vote("c", 0.7), pair_vote("d", 0.6)]
    assert aggregate(votes).pairs[0].decisive == ["a", "b", "c"]


def test_single_principle_is_reported_as_its_own_contributor() -> None:
    assert aggregate([pair_vote("only", 0.2)]).pairs[0].decisive == ["only"]


def test_decisive_per_pair_with_a_ranking_rule() -> None:
    # K=3, Borda, pairs "all". a (w2): 0>1>2, b (w1): 1>0>2, c (w1): 2>1>0
    # Borda: 0 -> 2*2 + 1 + 0 = 5; 1 -> 2*1 + 2 + 1 = 5; 2 -> 0 + 0 + 2 = 2 -> tie -> [0, 1, 2]
    # without a: 0 -> 1, 1 -> 3, 2 -> 2 -> [1, 2, 0]: flips (0,1) and (0,2)
    # without b: 0 -> 4, 1 -> 3, 2 -> 2 -> [0, 1, 2]: nothing flips
    # without c: 0 -> 5, 1 -> 4, 2 -> 0 -> [0, 1, 2]: nothing flips
    votes = [
        ballot_vote("a", [0, 1, 2], 2),
        ballot_vote("b", [1, 0, 2]),
        ballot_vote("c", [2, 1, 0]),
    ]
    result = aggregate(votes, rule="borda", pairs="all")
    assert result.ranking == [0, 1, 2]
    decisive = {(p.chosen, p.rejected): p.decisive for p in result.pairs}
    assert decisive[(0, 1)] == ["a"]
    assert decisive[(0, 2)] == ["a"]
    # (1, 2): nobody pivotal; agreeing a (2*0.4 = 0.8), b (0.4); half 0.6 -> [a]
    assert decisive[(1, 2)] == ["a"]


# ---------------------------------------------------------------------------------------------
# 7. derive_pairs
# ---------------------------------------------------------------------------------------------


def test_derive_pairs() -> None:
    ranking = [2, 0, 3, 1]
    assert derive_pairs(ranking, "best_worst") == [(2, 1)]
    assert derive_pairs(ranking, "all") == [(2, 0), (2, 3), (2, 1), (0, 3), (0, 1), (3, 1)]
    with pytest.raises(ValueError, match="pairs mode"):
        derive_pairs(ranking, "some")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="distinct"):
        derive_pairs([0, 0], "all")


# ---------------------------------------------------------------------------------------------
# 8. Validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weight", "prefs", "message"),
    [
        (1.0, [[0.5, 0.7], [0.4, 0.5]], "not complementary"),
        (0.0, [[0.5, 0.7], [0.3, 0.5]], "weight"),
        (-1.0, [[0.5, 0.7], [0.3, 0.5]], "weight"),
        (float("inf"), [[0.5, 0.7], [0.3, 0.5]], "weight"),
        (1.0, [[0.5, 1.2], [-0.2, 0.5]], "not in"),
        (1.0, [[0.5, float("nan")], [0.5, 0.5]], "not in"),
        (1.0, [[0.5, None], [0.5, 0.5]], "both be None"),
        (1.0, [[0.5, 0.7, 0.2], [0.3, 0.5]], "square"),
        (1.0, [[0.5]], "at least 2"),
        (1.0, [[0.4, 0.7], [0.3, 0.5]], "diagonal"),
    ],
)
def test_invalid_votes(weight: float, prefs: list[list[float | None]], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PrincipleVote(principle_id="a", weight=weight, prefs=prefs)


def test_complementarity_tolerance_and_frozen_extra_forbid() -> None:
    PrincipleVote(principle_id="a", weight=1, prefs=[[0.5, 0.7], [0.3000005, 0.5]])  # within 1e-6
    vote = pair_vote("a", 0.7)
    with pytest.raises(ValidationError):
        vote.weight = 2.0  # type: ignore[misc]
    with pytest.raises(ValidationError):
        PrincipleVote(principle_id="a", weight=1, prefs=[[0.5, 0.7], [0.3, 0.5]], note="x")  # type: ignore[call-arg]


def test_invalid_aggregate_calls() -> None:
    k2, k3 = pair_vote("a", 0.7), ballot_vote("b", [0, 1, 2])
    with pytest.raises(ValueError, match="same K"):
        aggregate([k2, k3])
    with pytest.raises(ValueError, match="at least one"):
        aggregate([])
    with pytest.raises(ValueError, match="unique"):
        aggregate([pair_vote("a", 0.7), pair_vote("a", 0.2)])
    with pytest.raises(ValueError, match="contested_threshold"):
        aggregate([k2], contested_threshold=0.0)
    with pytest.raises(ValueError) as info:
        aggregate([k2], rule="plurality")
    for name in ("borda", "copeland", "kemeny", "majority", "mean", "ranked_pairs"):
        assert name in str(info.value)


# ---------------------------------------------------------------------------------------------
# 9. principle_agreement
# ---------------------------------------------------------------------------------------------


def test_principle_agreement_unanimous_and_split() -> None:
    unanimous = aggregate([pair_vote("a", 0.9), pair_vote("b", 0.6, 3), pair_vote("c", None)])
    assert unanimous.principle_agreement == 1.0
    # K=3, pairs "all": a (w2) 0>1>2, b (w1) 1>0>2
    # mean: m01 = (2*0.9 + 0.1)/3 = 0.633, row sums 0: 0.633 + 0.9, 1: 0.367 + 0.9, 2: 0.2
    # -> [0, 1, 2]; pairs (0,1): agree 2 / 3, (0,2): 3 / 3, (1,2): 3 / 3 -> 8 / 9
    split = aggregate([ballot_vote("a", [0, 1, 2], 2), ballot_vote("b", [1, 0, 2])], pairs="all")
    assert split.ranking == [0, 1, 2]
    assert split.principle_agreement == pytest.approx(8 / 9)
    assert [p.contested for p in split.pairs] == [True, False, False]  # 1/3 >= 0.25 only on (0,1)


# ---------------------------------------------------------------------------------------------
# 10. User-registered rules and serialisation
# ---------------------------------------------------------------------------------------------


def test_user_registered_rule_is_usable() -> None:
    @rule("test_reverse_index")
    def reverse_index(votes: list[PrincipleVote]) -> RuleOutcome:
        k = len(votes[0].prefs)
        return RuleOutcome(
            rule="test_reverse_index",
            ranking=list(range(k))[::-1],
            scores=[float(i) for i in range(k)],
        )

    try:
        assert RULES["test_reverse_index"] is reverse_index
        result = aggregate([pair_vote("a", 0.9)], rule="test_reverse_index")
        assert result.rule == "test_reverse_index"
        assert result.ranking == [1, 0]
        assert result.pairs[0].soft_label == pytest.approx(0.1)
        with pytest.raises(ValueError, match="already registered"):
            rule("test_reverse_index")(reverse_index)
    finally:
        RULES.pop("test_reverse_index")
    with pytest.raises(ValueError, match="unknown rule"):
        aggregate([pair_vote("a", 0.9)], rule="test_reverse_index")


def test_rule_outcome_must_be_a_permutation() -> None:
    with pytest.raises(ValidationError, match="permutation"):
        RuleOutcome(rule="bad", ranking=[0, 0], scores=[1.0, 1.0])


def test_aggregate_round_trips_through_json() -> None:
    result = aggregate(CYCLE, rule="ranked_pairs", pairs="all")
    assert Aggregate.model_validate_json(result.model_dump_json()) == result
