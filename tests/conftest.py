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
def lively_tiny_lm(tiny_models, tmp_path_factory) -> str:
    """The tiny model with weights drawn wider (std 0.2 instead of 0.02).

    At the usual init its greedy output is one whitespace token repeated, which would make
    alignment and stop-string checks vacuous; wider weights give varied text and clear argmaxes.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("lively-tiny")
    model = AutoModelForCausalLM.from_pretrained(tiny_models.causal_lm)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_models.causal_lm).save_pretrained(folder)
    return str(folder)


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
