"""`cai train dpo` and `cai train rloo` on the tiny causal LM (RLOO rewarded by the tiny PM).

HF_HUB_OFFLINE=1 python -m pytest -q tests/test_train_dpo_rloo.py
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from cai.train.common import LoraSection, TrainSection
from cai.train.dpo import DPOConfig, train_dpo
from cai.train.rloo import PMReward, RLOOConfig, train_rloo

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAST = TrainSection(max_steps=2, batch_size=2, learning_rate=1e-2, precision="fp32", max_length=256)
LORA = LoraSection(r=4, alpha=8, dropout=0.0)


@pytest.fixture(scope="module")
def hh_rows():
    from cai.preferences import load_hh
    from cai.resources import data_path

    return load_hh(data_path("hh_helpful.jsonl"), limit=8)[0]


def params(path) -> dict:
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(str(path)).named_parameters())


def test_dpo_full_fine_tune_changes_every_parameter(tmp_path: Path, tiny_models, hh_rows) -> None:
    import torch

    result = train_dpo(
        DPOConfig(lora=None, train=FAST), str(tiny_models.causal_lm), hh_rows, tmp_path, seed=0
    )
    assert result.steps == 2 and len(result.train_loss) == 2
    assert result.train_loss[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    assert "rewards/accuracies" in result.metrics
    before, after = params(tiny_models.causal_lm), params(result.model_path)
    assert [name for name in before if torch.equal(before[name], after[name])] == []


def test_dpo_with_lora_trains_the_adapter(tmp_path: Path, tiny_models, hh_rows) -> None:
    import torch

    config = DPOConfig(lora=LORA, train=FAST, beta=0.5)
    result = train_dpo(config, str(tiny_models.causal_lm), hh_rows, tmp_path, seed=0)
    assert result.lora and result.merged and result.steps == 2
    # Reference = the model with its adapter disabled, so the first loss is exactly log 2.
    assert result.train_loss[0] == pytest.approx(math.log(2), abs=1e-4)
    before, after = params(tiny_models.causal_lm), params(result.model_path)
    q, mlp = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(before[q], after[q]) and torch.equal(before[mlp], after[mlp])


class FakeScorer:
    def __init__(self) -> None:
        self.calls: list[tuple[list, list[str]]] = []

    def score(self, prompts, responses):
        self.calls.append((prompts, responses))
        return [float(len(text)) for text in responses]


def test_pm_reward_reads_conversational_completions() -> None:
    scorer = FakeScorer()
    prompt = [{"role": "user", "content": "hi"}]
    rewards = PMReward(scorer)(
        prompts=[prompt, prompt],
        completions=[[{"role": "assistant", "content": "abc"}], [{"role": "assistant", "content": "hello"}]],
        completion_ids=[[1], [2]],
        trainer_state=None,
    )
    assert rewards == [3.0, 5.0]
    assert scorer.calls == [([prompt, prompt], ["abc", "hello"])]


def test_rloo_config_needs_whole_groups() -> None:
    with pytest.raises(ValidationError, match="multiple of num_generations"):
        RLOOConfig(num_generations=4, train=TrainSection(batch_size=2))
    assert RLOOConfig(num_generations=4, train=TrainSection(batch_size=2, gradient_accumulation_steps=2))


def test_rloo_with_the_tiny_pm_changes_the_policy(tmp_path: Path, tiny_models, hh_rows) -> None:
    import torch

    config = RLOOConfig(
        lora=None,
        train=FAST.model_copy(update={"batch_size": 4}),
        num_generations=2,
        max_completion_length=8,
        beta=0.05,
    )
    prompts = [row.prompt for row in hh_rows]
    result = train_rloo(config, str(tiny_models.causal_lm), tiny_models.classifier, prompts, tmp_path, seed=0)
    assert result.steps == 2
    assert math.isfinite(result.metrics["rewards/pm/mean"]) and "kl" in result.metrics
    before, after = params(tiny_models.causal_lm), params(result.model_path)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert len(changed) == len(before)
