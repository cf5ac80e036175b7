"""One step's experience: sampled responses as token tensors, and the no-grad passes over them.

`collate` turns completions into left-padded prompt + right-padded response rows; `score_rollouts`
adds the rollout-time log-probs and values of the policy and the reference's log-probs. The
loss (`cai.train.ppo.update`) reads the same positions through `response_forward`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cai.backends.base import Chat, Completion
from cai.train.ppo.core import logprobs_from_logits


@dataclass
class Rollouts:
    """One step's experience. B = rollouts on this process, P = prompt width, R = response width."""

    chats: list[Chat]  # B prompts (repeated n times for n samples per prompt)
    texts: list[str]  # B decoded responses
    input_ids: torch.Tensor  # (B, P + R) left-padded prompt, right-padded response
    attention_mask: torch.Tensor  # (B, P + R)
    position_ids: torch.Tensor  # (B, P + R)
    response_ids: torch.Tensor  # (B, R)
    mask: torch.Tensor  # (B, R) bool, real response tokens (EOS included)
    ended: torch.Tensor  # (B,) bool, the response ended with EOS (not cut at max_new_tokens)
    old_logprobs: torch.Tensor | None = None  # (B, R) policy at rollout time
    ref_logprobs: torch.Tensor | None = None  # (B, R) reference
    old_values: torch.Tensor | None = None  # (B, R) critic at rollout time
    advantages: torch.Tensor | None = None  # (B, R) whitened
    returns: torch.Tensor | None = None  # (B, R) critic targets

    @property
    def response_width(self) -> int:
        return self.response_ids.shape[1]

    def rows(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        names = ("input_ids", "attention_mask", "position_ids", "response_ids", "mask")
        names += ("old_logprobs", "old_values", "advantages", "returns")
        return {name: getattr(self, name)[index] for name in names}


def autocast(device: Any, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)


def full_params(accelerator: Any, model: Any) -> contextlib.AbstractContextManager:
    """Whole weights for generation and no-grad passes through the unwrapped module.

    DDP keeps full weights on every process; FSDP and DeepSpeed ZeRO-3 shard them, and
    generating outside their forward needs the shards gathered first.
    """
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.summon_full_params(model, writeback=False, recurse=True)
    if kind == DistributedType.DEEPSPEED:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(model.parameters()))
    return contextlib.nullcontext()


def collate(
    chats: Sequence[Chat],
    completions: Sequence[Completion],
    n: int,
    encode_chat: Callable[[Chat], list[int]],
    tokenizer: Any,
    eos_id: int,
    device: Any,
) -> Rollouts:
    """Token tensors of a rollout batch; a failed completion becomes an empty (masked) row.

    `eos_id` is appended to a stopped sample only when its engine did not report which EOS token
    ended it (`Sample.stop_token_id`).
    """
    prompts, responses, texts, ended, row_chats = [], [], [], [], []
    for chat, completion in zip(chats, completions, strict=True):
        prompt = encode_chat(chat)
        samples = completion.samples if completion.ok else []
        for k in range(n):
            sample = samples[k] if k < len(samples) else None
            if sample is None:
                ids, text, stop = [], "", False
            else:
                ids = sample.token_ids
                if ids is None:  # an engine without token ids: re-tokenise the text
                    ids = tokenizer(sample.text, add_special_tokens=False)["input_ids"]
                ids, text, stop = list(ids), sample.text, sample.finish_reason == "stop"
                if stop:  # the engines cut the EOS off; emitting it was an action: put back the one
                    # that was emitted (a model can have several), `eos_id` only if the engine can't say
                    ids.append(sample.stop_token_id if sample.stop_token_id is not None else eos_id)
            prompts.append(prompt)
            responses.append(ids)
            texts.append(text)
            ended.append(stop)
            row_chats.append(chat)
    width_p = max(len(p) for p in prompts)
    width_r = max(1, max(len(r) for r in responses))
    pad = tokenizer.pad_token_id
    rows = [
        [pad] * (width_p - len(p)) + p + r + [pad] * (width_r - len(r))
        for p, r in zip(prompts, responses, strict=True)
    ]
    real = [
        [0] * (width_p - len(p)) + [1] * (len(p) + len(r)) + [0] * (width_r - len(r))
        for p, r in zip(prompts, responses, strict=True)
    ]
    input_ids = torch.tensor(rows, device=device)  # (B, P + R)
    attention = torch.tensor(real, device=device)  # (B, P + R)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)  # (B, P + R)
    lengths = torch.tensor([len(r) for r in responses], device=device)  # (B,)
    mask = torch.arange(width_r, device=device)[None, :] < lengths[:, None]  # (B, R)
    return Rollouts(
        chats=row_chats,
        texts=texts,
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=positions,
        response_ids=input_ids[:, width_p:],
        mask=mask,
        ended=torch.tensor(ended, device=device),
    )


def response_forward(
    model: Any, batch: dict[str, torch.Tensor], width_r: int, temperature: float, bf16: bool
) -> tuple[torch.Tensor, torch.Tensor]:  # logits (B, R, V) tempered, values (B, R)
    """Logits and values at the positions that predict each response token.

    The token at column P + t is predicted from column P + t - 1, which is also where the
    critic values the state before that token. Only the last R + 1 positions go through the
    vocabulary projection (`logits_to_keep`), the prompt's never.
    """
    with autocast(batch["input_ids"].device, bf16):
        logits, values = model(
            batch["input_ids"], batch["attention_mask"], batch["position_ids"], logits_to_keep=width_r + 1
        )  # (B, R + 1, V), (B, P + R)
    logits = logits[:, :-1].float() / temperature  # (B, R, V)
    values = values[:, -width_r - 1 : -1]  # (B, R)
    return logits, values


@torch.no_grad()
def score_rollouts(
    policy: Any, reference: Any, batch: Rollouts, mini_batch_size: int, temperature: float, bf16: bool
) -> None:
    """Rollout-time log-probs and values, and the reference log-probs, in mini-batches."""
    width_r = batch.response_width
    old_lp, ref_lp, old_v = [], [], []
    for start in range(0, batch.input_ids.shape[0], mini_batch_size):
        index = torch.arange(start, min(start + mini_batch_size, batch.input_ids.shape[0]))
        rows = {k: getattr(batch, k)[index] for k in ("input_ids", "attention_mask", "position_ids")}
        logits, values = response_forward(policy, rows, width_r, temperature, bf16)  # (b, R, V), (b, R)
        old_lp.append(logprobs_from_logits(logits, batch.response_ids[index]))
        old_v.append(values)
        with autocast(batch.input_ids.device, bf16):
            ref_logits = reference.logits(**rows, logits_to_keep=width_r + 1)  # (b, R + 1, V)
        ref_logits = ref_logits[:, :-1].float() / temperature
        ref_lp.append(logprobs_from_logits(ref_logits, batch.response_ids[index]))
    batch.old_logprobs = torch.cat(old_lp)  # (B, R)
    batch.ref_logprobs = torch.cat(ref_lp)  # (B, R)
    batch.old_values = torch.cat(old_v)  # (B, R)
