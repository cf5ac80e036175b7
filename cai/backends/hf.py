"""The transformers backend: the default engine, on CPU or GPU.

Generation is batched with left padding, longest prompts first, so a batch wastes little
padding, and prefilled in chunks of similar length (see `_prefill`). Scoring lives in
`cai.backends.hf_score` (shared prefixes computed once, tails packed behind them), mixed in here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from cai.backends.base import Chat, Completion, Sample, Usage, encode_chat, encode_for_generation
from cai.backends.hf_kernels import can_pack_linears, growing_cache, pack_linears
from cai.backends.hf_score import ScoringMixin
from cai.sections import HFEngine, SamplingParams

log = logging.getLogger("cai.backends.hf")

PREFILL_ROWS = 16  # rows per prefill chunk in generation (a chunk is padded to its own longest)


def pick_device(requested: str) -> str:
    import torch

    if requested != "auto":
        return requested
    if not torch.cuda.is_available():
        return "cpu"
    from cai.world import local_cuda_device

    return local_cuda_device()  # under a launch each rank its own GPU (LOCAL_RANK); cuda:0 alone


def pick_dtype(requested: str, device: str, purpose: str):
    """bf16 for generation where the hardware has it (1.7x faster on CPUs with AVX512-BF16/AMX),
    fp32 otherwise and for scoring on CPU.

    Soft labels are small log-prob margins; on CPU bf16 flipped a quarter of near-tie
    verdicts of SmolLM2, so scoring stays in fp32 unless the user asks otherwise.
    """
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    from cai.hardware import cpu_has_fast_bf16

    return torch.bfloat16 if purpose == "generate" and cpu_has_fast_bf16() else torch.float32


class HFBackend(ScoringMixin):
    """Generation and scoring with transformers. See the module docstring for the strategy."""

    def __init__(
        self,
        model: str,
        config: HFEngine | None = None,
        *,
        model_object: Any = None,
        tokenizer: Any = None,
    ) -> None:
        from transformers import AutoTokenizer

        from cai.models import resolve_model

        self.config = config or HFEngine()
        self.model_id = model
        self.usage = Usage()
        self.device = pick_device(self.config.device)
        self._models: dict[Any, Any] = {}
        if model_object is not None:
            self._path = getattr(model_object, "name_or_path", model)
            self._models[model_object.dtype] = model_object
            self.device = str(model_object.device)
            self._shared_object = True
        else:
            self._path = resolve_model(model)
            self._shared_object = False
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(self._path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.gen_dtype = pick_dtype(self.config.dtype, self.device, "generate")
        self.score_dtype = pick_dtype(self.config.score_dtype, self.device, "score")
        if self._shared_object:  # a live model being trained: use it as it is, never copy it
            self.gen_dtype = self.score_dtype = model_object.dtype

    # ------------------------------------------------------------------ model handling

    def model(self, dtype) -> Any:
        """The model in `dtype`, loaded on first use (two dtypes = two copies, by design)."""
        if dtype not in self._models:
            import torch
            from transformers import AutoModelForCausalLM

            from cai.backends.hf_kernels import ATTENTION, register_attention
            from cai.models import quiet_loading

            if self.config.attn_implementation == ATTENTION:
                register_attention()
            with quiet_loading():
                model = AutoModelForCausalLM.from_pretrained(
                    self._path,
                    dtype=dtype,
                    attn_implementation=self.config.attn_implementation,
                    trust_remote_code=False,
                )
            model.to(self.device).eval()
            cpu_fp32 = self.device == "cpu" and dtype == torch.float32
            if self.config.pack_linears and cpu_fp32 and can_pack_linears():
                pack_linears(model, batch_hint=self.config.batch_size)
            self._models[dtype] = model
        return self._models[dtype]

    @property
    def max_length(self) -> int:
        if self.config.max_length:
            return self.config.max_length
        model = next(iter(self._models.values()), None)
        if model is not None:
            return int(getattr(model.config, "max_position_embeddings", 4096))
        from transformers import AutoConfig

        return int(getattr(AutoConfig.from_pretrained(self._path), "max_position_embeddings", 4096))

    def close(self) -> None:
        self._models.clear()

    def encode_chat(self, chat: Chat, prefix: str = "") -> list[int]:
        return encode_chat(self.tokenizer, chat, prefix)

    # ------------------------------------------------------------------ generation

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Completion]:
        import torch

        encoded, results = encode_for_generation(self.encode_chat, chats, params, self.max_length)
        order = sorted(encoded, key=lambda i: -len(encoded[i]))
        model = self.model(self.gen_dtype)
        devices = [torch.device(self.device).index or 0] if self.device.startswith("cuda") else []
        with torch.random.fork_rng(devices=devices):
            if params.seed is not None:
                torch.manual_seed(params.seed)
            for start in range(0, len(order), self.config.batch_size):
                batch = order[start : start + self.config.batch_size]
                try:
                    outputs = self._generate_batch(model, [encoded[i] for i in batch], params)
                except (RuntimeError, ValueError) as exc:
                    if len(batch) == 1:
                        log.warning("generation failed for item %d: %s", batch[0], exc)
                        outputs = [Completion(prompt_tokens=len(encoded[batch[0]]), error=str(exc))]
                    else:  # retry one by one so only the culprit fails
                        log.warning("batch generation failed (%s); retrying items one by one", exc)
                        outputs = []
                        for i in batch:
                            try:
                                outputs += self._generate_batch(model, [encoded[i]], params)
                            except (RuntimeError, ValueError) as item_exc:
                                outputs.append(Completion(prompt_tokens=len(encoded[i]), error=str(item_exc)))
                for i, completion in zip(batch, outputs, strict=True):
                    results[i] = completion
        self.usage.generate_calls += 1
        for completion in results:
            assert completion is not None
            self.usage.prompt_tokens += completion.prompt_tokens
            self.usage.completion_tokens += sum(s.tokens for s in completion.samples)
            self.usage.failed_items += completion.error is not None
        return results  # type: ignore[return-value]

    def _generate_batch(self, model, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        import torch

        tok = self.tokenizer
        width = max(len(p) for p in prompts)
        pad = tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        eos = model.generation_config.eos_token_id or tok.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        kwargs: dict[str, Any] = dict(
            max_new_tokens=params.max_new_tokens,
            num_return_sequences=params.n,
            pad_token_id=pad,
            eos_token_id=sorted(eos_ids),
            repetition_penalty=params.repetition_penalty if params.repetition_penalty != 1.0 else None,
        )
        if params.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=None)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=tok)
        cache = growing_cache(model.config)
        if cache is not None:
            kwargs["past_key_values"] = cache
            if len(prompts) * params.n > PREFILL_ROWS and width > 1:
                # the rows, as generate would expand them, are prefilled here in chunks
                rows = [p for p in prompts for _ in range(params.n)]
                input_ids = input_ids.repeat_interleave(params.n, dim=0)
                attention = attention.repeat_interleave(params.n, dim=0)
                kwargs["num_return_sequences"] = 1
                with torch.inference_mode():
                    self._prefill(model, rows, input_ids, attention, cache)
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        new = out[:, width:].tolist()
        completions = []
        for row, prompt in enumerate(prompts):
            samples = [self._to_sample(new[row * params.n + k], eos_ids, params) for k in range(params.n)]
            completions.append(Completion(samples=samples, prompt_tokens=len(prompt)))
        return completions

    def _prefill(self, model, rows: list[list[int]], input_ids, attention, cache) -> None:
        """Fill `cache` with every row's prompt but its last token, in chunks of similar length.

        One left-padded prefill of the whole batch computes the padding too: 25% of the tokens
        for the benchmark's 64 chats. Rows are sorted longest first, so a chunk of consecutive
        rows is padded only to its own longest; its keys and values are written right-aligned
        into the batch-wide cache, where the columns left of them are masked padding (zeros).
        generate() then finds the cache one token short of the prompt and runs just that token,
        with the same positions (generate's own formula: mask cumsum - 1).
        """
        import torch

        width = input_ids.shape[1]
        parts: list[list[Any]] = []  # per chunk, per layer: (keys, values)
        for start in range(0, len(rows), PREFILL_ROWS):
            chunk = slice(start, start + PREFILL_ROWS)
            own = max(len(r) for r in rows[chunk])
            ids, mask = input_ids[chunk, width - own : -1], attention[chunk, width - own : -1]
            positions = (mask.long().cumsum(-1) - 1).masked_fill_(mask == 0, 1)
            out = model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
            )
            parts.append([(layer.keys, layer.values) for layer in out.past_key_values.layers])
            del out

        def widen(tensor):  # left-pad the sequence dimension with zeros to the batch's width
            return torch.nn.functional.pad(tensor, (0, 0, width - 1 - tensor.shape[-2], 0))

        for index, layer in enumerate(cache.layers):
            keys = torch.cat([widen(chunk[index][0]) for chunk in parts])
            values = torch.cat([widen(chunk[index][1]) for chunk in parts])
            for chunk in parts:
                chunk[index] = None  # freed as we go: peak memory ~ one extra layer
            layer.update(keys, values)

    def _to_sample(self, tokens: list[int], eos_ids: set[int], params: SamplingParams) -> Sample:
        """Cut at EOS and at the first stop string; report why the sample ended."""
        finish, ender = "length", None
        kept = tokens
        for position, token in enumerate(tokens):
            if token in eos_ids:
                kept, finish, ender = tokens[:position], "stop", token
                break
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        if params.stop:
            cuts = [text.find(s) for s in params.stop if s and s in text]
            if cuts:
                text, finish = text[: min(cuts)], "stop"
        return Sample(
            text=text.strip(), tokens=len(kept), finish_reason=finish, token_ids=kept, stop_token_id=ender
        )
