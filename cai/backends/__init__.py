"""Engines behind one protocol (`cai.backends.base.Backend`), chosen by `engine.kind` in config.

    from cai.backends import make_backend
    backend = make_backend(config.engine, config.model)

Importing this package stays cheap: each engine module (and torch, vllm or openai with it) is
imported only when `make_backend` builds that engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cai.backends.base import Backend
    from cai.config import EngineConfig

KINDS = ("hf", "vllm", "openai")


def make_backend(engine: EngineConfig, model: str) -> Backend:
    """Build the backend `engine.kind` names for `model` (a built-in name, folder or hub id;
    for `openai`, the model name the server knows)."""
    kind = getattr(engine, "kind", None)
    if kind == "hf":
        from cai.backends.hf import HFBackend

        return HFBackend(model, engine)  # type: ignore[arg-type]
    if kind == "vllm":
        from cai.backends.vllm import VLLMBackend

        return VLLMBackend(model, engine)  # type: ignore[arg-type]
    if kind == "openai":
        from cai.backends.openai import OpenAIBackend

        return OpenAIBackend(model, engine)  # type: ignore[arg-type]
    raise ValueError(f"unknown engine kind {kind!r}; expected one of {', '.join(KINDS)}")


def request_seed(seed: int | None, index: int) -> int | None:
    """The seed of item `index` of a call seeded with `seed` (None stays unseeded).

    Seeding each request on its own, rather than the whole batch, makes an item's samples
    independent of what else is in the batch (and of the order a server runs requests in).
    31 bits, because some OpenAI-compatible servers reject larger seeds.
    """
    if seed is None:
        return None
    from cai.constitution import derive_seed

    return derive_seed("request", seed, index) % (2**31 - 1)
