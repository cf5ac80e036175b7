"""`cai audit` queries on a fixed set of hand-made audit rows whose answers are worked out below.

The fixture (tests/fixtures/audit_rows.jsonl, written by make_audit_rows.py through cai's own
`build_label`) holds 10 labels over five principles of constitutions/harmless.yaml, all of
weight 1.0: harmful-content [harm], illegal [legal], privacy [privacy], violence [harm, safety],
misinformation [honesty]. "p" is P(response 0 better) for K=2, averaged over both orders. A
reading is a verdict when both orders agree and |p - .5| >= .05; the others are marked:
  inconsistent (the orders disagree), abstained (an order failed), below (under the margin).

  label  rule      readings                                  verdict mean  ranking  pair
  001    mean      harmful .8, illegal .7, violence .9        .800  0>1   decisive violence, harmful
  002    mean      harmful .8, illegal .3, privacy .7         .600  0>1   CONTESTED (illegal 1/3); harmful
  003    mean      harmful .2, privacy .4,                    .300  1>0   harmful (soft label .7)
                   misinfo ab .9 / ba .3: inconsistent
  004    mean/CoT  privacy .6, violence .55 (at the margin),  .575  0>1   privacy
                   illegal: ab abstained, ba .7
  005    mean K=3, pairs="all": see test_k3_label_view              0>1>2  CONTESTED
  006    majority  privacy .55, harmful .05,                  .300  0>1   RULE CONFLICT: 1 vs 1 ties to
                   misinfo ab .74 / ba .30: inconsistent                  index 0, but p(0>1)=.3 -> not a row
  007    mean      illegal .3, violence .25, privacy .35      .300  1>0   violence, illegal
  008    mean      harmful .9, illegal .2, violence .3,        .550  0>1   CONTESTED (2/4); harmful, privacy
                   privacy .8
  009    mean      harmful ab .82 / ba .19, privacy .78 / .25:  -    0>1   NO VERDICT: the paper's mean
                   both inconsistent (a judge that says "A")                  .51 is kept, nothing decisive
  010    mean      violence .8 / .7, illegal .53 / .52 below  .750  0>1   violence

Decisive, worked by hand (cai.aggregate.aggregate's definition; verdicts only):
- 002: drop harmful -> mean(.3,.7)=.5, a tie that goes to index 0, so nobody is pivotal; the
  largest agreeing contributions |p-.5| are harmful .3, privacy .2; half of .5 is .25 and .3
  already exceeds it -> [harmful-content].
- 003: misinformation has no verdict, so only harmful (.2) and privacy (.4) count; dropping
  either leaves 1>0, so nobody is pivotal; contributions .3 and .1, half .2 -> [harmful-content].
- 006 (majority): dropping privacy leaves harmful alone, 1>0: privacy is pivotal -> [privacy].
  Its soft label .3 favours the rejected response: a rule conflict, contested, not a row.
- 008: drop harmful -> .433, drop privacy -> .467: both pivotal.
- 009: no verdict anywhere, so no decisive principle and no agreement figure.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from rich.console import Console

from cai.aggregate import aggregate
from cai.audit import (
    AUDIT_FILE,
    audit_file,
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
    quality_warnings,
)
from cai.constitution import load_constitution, parse_constitution
from cai.records import LabelAudit
from cai.rules import PrincipleVote
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
    assert len(rows) == 10
    for row in rows:
        k = len(row.responses)
        votes = []
        for principle in row.principles:
            prefs: list[list[float | None]] = [[0.5 if a == b else None for b in range(k)] for a in range(k)]
            verdicts = [[False] * k for _ in range(k)]
            for v in (v for v in row.votes if v.principle_id == principle):
                p = v.p_i_better
                prefs[v.i][v.j], prefs[v.j][v.i] = p, None if p is None else 1 - p
                verdicts[v.i][v.j] = verdicts[v.j][v.i] = v.verdict is not None
            weight = harmless.principle(principle).weight
            votes.append(PrincipleVote(principle_id=principle, weight=weight, prefs=prefs, verdicts=verdicts))
        pairs = "all" if k == 3 else "best_worst"
        again = aggregate(votes, rule=row.rule, pairs=pairs)
        assert again.ranking == row.outcome.ranking, row.label_id
        assert again.pairs == row.pairs, row.label_id
        assert again.contested == row.contested
        assert again.has_verdict == row.has_verdict
        assert again.principle_agreement == pytest.approx(row.principle_agreement)


# ------------------------------------------------------------------------- per-principle influence


def test_principle_influence(rows):
    # principle:        labels  decisive on            disagreed on   opinionated  verdicts  none
    # harmful-content   7       001 002 003 005 008    006            6            8         1 (009)
    # violence          6       001 005 007 010        005 (1>2) 008  6            8         0
    # privacy           7       004 006 008            -              6            6         1 (009)
    # illegal           7       007                    002 005 008    5            7         2 (004, 010)
    # misinformation    2       -                      -              0            0         2
    got = {p.principle_id: p for p in principle_influence(rows)}
    table = {
        pid: (p.labels, p.decisive, p.disagreed, p.opinionated, p.verdicts, p.no_verdicts, p.abstentions)
        for pid, p in got.items()
    }
    assert table == {
        "harmful-content": (7, 5, 1, 6, 8, 1, 0),
        "violence": (6, 4, 2, 6, 8, 0, 0),
        "privacy": (7, 3, 0, 6, 6, 1, 0),
        "illegal": (7, 1, 3, 5, 7, 2, 0),
        "misinformation": (2, 0, 0, 0, 0, 2, 0),
    }
    assert got["harmful-content"].disagreement_rate == pytest.approx(1 / 6)
    assert got["privacy"].disagreement_rate == 0.0
    assert got["violence"].disagreement_rate == pytest.approx(2 / 6)
    assert got["illegal"].disagreement_rate == pytest.approx(3 / 5)
    # misinformation never gave a verdict: no disagreement rate, never decisive, no strength
    assert got["misinformation"].disagreement_rate is None and got["misinformation"].mean_strength is None
    # Strength over harmful-content's 8 verdicts: |p-.5| = .3 .3 .3 (001-003), .2 .4 .3 (005),
    # .45 (006), .4 (008) -> 2.65 / 8; its reading on 009 is no verdict and does not count.
    assert got["harmful-content"].mean_strength == pytest.approx(2.65 / 8)
    # privacy: .2 .1 .1 .05 .15 .3 -> .9 / 6
    assert got["privacy"].mean_strength == pytest.approx(0.9 / 6)
    # misinformation is inconsistent on both of its readings; harmful-content on 009 only (8 of 9);
    # illegal's abstained order on 004 leaves that reading out; its below-margin 010 is consistent.
    assert got["misinformation"].position_consistency == 0.0
    assert got["harmful-content"].position_consistency == pytest.approx(8 / 9)
    assert got["illegal"].position_consistency == 1.0
    # Most decisive first; ties by more labels, then by id.
    assert [p.principle_id for p in principle_influence(rows)] == [
        "harmful-content",
        "violence",
        "privacy",
        "illegal",
        "misinformation",
    ]


# ------------------------------------------------------------------------- contested and quality


def test_contested_labels(rows):
    contested = contested_labels(rows)
    assert [(c.label_id, c.chosen, c.rejected) for c in contested] == [
        ("label-002", 0, 1),
        ("label-005", 0, 1),  # illegal prefers 1 (p01=.4)
        ("label-005", 1, 2),  # violence prefers 2 (p12=.3); the 0>2 pair is unanimous
        ("label-006", 0, 1),  # a rule conflict: 1 vs 1 verdicts, soft label .3
        ("label-008", 0, 1),
    ]
    by_label = {c.label_id: c for c in contested}
    assert by_label["label-008"].disagree == ["illegal", "violence"]
    assert by_label["label-008"].decisive == ["harmful-content", "privacy"]
    assert by_label["label-006"].soft_label == pytest.approx((0.55 + 0.05) / 2)
    assert (
        by_label["label-006"].no_verdict == ["misinformation"]
        and by_label["label-006"].training == "rule-conflict"
    )
    # 003 was contested while misinformation's position flip counted as a vote; now it is not
    assert "label-003" not in by_label


def test_judge_quality(rows):
    q = judge_quality(rows)
    # (principle, pair) readings: 3+3+3+3+9+3+3+4+2+2 = 35; verdicts 3+3+2+2+9+2+3+4+0+1 = 29.
    # No verdict: position-inconsistent 4 (003 and 006 misinformation, 009 both), abstained 1
    # (004 illegal), below-margin 1 (010 illegal).
    assert (q.labels, q.labels_with_verdict, q.derived_pairs, q.contested_labels) == (10, 9, 12, 4)
    assert (q.comparisons, q.verdicts) == (35, 29)
    assert q.no_verdict == {"abstained": 1, "position-inconsistent": 4, "below-margin": 1}
    # Position is known for the 34 readings with both orders; the 4 inconsistent ones fail it.
    assert (q.position_known, q.position_consistent) == (34, 30)
    assert q.position_consistency == pytest.approx(30 / 34)
    # 004's illegal still has the answered order's probability, so no reading is fully abstained.
    assert (q.abstentions, q.abstained_orders) == (0, 1)
    # Training rows: every pair but 006 (rule conflict) and 009 (no verdict).
    assert (q.training_rows, q.pairs_by_use) == (10, {"row": 10, "rule-conflict": 1, "no-verdict": 1})
    # Agreement over the 9 labels with verdicts: 1, 2/3, 1, 1, 7/9 (005), 1/2, 1, 1/2, 1.
    assert q.principle_agreement_mean == pytest.approx((5 + 2 / 3 + 7 / 9 + 1 / 2 + 1 / 2) / 9)
    # Soft labels .8 .6 .7 .575 | .567 .767 .6 | .3 .7 .55 .51 .75 in tenths of [0, 1]; the
    # floating-point .6 (005's (.8 + .7 + .3) / 3) must still count as .6.
    assert q.soft_label_histogram == [0, 0, 0, 1, 0, 4, 2, 4, 1, 0]
    assert not q.mostly_without_verdict


def test_a_judge_without_verdicts_is_called_out(rows):
    silent = [rows[8]] * 3 + [rows[0]]  # three copies of 009 and one real verdict
    q = judge_quality(silent)
    assert q.labels_with_verdict == 1 and q.mostly_without_verdict
    (note,) = quality_warnings(q)
    assert "3 of 4 labels had no verdict" in note and "no measurable signal" in note


# ------------------------------------------------------------------------- per-label view


def test_label_view_orders_and_inconsistency(rows):
    view = label_view(rows[2])  # label-003
    assert view.ranking == [1, 0]
    misinfo = next(v for v in view.votes if v.principle_id == "misinformation")
    # P(response 0 better): .9 when shown first (ab), .3 when shown second (ba): no verdict.
    assert (misinfo.p_ab, misinfo.p_ba, misinfo.combined) == (0.9, 0.3, 0.6)
    assert misinfo.position_consistent is False
    assert (misinfo.verdict, misinfo.no_verdict) == (None, "position-inconsistent")
    (pair,) = view.pairs
    assert (pair.chosen, pair.rejected, pair.decisive) == (1, 0, ["harmful-content"])
    assert pair.disagree == [] and pair.no_verdict == ["misinformation"] and not pair.contested
    assert pair.soft_label == pytest.approx(0.7)  # the verdicts' mean, not (.8 + .6 + .4) / 3


def test_label_view_abstention_and_reasoning(rows):
    view = label_view(rows[3])  # label-004, chain of thought
    illegal = next(v for v in view.votes if v.principle_id == "illegal")
    assert illegal.p_ab is None and illegal.p_ba == pytest.approx(0.7)
    assert illegal.combined == pytest.approx(0.7)  # the answered order, kept for the soft label
    assert (illegal.verdict, illegal.no_verdict) == (None, "abstained")
    assert illegal.position_consistent is None
    assert "cannot tell" in (illegal.reasoning or "")
    violence = next(v for v in view.votes if v.principle_id == "violence")
    assert violence.verdict == 0  # .55 is exactly .05 from .5: at the margin is enough
    (pair,) = view.pairs
    assert pair.no_verdict == ["illegal"] and pair.agree == ["privacy", "violence"]
    assert pair.soft_label == pytest.approx(0.575) and pair.training == "row"


def test_label_without_verdict_view(rows):
    view = label_view(rows[8])  # label-009
    assert not view.has_verdict and view.principle_agreement is None
    (pair,) = view.pairs
    assert pair.decisive == [] and not pair.contested and pair.training == "no-verdict"
    assert pair.soft_label == pytest.approx(0.51)  # the paper's mean of the answered readings
    assert pair.no_verdict == ["harmful-content", "privacy"]


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
    assert ids(filter_labels(rows, contested=True)) == ["002", "005", "006", "008"]
    assert ids(filter_labels(rows, contested=False)) == ["001", "003", "004", "007", "009", "010"]
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
        "010",
    ]
    assert len(filter_labels(rows, tag="harm", constitution=harmless)) == 10
    assert ids(filter_labels(rows, tag="harm", constitution=harmless, decisive=True)) == [
        "001",
        "002",
        "003",
        "005",
        "007",
        "008",
        "010",
    ]
    assert ids(filter_labels(rows, tag="legal", contested=False, constitution=harmless)) == [
        "001",
        "004",
        "007",
        "010",
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


def test_a_run_dir_with_two_label_folders_is_never_guessed(tmp_path, rows):
    run = tmp_path / "run"
    folders = []
    for rule in ("mean", "borda"):
        with StageStore(run, "label", {"rule": rule}) as store:
            store.commit([{"row_id": r.row_id} for r in rows])
            store.finalize(outputs={AUDIT_FILE: lambda path: path.write_bytes(FIXTURE.read_bytes())})
        folders.append(store.path)
    with pytest.raises(FileNotFoundError, match="holds 2 label folders.*cai audit -c CONFIG"):
        load_audit(run)
    # the run manifest of `cai run` says which config ran: that folder is the run's
    (run / "manifest.json").write_bytes(orjson.dumps({"stages": {"label": {"path": str(folders[0])}}}))
    assert audit_file(run) == folders[0] / AUDIT_FILE


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished label stage"):
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
    assert "88.2% (30/34 comparisons)" in text
    assert "29 of 35 comparisons" in text  # verdicts
