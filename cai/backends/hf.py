"""The transformers backend: the default engine, on CPU or GPU.

Generation is batched with left padding, longest prompts first, so a batch wastes little
padding. Scoring groups prompts that share a token prefix (an ensemble of principles asks about
the same conversation and responses, with the principle placed last) and computes that prefix
once; the differing tails then run packed into one row behind it (block-diagonal mask), so an
ensemble of 16 principles computes the prefix plus 16 tails and no padding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cai.backends.base import Chat, ChoiceScores, Completion, Sample, ScorePrompt, Usage
from cai.backends.hf_kernels import can_pack_linears, growing_cache, pack_linears
from cai.sections import HFEngine, SamplingParams

log = logging.getLogger("cai.backends.hf")

MIN_SHARED_PREFIX = 16  # tokens; below this a prefix pass costs more than it saves
PREFILL_ROWS = 16  # rows per prefill chunk in generation (a chunk is padded to its own longest)
PACK_TOKENS = 512  # most tail tokens run in one packed row behind a shared prefix
PREFIX_SHARE = 0.5  # a group's shared prefix must cover at least this share of its shortest member


def pick_device(requested: str) -> str:
    import torch

    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


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


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class _ScoreJob:
    """One (prompt, option) continuation to score: the tokens and how many end in the option."""

    item: int
    option: int
    tokens: list[int]
    option_len: int  # 0 when the option is scored from the prompt's last position alone


class HFBackend:
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
        text = self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text + prefix, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------ generation

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Completion]:
        import torch

        results: list[Completion | None] = [None] * len(chats)
        encoded: dict[int, list[int]] = {}
        limit = self.max_length
        for index, chat in enumerate(chats):
            try:
                ids = self.encode_chat(chat)
            except Exception as exc:  # noqa: BLE001 - a malformed chat fails only its own item
                results[index] = Completion(error=f"chat template failed: {exc}")
                continue
            if len(ids) + params.max_new_tokens > limit:
                results[index] = Completion(
                    prompt_tokens=len(ids),
                    error=f"prompt of {len(ids)} tokens + {params.max_new_tokens} new tokens exceeds "
                    f"the maximum length {limit}",
                )
                continue
            encoded[index] = ids
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
        finish = "length"
        kept = tokens
        for position, token in enumerate(tokens):
            if token in eos_ids:
                kept, finish = tokens[:position], "stop"
                break
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        if params.stop:
            cuts = [text.find(s) for s in params.stop if s and s in text]
            if cuts:
                text, finish = text[: min(cuts)], "stop"
        return Sample(text=text.strip(), tokens=len(kept), finish_reason=finish, token_ids=kept)

    # ------------------------------------------------------------------ scoring

    def score_choices(self, prompts: Sequence[ScorePrompt], options: Sequence[str]) -> list[ChoiceScores]:
        import torch

        if not options:
            raise ValueError("score_choices needs at least one option")
        tok = self.tokenizer
        option_ids = [tok(o, add_special_tokens=False)["input_ids"] for o in options]
        if any(not ids for ids in option_ids):
            raise ValueError(f"an option tokenizes to nothing: {list(options)!r}")
        single = all(len(ids) == 1 for ids in option_ids)
        results: list[ChoiceScores | None] = [None] * len(prompts)
        jobs: list[_ScoreJob] = []
        limit = self.max_length
        for index, prompt in enumerate(prompts):
            try:
                ids = self.encode_chat(prompt.chat, prompt.assistant_prefix)
            except Exception as exc:  # noqa: BLE001 - fails only this item
                results[index] = ChoiceScores.failed(options, f"chat template failed: {exc}")
                continue
            longest = len(ids) + max(len(o) for o in option_ids)
            if longest > limit:
                results[index] = ChoiceScores.failed(
                    options, f"prompt of {len(ids)} tokens exceeds the maximum length {limit}"
                )
                continue
            if single:
                jobs.append(_ScoreJob(index, -1, ids, 0))
            else:
                jobs += [_ScoreJob(index, k, ids + o, len(o)) for k, o in enumerate(option_ids)]
        model = self.model(self.score_dtype)
        logprobs: dict[tuple[int, int], float] = {}
        cached: dict[int, int] = {}
        with torch.inference_mode():
            for group, prefix_len in self._groups(jobs):
                try:
                    values = self._score_group(model, group, prefix_len, option_ids, single)
                except (RuntimeError, ValueError) as exc:
                    log.warning("scoring failed for %d sequences: %s", len(group), exc)
                    for job in group:
                        results[job.item] = ChoiceScores.failed(options, f"scoring failed: {exc}")
                    continue
                for job, value in zip(group, values, strict=True):
                    if single:
                        for k, v in enumerate(value):
                            logprobs[(job.item, k)] = v
                    else:
                        logprobs[(job.item, job.option)] = value[0]
                    cached[job.item] = prefix_len if len(group) > 1 else 0
        self.usage.score_calls += 1
        for job in jobs:
            if results[job.item] is not None and not results[job.item].ok:  # type: ignore[union-attr]
                continue
            prompt_tokens = len(job.tokens) - job.option_len
            results[job.item] = ChoiceScores.from_logprobs(
                options,
                [logprobs[(job.item, k)] for k in range(len(options))],
                prompt_tokens=prompt_tokens,
                cached_tokens=cached.get(job.item, 0),
            )
        for scores in results:
            assert scores is not None
            self.usage.failed_items += not scores.ok
        return results  # type: ignore[return-value]

    def _groups(self, jobs: list[_ScoreJob]):
        """Yield (group, shared prefix length): prefix-sharing groups first, then plain batches.

        Sorting the token lists puts sequences with a common prefix next to each other; within
        a sorted run the prefix shared by all is the common prefix of its first and last member.
        """
        order = sorted(jobs, key=lambda j: j.tokens)
        clusters: list[list[_ScoreJob]] = []
        for job in order:
            if clusters and self.config.prefix_reuse and self._worth_sharing(clusters[-1], job):
                clusters[-1].append(job)
            else:
                clusters.append([job])
        size = self.config.score_batch_size
        loners = sorted((c[0] for c in clusters if len(c) == 1), key=lambda j: len(j.tokens))  # less padding
        batches = [(c[i : i + size], True) for c in clusters if len(c) > 1 for i in range(0, len(c), size)]
        # loners share only short prefixes (the system prompt): one plain padded batch each
        batches += [(loners[i : i + size], False) for i in range(0, len(loners), size)]
        for group, clustered in batches:
            prefix = 0
            if clustered and len(group) > 1:
                shared = _common_prefix(group[0].tokens, group[-1].tokens)
                if shared >= MIN_SHARED_PREFIX:
                    # every sequence keeps its option and the token before it (whose logits
                    # predict the option's first token) out of the shared prefix
                    prefix = min(shared, min(len(j.tokens) - j.option_len - 1 for j in group))
            self.usage.scored_tokens += sum(len(j.tokens) for j in group) - prefix * (len(group) - 1)
            self.usage.cached_tokens += prefix * (len(group) - 1)
            yield group, prefix

    @staticmethod
    def _worth_sharing(cluster: list[_ScoreJob], job: _ScoreJob) -> bool:
        """Join a cluster only if the prefix shared with ALL its members is most of both sequences.

        Everything shares the chat template's system prompt, and an ensemble's two presentation
        orders share the conversation; grouping on such short prefixes would compute little
        once and a lot twice. Requiring the shared part to be at least half of the shorter
        sequence keeps the groups that matter: one (label, order) under many principles.
        """
        shared = _common_prefix(cluster[0].tokens, job.tokens)  # sorted: the minimum over the cluster
        shortest = min(len(job.tokens), min(len(j.tokens) for j in cluster))
        return shared >= max(MIN_SHARED_PREFIX, PREFIX_SHARE * shortest)

    def _score_group(self, model, group: list[_ScoreJob], prefix_len: int, option_ids, single: bool):
        """Log-probs for one group: packed behind a shared prefix, or left-padded side by side."""
        if prefix_len and len(group) > 1:
            logp, ends = self._packed_logprobs(model, group, prefix_len, single)
        else:
            logp, ends = self._padded_logprobs(model, group, single)
        return _read_options(logp, ends, group, option_ids, single)

    def _padded_logprobs(self, model, group: list[_ScoreJob], single: bool):
        """One left-padded batch (no shared prefix).

        Left padding aligns every sequence's end, so the positions whose logits are needed (the
        last one, or the last few for multi-token options) are the same columns in every row
        and `logits_to_keep` avoids computing the vocabulary projection anywhere else.
        Returns (log-probs (1, G*keep, V), the column after each row's last kept position).
        """
        import torch

        device = self.device
        width = max(len(j.tokens) for j in group)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(j.tokens)) + j.tokens for j in group], device=device)
        mask = torch.tensor(
            [[0] * (width - len(j.tokens)) + [1] * len(j.tokens) for j in group], device=device
        )
        keep = 1 if single else max(j.option_len for j in group) + 1
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits.float()
        logp = torch.log_softmax(logits, dim=-1).reshape(1, len(group) * keep, -1)
        return logp, [(row + 1) * keep for row in range(len(group))]

    def _packed_logprobs(self, model, group: list[_ScoreJob], prefix_len: int, single: bool):
        """The shared prefix once, then every sequence's own tail packed into ONE row.

        A block-diagonal mask lets each tail see the prefix and its own earlier tokens only, and
        position ids restart at the prefix length for each tail, so every tail is computed
        exactly as if it followed the prefix alone. Packing computes no padding and keeps one
        copy of the prefix's KV cache (a padded batch would copy it per sequence): the tokens
        computed are the prefix plus the tails, the arithmetic floor of an ensemble's cost.
        Returns (log-probs (1, K, V) at the kept positions, the end of each tail's kept slice).
        """
        import torch

        device = self.device
        prefix = torch.tensor([group[0].tokens[:prefix_len]], device=device)
        # logits_to_keep=1: the prefix's own logits are never read (the vocabulary projection of
        # every prefix position would cost ~20% of the pass)
        cache = model(input_ids=prefix, use_cache=True, logits_to_keep=1).past_key_values
        pieces, ends, offset = [], [], 0
        for pack in _packs([len(j.tokens) - prefix_len for j in group], PACK_TOKENS):
            extra = cache.get_seq_length() - prefix_len
            if extra:
                cache.crop(-extra)  # drop the previous pack's tails
            logp, pack_ends = self._run_pack(model, cache, prefix_len, [group[i] for i in pack], single)
            pieces.append(logp)
            ends += [offset + end for end in pack_ends]
            offset += logp.shape[1]
        return torch.cat(pieces, dim=1), ends

    def _run_pack(self, model, cache, prefix_len: int, jobs: list[_ScoreJob], single: bool):
        """One packed row of tails after the cached prefix: (log-probs (1, K, V), slice ends)."""
        import torch

        device = self.device
        tails = [j.tokens[prefix_len:] for j in jobs]
        total = sum(len(t) for t in tails)
        dtype = next(model.parameters()).dtype
        mask = torch.full((total, prefix_len + total), torch.finfo(dtype).min, dtype=dtype, device=device)
        mask[:, :prefix_len] = 0
        positions, keep_index, ends = [], [], []
        start = 0
        for job, tail in zip(jobs, tails, strict=True):
            n = len(tail)
            block = torch.ones(n, n, dtype=torch.bool, device=device).tril()
            mask[start : start + n, prefix_len + start : prefix_len + start + n].masked_fill_(block, 0)
            positions += range(prefix_len, prefix_len + n)
            wanted = 1 if single else job.option_len + 1
            keep_index += range(start + n - wanted, start + n)
            ends.append(len(keep_index))
            start += n
        logits = model(
            input_ids=torch.tensor([sum(tails, [])], device=device),
            attention_mask=mask[None, None],
            position_ids=torch.tensor([positions], device=device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=torch.tensor(keep_index, device=device),
        ).logits.float()
        return torch.log_softmax(logits, dim=-1), ends


def _packs(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive runs of tails whose total stays within `budget` tokens (at least one each).

    A pack's attention is dense over all its tails (masked, but computed), so packing everything
    into one row would grow quadratically; bounded packs keep it near the linear cost.
    """
    packs: list[list[int]] = [[]]
    used = 0
    for index, length in enumerate(lengths):
        if packs[-1] and used + length > budget:
            packs.append([])
            used = 0
        packs[-1].append(index)
        used += length
    return packs


def _read_options(logp, ends: list[int], group: list[_ScoreJob], option_ids, single: bool):
    """Each job's option log-probs from its kept positions (`ends[row]` = one past its last)."""
    import torch

    device = logp.device
    if single:
        columns = torch.tensor([o[0] for o in option_ids], device=device)
        last = torch.tensor([end - 1 for end in ends], device=device)
        return logp[0, last, :].index_select(-1, columns).tolist()  # (G, n_options)
    values = []
    for row, job in enumerate(group):
        target = job.tokens[-job.option_len :]
        # the logits at a kept position predict the next token; the option fills the last L
        rows = logp[0, ends[row] - 1 - job.option_len : ends[row] - 1, :]  # (L, V)
        values.append([float(rows.gather(-1, torch.tensor(target, device=device)[:, None]).sum())])
    return values
