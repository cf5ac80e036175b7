"""`cai train sft` on the tiny causal LM: full and LoRA fine-tunes, prompt masking, demos, resume.

HF_HUB_OFFLINE=1 python -m pytest -q tests/test_train_sft.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cai.train.common import LoraSection, TrainSection
from cai.train.sft import SFTConfig, build_sft_trainer, helpful_demonstrations, train_sft

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# fp32 keeps the tiny runs deterministic; a large learning rate makes 2 steps visibly move weights.
FAST = TrainSection(max_steps=2, batch_size=2, learning_rate=1e-2, precision="fp32", max_length=256)
LORA = LoraSection(r=4, alpha=8, dropout=0.0)


def examples(n: int = 6) -> list[list[dict]]:
    return [
        [
            {"role": "user", "content": f"How do I pick lock number {i}?"},
            {"role": "assistant", "content": f"I can't help with breaking into lock {i}; call a locksmith."},
        ]
        for i in range(n)
    ]


def load_lm(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path))


def logits(model, tokenizer):
    import torch

    ids = tokenizer.apply_chat_template(examples(1)[0], return_tensors="pt", return_dict=True)
    with torch.no_grad():
        return model(**ids).logits


def test_full_fine_tune_changes_every_parameter(tmp_path: Path, tiny_models) -> None:
    import torch

    result = train_sft(
        SFTConfig(lora=None, train=FAST), str(tiny_models.causal_lm), examples(), tmp_path, seed=0
    )
    assert result.steps == 2 and len(result.train_loss) == 2 and not result.lora
    assert (Path(result.model_path) / "model.safetensors").is_file()
    before, after = load_lm(tiny_models.causal_lm), load_lm(result.model_path)
    unchanged = [
        name
        for (name, p0), (_, p1) in zip(before.named_parameters(), after.named_parameters(), strict=True)
        if torch.equal(p0, p1)
    ]
    assert unchanged == []
    assert after.config.use_cache  # the Trainer's use_cache=False is not left in the saved config


def test_lora_adapter_unmerged_loads_with_peft(tmp_path: Path, tiny_models) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    config = SFTConfig(lora=LORA.model_copy(update={"merge": False}), train=FAST)
    result = train_sft(config, str(tiny_models.causal_lm), examples(), tmp_path, seed=0)
    folder = Path(result.model_path)
    assert result.lora and not result.merged
    assert (folder / "adapter_model.safetensors").is_file() and not (folder / "model.safetensors").exists()
    adapter = json.loads((folder / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_models.causal_lm)

    tokenizer = AutoTokenizer.from_pretrained(folder)
    base_logits = logits(load_lm(tiny_models.causal_lm), tokenizer)
    tuned = PeftModel.from_pretrained(load_lm(tiny_models.causal_lm), folder)
    assert not torch.allclose(logits(tuned, tokenizer), base_logits, atol=1e-6)


def test_lora_merged_is_a_plain_model(tmp_path: Path, tiny_models) -> None:
    import torch

    result = train_sft(
        SFTConfig(lora=LORA, train=FAST), str(tiny_models.causal_lm), examples(), tmp_path, seed=0
    )
    folder = Path(result.model_path)
    assert result.merged and not (folder / "adapter_config.json").exists()
    before, after = (
        dict(load_lm(tiny_models.causal_lm).named_parameters()),
        dict(load_lm(folder).named_parameters()),
    )
    assert before.keys() == after.keys()  # no lora_A / lora_B left over
    q = "model.layers.0.self_attn.q_proj.weight"
    mlp = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(before[q], after[q])  # the adapter's update was merged in
    assert torch.equal(before[mlp], after[mlp])  # untargeted modules stay as they were


@pytest.mark.parametrize("completion_only", [True, False])
def test_completion_only_loss_masks_the_prompt(tmp_path: Path, tiny_models, completion_only: bool) -> None:
    config = SFTConfig(lora=None, train=FAST, completion_only_loss=completion_only)
    trainer, _ = build_sft_trainer(config, str(tiny_models.causal_lm), examples(), tmp_path, seed=0)
    rows = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer.data_collator(rows)
    for i, row in enumerate(rows):
        prompt_ids = trainer.processing_class.apply_chat_template(
            row["prompt"], add_generation_prompt=True, return_dict=True
        )["input_ids"]
        n, length = len(prompt_ids), len(row["input_ids"])
        input_ids, labels = batch["input_ids"][i].tolist(), batch["labels"][i].tolist()
        assert input_ids[:n] == prompt_ids
        assert labels[n:length] == input_ids[n:length]  # the answer (and its end-of-turn) is learned
        if completion_only:
            assert labels[:n] == [-100] * n
        else:
            assert labels[:n] == input_ids[:n]


def test_helpful_demonstrations_are_mixed_in(tmp_path: Path, tiny_models) -> None:
    from cai.preferences import load_hh
    from cai.resources import data_path

    demos = helpful_demonstrations("hh_helpful.jsonl", 3, seed=0)
    assert len(demos) == 3 and all(chat[-1]["role"] == "assistant" for chat in demos)
    hh_prompts = [row.prompt for row in load_hh(data_path("hh_helpful.jsonl"))[0]]
    assert all(chat[:-1] in hh_prompts for chat in demos)
    assert len(helpful_demonstrations("hh_helpful.jsonl", 10_000, seed=0)) == len(hh_prompts)

    config = SFTConfig(lora=None, train=FAST, helpful_demos=3)
    trainer, mixed = build_sft_trainer(config, str(tiny_models.causal_lm), examples(), tmp_path, seed=0)
    assert mixed == 3 and len(trainer.train_dataset) == len(examples()) + 3
    assert sum(row["prompt"] in hh_prompts for row in trainer.train_dataset) == 3


def test_rerun_resumes_from_the_newest_checkpoint(tmp_path: Path, tiny_models) -> None:
    first = train_sft(
        SFTConfig(lora=None, train=FAST), str(tiny_models.causal_lm), examples(), tmp_path, seed=0
    )
    assert first.resumed_from is None
    assert (tmp_path / "checkpoints" / "checkpoint-2").is_dir()

    longer = SFTConfig(lora=None, train=FAST.model_copy(update={"max_steps": 4}))
    second = train_sft(longer, str(tiny_models.causal_lm), examples(), tmp_path, seed=0)
    assert second.resumed_from == str(tmp_path / "checkpoints" / "checkpoint-2")
    assert second.steps == 4
    assert second.train_loss[:2] == first.train_loss and len(second.train_loss) == 4
    state = json.loads((tmp_path / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
