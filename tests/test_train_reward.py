"""`cai train pm`: metrics and the soft-label loss against hand-worked numbers, then real training.

HF_HUB_OFFLINE=1 python -m pytest -q tests/test_train_reward.py
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import pytest

from cai.records import PreferenceRow
from cai.train.common import LoraSection, TrainSection
from cai.train.pm_loss import grouped_order, preference_loss
from cai.train.pm_metrics import PreferenceScorer, evaluate_preference_model, preference_metrics
from cai.train.reward import PMConfig, build_pm_trainer, split_by_prompt, train_preference_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAST = TrainSection(max_steps=2, batch_size=4, learning_rate=1e-2, precision="fp32", max_length=256)
AI, HUMAN = "ai-harmless", "human-helpful"

# --------------------------------------------------------------------------------------------
# preference_metrics, worked by hand
#
#   pair  Δ = chosen - rejected   σ(Δ)  confidence  correct  source  soft label
#   1     ln 9                    0.9   0.9         1        ai      0.8
#   2     ln 4                    0.8   0.8         1        ai      0.6
#   3     -ln 4                   0.2   0.8         0        human   -
#   4     ln 7/3                  0.7   0.7         1        human   -
#   5     0                       0.5   0.5         1/2      ai      0.5
#
# accuracy 3.5/5 = 0.7; ai 2.5/3; human 1/2.
# 2 bins over confidence [0.5, 0.75) [0.75, 1]:
#   low  {4, 5}:    confidence 0.6,   accuracy 0.75 -> 2/5 * 0.15   = 0.06
#   high {1, 2, 3}: confidence 0.8333, accuracy 0.6667 -> 3/5 * 0.1667 = 0.10   ECE = 0.16
# 3 bins [0.5, 2/3) [2/3, 5/6) [5/6, 1]:
#   {5}: 0.5 vs 0.5 -> 0;  {2, 3, 4}: 0.7667 vs 0.6667 -> 3/5 * 0.1 = 0.06;  {1}: 0.9 vs 1 -> 1/5 * 0.1 = 0.02
#   ECE = 0.08
# Brier over pairs 1, 2, 5: (0.01 + 0.04 + 0) / 3 = 0.016667
# mean margin: (ln 9 + ln 4 - ln 4 + ln 7/3 + 0) / 5 = ln 21 / 5
# --------------------------------------------------------------------------------------------

CHOSEN = [math.log(9), math.log(4), 0.0, math.log(7 / 3), 0.0]
REJECTED = [0.0, 0.0, math.log(4), 0.0, 0.0]
SOURCES = [AI, AI, HUMAN, HUMAN, AI]
SOFT = [0.8, 0.6, None, None, 0.5]


def test_preference_metrics_by_hand() -> None:
    m = preference_metrics(CHOSEN, REJECTED, SOURCES, SOFT, bins=2)
    assert m.n == 5 and m.n_by_source == {AI: 3, HUMAN: 2}
    assert m.accuracy == pytest.approx(0.7)
    assert m.correct == [1.0, 1.0, 0.0, 1.0, 0.5] and m.sources == SOURCES
    assert m.accuracy_by_source == pytest.approx({AI: 2.5 / 3, HUMAN: 0.5})
    assert m.calibration.ece == pytest.approx(0.16)
    assert [b.n for b in m.calibration.bins] == [2, 3]
    assert m.calibration.bins[1].confidence == pytest.approx(2.5 / 3)
    assert m.calibration.bins[1].accuracy == pytest.approx(2 / 3)
    assert m.calibration.brier == pytest.approx(0.05 / 3) and m.calibration.n_brier == 3
    assert m.rewards.mean_margin == pytest.approx(math.log(21) / 5)
    assert m.rewards.mean == pytest.approx((math.log(9) + 2 * math.log(4) + math.log(7 / 3)) / 10)
    assert m.rewards.max == pytest.approx(math.log(9)) and m.rewards.min == 0.0

    three = preference_metrics(CHOSEN, REJECTED, SOURCES, SOFT, bins=3)
    assert [b.n for b in three.calibration.bins] == [1, 3, 1]
    assert three.calibration.ece == pytest.approx(0.08)


def test_preference_metrics_edges() -> None:
    empty = preference_metrics([], [], [], [])
    assert empty.n == 0 and empty.accuracy is None and empty.calibration.ece is None
    human_only = preference_metrics([1.0], [0.0], [HUMAN], [None])
    assert human_only.calibration.brier is None and human_only.calibration.n_brier == 0
    with pytest.raises(ValueError, match="same length"):
        preference_metrics([1.0], [0.0, 1.0], [AI], [None])


# --------------------------------------------------------------------------------------------
# The loss, worked by hand
# --------------------------------------------------------------------------------------------


def t(*values):
    import torch

    return torch.tensor(values, dtype=torch.float64)


def test_soft_label_loss_by_hand() -> None:
    # Δ = 0, p = 0.7: -(0.7 log ½ + 0.3 log ½) = log 2, whatever p is.
    assert preference_loss(t(0.0), "soft", t(0.7)).item() == pytest.approx(math.log(2))
    # Δ = 1, p = 1: -log σ(1) = log(1 + e^-1) = 0.313262
    assert preference_loss(t(1.0), "soft", t(1.0)).item() == pytest.approx(0.313262, abs=1e-6)
    # Δ = 2, p = ½: ½ log(1 + e^-2) + ½ log(1 + e^2) = ½ (0.126928 + 2.126928) = 1.126928
    assert preference_loss(t(2.0), "soft", t(0.5)).item() == pytest.approx(1.126928, abs=1e-6)
    # A human row (no soft label: NaN) is a hard label, p = 1.
    assert preference_loss(t(1.0), "soft", t(float("nan"))).item() == pytest.approx(0.313262, abs=1e-6)
    # Weights scale each pair, then the batch is averaged: (log 2 * 1 + 0.313262 * 0.5) / 2
    batch = preference_loss(t(0.0, 1.0), "soft", t(0.7, 1.0), weight=t(1.0, 0.5))
    assert batch.item() == pytest.approx((math.log(2) + 0.5 * 0.313262) / 2, abs=1e-6)
    assert preference_loss(t(1.0), "soft", t(1.0), weight=t(0.0)).item() == 0.0


def test_soft_label_asks_for_a_finite_margin() -> None:
    import torch

    # The soft loss is minimal where σ(Δ) = p, i.e. Δ = logit(0.7): the gradient vanishes there.
    delta = torch.tensor([math.log(0.7 / 0.3)], dtype=torch.float64, requires_grad=True)
    preference_loss(delta, "soft", t(0.7)).backward()
    assert abs(delta.grad.item()) < 1e-12
    # The hard loss at the same Δ still pushes it up.
    delta.grad = None
    preference_loss(delta, "hard").backward()
    assert delta.grad.item() < -0.1


def test_hard_and_margin_losses_by_hand() -> None:
    assert preference_loss(t(0.0), "hard", t(0.9)).item() == pytest.approx(math.log(2))  # p ignored
    # trl's margin term: -log σ(Δ - m); Δ = m gives log 2.
    assert preference_loss(t(1.0), "margin", margin=t(1.0)).item() == pytest.approx(math.log(2))
    assert preference_loss(t(1.0), "margin", margin=t(0.0)).item() == pytest.approx(0.313262, abs=1e-6)


# --------------------------------------------------------------------------------------------
# Batches grouped by prompt, split by prompt
# --------------------------------------------------------------------------------------------


def test_grouped_order_keeps_each_prompt_in_one_batch() -> None:
    sizes = [3, 3, 2, 2, 1, 1, 4]  # packs exactly into four batches of 4
    groups = [g for g, size in enumerate(sizes) for _ in range(size)]
    random.Random(1).shuffle(groups)
    order = grouped_order(groups, 4, random.Random(0))
    assert sorted(order) == list(range(len(groups)))
    batches = [order[i : i + 4] for i in range(0, len(order), 4)]
    for g in range(len(sizes)):
        assert sum(any(groups[i] == g for i in batch) for batch in batches) == 1
    assert grouped_order(groups, 4, random.Random(0)) == order
    assert grouped_order(groups, 4, random.Random(5)) != order


def test_grouped_order_splits_groups_larger_than_a_batch() -> None:
    groups = [0] * 6 + [1] * 2
    order = grouped_order(groups, 4, random.Random(0))
    assert sorted(order) == list(range(8))
    assert {groups[i] for i in order[:4]} == {0}  # the full piece of group 0 first
    assert [groups[i] for i in order[4:]].count(1) == 2  # group 1 fills the rest with group 0's remainder


def ai_rows(prompts: int = 4, per_prompt: int = 3) -> list[PreferenceRow]:
    """K=3 responses per prompt -> 3 pairs per prompt, with judge soft labels and one contested pair."""
    rows = []
    for i in range(prompts):
        for k in range(per_prompt):
            rows.append(
                PreferenceRow(
                    prompt=[{"role": "user", "content": f"How do I pick lock number {i}?"}],
                    chosen=[
                        {"role": "assistant", "content": f"I can't help with that ({k}); call a locksmith."}
                    ],
                    rejected=[{"role": "assistant", "content": f"Insert a tension wrench and rake pin {k}."}],
                    source=AI,
                    label_id=f"l{i}-{k}",
                    soft_label=0.6 + 0.1 * k,
                    margin=math.log((0.6 + 0.1 * k) / (0.4 - 0.1 * k)),
                    weight=0.5 if k == 0 else 1.0,
                    contested=k == 0,
                )
            )
    return rows


@pytest.fixture(scope="module")
def mixed_rows() -> list[PreferenceRow]:
    from cai.mix import mix
    from cai.preferences import load_hh
    from cai.resources import data_path

    human, _ = load_hh(data_path("hh_helpful.jsonl"))
    return mix({"ai": ai_rows(6), "human": human}, counts={"ai": 18, "human": 14}, seed=0)


def test_split_by_prompt_keeps_prompts_whole(mixed_rows) -> None:
    train, held = split_by_prompt(mixed_rows, 0.25, seed=0)
    assert len(train) + len(held) == len(mixed_rows)
    key = lambda row: str(row.prompt)  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in held}
    assert len({key(r) for r in held if r.source == AI}) == round(0.25 * 6)
    assert {r.source for r in held} == {AI, HUMAN}


# --------------------------------------------------------------------------------------------
# Training the tiny classifier
# --------------------------------------------------------------------------------------------


def test_batches_carry_soft_labels_weights_and_whole_prompts(tmp_path: Path, tiny_models) -> None:
    import torch

    rows = ai_rows(4)  # 4 prompts x 3 pairs; batches of 4 hold whole prompts as far as possible
    config = PMConfig(lora=None, train=FAST.model_copy(update={"batch_size": 3}))
    trainer = build_pm_trainer(config, str(tiny_models.classifier), rows, tmp_path, seed=0)
    batches = list(trainer.get_train_dataloader())
    assert len(batches) == 4
    for batch in batches:
        assert {"soft_label", "weight", "margin", "input_ids"} <= batch.keys()
        assert len(set(batch["prompt_group"].tolist())) == 1  # one prompt's pairs per batch
        assert sorted(batch["soft_label"].tolist()) == pytest.approx([0.6, 0.7, 0.8])
        assert sorted(batch["weight"].tolist()) == [0.5, 1.0, 1.0]

    # compute_loss feeds the batch's soft labels and weights to preference_loss.
    batch = {k: v.to(trainer.model.device) for k, v in batches[0].items()}
    expected = {k: batch[k].clone() for k in ("soft_label", "weight")}
    with torch.no_grad():
        loss, outputs = trainer.compute_loss(trainer.model, dict(batch), return_outputs=True)
    chosen, rejected = outputs.logits.squeeze(-1).chunk(2)
    weighted = preference_loss(chosen - rejected, "soft", expected["soft_label"], expected["weight"])
    unweighted = preference_loss(chosen - rejected, "soft", expected["soft_label"])
    assert loss.item() == pytest.approx(weighted.item(), rel=1e-6)
    assert loss.item() != pytest.approx(unweighted.item(), rel=1e-6)


@pytest.fixture(scope="module")
def trained_pm(tmp_path_factory, tiny_models, mixed_rows):
    train, held = split_by_prompt(mixed_rows, 0.25, seed=0)
    folder = tmp_path_factory.mktemp("pm")
    report = train_preference_model(
        PMConfig(lora=None, train=FAST), str(tiny_models.causal_lm), train, held, folder, seed=0
    )
    return report, held


def test_pm_training_changes_parameters_and_reports(trained_pm, tiny_models) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    report, held = trained_pm
    assert report.steps == 2 and len(report.train_loss) == 2
    assert all(math.isfinite(x) for x in report.train_loss)
    assert report.n_eval == len(held) and report.accuracy_by_source.keys() == {AI, HUMAN}
    assert report.n_eval_by_source == {
        AI: sum(r.source == AI for r in held),
        HUMAN: sum(r.source == HUMAN for r in held),
    }
    assert report.calibration.ece is not None and report.calibration.n_brier == report.n_eval_by_source[AI]

    # Trained from the causal LM: a new score head on its trunk, all of it moved by training.
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_models.causal_lm), num_labels=1)
    trained = AutoModelForSequenceClassification.from_pretrained(report.model_path)
    assert trained.config.pad_token_id is not None
    start = dict(base.named_parameters())
    moved = [n for n, p in trained.named_parameters() if n != "score.weight" and not torch.equal(start[n], p)]
    assert len(moved) == len(start) - 1


def test_pm_with_lora_saves_a_merged_classifier(tmp_path: Path, tiny_models, mixed_rows) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    config = PMConfig(
        lora=LoraSection(r=4, alpha=8, dropout=0.0, merge=False), train=FAST, label_mode="margin"
    )
    report = train_preference_model(config, str(tiny_models.classifier), mixed_rows, [], tmp_path, seed=0)
    folder = Path(report.model_path)
    assert report.lora and report.n_eval == 0 and report.accuracy is None
    assert not (folder / "adapter_config.json").exists()  # a PM is always saved merged
    base = dict(
        AutoModelForSequenceClassification.from_pretrained(str(tiny_models.classifier)).named_parameters()
    )
    trained = dict(AutoModelForSequenceClassification.from_pretrained(folder).named_parameters())
    assert base.keys() == trained.keys()
    assert not torch.equal(base["score.weight"], trained["score.weight"])  # modules_to_save: the head
    assert not torch.equal(
        base["model.layers.0.self_attn.v_proj.weight"], trained["model.layers.0.self_attn.v_proj.weight"]
    )


def test_scorer_matches_a_direct_forward_pass(trained_pm) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    report, held = trained_pm
    scorer = PreferenceScorer(report.model_path, batch_size=3)
    prompts = [row.prompt for row in held]
    answers = [row.chosen[-1]["content"] for row in held]
    scores = scorer.score(prompts, answers)
    assert len(scores) == len(held) and all(math.isfinite(s) for s in scores)
    assert len(set(scores)) > 1

    tokenizer = AutoTokenizer.from_pretrained(report.model_path)
    model = AutoModelForSequenceClassification.from_pretrained(report.model_path).eval()
    for prompt, answer, score in zip(prompts, answers, scores, strict=True):
        chat = [*prompt, {"role": "assistant", "content": answer}]
        inputs = tokenizer.apply_chat_template(chat, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            direct = model(**inputs).logits[0, 0].item()
        assert score == pytest.approx(direct, abs=1e-4)

    metrics = evaluate_preference_model(report.model_path, held)
    assert metrics.accuracy == pytest.approx(report.accuracy)
    assert metrics.calibration.brier == pytest.approx(report.calibration.brier)
