"""Scoring choices with transformers: shared prefixes computed once, tails packed behind them.

Mixed into `cai.backends.hf.HFBackend`, which provides the model, tokenizer and usage counters.
Scoring groups prompts that share a token prefix (an ensemble of principles asks about the same
conversation and responses, with the principle placed last) and computes that prefix once; the
differing tails then run packed into one row behind it (block-diagonal mask), so an ensemble of
16 principles computes the prefix plus 16 tails and no padding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from cai.backends.base import (
    ChoiceScores,
    ContinuationPrompt,
    ContinuationScore,
    ScorePrompt,
    encode_continuations,
    encode_for_scoring,
    option_token_ids,
)

log = logging.getLogger("cai.backends.hf")

MIN_SHARED_PREFIX = 16  # tokens; below this a prefix pass costs more than it saves
PACK_TOKENS = 512  # most tail tokens run in one packed row behind a shared prefix
PREFIX_SHARE = 0.5  # a group's shared prefix must cover at least this share of its shortest member


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


class ScoringMixin:
    """`score_choices` for HFBackend (see the module docstring for the strategy).

    It uses the backend's `config`, `device`, `tokenizer`, `usage`, `max_length`, `model(dtype)`,
    `score_dtype` and `encode_chat(chat, prefix)`.
    """

    def score_choices(self, prompts: Sequence[ScorePrompt], options: Sequence[str]) -> list[ChoiceScores]:
        import torch

        if not options:
            raise ValueError("score_choices needs at least one option")
        option_ids, single = option_token_ids(self.tokenizer, options)
        room = max(len(o) for o in option_ids)
        encoded, results = encode_for_scoring(self.encode_chat, prompts, options, room, self.max_length)
        jobs: list[_ScoreJob] = []
        for index, ids in encoded.items():
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

    def score_continuations(self, prompts: Sequence[ContinuationPrompt]) -> list[ContinuationScore]:
        """Each continuation's summed log-prob, every shared prefix computed once (`hf_tree`).

        The likelihood judge's sequences share prefixes at several depths (the conditioning text
        across labels, a label's conversation across its K responses); the trie packing of
        `cai.backends.hf_tree` computes each shared token once. With `prefix_reuse: false` every
        sequence runs alone in plain padded batches (the reference the benchmark compares with).
        """
        import torch

        from cai.backends.hf_tree import Sequence_, score_tree

        encoded, results = encode_continuations(self.encode_chat, self.tokenizer, prompts, self.max_length)
        model = self.model(self.score_dtype)
        with torch.inference_mode():
            if self.config.prefix_reuse:
                sequences = [Sequence_(i, p + t, len(t)) for i, (p, t) in encoded.items()]
                try:
                    scored = score_tree(model, sequences, self.device)
                except (RuntimeError, ValueError) as exc:
                    log.warning("scoring failed for %d sequences: %s", len(sequences), exc)
                    scored = {}
                    for seq in sequences:
                        results[seq.item] = ContinuationScore(error=f"scoring failed: {exc}")
                for index, (value, computed, shared) in scored.items():
                    prompt, tail = encoded[index]
                    self.usage.scored_tokens += computed
                    self.usage.cached_tokens += shared
                    results[index] = ContinuationScore(
                        logprob=value, tokens=len(tail), prompt_tokens=len(prompt), cached_tokens=shared
                    )
            else:
                self._continuations_alone(model, encoded, results)
        self.usage.score_calls += 1
        for score in results:
            assert score is not None
            self.usage.failed_items += not score.ok
        return results  # type: ignore[return-value]

    def _continuations_alone(self, model, encoded, results) -> None:
        """Every sequence computed in full, in padded batches: no sharing at all."""
        jobs = sorted(
            (_ScoreJob(i, 0, p + t, len(t)) for i, (p, t) in encoded.items()), key=lambda j: len(j.tokens)
        )
        size = self.config.score_batch_size
        for start in range(0, len(jobs), size):
            group = jobs[start : start + size]
            self.usage.scored_tokens += sum(len(j.tokens) for j in group)
            try:
                values = self._score_group(model, group, 0, None, False)
            except (RuntimeError, ValueError) as exc:
                log.warning("scoring failed for %d sequences: %s", len(group), exc)
                for job in group:
                    results[job.item] = ContinuationScore(error=f"scoring failed: {exc}")
                continue
            for job, value in zip(group, values, strict=True):
                results[job.item] = ContinuationScore(
                    logprob=value[0], tokens=job.option_len, prompt_tokens=len(job.tokens) - job.option_len
                )

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
