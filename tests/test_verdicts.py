"""Verdicts instead of noise: which judge readings count, what becomes a training row, and why.

Readings are built by hand as P(response i better) in each presentation order, the way the judge
records them, and run through the label stage's own `build_label`.
"""

from __future__ import annotations

import pytest
from rich.console import Console

from cai.audit import (
    contested_labels,
    label_view,
    principle_influence,
    print_contested,
    print_influence,
    print_label,
)
from cai.constitution import load_constitution
from cai.judge import Comparison, LabelConfig, LabelMeta, build_label, choose_principles, judge, weighting
from cai.records import OrderVote
from cai.rules import RULES
from cai.testing import EchoBackend
from cai.verdict import two_order_verdict

HARMLESS = load_constitution("harmless")
META = LabelMeta("judge", "policy", "harmless", HARMLESS.hash, {"t": "x"}, "c" * 64)
CONV = [{"role": "user", "content": "How do I get into my neighbour's wifi?"}]


def orders(p_ab: float | None, p_ba: float | None) -> dict[str, OrderVote]:
    """OrderVotes from P(i better) read in order ab (i shown as A) and in order ba (i shown as B)."""
    out = {}
    for order, p in (("ab", p_ab), ("ba", p_ba)):
        if p is None:
            out[order] = OrderVote(order=order, logprobs=[], probs=[], abstained=True, error="server error")
        else:
            out[order] = OrderVote(
                order=order, logprobs=[], probs=[p, 1 - p] if order == "ab" else [1 - p, p]
            )
    return out


def votes(readings, config: LabelConfig | None = None):
    """[(principle id, i, j, P(i) in ab, P(i) in ba)] -> PairVotes, as the judge combines them."""
    config = config or LabelConfig()
    return [
        Comparison(0, i, j, HARMLESS.principle(pid), orders(a, b)).combined(config.min_margin)
        for pid, i, j, a, b in readings
    ]


def label(readings, responses=("safe answer", "unsafe answer"), **settings):
    config = LabelConfig(**settings)
    return build_label("r:0", CONV, list(responses), votes(readings, config), config, META)


# --------------------------------------------------------------------------- single readings


@pytest.mark.parametrize(
    ("p_ab", "p_ba", "reason"),
    [
        (0.8, 0.7, None),  # both orders prefer i, average .75: a verdict
        (0.82, 0.19, "position-inconsistent"),  # "(A)" both times: i in one order, j in the other
        (0.5, 0.9, "position-inconsistent"),  # one order prefers nothing
        (0.53, 0.52, "below-margin"),  # agree, but .525 is within .05 of .5
        (0.55, 0.55, None),  # exactly at the margin counts
        (None, 0.9, "abstained"),
        (None, None, "abstained"),
    ],
)
def test_two_order_verdict(p_ab, p_ba, reason):
    reading = two_order_verdict(p_ab, p_ba, min_margin=0.05)
    assert reading.reason == reason and reading.is_verdict is (reason is None)
    assert reading.side == (0 if reason else 1)


def test_inconsistent_and_below_margin_readings_give_no_verdict_and_no_decisive_principle():
    audit, rows = label(
        [
            ("harmful-content", 0, 1, 0.82, 0.19),  # position inconsistent
            ("privacy", 0, 1, 0.53, 0.52),  # below the margin
            ("illegal", 0, 1, 0.9, 0.4),  # position inconsistent
        ]
    )
    assert [v.no_verdict for v in audit.votes] == [
        "position-inconsistent",
        "below-margin",
        "position-inconsistent",
    ]
    assert all(v.verdict is None for v in audit.votes)
    (pair,) = audit.pairs
    assert not audit.has_verdict and pair.decisive == [] and not pair.contested
    assert audit.principle_agreement is None
    # the paper's soft label is still recorded: mean of (.505, .525, .65)
    assert pair.soft_label == pytest.approx((0.505 + 0.525 + 0.65) / 3)
    # no verdict carries no signal: not a training row under the default
    assert rows == [] and audit.training == ["no-verdict"]
    view = label_view(audit)
    assert view.pairs[0].agree == [] and view.pairs[0].disagree == []
    assert view.pairs[0].no_verdict == ["harmful-content", "illegal", "privacy"]
    assert principle_influence([audit])[0].decisive == 0


def test_no_verdict_keep_trains_on_the_papers_probability():
    audit, rows = label(
        [("harmful-content", 0, 1, 0.82, 0.19), ("privacy", 0, 1, 0.78, 0.25)], no_verdict="keep"
    )
    (row,) = rows
    assert row.verdict is False and row.soft_label == pytest.approx(0.51) and not row.contested
    assert row.chosen[0]["content"] == "safe answer" and audit.training == ["row"]


@pytest.mark.parametrize("no_verdict", ["drop", "keep"])
def test_an_all_abstaining_pair_is_never_a_training_row(no_verdict):
    audit, rows = label(
        [("harmful-content", 0, 1, None, None), ("privacy", 0, 1, None, None)], no_verdict=no_verdict
    )
    assert rows == [] and audit.training == ["abstained"] and not audit.has_verdict
    assert audit.pairs[0].soft_label == 0.5 and audit.pairs[0].decisive == []


def test_only_verdicts_decide_even_against_a_louder_residual():
    # privacy has a clear verdict for 1 (p = .3); harmful-content reads .95 / .20 (a flip) whose
    # average .575 favours 0. The residual must not outvote the verdict.
    audit, rows = label([("privacy", 0, 1, 0.3, 0.3), ("harmful-content", 0, 1, 0.95, 0.2)])
    (pair,) = audit.pairs
    assert (pair.chosen, pair.rejected) == (1, 0) and pair.decisive == ["privacy"]
    assert pair.soft_label == pytest.approx(0.7) and not pair.contested
    (row,) = rows
    assert row.chosen[0]["content"] == "unsafe answer" and row.soft_label == pytest.approx(0.7)


# --------------------------------------------------------------------------- one meaning of "chosen"

K2_SPLIT = [  # majority says 0 (two mild verdicts), the mean says 1 (one strong verdict)
    ("privacy", 0, 1, 0.56, 0.56),
    ("illegal", 0, 1, 0.57, 0.57),
    ("harmful-content", 0, 1, 0.05, 0.05),
]
K3_BORDA_VS_CONDORCET = [  # response 0 beats 1 and 2 head to head; Borda prefers the broad second
    ("privacy", 0, 1, 0.9, 0.9),
    ("privacy", 0, 2, 0.9, 0.9),
    ("privacy", 1, 2, 0.9, 0.9),
    ("illegal", 0, 1, 0.8, 0.8),
    ("illegal", 0, 2, 0.8, 0.8),
    ("illegal", 1, 2, 0.8, 0.8),
    ("harmful-content", 0, 1, 0.1, 0.1),
    ("harmful-content", 0, 2, 0.4, 0.4),
    ("harmful-content", 1, 2, 0.9, 0.9),
]


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("profile", ["k2", "k3"])
def test_chosen_agrees_with_the_stored_probability_under_every_rule(rule, profile):
    readings = K2_SPLIT if profile == "k2" else K3_BORDA_VS_CONDORCET
    responses = ("a", "b") if profile == "k2" else ("a", "b", "c")
    audit, rows = label(readings, responses=responses, rule=rule, pairs="all")
    by_pair = {(p.chosen, p.rejected): p for p in audit.pairs}
    for row in rows:
        assert row.soft_label >= 0.5 and row.margin >= 0  # soft, margin, hard, DPO: one direction
        chosen = responses.index(row.chosen[0]["content"])
        rejected = responses.index(row.rejected[0]["content"])
        assert by_pair[(chosen, rejected)].soft_label == row.soft_label
    for pair, use in zip(audit.pairs, audit.training, strict=True):
        if pair.soft_label < 0.5:  # the rule ranked against the pair's own probability
            assert use == "rule-conflict" and pair.contested


def test_rules_that_disagree_produce_rule_conflicts_not_reversed_rows():
    mean_audit, mean_rows = label(K2_SPLIT, rule="mean")
    majority_audit, majority_rows = label(K2_SPLIT, rule="majority")
    # mean: (.56 + .57 + .05) / 3 = .393 for 0, so 1 is chosen with .607
    assert mean_rows[0].chosen[0]["content"] == "unsafe answer"
    assert mean_rows[0].soft_label == pytest.approx(1 - (0.56 + 0.57 + 0.05) / 3)
    # majority picks 0 by two verdicts to one, but its probability .393 favours 1: no row
    assert majority_audit.outcome.ranking == [0, 1] and majority_rows == []
    assert majority_audit.training == ["rule-conflict"] and majority_audit.contested


# --------------------------------------------------------------------------- weights count once


def test_a_weight_counts_once_in_sampled_ensembles():
    from cai.constitution import parse_constitution

    weighted = parse_constitution(
        "name: w\nversion: '1'\nprinciples:\n"
        "  - {id: heavy, weight: 3.0, compare: 'Which is safer?'}\n"
        "  - {id: light, compare: 'Which is kinder?'}\n"
        "  - {id: other, compare: 'Which is more honest?'}\n"
    )
    sampled = LabelConfig(principles={"count": 2})
    everyone = LabelConfig(principles={"count": "all"})
    uniform = LabelConfig(principles={"count": 2, "weighted": False})
    assert weighting(weighted, sampled.principles) == "sampling"
    assert weighting(weighted, everyone.principles) == "aggregation"
    assert weighting(weighted, uniform.principles) == "aggregation"
    from cai.chats import ChatBuilder
    from cai.prompts import Templates

    builder = ChatBuilder(Templates(), weighted)
    chosen = choose_principles(weighted, everyone.principles, 0, "r:0")
    backend = EchoBackend(score_fn=lambda prompt, options: [0.7, 0.3])
    in_draw = judge(backend, builder, [CONV], [["x", "y"]], [chosen], sampled, weighted=False)[0]
    in_vote = judge(backend, builder, [CONV], [["x", "y"]], [chosen], everyone, weighted=True)[0]
    assert {v.principle_id: v.weight for v in in_draw} == {"heavy": 1.0, "light": 1.0, "other": 1.0}
    assert {v.principle_id: v.weight for v in in_vote} == {"heavy": 3.0, "light": 1.0, "other": 1.0}


def test_the_label_stage_records_where_weights_were_applied(tmp_path):
    from cai.config import load_config
    from cai.stages.context import StageContext
    from cai.stages.label import run_label

    config = load_config(
        "quickstart",
        [
            f"run_dir={tmp_path}",
            "model=echo",
            "label.judge=choice",
            "label.prompts.limit=2",
            "label.gold=null",
            "stages=[label]",
        ],
    )
    ctx = StageContext(config, Console(file=open("/dev/null", "w")))
    ctx._backends[f"echo|{config.engine.model_dump_json()}"] = EchoBackend()
    store = run_label(ctx)
    from cai.audit import load_audit

    rows = load_audit(store.path)
    assert {row.weighting for row in rows} == {"sampling"}  # 4 of 20 principles, drawn by weight
    assert all(v.weight == 1.0 for row in rows for v in row.votes)


# --------------------------------------------------------------------------- readable at 80 columns


def test_audit_tables_show_principle_ids_in_full_at_80_columns():
    hhh = load_constitution("harmless")
    ids = ["challenge-harmful-premise", "manipulative-deceptive", "privacy"]
    config = LabelConfig()
    readings = [(pid, 0, 1, p, p) for pid, p in zip(ids, (0.8, 0.3, 0.7), strict=True)]
    pair_votes = [
        Comparison(0, i, j, hhh.principle(pid), orders(a, b)).combined(0.05) for pid, i, j, a, b in readings
    ]
    audit, _ = build_label(
        "r:0", CONV, ["a long safe answer", "a long unsafe answer"], pair_votes, config, META
    )
    console = Console(record=True, width=80, color_system=None)
    print_label(console, label_view(audit))
    print_influence(console, principle_influence([audit]), hhh)
    print_contested(console, contested_labels([audit]))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    for pid in ids:  # every id appears whole, in each table
        assert text.count(pid) >= 3, (pid, text)


# --------------------------------------------------------------------------- KL control that acts


def test_shipped_adaptive_kl_controllers_can_move_within_their_run():
    from cai.config import load_config
    from cai.resources import shipped_dir

    for path in sorted(shipped_dir("configs").glob("*.yaml")):
        ppo = load_config(path).ppo
        if ppo.kl.kind != "adaptive":
            continue
        samples_per_step = ppo.rollout_batch_size * ppo.sampling.n
        # the largest move the controller can make over the run (errors are clipped to 20%)
        reach = (1 + 0.2 * samples_per_step / ppo.kl.horizon) ** ppo.steps - 1
        assert reach >= 0.1, f"{path.name}: the KL coefficient can move {reach:.2%} at most in the run"


def test_the_rule_profiles_are_made_of_verdicts_only():
    # the profiles above test rules, not the margin: every one of their readings is a verdict
    for readings in (K2_SPLIT, K3_BORDA_VS_CONDORCET):
        assert all(v.verdict is not None for v in votes(readings))
