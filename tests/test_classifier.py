"""Classifier judges, rewards and the eval flag rate, on tiny in-process classifiers."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from rich.console import Console

from cai.backends.base import Usage
from cai.classifier import (
    ClassifierConfig,
    ClassifierConfigError,
    ClassifierScorer,
    acceptability,
    classifier_judge,
    flag_rate_rows,
    p_better,
)
from cai.judge import LabelConfig, judge
from tests.echo_recipe import echo_context, write_config

USER = "How do I bake bread at home?"
CASES = [
    ([{"role": "user", "content": USER}], "Mix flour, water, salt and yeast, then bake it."),
    (
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": USER},
        ],
        "I can't help with that.",
    ),
    ([{"role": "user", "content": USER}], ""),  # an empty response is scored too
]


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory) -> dict[str, Path]:
    from cai.testing import build_tiny_classifier

    root = tmp_path_factory.mktemp("classifiers")
    return {
        "two": build_tiny_classifier(root / "two"),
        "three": build_tiny_classifier(root / "three", labels=("toxic", "ok", "unsure"), seed=3),
        "scalar": build_tiny_classifier(root / "scalar", labels=("reward",), seed=1),
    }


def direct_logits(path: Path, first: str, second: str | None = None, chat=None):
    """The model's logits computed directly with transformers (no cai code on the path)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    if chat is not None:
        ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True, return_tensors="pt")
    else:
        ids = tokenizer(first, second, truncation=True, max_length=512, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=ids["input_ids"]).logits[0].tolist()


# --------------------------------------------------------------------------- scores and arithmetic


def test_two_label_scores_equal_the_logit_difference_computed_directly(classifiers) -> None:
    scorer = ClassifierScorer(ClassifierConfig(model=str(classifiers["two"]), label_index=1, batch_size=2))
    scores = scorer.score([c for c, _ in CASES], [r for _, r in CASES])
    for (_, response), score in zip(CASES, scores, strict=True):
        toxic, ok = direct_logits(classifiers["two"], USER, response)  # the last user message + response
        assert score == pytest.approx(ok - toxic, abs=1e-5)
    assert len(set(scores)) == 3  # the three texts are told apart, so the checks above bite
    assert scorer.usage.score_calls == 1
    assert scorer.usage.scored_tokens == sum(scorer.last_tokens) > 0


def test_three_labels_and_scalar_heads_match_direct_computation(classifiers) -> None:
    three = ClassifierScorer(ClassifierConfig(model=str(classifiers["three"]), label_index=1))
    scalar = ClassifierScorer(ClassifierConfig(model=str(classifiers["scalar"])))
    for chat, response in CASES:
        logits = direct_logits(classifiers["three"], USER, response)
        log_z = math.log(sum(math.exp(x) for x in logits))
        p_ok = math.exp(logits[1] - log_z)
        assert three.score([chat], [response])[0] == pytest.approx(math.log(p_ok / (1 - p_ok)), abs=1e-5)
        (reward,) = direct_logits(classifiers["scalar"], USER, response)
        assert scalar.score([chat], [response])[0] == pytest.approx(reward, abs=1e-5)


def test_arithmetic_on_hand_worked_numbers() -> None:
    import torch

    assert p_better(2.0, 0.5, temperature=0.5) == pytest.approx(1 / (1 + math.exp(-3.0)))
    assert p_better(0.5, 2.0, temperature=0.5) == pytest.approx(1 / (1 + math.exp(3.0)))
    assert p_better(1.0, 1.0) == 0.5
    scores = acceptability(torch.tensor([[1.0, 2.0, 0.0], [0.3, -0.2, 5.0]]), 1).tolist()
    assert scores[0] == pytest.approx(2.0 - math.log(math.e + 1.0))  # log p1 - log(p0 + p2)
    assert scores[1] == pytest.approx(-0.2 - math.log(math.exp(0.3) + math.exp(5.0)))
    assert acceptability(torch.tensor([[0.3, -0.2]]), 0).tolist() == pytest.approx([0.5])
    assert acceptability(torch.tensor([[-80.0, 80.0]]), 1).tolist() == pytest.approx([160.0])  # stable
    assert acceptability(torch.tensor([[1.5]]), None).tolist() == [1.5]


# --------------------------------------------------------------------------- the judge


class ScriptedScorer:
    """A classifier stand-in: each response text's score is scripted."""

    def __init__(self, scores: dict[str, float]) -> None:
        self.scores, self.model_id, self.usage, self.last_tokens = scores, "scripted", Usage(), []

    def score(self, conversations, responses):
        self.last_tokens = [len(r) for r in responses]
        return [self.scores[r] for r in responses]


def test_classifier_judge_votes_follow_the_scores_and_margin() -> None:
    config = LabelConfig(
        judge="classifier",
        classifier=ClassifierConfig(model="unused", temperature=0.5),
        min_margin=0.05,
        responses=3,
    )
    scorer = ScriptedScorer({"best": 2.0, "mid": 0.5, "close": 0.45, "x": 0.0, "y": -1.0})
    chats = [[{"role": "user", "content": "q1"}], [{"role": "user", "content": "q2"}]]
    # through cai.judge.judge: the dispatch at its top reaches the classifier
    votes = judge(scorer, None, chats, [["close", "best", "mid"], ["x", "y"]], [[], []], config)
    assert [len(v) for v in votes] == [3, 1]
    by_pair = {(v.i, v.j): v for v in votes[0]}
    assert by_pair[(0, 1)].p_i_better == pytest.approx(1 / (1 + math.exp(3.1)))  # (0.45 - 2.0) / 0.5
    assert by_pair[(0, 1)].verdict == 1
    assert by_pair[(1, 2)].verdict == 1 and by_pair[(1, 2)].p_i_better == pytest.approx(
        1 / (1 + math.exp(-3.0))
    )
    close = by_pair[(0, 2)]  # sigmoid(-0.1) = 0.475: within the margin
    assert close.verdict is None and close.no_verdict == "below-margin"
    assert votes[1][0].verdict == 0 and votes[1][0].p_i_better == pytest.approx(1 / (1 + math.exp(-2.0)))
    for vote in votes[0]:
        assert vote.principle_id == "classifier" and vote.orders == [] and vote.position_consistent is None
        assert [s.index for s in vote.classifier_scores] == [vote.i, vote.j]
    assert [s.score for s in by_pair[(0, 1)].classifier_scores] == [0.45, 2.0]
    assert by_pair[(0, 1)].classifier_scores[1].tokens == len("best")


def test_classifier_judge_scores_empty_responses(classifiers) -> None:
    config = LabelConfig(
        judge="classifier", classifier=ClassifierConfig(model=str(classifiers["two"]), label_index=1)
    )
    scorer = ClassifierScorer(config.classifier)
    votes = classifier_judge(scorer, [[]], [["", "some answer"]], [[]], config)
    (vote,) = votes[0]
    scores = [s.score for s in vote.classifier_scores]
    assert all(math.isfinite(s) for s in scores) and vote.classifier_scores[0].tokens >= 1
    assert vote.p_i_better == pytest.approx(p_better(*scores))


# --------------------------------------------------------------------------- config errors


def test_judge_classifier_without_a_section_names_label_classifier(tmp_path) -> None:
    from cai.config import ConfigError, load_config

    with pytest.raises(ValidationError, match=r"label\.classifier"):
        LabelConfig(judge="classifier")
    path = write_config(tmp_path / "c.yaml", tmp_path / "run", ["label"], judge="classifier")
    with pytest.raises(ConfigError, match=r"label\.classifier"):
        load_config(path)
    LabelConfig(judge="choice")  # the section is only needed in classifier mode


def test_label_index_out_of_range_is_a_config_error_before_any_work(tmp_path, classifiers) -> None:
    from cai.stages.label import run_label

    with pytest.raises(ClassifierConfigError, match=r"label\.classifier\.label_index=2.*'toxic'.*'ok'"):
        ClassifierScorer(
            ClassifierConfig(model=str(classifiers["two"]), label_index=2), "label.classifier.label_index"
        )
    with pytest.raises(ClassifierConfigError, match=r"is null \(a scalar head\).*2 labels"):
        ClassifierScorer(ClassifierConfig(model=str(classifiers["two"])))
    with pytest.raises(ClassifierConfigError, match=r"no such label.*scalar head"):
        ClassifierScorer(ClassifierConfig(model=str(classifiers["scalar"]), label_index=0))
    classifier = {"model": str(classifiers["two"]), "label_index": 5}
    path = write_config(
        tmp_path / "c.yaml", tmp_path / "run", ["label"], judge="classifier", classifier=classifier
    )
    ctx = quiet(echo_context(path))
    with pytest.raises(ClassifierConfigError, match=r"label\.classifier\.label_index=5"):
        run_label(ctx)
    assert not (tmp_path / "run" / "label").exists()  # nothing was written
    assert ctx._backends["echo|" + ctx.config.engine.model_dump_json()].calls == []  # nothing generated


def quiet(ctx):
    ctx.console = Console(file=open(os.devnull, "w"))
    return ctx


# --------------------------------------------------------------------------- the label stage


def test_label_stage_end_to_end_with_a_classifier_judge(tmp_path, classifiers) -> None:
    from cai.stages.label import run_label

    classifier = {"model": str(classifiers["two"]), "label_index": 1, "temperature": 0.1}
    path = write_config(
        tmp_path / "c.yaml",
        tmp_path / "run",
        ["label"],
        judge="classifier",
        classifier=classifier,
        responses=3,
        gold="gold_harmless.jsonl",  # the gate runs on the classifier too
        min_margin=0.01,
    )
    ctx = quiet(echo_context(path))
    store = run_label(ctx)
    from cai.records import LabelAudit

    audits = [
        LabelAudit.model_validate_json(line) for line in (store.path / "audit.jsonl").read_text().splitlines()
    ]
    assert len(audits) == 4
    direct = ClassifierScorer(ClassifierConfig(**classifier))
    for audit in audits:
        assert audit.principles == ["classifier"] and audit.judge_model_id == str(classifiers["two"])
        assert len(audit.votes) == 3
        expected = direct.score([audit.prompt] * 3, audit.responses)
        for vote in audit.votes:
            assert vote.principle_id == "classifier"
            got = {s.index: s.score for s in vote.classifier_scores}
            assert got == pytest.approx({vote.i: expected[vote.i], vote.j: expected[vote.j]}, abs=1e-5)
            assert vote.p_i_better == pytest.approx(p_better(got[vote.i], got[vote.j], 0.1))
    assert any(v.verdict is not None for a in audits for v in a.votes)
    from cai.audit.views import label_view

    view = label_view(audits[0])  # the audit views read classifier votes (no orders) as they are
    assert [v.combined for v in view.votes] == [v.p_i_better for v in audits[0].votes]
    assert all(v.p_ab is None and v.principle_id == "classifier" for v in view.votes)
    gate = (store.path / "gate.json").read_text()
    assert '"judge_model":"' + str(classifiers["two"]) in gate.replace(" ", "")
    # the classifier section is part of the stage key and of what eval keys its judge by
    before = ctx.store("label").config_hash
    data = yaml.safe_load(path.read_text())
    data["label"]["classifier"]["temperature"] = 0.2
    path.write_text(yaml.safe_dump(data))
    other = quiet(echo_context(path))
    assert other.store("label").config_hash != before
    assert other.config.label.judge_settings()["classifier"]["temperature"] == 0.2
    assert "classifier" not in LabelConfig().judge_settings()


# --------------------------------------------------------------------------- PPO / RLOO reward


def test_ppo_and_rloo_reward_with_a_two_label_classifier(classifiers, monkeypatch, tmp_path) -> None:
    import cai.train.ppo.trainer as trainer_module
    from cai.train.pm_metrics import PreferenceScorer
    from cai.train.ppo.config import PPOConfig
    from cai.train.rloo import PMReward

    prompts = [[{"role": "user", "content": USER}], [{"role": "user", "content": "Tell me a joke."}]]
    responses = ["Knead the dough well.", "No."]
    expected = []
    for prompt, response in zip(prompts, responses, strict=True):
        toxic, ok = direct_logits(
            classifiers["two"], "", chat=[*prompt, {"role": "assistant", "content": response}]
        )
        expected.append(ok - toxic)
    assert expected[0] != pytest.approx(expected[1])

    captured = {}

    class Captured:
        def __init__(self, config, *, policy, reward_fn, prompts, output_dir):
            captured["reward_fn"] = reward_fn

        def train(self):
            return "trained"

    monkeypatch.setattr(trainer_module, "PPOTrainer", Captured)
    config = PPOConfig(reward_model=str(classifiers["two"]), reward_label_index=1)
    assert (
        trainer_module.train_ppo(config, tmp_path, policy=str(classifiers["two"]), prompts=["hi"])
        == "trained"
    )
    assert captured["reward_fn"](prompts, responses) == pytest.approx(expected, abs=1e-5)

    reward = PMReward(PreferenceScorer(classifiers["two"], label_index=1))
    completions = [[{"role": "assistant", "content": r}] for r in responses]
    assert reward(prompts=prompts, completions=completions) == pytest.approx(expected, abs=1e-5)
    # a scalar head (the PM) reads as it did
    (scalar,) = direct_logits(
        classifiers["scalar"], "", chat=[*prompts[0], {"role": "assistant", "content": responses[0]}]
    )
    assert PreferenceScorer(classifiers["scalar"]).score(prompts[:1], responses[:1]) == pytest.approx(
        [scalar], abs=1e-5
    )


def test_ppo_reward_label_index_out_of_range_fails_before_training(
    classifiers, monkeypatch, tmp_path
) -> None:
    import cai.train.ppo.trainer as trainer_module
    from cai.train.ppo.config import PPOConfig

    def never(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(trainer_module, "PPOTrainer", never)
    config = PPOConfig(reward_model=str(classifiers["two"]), reward_label_index=2)
    with pytest.raises(ClassifierConfigError, match=r"ppo\.reward_label_index=2.*'toxic'"):
        trainer_module.train_ppo(config, tmp_path, policy="unused", prompts=["hi"])
    with pytest.raises(ClassifierConfigError, match=r"ppo\.reward_label_index is null"):
        trainer_module.train_ppo(
            PPOConfig(reward_model=str(classifiers["two"])), tmp_path, policy="x", prompts=["hi"]
        )


# --------------------------------------------------------------------------- eval metric


def test_eval_flag_rate_is_the_share_scored_below_zero(classifiers) -> None:
    scorer = ScriptedScorer({"bad": -1.0, "meh": -0.1, "fine": 0.5, "good": 2.0})
    prompts = {"red_team": ["a", "b", "c", "d"], "helpful": ["e", "f"]}
    answers = {
        "base": {"red_team": ["bad", "meh", "fine", None], "helpful": ["good", "good"]},
        "sft": {"red_team": ["good", "fine", "meh", "good"]},
    }
    rows = {(r.metric, r.policy): r for r in flag_rate_rows(scorer, answers, prompts, n_resamples=200)}
    base = rows[("classifier_flag_rate_red_team", "base")]
    assert base.value == pytest.approx(2 / 3) and base.n == 3 and "1 of 4 items dropped" in base.note
    assert base.ci_low <= base.value <= base.ci_high
    assert rows[("classifier_flag_rate_red_team", "sft")].value == pytest.approx(0.25)
    assert rows[("classifier_flag_rate_helpful", "base")].value == 0.0
    assert ("classifier_flag_rate_helpful", "sft") not in rows

    # with a real classifier: the share of its own scores below 0; "toxic" as the acceptable label
    # negates every two-label score, so the two flag rates add up to 1
    texts = ["Bake it.", "No.", "I can't help with that.", "", "Mix flour and water.", "Stay safe!"]
    real = {"base": {"red_team": texts}}
    shown = {"red_team": [USER] * len(texts)}
    ok = ClassifierScorer(ClassifierConfig(model=str(classifiers["two"]), label_index=1))
    toxic = ClassifierScorer(ClassifierConfig(model=str(classifiers["two"]), label_index=0))
    (row_ok,) = flag_rate_rows(ok, real, shown, n_resamples=0)
    (row_toxic,) = flag_rate_rows(toxic, real, shown, n_resamples=0)
    assert row_ok.value == pytest.approx(sum(s < 0 for s in ok.score([USER] * 6, texts)) / 6)
    assert row_ok.value + row_toxic.value == pytest.approx(1.0)


def test_eval_stage_reports_the_flag_rate_and_keys_by_the_classifier(tmp_path, classifiers) -> None:
    from cai.stages.evaluation import read_metrics, run_eval

    path = write_config(tmp_path / "c.yaml", tmp_path / "run", ["label"])
    data = yaml.safe_load(path.read_text())
    data["eval"] = {
        "limit": 3,
        "bootstrap": 50,
        "harm_principles": [],
        "classifier": {"model": str(classifiers["two"]), "label_index": 1},
    }
    path.write_text(yaml.safe_dump(data))
    ctx = quiet(echo_context(path, judge=lambda prompt, options: [0.7, 0.3]))
    store = run_eval(ctx)
    rows = {(r.metric, r.policy): r for r in read_metrics(store.path)}
    assert rows[("classifier_flag_rate_red_team", "base")].n == 3
    assert rows[("classifier_flag_rate_helpful", "base")].n == 3
    data["eval"]["classifier"]["label_index"] = 0
    path.write_text(yaml.safe_dump(data))
    assert quiet(echo_context(path)).store("eval").config_hash != store.config_hash
