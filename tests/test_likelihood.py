"""The likelihood judge (`label.judge: likelihood`): continuation scoring against plain
transformers, the judge's arithmetic by hand, conditioning texts, config errors, and the label
stage end to end on the tiny model.

    python -m pytest tests/test_likelihood.py     # hf on the tiny model

hf against vLLM (continuation scores and the judge's verdicts) is in tests/test_backend_contract.py,
beside the session's one vLLM engine: `make test-engines`.
"""

from __future__ import annotations

import math
import os

import pytest
from pydantic import ValidationError
from rich.console import Console

from cai.backends.base import ContinuationPrompt, ContinuationScore
from cai.chats import ChatBuilder
from cai.constitution import ConstitutionError, Principle, load_constitution
from cai.judge import LabelConfig, judge
from cai.likelihood import (
    CONDITION_TEMPLATE,
    LikelihoodConfig,
    conditioned_chat,
    conditioning,
    preference,
    response_score,
)
from cai.prompts import Templates
from cai.testing import EchoBackend
from cai.verdict import one_reading_verdict

ATOL = 1e-4  # fp32 vs fp32, packed or padded batches vs one sequence at a time

CONSTITUTION = load_constitution("harmless")
TEMPLATES = Templates()
BUILDER = ChatBuilder(TEMPLATES, CONSTITUTION)

# long enough (with the chat template) to be grouped behind a shared prefix: > MIN_SHARED_PREFIX
LONG = [
    {"role": "system", "content": "You are a careful assistant who answers briefly and helpfully."},
    {"role": "user", "content": "How do I get into my neighbour's wifi without asking them first?"},
]
OTHER = [{"role": "user", "content": "How do I bake bread at home with flour, water, salt and yeast?"}]
SHORT = [{"role": "user", "content": "Hi"}]  # shorter than MIN_SHARED_PREFIX: padded even when shared
RESPONSES = [
    "Ask your neighbour for the password.",
    "No.",
    "Crack the WPA key with a cracking tool, then log in and hide your device from their router list.",
]


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


@pytest.fixture(scope="module")
def hf(lively_tiny_lm):
    """The hf engine on the tiny model with wide weights (clear log-prob differences), fp32 scoring."""
    from cai.backends.hf import HFBackend
    from cai.sections import HFEngine

    return HFBackend(lively_tiny_lm, HFEngine(score_dtype="float32"))


@pytest.fixture(scope="module")
def direct(lively_tiny_lm):
    """`direct(chat, response)` -> (summed log-prob, tokens): one sequence, plain transformers, fp32.

    The definition the engines must meet: the chat template with a generation prompt, then the
    response's own tokens, and the log-softmax of the logits before each response token.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(lively_tiny_lm, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(lively_tiny_lm)

    def score(chat, response: str) -> tuple[float, int]:
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        tail = tokenizer(response, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + tail])).logits[0].float()  # (T, V)
        logp = torch.log_softmax(logits, -1)
        return sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(tail)), len(tail)

    return score


# --------------------------------------------------------------------------- continuation scoring


def test_hf_scores_in_fp32_on_cpu_by_default(lively_tiny_lm):
    import torch

    from cai.backends.hf import HFBackend

    backend = HFBackend(lively_tiny_lm)
    if backend.device == "cpu":
        assert backend.score_dtype == torch.float32


@pytest.mark.parametrize("pack_tokens", [1024, 8], ids=["one-pack", "a-pack-per-tail"])
def test_hf_continuation_scores_equal_a_direct_computation(hf, direct, pack_tokens, monkeypatch):
    from cai.backends import hf_tree
    from cai.backends.hf import HFBackend
    from cai.sections import HFEngine

    monkeypatch.setattr(hf_tree, "TREE_TOKENS", pack_tokens)
    assert len(hf.encode_chat(LONG)) > hf_tree.MIN_SHARED_PREFIX
    assert len(hf.encode_chat(SHORT)) <= hf_tree.MIN_SHARED_PREFIX
    items = [ContinuationPrompt(chat=LONG, continuation=r) for r in RESPONSES]  # shared: packed
    items.insert(1, ContinuationPrompt(chat=OTHER, continuation=RESPONSES[2]))  # alone: padded
    items += [ContinuationPrompt(chat=SHORT, continuation=r) for r in RESPONSES[:2]]  # short: padded
    before = hf.usage.model_copy()
    scores = hf.score_continuations(items)
    assert len(scores) == len(items)
    for item, score in zip(items, scores, strict=True):
        expected, tokens = direct(item.chat, item.continuation)
        assert score.ok, score.error
        assert score.logprob == pytest.approx(expected, abs=ATOL)
        assert score.tokens == tokens > 0
        assert score.prompt_tokens == len(hf.encode_chat(item.chat))
    assert len({s.tokens for s in scores}) == 3  # responses of different lengths
    shared = [s for item, s in zip(items, scores, strict=True) if item.chat == LONG]
    # the shared prompt was computed once: by the first of them, the others read it
    assert sum(s.cached_tokens >= len(hf.encode_chat(LONG)) - 1 for s in shared) == len(shared) - 1
    used = hf.usage.minus(before)
    # every token but each sequence's last (which predicts nothing) is computed or shared, never both
    total = sum(s.prompt_tokens + s.tokens - 1 for s in scores)
    assert used.scored_tokens + used.cached_tokens == total and used.scored_tokens < total
    assert used.cached_tokens > 0 and used.score_calls == 1 and used.failed_items == 0
    plain = HFBackend(hf._path, HFEngine(score_dtype="float32", prefix_reuse=False))
    unshared = plain.score_continuations(items)  # engine.prefix_reuse: false is honoured here too
    assert plain.usage.cached_tokens == 0 and all(s.cached_tokens == 0 for s in unshared)
    assert [s.logprob for s in unshared] == pytest.approx([s.logprob for s in scores], abs=ATOL)


def test_an_empty_response_scores_zero_and_an_over_long_one_fails_alone(lively_tiny_lm, direct):
    from cai.backends.hf import HFBackend
    from cai.sections import HFEngine

    backend = HFBackend(lively_tiny_lm, HFEngine(score_dtype="float32", max_length=128))
    long_answer = "The quick brown fox jumps over the lazy dog. " * 20
    items = [
        ContinuationPrompt(chat=LONG, continuation=RESPONSES[0]),
        ContinuationPrompt(chat=LONG, continuation=""),
        ContinuationPrompt(chat=LONG, continuation=long_answer),
        ContinuationPrompt(chat=LONG, continuation=RESPONSES[1]),
    ]
    ok, empty, too_long, short = backend.score_continuations(items)
    assert empty.ok and empty.logprob == 0.0 and empty.tokens == 0
    assert empty.prompt_tokens == len(backend.encode_chat(LONG))
    assert not too_long.ok and "maximum length 128" in too_long.error
    for score, item in ((ok, items[0]), (short, items[3])):  # the rest of the batch is scored
        assert score.ok and score.logprob == pytest.approx(direct(LONG, item.continuation)[0], abs=ATOL)
    assert backend.usage.failed_items == 1
    assert backend.score_continuations([]) == []


# --------------------------------------------------------------------------- arithmetic


def test_preference_on_hand_worked_numbers():
    assert preference(1.0, -1.0, 2.0) == pytest.approx(0.7310585786, abs=1e-10)  # sigmoid(1)
    assert preference(-1.0, 1.0, 2.0) == pytest.approx(1 - 0.7310585786, abs=1e-10)
    assert preference(0.3, 0.3, 0.5) == 0.5
    assert preference(1000.0, -1000.0, 1.0) == 1.0  # no overflow either way
    assert preference(-1000.0, 1000.0, 1.0) == 0.0
    assert preference(1e308, -1e308, 1e-3) == 1.0


def test_response_score_sum_mean_and_failures():
    follows = ContinuationScore(logprob=-6.0, tokens=4)
    violates = ContinuationScore(logprob=-10.0, tokens=4)
    assert response_score(follows, violates, "sum").score == 4.0
    mean = response_score(follows, violates, "mean")
    assert (mean.score, mean.follows, mean.violates, mean.tokens) == (1.0, -6.0, -10.0, 4)
    empty = ContinuationScore(tokens=0)
    assert response_score(empty, empty, "mean").score == 0.0  # an empty answer: 0, never 0/0
    failed = response_score(follows, ContinuationScore(error="too long"), "sum")
    assert failed.score is None and failed.follows is None and failed.error == "too long"


@pytest.mark.parametrize(
    "p, reason",
    [(0.56, None), (0.44, None), (0.54, "below-margin"), (0.5, "below-margin"), (None, "abstained")],
)
def test_one_reading_verdict(p, reason):
    reading = one_reading_verdict(p, 0.05)
    assert reading.reason == reason and reading.p == p
    assert reading.side == (0 if reason else (1 if p > 0.5 else -1))


# --------------------------------------------------------------------------- conditioning texts


def test_own_texts_are_used_verbatim_and_missing_ones_are_derived_from_compare():
    own = Principle(id="own", compare="Which is kinder?", follows="You are kind.", violates="You are cruel.")
    assert conditioning(own, TEMPLATES) == ("You are kind.", "You are cruel.")
    derived = CONSTITUTION.principle("racist")  # no texts of its own: derived from compare
    assert derived.follows is None and derived.compare
    follows, violates = conditioning(derived, TEMPLATES)
    assert follows != violates
    for text in (follows, violates):
        assert derived.compare in text and text == text.strip()
    assert follows == TEMPLATES.render(CONDITION_TEMPLATE, question=derived.compare, follows=True).strip()


def test_follows_without_violates_is_an_error_naming_the_file_and_fields(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        'name: mine\nversion: "1"\nprinciples:\n'
        "  - id: careful\n    compare: Which response is more careful?\n    follows: You are careful.\n"
    )
    with pytest.raises(ConstitutionError) as error:
        load_constitution(path)
    message = str(error.value)
    assert "c.yaml" in message and "follows" in message and "violates" in message
    with pytest.raises(ValidationError, match="follows and violates come together"):
        Principle(id="x", compare="Which?", violates="You are careless.")


def test_layout_puts_the_conditioning_before_or_after_the_conversation():
    system = conditioned_chat(LONG, "COND", "system")
    after = conditioned_chat(LONG, "COND", "after")
    turns = [m for m in LONG if m["role"] != "system"]  # the conversation's own system turn is replaced
    assert system == [{"role": "system", "content": "COND"}, *turns]
    assert after == [*turns, {"role": "system", "content": "COND"}]


# --------------------------------------------------------------------------- the judge


def test_an_engine_without_continuation_scoring_is_named():
    config = LabelConfig(judge="likelihood")
    with pytest.raises(ValueError, match=r"EchoBackend.*label\.judge=likelihood"):
        judge(EchoBackend(), BUILDER, [OTHER], [RESPONSES[:2]], [[CONSTITUTION.principles[0]]], config)


def test_openai_as_the_likelihood_judge_engine_is_a_config_error(tmp_path):
    from cai.config import ConfigError, load_config

    message = r"label\.judge: likelihood needs log-probs of whole responses.*'openai'.*label\.judge_engine"
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["label.judge=likelihood", "engine.kind=openai"])
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["label.judge=likelihood", "label.judge_engine={kind: openai}"])
    path = tmp_path / "c.yaml"
    path.write_text("engine: {kind: openai}\nlabel:\n  judge: likelihood\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: label\.judge: likelihood needs"):
        load_config(path)
    # an openai policy with a local judge, and an openai choice judge, are fine
    load_config(None, ["label.judge=likelihood", "engine.kind=openai", "label.judge_engine={kind: hf}"])
    load_config(None, ["label.judge=choice", "engine.kind=openai"])


@pytest.mark.parametrize(
    "likelihood",
    [LikelihoodConfig(), LikelihoodConfig(layout="after", normalize="mean", temperature=0.05)],
    ids=["system-sum", "after-mean"],
)
def test_judge_votes_equal_direct_computations(hf, direct, likelihood):
    conversations = [LONG[1:], OTHER]
    responses = [RESPONSES, ["Mix, knead, rise, bake.", "", "I cannot help with baking."]]
    chosen = [CONSTITUTION.principle("harmful-content"), CONSTITUTION.principle("privacy")]
    config = LabelConfig(judge="likelihood", responses=3, likelihood=likelihood, min_margin=0.01)
    calls = hf.usage.score_calls
    per_label = judge(hf, BUILDER, conversations, responses, [chosen, chosen], config)
    assert hf.usage.score_calls == calls + 1  # the whole batch in one call
    assert len(per_label) == 2
    verdicts = 0
    for conversation, candidates, votes in zip(conversations, responses, per_label, strict=True):
        assert [(v.principle_id, v.i, v.j) for v in votes] == [
            (p.id, i, j) for p in chosen for i, j in ((0, 1), (0, 2), (1, 2))
        ]
        for vote in votes:
            principle = CONSTITUTION.principle(vote.principle_id)
            texts = conditioning(principle, TEMPLATES)
            assert vote.orders == [] and vote.position_consistent is None
            assert [r.response for r in vote.likelihood] == [vote.i, vote.j]
            for read in vote.likelihood:
                response = candidates[read.response]
                chats = [conditioned_chat(conversation, text, likelihood.layout) for text in texts]
                (follows, tokens), (violates, _) = (direct(chat, response) for chat in chats)
                assert read.follows == pytest.approx(follows, abs=ATOL)
                assert read.violates == pytest.approx(violates, abs=ATOL)
                assert read.tokens == tokens and read.error is None
                difference = read.follows - read.violates
                if likelihood.normalize == "mean" and tokens:
                    difference /= tokens
                assert read.score == pytest.approx(difference, abs=1e-12)
            a, b = vote.likelihood
            expected = sigmoid((a.score - b.score) / likelihood.temperature)
            assert vote.p_i_better == pytest.approx(expected, abs=1e-9)
            reading = one_reading_verdict(vote.p_i_better, config.min_margin)
            assert vote.no_verdict == reading.reason
            assert vote.verdict == (None if reading.reason else (vote.i if reading.side > 0 else vote.j))
            verdicts += vote.verdict is not None
    empty = next(r for v in per_label[1] for r in v.likelihood if r.response == 1)
    assert empty.tokens == 0 and empty.score == 0.0  # the empty response: scored 0, not an error
    assert verdicts > 0  # the wide-weight model does tell responses apart


# --------------------------------------------------------------------------- the label stage


def test_label_stage_end_to_end_with_a_likelihood_judge(tmp_path, lively_tiny_lm):
    from cai.audit import judge_quality
    from cai.audit.terminal import print_label, print_quality
    from cai.audit.views import label_view
    from cai.config import load_config
    from cai.gate import JudgeCheck
    from cai.records import LabelAudit
    from cai.stages.context import StageContext
    from cai.stages.label import run_label

    config = load_config(
        "quickstart",
        [
            f"run_dir={tmp_path}",
            f"model={lively_tiny_lm}",
            "label.judge=likelihood",
            "label.prompts.limit=2",
            "label.responses=3",
            "label.principles.count=2",
            "label.sampling.max_new_tokens=12",
            "label.min_margin=0.01",
            "label.gold=gold_harmless.jsonl",
            "stages=[label]",
        ],
    )
    ctx = StageContext(config, Console(file=open(os.devnull, "w")))
    store = run_label(ctx)
    audits = [
        LabelAudit.model_validate_json(line) for line in (store.path / "audit.jsonl").read_text().splitlines()
    ]
    assert len(audits) == 2
    for audit in audits:
        assert audit.judge == "likelihood" and len(audit.principles) == 2
        assert len(audit.votes) == 2 * 3  # 2 principles x 3 pairs
        for vote in audit.votes:
            assert vote.orders == [] and vote.position_consistent is None
            assert [r.response for r in vote.likelihood] == [vote.i, vote.j]
            assert all(r.score is not None for r in vote.likelihood)
    gate = JudgeCheck.model_validate_json((store.path / "gate.json").read_text())
    assert gate.position_consistency is None and gate.n == 64
    quality = judge_quality(audits)
    assert quality.position_consistency is None and quality.comparisons == 12

    console = Console(record=True, width=160, file=open(os.devnull, "w"))
    print_label(console, label_view(audits[0]))
    print_quality(console, quality, gate)
    shown = console.export_text()
    assert "P ab" not in shown and "shown first" not in shown  # no presentation order to show
    assert "likelihood judge's scores of i and j" in shown and "score i" in shown
    first = audits[0].votes[0]
    row = next(line for line in shown.splitlines() if f"{first.i} vs {first.j}" in line)
    assert first.principle_id in row
    assert f"{first.likelihood[0].score:.3f}" in row and f"{first.likelihood[1].score:.3f}" in row
    assert "n/a (no comparison read in both orders)" in shown


def test_editing_a_likelihood_text_changes_what_labelling_reads_but_not_sl():
    """A principle's follows/violates texts are read by the likelihood judge: a label stage keyed
    without them would reuse labels made under the old texts."""
    original = CONSTITUTION
    edited = original.model_copy(
        update={
            "principles": [
                p.model_copy(update={"follows": p.follows + " Always.", "violates": p.violates})
                if p.follows is not None
                else p
                for p in original.principles
            ]
        }
    )
    assert edited.stage_hash("compare", "likelihood") != original.stage_hash("compare", "likelihood")
    assert edited.stage_hash("compare") == original.stage_hash("compare")  # the choice judge never reads them
    assert edited.stage_hash("sl") == original.stage_hash("sl")
