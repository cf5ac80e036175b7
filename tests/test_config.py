"""Run config: shipped configs validate; errors name file, line and field; overrides work."""

from __future__ import annotations

from pathlib import Path

import pytest

from cai.config import ConfigError, RunConfig, load_config
from cai.resources import shipped_dir
from cai.sections import HFEngine, OpenAIEngine


@pytest.mark.parametrize("path", sorted(shipped_dir("configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    assert isinstance(load_config(path), RunConfig)


GPU_CONFIGS = sorted(shipped_dir("configs").glob("gpu-*.yaml"))


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_gpu_recipes_roll_out_ppo_as_the_readme_says(path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## GPUs and scale", 1)[1].split("\n## ", 1)[0]
    assert f"configs/{path.name}" in section
    assert "`ppo.rollout_engine: vllm`" in section
    config = load_config(path)
    assert config.ppo.rollout_engine == "vllm"
    assert config.engine.kind == "vllm"
    assert "ppo" in config.stages


def test_there_are_gpu_recipes():
    assert len(GPU_CONFIGS) >= 2


def test_defaults_without_a_file():
    config = load_config()
    assert config.model == "smollm2-135m-instruct" and isinstance(config.engine, HFEngine)


def test_dotted_overrides_are_parsed_as_yaml():
    config = load_config("quickstart", ["engine.batch_size=4", "seed=7", "engine.prefix_reuse=false"])
    assert config.engine.batch_size == 4 and config.seed == 7 and config.engine.prefix_reuse is False


def test_engine_kind_selects_the_section():
    config = load_config(None, ["engine.kind=openai", "engine.base_url=http://127.0.0.1:9/v1"])
    assert isinstance(config.engine, OpenAIEngine) and config.engine.base_url.endswith(":9/v1")


def test_unknown_key_names_file_line_and_field(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("seed: 1\nengine:\n  kind: hf\n  batchsize: 4\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path}:4" in str(info.value) and "engine.batchsize" in str(info.value)


def test_wrong_type_and_bad_kind(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("seed: many\nengine:\n  kind: tpu\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"{path}:1" in message and "field 'seed'" in message
    assert f"{path}:3" in message or f"{path}:2" in message
    assert "tpu" in message or "kind" in message


def test_yaml_syntax_and_bad_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("seed: [1\n")
    with pytest.raises(ConfigError, match="YAML syntax"):
        load_config(path)
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["seed"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config("quickstart", ["seed.x=1"])
