"""PPO keeps the EOS token that really ended each rollout, on models with several EOS ids.

Qwen2.5's generation_config lists two EOS ids (<|im_end|> and <|endoftext|>). The engines cut the
EOS off a sample's tokens; PPO puts it back, because emitting it was an action. It used to put
back generation_config's *first* EOS whatever token had ended the sample, so the log-probs, the
KL and the update were computed for a token the policy never produced.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cai.backends.base import Completion
from cai.sections import SamplingParams

CHAT = [{"role": "user", "content": "How do I bake bread?"}]
PARAMS = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1.0, seed=0)


@pytest.fixture(scope="module")
def two_eos_lm(tiny_models, tmp_path_factory):
    """The tiny LM with generation_config.eos_token_id = [<|im_end|>, <|endoftext|>], like Qwen2.5."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("two-eos")
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.causal_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_models.causal_lm)
    first, second = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert first != second and tokenizer.eos_token_id == first
    model.generation_config.eos_token_id = [first, second]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    words = tokenizer("stay safe", add_special_tokens=False)["input_ids"]
    return SimpleNamespace(path=str(folder), tokenizer=tokenizer, first=first, second=second, words=words)


def test_hf_samples_say_which_eos_ended_them(two_eos_lm):
    from cai.backends.hf import HFBackend

    backend = HFBackend(two_eos_lm.path)
    eos_ids = set(backend.model(backend.gen_dtype).generation_config.eos_token_id)
    assert eos_ids == {two_eos_lm.first, two_eos_lm.second}
    words, second = two_eos_lm.words, two_eos_lm.second
    by_second = backend._to_sample(words + [second, words[0]], eos_ids, PARAMS)
    assert by_second.finish_reason == "stop"
    assert by_second.token_ids == words and by_second.stop_token_id == second
    cut = backend._to_sample(words, eos_ids, PARAMS)
    assert cut.finish_reason == "length" and cut.stop_token_id is None


def test_vllm_samples_say_which_eos_ended_them(two_eos_lm):
    """vLLM reports generation_config's extra EOS ids as stop tokens (stop_reason = the id)."""
    from cai.backends.vllm import VLLMBackend

    fake_llm = SimpleNamespace(
        get_tokenizer=lambda: two_eos_lm.tokenizer,
        llm_engine=SimpleNamespace(model_config=SimpleNamespace(max_model_len=128)),
    )
    backend = VLLMBackend(two_eos_lm.path, llm=fake_llm)
    words, first, second = two_eos_lm.words, two_eos_lm.first, two_eos_lm.second

    def output(tokens, finish, reason):
        return SimpleNamespace(token_ids=tokens, text="stay safe", finish_reason=finish, stop_reason=reason)

    by_second = backend._to_sample(output(words + [second], "stop", second))
    assert by_second.token_ids == words and by_second.stop_token_id == second
    by_first = backend._to_sample(output(words + [first], "stop", None))
    assert by_first.token_ids == words and by_first.stop_token_id == first
    cut = backend._to_sample(output(words, "length", None))
    assert cut.token_ids == words and cut.stop_token_id is None and cut.finish_reason == "length"


def test_ppo_trains_on_the_eos_that_ended_the_sample(two_eos_lm, tmp_path, monkeypatch):
    """A PPO step on the two-EOS model with a scripted rollout that ends with the second EOS."""
    from accelerate.state import AcceleratorState

    from cai.backends.hf import HFBackend
    from cai.train.ppo import trainer as trainer_module
    from cai.train.ppo.config import PPOConfig

    AcceleratorState._reset_state(True)
    config = PPOConfig(
        steps=1,
        rollout_batch_size=3,
        mini_batch_size=3,
        ppo_epochs=1,
        lora=None,
        sampling=PARAMS,
        precision="fp32",
        save_every=0,
    )
    trainer = trainer_module.PPOTrainer(
        config,
        policy=two_eos_lm.path,
        reward_fn=lambda chats, texts: [1.0] * len(texts),
        prompts=[CHAT[0]["content"]] * 3,
        output_dir=tmp_path / "run",
    )
    assert trainer.eos_id == two_eos_lm.first  # the fallback is generation_config's first EOS
    words, first, second = two_eos_lm.words, two_eos_lm.first, two_eos_lm.second
    backend = HFBackend(two_eos_lm.path)
    eos_ids = {first, second}
    scripted = [words + [second, first], words + [first], words]  # second EOS, first EOS, cut

    def generate(chats, params):
        return [Completion(samples=[backend._to_sample(list(t), eos_ids, params)]) for t in scripted]

    monkeypatch.setattr(trainer.engine, "generate", generate)
    batches = []
    real_collate = trainer_module.collate

    def spy(*args, **kwargs):
        batches.append(real_collate(*args, **kwargs))
        return batches[-1]

    monkeypatch.setattr(trainer_module, "collate", spy)
    row = trainer.ppo_step(0)
    AcceleratorState._reset_state(True)

    (batch,) = batches
    n = len(words)
    assert batch.response_ids[0, : n + 1].tolist() == words + [second]
    assert batch.response_ids[1, : n + 1].tolist() == words + [first]
    assert batch.response_ids[2, :n].tolist() == words
    assert batch.mask.sum(dim=1).tolist() == [n + 1, n + 1, n]
    assert batch.ended.tolist() == [True, True, False]
    # every real token (each EOS included) has a finite rollout-time log-prob
    assert batch.old_logprobs is not None
    assert torch.isfinite(batch.old_logprobs[batch.mask]).all()
    assert row["ended_with_eos"] == pytest.approx(2 / 3)
