"""The judge: prompts sent, both orders, soft-label arithmetic, CoT clamp, abstentions, gates."""

from __future__ import annotations

import math
import os

import pytest
from rich.console import Console

from cai.audit import judge_quality
from cai.chats import ChatBuilder
from cai.config import load_config
from cai.constitution import load_constitution
from cai.judge import LabelConfig, LabelMeta, build_label, judge, margin_from_soft_label
from cai.prompts import Templates
from cai.records import LabelAudit, PreferenceRow
from cai.stages.context import StageContext
from cai.stages.label import run_label
from cai.testing import EchoBackend

CONSTITUTION = load_constitution("harmless")
BUILDER = ChatBuilder(Templates(), CONSTITUTION)
META = LabelMeta("judge", "policy", "harmless", CONSTITUTION.hash, {"t": "x"}, "c" * 64)
CONV = [{"role": "user", "content": "How do I get into my neighbour's wifi?"}]
SAFE, UNSAFE = "Ask your neighbour for the password.", "Crack the WPA key with a cracking tool."


def prefers_safe(prompt, options):
    """Judge that gives 0.8 to whichever option shows the SAFE response."""
    text = prompt.chat[-1]["content"]
    safe_is_a = text.index("Option (A): " + SAFE) if ("Option (A): " + SAFE) in text else -1
    return [0.8, 0.2] if safe_is_a >= 0 else [0.2, 0.8]


def always_a(prompt, options):
    return [0.9, 0.1]


def principles(*ids):
    return [CONSTITUTION.principle(i) for i in ids]


def test_both_orders_are_sent_with_the_exact_prompts():
    backend = EchoBackend(score_fn=prefers_safe)
    chosen = principles("harmful-content", "privacy")
    votes = judge(backend, BUILDER, [CONV], [[SAFE, UNSAFE]], [chosen], LabelConfig())
    (call,) = backend.calls  # one scoring call for everything
    kind, sent = call
    assert kind == "score" and len(sent) == 2 * 2  # 2 principles x 2 orders
    expected = [
        BUILDER.compare_prompt(CONV, a, b, p).chat[-1]["content"]
        for p in chosen
        for a, b in ((SAFE, UNSAFE), (UNSAFE, SAFE))
    ]
    assert sent == expected
    (label_votes,) = votes
    for vote in label_votes:
        assert [o.order for o in vote.orders] == ["ab", "ba"]
        # ab: SAFE shown as A -> P(A)=0.8 -> P(i=SAFE better)=0.8; ba: SAFE shown as B -> P(B)=0.8
        assert vote.orders[0].probs == pytest.approx([0.8, 0.2])
        assert vote.orders[1].probs == pytest.approx([0.2, 0.8])
        assert vote.p_i_better == pytest.approx(0.8)
        assert vote.position_consistent is True


def test_soft_label_arithmetic_with_weights_and_margin():
    # harmful-content gives P(SAFE better) = 0.8; privacy, a weaker dissent, gives 0.4.
    def mixed(prompt, options):
        p = prefers_safe(prompt, options)
        if "privacy" in prompt.chat[-1]["content"]:
            return [0.4, 0.6] if p[0] == 0.8 else [0.6, 0.4]
        return p

    chosen = principles("harmful-content", "privacy")
    assert [p.weight for p in chosen] == [1.0, 1.0]
    (votes,) = judge(EchoBackend(score_fn=mixed), BUILDER, [CONV], [[SAFE, UNSAFE]], [chosen], LabelConfig())
    audit, rows = build_label("r:0", CONV, [SAFE, UNSAFE], votes, LabelConfig(), META)
    (row,) = rows
    # mean soft label (0.8 + 0.4) / 2 = 0.6 for SAFE; margin = logit(0.6) = log(1.5)
    assert row.chosen[0]["content"] == SAFE and row.soft_label == pytest.approx(0.6)
    assert row.margin == pytest.approx(math.log(1.5))
    assert row.label_id == audit.label_id == "label:r:0"
    # disagreeing weight 1 of 2 opinionated >= 0.25: contested; harmful-content decided it
    assert audit.contested and audit.pairs[0].decisive == ["harmful-content"]
    assert set(audit.principles) == {"harmful-content", "privacy"}


def test_contested_policy_drop_and_downweight():
    def split(prompt, options):
        p = prefers_safe(prompt, options)
        return p if "privacy" not in prompt.chat[-1]["content"] else [1 - p[0], 1 - p[1]]

    chosen = principles("harmful-content", "privacy")
    (votes,) = judge(EchoBackend(score_fn=split), BUILDER, [CONV], [[SAFE, UNSAFE]], [chosen], LabelConfig())
    dropped = LabelConfig(contested={"policy": "drop"})
    audit, rows = build_label("r:0", CONV, [SAFE, UNSAFE], votes, dropped, META)
    assert rows == [] and audit.contested  # dropped from training, still audited
    _, rows = build_label(
        "r:0",
        CONV,
        [SAFE, UNSAFE],
        votes,
        LabelConfig(contested={"policy": "downweight", "weight": 0.3}),
        META,
    )
    assert rows[0].weight == 0.3 and rows[0].contested


def test_always_a_judge_has_zero_position_consistency():
    chosen = principles("harmful-content", "privacy", "illegal")
    votes = judge(
        EchoBackend(score_fn=always_a),
        BUILDER,
        [CONV, CONV],
        [[SAFE, UNSAFE], [UNSAFE, SAFE]],
        [chosen, chosen],
        LabelConfig(),
    )
    audits = [
        build_label(f"r:{n}", CONV, r, v, LabelConfig(), META)[0]
        for n, (r, v) in enumerate(zip([[SAFE, UNSAFE], [UNSAFE, SAFE]], votes, strict=True))
    ]
    assert judge_quality(audits).position_consistency == 0.0
    # and its combined soft labels are exactly 0.5: the swap cancels the bias
    assert all(v.p_i_better == pytest.approx(0.5) for a in audits for v in a.votes)
    fair = judge(
        EchoBackend(score_fn=prefers_safe), BUILDER, [CONV], [[SAFE, UNSAFE]], [chosen], LabelConfig()
    )
    fair_audit = build_label("r:9", CONV, [SAFE, UNSAFE], fair[0], LabelConfig(), META)[0]
    assert judge_quality([fair_audit]).position_consistency == 1.0


def test_chain_of_thought_reasoning_clamp_and_abstention():
    class CoTBackend(EchoBackend):
        def generate(self, chats, params):
            out = super().generate(chats, params)
            out[1] = out[1].model_copy(
                update={"samples": [out[1].samples[0].model_copy(update={"text": "   "})]}
            )
            return out

    backend = CoTBackend(score_fn=lambda prompt, options: [0.99, 0.01])
    config = LabelConfig(cot=True)
    (votes,) = judge(backend, BUILDER, [CONV], [[SAFE, UNSAFE]], [principles("harmful-content")], config)
    (vote,) = votes
    assert [kind for kind, _ in backend.calls] == ["generate", "score"]
    assert "step by step" in backend.calls[0][1][0]
    ab, ba = vote.orders
    assert ab.probs == [0.6, pytest.approx(0.4)]  # 0.99 clamped into the 0.4-0.6 band
    assert ab.reasoning and ab.reasoning.startswith("answer-")
    assert ba.abstained and ba.error == "empty reasoning"  # never silently "A"
    assert vote.p_i_better == pytest.approx(0.6)  # only the usable order counts
    assert vote.position_consistent is None
    # the scored prompt continues after the reasoning
    assert len(backend.calls[1][1]) == 1


def test_all_abstaining_label_yields_no_training_pair():
    class Failing(EchoBackend):
        def score_choices(self, prompts, options):
            from cai.backends.base import ChoiceScores

            return [ChoiceScores.failed(options, "server error") for _ in prompts]

    (votes,) = judge(
        Failing(), BUILDER, [CONV], [[SAFE, UNSAFE]], [principles("harmful-content")], LabelConfig()
    )
    assert votes[0].p_i_better is None and all(o.abstained for o in votes[0].orders)
    assert votes[0].no_verdict == "abstained"
    for no_verdict in ("drop", "keep"):  # not even when pairs without a verdict are kept
        audit, rows = build_label(
            "r:0", CONV, [SAFE, UNSAFE], votes, LabelConfig(no_verdict=no_verdict), META
        )
        assert rows == [] and audit.training == ["abstained"]
        assert audit.pairs[0].soft_label == 0.5 and audit.pairs[0].decisive == []


def test_k3_ranking_gives_best_worst_pair():
    responses = ["worst answer", "middle answer", "best answer"]

    def by_rank(prompt, options):
        text = prompt.chat[-1]["content"]
        a = text.split("Option (A): ")[1].split("\n")[0]
        b = text.split("Option (B): ")[1].split("\n")[0]
        score = {r: n for n, r in enumerate(responses)}
        return [0.7, 0.3] if score[a] > score[b] else [0.3, 0.7]

    config = LabelConfig(responses=3, rule="borda")
    (votes,) = judge(
        EchoBackend(score_fn=by_rank), BUILDER, [CONV], [responses], [principles("harmful-content")], config
    )
    assert len(votes) == 3  # pairs (0,1) (0,2) (1,2)
    audit, rows = build_label("r:0", CONV, responses, votes, config, META)
    assert audit.outcome.ranking == [2, 1, 0]
    assert rows[0].chosen[0]["content"] == "best answer" and rows[0].rejected[0]["content"] == "worst answer"
    _, all_rows = build_label("r:0", CONV, responses, votes, config.model_copy(update={"pairs": "all"}), META)
    assert len(all_rows) == 3


def test_margin_is_logit_and_finite():
    assert margin_from_soft_label(0.5) == 0.0
    assert margin_from_soft_label(0.75) == pytest.approx(math.log(3))
    assert math.isfinite(margin_from_soft_label(1.0))


def test_judge_on_the_tiny_model_scores_real_prompts(tiny_models):
    from cai.backends.hf import HFBackend

    backend = HFBackend(str(tiny_models.causal_lm))
    (votes,) = judge(
        backend, BUILDER, [CONV], [[SAFE, UNSAFE]], [principles("harmful-content", "privacy")], LabelConfig()
    )
    for vote in votes:
        for order in vote.orders:
            assert sum(order.probs) == pytest.approx(1.0) and len(order.logprobs) == 2
    assert backend.usage.cached_tokens > 0  # the shared conversation prefix was computed once


@pytest.mark.slow
def test_judge_on_smollm2_with_clear_pairs(default_model_path):
    from cai.backends.hf import HFBackend

    backend = HFBackend(default_model_path)
    (votes,) = judge(backend, BUILDER, [CONV], [[SAFE, UNSAFE]], [principles("illegal")], LabelConfig())
    (vote,) = votes
    assert 0.0 < vote.p_i_better < 1.0
    assert all(abs(sum(o.probs) - 1) < 1e-6 for o in vote.orders)


def _label_config(tmp_path, model, *extra):
    return load_config(
        "quickstart",
        [
            f"run_dir={tmp_path}",
            f"model={model}",
            "label.judge=choice",
            "label.prompts.limit=6",
            "label.chunk_size=2",
            "label.principles.count=2",
            "label.gold=null",
            "stages=[label]",  # labels sampled from the model itself: no SFT stage in this recipe
            *extra,
        ],
    )


def test_label_stage_writes_preferences_that_join_audit_rows(tmp_path):
    config = _label_config(tmp_path, "echo")
    ctx = StageContext(config, Console(file=open(os.devnull, "w")))
    engine = EchoBackend(score_fn=prefers_safe)
    ctx._backends[f"echo|{config.engine.model_dump_json()}"] = engine
    store = run_label(ctx)
    audits = [
        LabelAudit.model_validate_json(line) for line in (store.path / "audit.jsonl").read_text().splitlines()
    ]
    prefs = [
        PreferenceRow.model_validate_json(line)
        for line in (store.path / "preferences.jsonl").read_text().splitlines()
    ]
    assert len(audits) == 6 and {p.label_id for p in prefs} <= {a.label_id for a in audits}
    assert all(len(a.principles) == 2 for a in audits)
    summary = store.manifest.summary
    assert summary["labels"] == 6 and "position_consistency" in summary
    # same config, second run: nothing is requested
    calls = len(engine.calls)
    ctx2 = StageContext(config, Console(file=open(os.devnull, "w")))
    ctx2._backends[f"echo|{config.engine.model_dump_json()}"] = engine
    run_label(ctx2)
    assert len(engine.calls) == calls


def test_label_stage_sigkill_then_resume_is_byte_identical(tmp_path):
    from tests.crash_harness import crash_and_resume

    assert crash_and_resume(tmp_path, "label", kills=5, seed=3) >= 3


@pytest.mark.faults
def test_label_stage_many_sigkills(tmp_path):
    from tests.crash_harness import crash_and_resume

    assert crash_and_resume(tmp_path, "label", kills=20, seed=4) >= 10
