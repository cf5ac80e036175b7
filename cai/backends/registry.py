"""The one place that maps `engine.kind` to an engine class.

Adding an engine: its config section in `cai.sections` (a `kind` literal, added to
`EngineConfig`), its module implementing `cai.backends.base.Backend`, and one line here. The
module is named as text and imported only when a run asks for that engine, so `import cai`
never pays for torch, vLLM or an HTTP client it does not use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cai.backends.base import Backend
    from cai.sections import EngineConfig

ENGINES: dict[str, str] = {
    "hf": "cai.backends.hf:HFBackend",
    "vllm": "cai.backends.vllm:VLLMBackend",
    "openai": "cai.backends.openai:OpenAIBackend",
}


def engine_class(kind: str) -> type:
    if kind not in ENGINES:
        raise ValueError(f"unknown engine kind {kind!r}; expected one of {', '.join(ENGINES)}")
    module, name = ENGINES[kind].split(":")
    return getattr(import_module(module), name)


def make_backend(engine: EngineConfig, model: str) -> Backend:
    """Build the backend `engine.kind` names for `model` (a built-in name, folder or hub id;
    for `openai`, the model name the server knows)."""
    return engine_class(getattr(engine, "kind", None))(model, engine)  # type: ignore[arg-type]
