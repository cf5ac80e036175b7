"""`cai audit` queries on a fixed set of hand-made audit rows whose answers are worked out below.

The fixture (tests/fixtures/audit_rows.jsonl) holds 8 labels over five principles of
constitutions/harmless.yaml, all of weight 1.0: harmful-content [harm], illegal [legal],
privacy [privacy], violence [harm, safety], misinformation [honesty]. "p" is P(response 0
better) for K=2, averaged over both orders; every principle is position consistent unless noted.

  label  rule      principles: p                          mean   ranking  derived pair(s)
  001    mean      harmful .8, illegal .7, violence .9     .800   0>1      decisive violence, harmful
  002    mean      harmful .8, illegal .3, privacy .7      .600   0>1      CONTESTED (illegal 1/3); harmful
  003    mean      harmful .2, privacy .4, misinfo .6      .400   1>0      CONTESTED (misinfo); harmful
                   misinfo: ab .9, ba .3 -> position INCONSISTENT
  004    mean/CoT  privacy .6, illegal ABSTAINED, violence .55  .575  0>1      privacy
  005    mean K=3, pairs="all": see test_k3_label_view                    0>1>2    CONTESTED
  006    majority  privacy .55, misinfo .52, harmful .05   .373   0>1      CONTESTED (harmful); privacy
                   misinfo: ab .74, ba .30 -> position INCONSISTENT
  007    mean      illegal .3, violence .25, privacy .35   .300   1>0      violence, illegal
  008    mean      harmful .9, illegal .2, violence .3,      .550   0>1      CONTESTED (2/4);
                   privacy .8                                               harmful, privacy

Decisive, worked by hand (cai.aggregate.aggregate's definition):
- 002: drop harmful -> mean(.3,.7)=.5, a tie that goes to index 0, so nobody is pivotal; the
  largest agreeing contributions |p-.5| are harmful .3, privacy .2; half of .5 is .25 and .3
  already exceeds it -> [harmful-content].
- 003: drop harmful -> mean(.4,.6)=.5, tie to index 0, so 1>0 flips: harmful is pivotal.
- 006 (majority): dropping privacy or misinfo leaves 1 vs 1, a tie to index 0 -> not pivotal;
  contributors privacy .05, misinfo .02 -> [privacy]. Its soft label .373 < .5: the rule, not
  the mean, chose response 0.
- 008: drop harmful -> .433, drop privacy -> .467: both pivotal.
"""

from __future__ import annotations

import math
from pathlib import Path

import orjson
import pytest
from rich.console import Console

from cai.aggregate import PrincipleVote, aggregate
from cai.audit import (
    AUDIT_FILE,
    contested_labels,
    filter_labels,
    judge_quality,
    label_view,
    load_audit,
    principle_influence,
    print_contested,
    print_influence,
    print_label,
    print_quality,
)
from cai.constitution import load_constitution, parse_constitution
from cai.records import LabelAudit
from cai.store import StageStore

FIXTURE = Path(__file__).parent / "fixtures" / "audit_rows.jsonl"


@pytest.fixture(scope="module")
def rows() -> list[LabelAudit]:
    return load_audit(FIXTURE)


@pytest.fixture(scope="module")
def harmless():
    return load_constitution("harmless")


def ids(rows: list[LabelAudit]) -> list[str]:
    return [r.label_id.removeprefix("label-") for r in rows]


# ------------------------------------------------------------------------- the fixture itself


def test_fixture_is_consistent_with_aggregate(rows, harmless):
    """The stored outcome of every row is what cai.aggregate computes from its stored votes."""
    assert len(rows) == 8
    for row in rows:
        k = len(row.responses)
        votes = []
        for principle in row.principles:
            prefs: list[list[float | None]] = [[0.5] * k for _ in range(k)]
            for v in (v for v in row.votes if v.principle_id == principle):
                p = v.p_i_better
                prefs[v.i][v.j], prefs[v.j][v.i] = p, None if p is None else 1 - p
            weight = harmless.principle(principle).weight
            votes.append(PrincipleVote(principle_id=principle, weight=weight, prefs=prefs))
        pairs = "all" if k == 3 else "best_worst"
        again = aggregate(votes, rule=row.rule, pairs=pairs)
        assert again.ranking == row.outcome.ranking, row.label_id
        assert again.pairs == row.pairs, row.label_id
        assert again.contested == row.contested
        assert math.isclose(again.principle_agreement, row.principle_agreement)


# ------------------------------------------------------------------------- per-principle influence


def test_principle_influence(rows):
    # principle:        labels  decisive on          disagreed on   opinionated
    # harmful-content   6       001 002 003 005 008  006            6
    # privacy           6       004 006 008          -              6
    # violence          5       001 005 007          005 (1>2) 008  5
    # illegal           6       007                  002 005 008    5 (abstained on 004's only pair)
    # misinformation    2       -                    003            2
    got = {p.principle_id: p for p in principle_influence(rows)}
    table = {pid: (p.labels, p.decisive, p.disagreed, p.opinionated, p.abstentions) for pid, p in got.items()}
    assert table == {
        "harmful-content": (6, 5, 1, 6, 0),
        "privacy": (6, 3, 0, 6, 0),
        "violence": (5, 3, 2, 5, 0),
        "illegal": (6, 1, 3, 5, 1),
        "misinformation": (2, 0, 1, 2, 0),
    }
    assert got["harmful-content"].disagreement_rate == pytest.approx(1 / 6)
    assert got["privacy"].disagreement_rate == 0.0
    assert got["violence"].disagreement_rate == pytest.approx(2 / 5)
    assert got["illegal"].disagreement_rate == pytest.approx(3 / 5)
    assert got["misinformation"].disagreement_rate == pytest.approx(1 / 2)
    # Strength, harmful-content's 8 pair votes: |p-.5| = .3 .3 .3 (001-003), .2 .4 .3 (005),
    # .45 (006), .4 (008) -> 2.65 / 8.
    assert got["harmful-content"].mean_strength == pytest.approx(2.65 / 8)
    # misinformation is inconsistent on both of its votes; illegal's abstained vote is not counted.
    assert got["misinformation"].position_consistency == 0.0
    assert got["illegal"].position_consistency == 1.0
    # Most decisive first; ties (privacy, violence: 3) by more labels, then by id.
    assert [p.principle_id for p in principle_influence(rows)] == [
        "harmful-content",
        "privacy",
        "violence",
        "illegal",
        "misinformation",
    ]


# ------------------------------------------------------------------------- contested and quality


def test_contested_labels(rows):
    contested = contested_labels(rows)
    assert [(c.label_id, c.chosen, c.rejected) for c in contested] == [
        ("label-002", 0, 1),
        ("label-003", 1, 0),
        ("label-005", 0, 1),  # illegal prefers 1 (p01=.4)
        ("label-005", 1, 2),  # violence prefers 2 (p12=.3); the 0>2 pair is unanimous
        ("label-006", 0, 1),
        ("label-008", 0, 1),
    ]
    by_label = {c.label_id: c for c in contested}
    assert by_label["label-003"].agree == ["harmful-content", "privacy"]
    assert by_label["label-003"].disagree == ["misinformation"]
    assert by_label["label-008"].disagree == ["illegal", "violence"]
    assert by_label["label-008"].decisive == ["harmful-content", "privacy"]
    assert by_label["label-006"].soft_label == pytest.approx((0.55 + 0.52 + 0.05) / 3)


def test_judge_quality(rows):
    q = judge_quality(rows)
    # (principle, pair) comparisons: 3+3+3+3+9+3+3+4 = 31, one abstained (illegal on 004),
    # two inconsistent (misinformation on 003 and 006): 28 of 30.
    assert (q.labels, q.derived_pairs, q.contested_labels) == (8, 10, 5)
    assert (q.comparisons, q.position_known, q.position_consistent) == (31, 30, 28)
    assert q.position_consistency == pytest.approx(28 / 30)
    assert (q.abstentions, q.abstained_orders) == (1, 1)
    # Agreement: 1, 2/3, 2/3, 1, 7/9 (005: 7 agreeing of 9 opinions), 2/3, 1, 1/2.
    assert q.principle_agreement_mean == pytest.approx((3 + 3 * 2 / 3 + 7 / 9 + 1 / 2) / 8)
    # Soft labels .8 .6 .6 .575 | .567 .767 .6 | .373 .7 .55 in tenths of [0, 1]; the three
    # .6 are floating-point means (one is 0.5999...) and must still count as .6.
    assert q.soft_label_histogram == [0, 0, 0, 1, 0, 3, 3, 2, 1, 0]


# ------------------------------------------------------------------------- per-label view


def test_label_view_orders_and_inconsistency(rows):
    view = label_view(rows[2])  # label-003
    assert view.ranking == [1, 0]
    misinfo = next(v for v in view.votes if v.principle_id == "misinformation")
    # P(response 0 better): .9 when shown first (ab), .3 when shown second (ba).
    assert (misinfo.p_ab, misinfo.p_ba, misinfo.combined) == (0.9, 0.3, 0.6)
    assert misinfo.position_consistent is False
    (pair,) = view.pairs
    assert (pair.chosen, pair.rejected, pair.decisive) == (1, 0, ["harmful-content"])
    assert pair.disagree == ["misinformation"]


def test_label_view_abstention_and_reasoning(rows):
    view = label_view(rows[3])  # label-004, chain of thought
    illegal = next(v for v in view.votes if v.principle_id == "illegal")
    assert illegal.abstained and illegal.combined is None and illegal.p_ab is None
    assert illegal.p_ba == pytest.approx(0.7)
    assert illegal.position_consistent is None
    assert "cannot tell" in (illegal.reasoning or "")
    (pair,) = view.pairs
    assert pair.abstain == ["illegal"] and pair.agree == ["privacy", "violence"]


def test_k3_label_view(rows):
    # label-005, K=3, prefs (p01, p02, p12): harmful (.7, .9, .8), illegal (.4, .6, .7),
    # violence (.6, .8, .3). Mean matrix row sums: 1.333, 1.033, 0.633 -> ranking 0>1>2.
    view = label_view(rows[4])
    assert view.ranking == [0, 1, 2] and len(view.votes) == 9
    pairs = {(p.chosen, p.rejected): p for p in view.pairs}
    assert pairs.keys() == {(0, 1), (0, 2), (1, 2)}
    assert pairs[(0, 2)].contested is False and pairs[(0, 2)].decisive == ["harmful-content", "violence"]
    assert pairs[(1, 2)].disagree == ["violence"]
    assert pairs[(0, 1)].disagree == ["illegal"]
    assert pairs[(0, 1)].soft_label == pytest.approx((0.7 + 0.4 + 0.6) / 3)


# ------------------------------------------------------------------------- filters


def test_filters(rows, harmless):
    assert ids(filter_labels(rows, principle="misinformation")) == ["003", "006"]
    assert ids(filter_labels(rows, contested=True)) == ["002", "003", "005", "006", "008"]
    assert ids(filter_labels(rows, contested=False)) == ["001", "004", "007"]
    assert ids(filter_labels(rows, principle="illegal", contested=True)) == ["002", "005", "008"]
    assert ids(filter_labels(rows, principle="privacy", decisive=True)) == ["004", "006", "008"]
    assert ids(filter_labels(rows, principle="no-such-principle")) == []
    # Tags come from the constitution: honesty = misinformation; safety = violence only here.
    assert ids(filter_labels(rows, tag="honesty", constitution=harmless)) == ["003", "006"]
    assert ids(filter_labels(rows, tag="safety", constitution=harmless)) == [
        "001",
        "004",
        "005",
        "007",
        "008",
    ]
    assert len(filter_labels(rows, tag="harm", constitution=harmless)) == 8
    assert ids(filter_labels(rows, tag="harm", constitution=harmless, decisive=True)) == [
        "001",
        "002",
        "003",
        "005",
        "007",
        "008",
    ]
    assert ids(filter_labels(rows, tag="legal", contested=False, constitution=harmless)) == [
        "001",
        "004",
        "007",
    ]


def test_tag_filter_errors(rows, harmless):
    with pytest.raises(ValueError, match="needs the constitution"):
        filter_labels(rows, tag="harm")
    with pytest.raises(ValueError, match="no principle of 'harmless' has tag 'nonsense'"):
        filter_labels(rows, tag="nonsense", constitution=harmless)
    other = parse_constitution(
        "name: other\nversion: '1'\nprinciples:\n"
        "  - id: privacy\n    tags: [harm]\n    compare: Which response is kinder?\n"
    )
    with pytest.raises(ValueError, match="no principle.*harmful-content.*pass the constitution the run used"):
        filter_labels(rows, tag="harm", constitution=other)


# ------------------------------------------------------------------------- loading


def test_load_from_run_dir_and_stage_folder(tmp_path, rows):
    run = tmp_path / "run"
    with StageStore(run, "label", {"rule": "mean"}) as store:
        store.commit([{"row_id": r.row_id} for r in rows])
        store.finalize(outputs={AUDIT_FILE: lambda path: path.write_bytes(FIXTURE.read_bytes())})
    assert load_audit(run) == rows
    assert load_audit(store.path) == rows
    assert load_audit(store.path / AUDIT_FILE) == rows


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no label stage"):
        load_audit(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_audit(tmp_path / "missing")
    lines = FIXTURE.read_bytes().splitlines()
    broken = orjson.loads(lines[1])
    del broken["rule"]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(lines[0] + b"\n\n" + orjson.dumps(broken) + b"\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not a valid label audit row"):
        load_audit(bad)


# ------------------------------------------------------------------------- terminal output


def test_rich_output(rows, harmless):
    console = Console(record=True, width=200, color_system=None)
    sneaky = rows[1].model_copy(update={"prompt": [{"role": "user", "content": "[bold red]hi[/bold red]"}]})
    print_label(console, label_view(sneaky))
    print_influence(console, principle_influence(rows), harmless)
    print_contested(console, contested_labels(rows))
    print_quality(console, judge_quality(rows))
    text = console.export_text()
    assert "[bold red]hi[/bold red]" in text  # data is printed, never interpreted as markup
    assert "<script>alert(1)</script>" in text  # a terminal needs no HTML escaping
    assert "label-002" in text and "CONTESTED" in text
    assert "harm, safety" in text  # violence's tags
    assert "93.3% (28/30 comparisons)" in text
