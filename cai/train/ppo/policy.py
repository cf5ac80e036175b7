"""The PPO policy: a causal LM with a value head, its frozen reference, and its rollout engines.

    policy, reference = load_policy("runs/x/sft/model", lora=LoraSection())
    logits, values = policy(input_ids, attention_mask)            # (B, T, V), (B, T)
    ref_logits = reference.logits(input_ids, attention_mask)      # (B, T, V), no grad

The critic shares the policy's trunk (a Linear on the last hidden state). InstructGPT trains a
separate value model; sharing keeps one copy of the weights, which is what makes PPO fit on a
CPU at all, and the value loss is weighted down (`vf_coef`) so it does not steer the policy.

With LoRA the reference is the same module with its adapter disabled (`disable_adapter()`), so
only one copy of the base weights exists; a full fine-tune needs a frozen copy of the SFT model.
What leaves training is a plain causal-LM folder (LoRA merged), which later stages load with
`AutoModelForCausalLM.from_pretrained`; the merge is computed without touching the live model.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from cai.backends.base import Chat, Completion
from cai.sections import SamplingParams

if TYPE_CHECKING:
    from cai.train.common import LoraSection

log = logging.getLogger("cai.train.ppo")

VALUE_HEAD_FILE = "value_head.safetensors"


class PolicyWithValue(nn.Module):
    """A causal LM (optionally peft-wrapped) plus a scalar value head on its last hidden state."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        hidden = int(self.base_config.hidden_size)
        self.value_head = nn.Linear(hidden, 1)
        # Small init: values start near 0, so early advantages are the rewards themselves rather
        # than noise from a random critic (OpenRLHF uses the same 1 / (H + 1) scale).
        nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1))
        nn.init.zeros_(self.value_head.bias)

    @property
    def is_peft(self) -> bool:
        return hasattr(self.lm, "disable_adapter")

    @property
    def base_config(self) -> Any:
        return self.lm.get_base_model().config if self.is_peft else self.lm.config

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor,  # (B, T)
        position_ids: torch.Tensor | None = None,  # (B, T)
        logits_to_keep: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # logits (B, K, V) with K = logits_to_keep or T; values (B, T)
        out = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=True,
            use_cache=False,
            logits_to_keep=logits_to_keep,
        )
        hidden = out.hidden_states[-1]  # (B, T, H), after the final norm
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()  # (B, T)
        return out.logits, values


class Reference:
    """Log-probs of the reference (SFT) model, never differentiated.

    `frozen` is None with LoRA: the policy's own LM with the adapter switched off is exactly the
    SFT model, so no second copy is held.
    """

    def __init__(self, policy: PolicyWithValue, frozen: nn.Module | None) -> None:
        if frozen is None and not policy.is_peft:
            raise ValueError("a full fine-tune needs a frozen reference model")
        self.policy = policy
        self.frozen = frozen

    @torch.no_grad()
    def logits(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor,  # (B, T)
        position_ids: torch.Tensor | None = None,  # (B, T)
        logits_to_keep: int = 0,
    ) -> torch.Tensor:  # (B, K, V)
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=logits_to_keep,
        )
        if self.frozen is not None:
            return self.frozen(**kwargs).logits
        with self.policy.lm.disable_adapter():
            return self.policy.lm(**kwargs).logits


def load_policy(
    path: str,
    lora: LoraSection | None,
    device: str | torch.device = "cpu",
    reference_path: str | None = None,
) -> tuple[PolicyWithValue, Reference]:
    """Load the SFT model as the policy (LoRA-wrapped or fully trainable) and its reference.

    Everything runs in eval mode for the whole of training: dropout would make the ratio of the
    first PPO epoch differ from 1 for no reason, so PPO runs without it (as TRL's PPO did).
    Weights stay float32; speed comes from bf16 autocast where the hardware has it
    (`cai.train.common.use_bf16`), and the log-prob arithmetic stays float32 either way.
    """
    from transformers import AutoModelForCausalLM

    from cai.models import quiet_loading

    with quiet_loading():
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    frozen = None
    if lora is not None:
        from peft import get_peft_model

        from cai.train.common import peft_config

        lm = get_peft_model(lm, peft_config(lora, "CAUSAL_LM"))
    else:
        with quiet_loading():
            frozen = AutoModelForCausalLM.from_pretrained(reference_path or path, dtype=torch.float32)
        frozen.requires_grad_(False)
        frozen.to(device).eval()
    policy = PolicyWithValue(lm).to(device).eval()
    return policy, Reference(policy, frozen)


# ------------------------------------------------------------------------------------ export


def merged_state_dict(policy: PolicyWithValue) -> dict[str, torch.Tensor]:
    """The LM's weights under plain (non-peft) names, with LoRA deltas added: W + scale * B A.

    Computed module by module from `get_delta_weight`, so the live model (and with it the
    reference, which is the base) is never modified; peft's merge_and_unload would change it in
    place. Used for the exported folder and for pushing weights into vLLM.
    """
    if not policy.is_peft:
        return {k: v.detach() for k, v in policy.lm.state_dict().items()}
    from peft.tuners.lora import LoraLayer

    base = policy.lm.get_base_model()
    adapter = policy.lm.active_adapter
    deltas = {
        name + ".weight": module.get_delta_weight(adapter).detach()
        for name, module in base.named_modules()
        if isinstance(module, LoraLayer)
    }
    merged: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        merged[plain] = value.detach() + deltas[plain].to(value.dtype) if plain in deltas else value.detach()
    return merged


def save_policy(policy: PolicyWithValue, tokenizer: Any, folder: str | Path) -> Path:
    """Write a plain causal-LM folder (+ value head) atomically: temp folder, then rename."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        lm = policy.lm.get_base_model() if policy.is_peft else policy.lm
        lm.save_pretrained(staging, state_dict=merged_state_dict(policy), safe_serialization=True)
        tokenizer.save_pretrained(staging)
        head = {k: v.detach().contiguous() for k, v in policy.value_head.state_dict().items()}
        save_file(head, str(staging / VALUE_HEAD_FILE))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


# ------------------------------------------------------------------------------------ rollouts


class RolloutEngine(Protocol):
    """Generates rollouts for the current policy weights; `sync` pushes those weights first."""

    def sync(self, policy: PolicyWithValue) -> None: ...

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Completion]: ...

    def encode_chat(self, chat: Chat) -> list[int]: ...

    def close(self) -> None: ...


class HFRollout:
    """Rollouts through cai's hf backend on the live policy LM (no copy, nothing to sync)."""

    def __init__(self, policy: PolicyWithValue, tokenizer: Any, bf16: bool) -> None:
        from cai.backends.hf import HFBackend

        self.backend = HFBackend(policy.base_config.name_or_path, model_object=policy.lm, tokenizer=tokenizer)
        self.bf16 = bf16
        self.device_type = str(self.backend.device).split(":")[0]

    def sync(self, policy: PolicyWithValue) -> None:
        """Nothing to do: the backend generates with the very module being trained."""

    def encode_chat(self, chat: Chat) -> list[int]:
        return self.backend.encode_chat(chat)

    def close(self) -> None:
        """Nothing to free: the model belongs to the trainer."""

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Completion]:
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.backend.generate(chats, params)


class VLLMRollout:
    """Rollouts through cai's vLLM backend, with the policy's weights pushed in before each.

    Generation is `cai.backends.vllm.VLLMBackend`'s own (the engine labelling and eval use), so
    rollouts are sampled, seeded and decoded exactly as everywhere else; this class adds only
    the weight sync.

    Weight sync uses vLLM's documented RLHF extension point: `LLM(worker_extension_cls=...)`
    mixes `_VLLMWeightLoader` into every worker, and `LLM.collective_rpc("cai_receive_weights", ...)`
    runs it there (vLLM docs, "Reinforcement learning from human feedback"; examples
    offline_inference/rlhf*.py; checked against vLLM 0.32). The worker hands the tensors to the
    model's own `load_weights`, which maps HF names onto vLLM's fused layers (q/k/v -> qkv_proj,
    gate/up -> gate_up_proj). Weights go under plain HF names with LoRA merged
    (`merged_state_dict`), so vLLM never needs to know about peft.

    collective_rpc's msgpack channel does not rebuild tensors nested in untyped arguments (they
    arrive as [dtype, shape, buffer-index] lists; vLLM recommends it for control messages), so
    each chunk travels as one safetensors byte string, which msgpack carries natively. That
    copies the weights once per sync: right for CPU and small models. Large GPU runs should use
    vLLM's weight-transfer engines instead (`weight_transfer_config` with the nccl or ipc
    backend, then `LLM.init_weight_transfer_engine` / `update_weights`), which move tensors
    device to device. The prefix cache is reset after a sync: its KV blocks came from the old
    weights.
    """

    def __init__(
        self,
        model_path: str,
        tokenizer: Any,
        *,
        seed: int = 0,
        gpu_memory_utilization: float = 0.3,
        dtype: str = "bfloat16",
        enforce_eager: bool = True,
        **llm_kwargs: Any,
    ) -> None:
        from cai.backends.vllm import VLLMBackend
        from cai.sections import VLLMEngine

        engine = VLLMEngine(
            dtype=dtype,  # type: ignore[arg-type]
            seed=seed,
            enforce_eager=enforce_eager,
            gpu_memory_utilization=gpu_memory_utilization,
            extra={"worker_extension_cls": f"{__name__}._VLLMWeightLoader", **llm_kwargs},
        )
        self.backend = VLLMBackend(model_path, engine)
        self.llm = self.backend.llm
        self.tokenizer = tokenizer

    def encode_chat(self, chat: Chat) -> list[int]:
        return self.backend.encode_chat(chat)

    def close(self) -> None:
        """Stop vLLM's engine process now, freeing its KV cache (see VLLMBackend.close)."""
        self.backend.close()

    def sync(self, policy: PolicyWithValue, chunk_bytes: int = 256 << 20) -> None:
        from safetensors.torch import save

        for chunk in _chunks(merged_state_dict(policy), chunk_bytes):
            self.llm.collective_rpc("cai_receive_weights", args=(save(chunk),))
        self.llm.collective_rpc("cai_commit_weights")
        self.llm.reset_prefix_cache()

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Completion]:
        return self.backend.generate(chats, params)


class _VLLMWeightLoader:
    """Mixed into vLLM's worker class (worker_extension_cls); runs inside the worker process.

    Chunks are collected first and loaded in one go through the worker's `reload_weights`
    (vLLM's in-place reload: it re-runs the post-load processing, e.g. the CPU backend's weight
    repacking, which a bare `model.load_weights` on a loaded model trips over). Workers of older
    vLLM versions without it fall back to `model.load_weights`.
    """

    def cai_receive_weights(self, payload: bytes) -> int:
        from safetensors.torch import load

        pending = self.__dict__.setdefault("_cai_pending", [])
        pending.append(load(payload))
        return len(pending[-1])

    def cai_commit_weights(self) -> int:
        pending = self.__dict__.pop("_cai_pending", [])
        weights = [(name, tensor) for chunk in pending for name, tensor in chunk.items()]
        if hasattr(self, "reload_weights"):
            self.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
        else:
            model = self.model_runner.model  # type: ignore[attr-defined]
            device = next(model.parameters()).device
            model.load_weights(weights=((name, tensor.to(device)) for name, tensor in weights))
        return len(weights)


def _chunks(state: dict[str, torch.Tensor], limit: int) -> Iterator[dict[str, torch.Tensor]]:
    """Group tensors into RPC-sized dicts (one huge message would double peak memory).

    Tied weights (lm_head = embed_tokens) share storage, which safetensors refuses to save
    twice; vLLM skips lm_head for tied models anyway, so a second name for a storage is dropped.
    """
    chunk: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    size = 0
    for name, tensor in state.items():
        if tensor.untyped_storage().data_ptr() in seen:
            continue
        seen.add(tensor.untyped_storage().data_ptr())
        chunk[name] = tensor.detach().cpu().contiguous()
        size += tensor.numel() * tensor.element_size()
        if size >= limit:
            yield chunk
            chunk, size = {}, 0
    if chunk:
        yield chunk
