"""Shared fixtures: offline hub settings, tiny in-process models, the real default model.

The default model (SmolLM2-135M) is converted from its GGUF file once per test session into a
session cache, so the conversion itself is exercised by the suite and later tests reuse it.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A two-layer Llama causal LM and its reward-model twin, sharing a trained BPE tokenizer."""
    from cai.testing import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cai-cache")


@pytest.fixture(scope="session")
def default_model_path(session_cache) -> str:
    """SmolLM2-135M-Instruct converted from the shipped GGUF, once per session."""
    from cai.models import DEFAULT_MODEL, resolve_model

    previous = os.environ.get("CAI_CACHE")
    os.environ["CAI_CACHE"] = str(session_cache)
    try:
        return resolve_model(DEFAULT_MODEL)
    finally:
        if previous is None:
            os.environ.pop("CAI_CACHE", None)
        else:
            os.environ["CAI_CACHE"] = previous
