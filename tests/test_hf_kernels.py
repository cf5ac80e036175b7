"""cai_sdpa attention, the growing KV cache and packed linears must change speed, not results."""

from __future__ import annotations

import pytest

from cai.sections import SamplingParams

CHATS = [
    [{"role": "user", "content": "Tell me a long story about a harbour and its lighthouse keeper."}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "How do owls see at night? Please be brief."}],
    [{"role": "user", "content": "Name three rivers."}],
    [{"role": "user", "content": "Why is the sky blue, and why are sunsets red and orange instead?"}],
]


def _backend(path: str, attention: str, pack: bool):
    from cai.backends.hf import HFBackend
    from cai.sections import HFEngine

    engine = HFEngine(
        dtype="float32", score_dtype="float32", attn_implementation=attention, pack_linears=pack
    )
    return HFBackend(path, engine)


def test_the_tiny_model_uses_grouped_query_attention(lively_tiny_lm):
    """Otherwise the tests below would not exercise the grouped path at all."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(lively_tiny_lm)
    assert config.num_attention_heads > config.num_key_value_heads


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=24, temperature=0),
        SamplingParams(max_new_tokens=16, temperature=1.0, n=2, seed=3),
    ],
    ids=["greedy", "sampled-n2"],
)
@pytest.mark.parametrize("prefill_rows", [1, 2, 16], ids=["prefill-per-row", "prefill-by-2", "one-prefill"])
def test_generation_matches_transformers_sdpa_and_dynamic_cache(
    lively_tiny_lm, params, prefill_rows, monkeypatch
):
    """Chunked prefill included: 5 chats of different lengths (x n), chunks of 1, 2 or all rows."""
    from cai.backends import hf

    monkeypatch.setattr(hf, "PREFILL_ROWS", prefill_rows)
    chunked = []
    original = hf.HFBackend._prefill
    monkeypatch.setattr(hf.HFBackend, "_prefill", lambda self, *a: chunked.append(1) or original(self, *a))
    fast = _backend(lively_tiny_lm, "cai_sdpa", pack=True).generate(CHATS, params)
    assert bool(chunked) == (len(CHATS) * params.n > prefill_rows)
    monkeypatch.setattr(hf, "growing_cache", lambda config: None)  # transformers' own cache and prefill
    plain = _backend(lively_tiny_lm, "sdpa", pack=False).generate(CHATS, params)
    for a, b in zip(fast, plain, strict=True):
        assert [s.token_ids for s in a.samples] == [s.token_ids for s in b.samples]
    assert sum(s.tokens for c in fast for s in c.samples) > 0


def test_scores_match_transformers_sdpa(lively_tiny_lm):
    from cai.backends.base import ScorePrompt

    prompts = [
        ScorePrompt(
            chat=chat + [{"role": "assistant", "content": "Sure."}, {"role": "user", "content": "A or B?"}]
        )
        for chat in CHATS
    ]
    fast = _backend(lively_tiny_lm, "cai_sdpa", pack=True).score_choices(prompts, ["A", "B"])
    plain = _backend(lively_tiny_lm, "sdpa", pack=False).score_choices(prompts, ["A", "B"])
    for a, b in zip(fast, plain, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_growing_layer_behaves_like_dynamic_layer():
    """Appends past the first capacity, crop (both conventions), reorder and repeat the batch."""
    import torch
    from transformers.cache_utils import DynamicLayer

    from cai.backends.hf_kernels import _growing_layer_class

    grow, plain = _growing_layer_class()(), DynamicLayer()
    generator = torch.Generator().manual_seed(0)

    def step(n: int) -> None:
        k, v = (torch.randn(3, 2, n, 4, generator=generator) for _ in range(2))
        a, b = grow.update(k, v), plain.update(k, v)
        torch.testing.assert_close(a[0], b[0])
        torch.testing.assert_close(a[1], b[1])

    step(50)
    for _ in range(20):  # 70 tokens: past the first 64-token capacity
        step(1)
    assert grow.get_seq_length() == plain.get_seq_length() == 70
    grow.crop(-5)
    plain.crop(-5)
    step(2)
    assert grow.get_seq_length() == 67
    grow.batch_select_indices(torch.tensor([2, 0]))
    plain.batch_select_indices(torch.tensor([2, 0]))
    k, v = (torch.randn(2, 2, 1, 4, generator=generator) for _ in range(2))
    torch.testing.assert_close(grow.update(k, v)[0], plain.update(k, v)[0])
    grow.batch_repeat_interleave(2)
    plain.batch_repeat_interleave(2)
    torch.testing.assert_close(grow.keys, plain.keys)
    torch.testing.assert_close(grow.values, plain.values)
    grow.reset()
    assert grow.get_seq_length() == 0


def test_growing_cache_is_only_used_for_plain_full_attention_layers():
    from transformers import LlamaConfig, MistralConfig

    from cai.backends.hf_kernels import growing_cache

    cache = growing_cache(LlamaConfig(num_hidden_layers=2))
    assert cache is not None and [type(layer).__name__ for layer in cache.layers] == ["GrowingLayer"] * 2
    assert growing_cache(MistralConfig(num_hidden_layers=2, sliding_window=16)) is None


def test_packed_linears_match_the_plain_model(lively_tiny_lm):
    import torch
    from transformers import AutoModelForCausalLM

    from cai.backends.hf_kernels import can_pack_linears, pack_linears

    if not can_pack_linears():
        pytest.skip("this torch build has no oneDNN packed linear")
    plain = AutoModelForCausalLM.from_pretrained(lively_tiny_lm, dtype=torch.float32).eval()
    packed = AutoModelForCausalLM.from_pretrained(lively_tiny_lm, dtype=torch.float32).eval()
    linears = sum(type(m) is torch.nn.Linear for m in packed.modules())
    assert pack_linears(packed) == linears > 0
    assert not any(type(m) is torch.nn.Linear for m in packed.modules())
    ids = torch.randint(0, packed.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(packed(ids).logits, plain(ids).logits, atol=1e-4, rtol=1e-4)


def test_the_backend_packs_only_models_it_owns(lively_tiny_lm):
    import torch
    from transformers import AutoModelForCausalLM

    from cai.backends.hf import HFBackend
    from cai.backends.hf_kernels import can_pack_linears
    from cai.sections import HFEngine

    if not can_pack_linears():
        pytest.skip("this torch build has no oneDNN packed linear")
    own = HFBackend(lively_tiny_lm, HFEngine(dtype="float32"))
    assert not any(type(m) is torch.nn.Linear for m in own.model(torch.float32).modules())
    unpacked = HFBackend(lively_tiny_lm, HFEngine(dtype="float32", pack_linears=False))
    assert any(type(m) is torch.nn.Linear for m in unpacked.model(torch.float32).modules())
    live = AutoModelForCausalLM.from_pretrained(lively_tiny_lm, dtype=torch.float32)
    shared = HFBackend(lively_tiny_lm, model_object=live)
    shared.generate(CHATS[:1], SamplingParams(max_new_tokens=2, temperature=0))
    assert any(type(m) is torch.nn.Linear for m in live.modules())  # a model being trained stays as it is
