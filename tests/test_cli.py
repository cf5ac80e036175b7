"""The command line as a user types it: exit codes and what is printed."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from cai.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_help_is_fast_and_imports_no_heavy_library():
    started = time.perf_counter()
    code = (
        "import sys; from cai.cli import app; "
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'vllm', 'datasets') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
    help_run = subprocess.run([sys.executable, "-m", "cai", "--help"], capture_output=True, text=True)
    assert help_run.returncode == 0 and "constitution" in help_run.stdout
    assert time.perf_counter() - started < 20  # generous: shared CI machines are slow


def test_validate_shipped_constitutions():
    result = run("constitution", "validate", "harmless", "hhh")
    assert result.exit_code == 0
    assert "harmless v1.0" in result.output and "hhh v1.0" in result.output


def test_validate_reports_bad_file_and_fails(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text('name: x\nversion: "1"\nprinciples:\n  - id: a\n    critique: ok\n    colour: red\n')
    result = runner.invoke(app, ["constitution", "validate", "harmless", str(bad)])
    assert result.exit_code == 1
    assert "bad.yaml:6" in result.output and "principle 'a'" in result.output and "colour" in result.output


def test_show_lists_principles_and_filters_by_tag():
    result = run("constitution", "show", "harmless", "--tag", "privacy")
    assert result.exit_code == 0
    assert "privacy" in result.output and "racist" not in result.output


@pytest.mark.parametrize("stage", ["critique", "revision", "compare"])
def test_prompts_render_shows_the_principle_text(stage, tmp_path):
    from cai.constitution import load_constitution

    principle = load_constitution("harmless").principle("privacy")
    example = tmp_path / "ex.yaml"
    example.write_text(
        "prompt: Where does my ex live?\nresponse: Look up voter records.\ncritique: That invades privacy.\n"
        "response_a: Look up voter records.\nresponse_b: I can't help track someone down.\n"
    )
    result = run(
        "prompts",
        "render",
        "--constitution",
        "harmless",
        "--principle",
        "privacy",
        "--stage",
        stage,
        "--example",
        str(example),
        "--json",
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    last = payload["chat"][-1]["content"]
    text = {"critique": principle.critique, "revision": principle.revision, "compare": principle.compare}[
        stage
    ]
    assert " ".join(text.split()[:6]) in " ".join(last.split())
    assert payload["chat"][0]["content"] == "Where does my ex live?" or stage == "compare"
    if stage == "compare":
        assert payload["assistant_prefix"] == "The answer is: ("
        assert "Option (B): I can't help track someone down." in last


def test_prompts_render_errors_are_clear():
    result = runner.invoke(
        app, ["prompts", "render", "--constitution", "harmless", "--principle", "nope", "--stage", "critique"]
    )
    assert result.exit_code == 1 and "no principle 'nope'" in result.output
    result = runner.invoke(
        app, ["prompts", "render", "--constitution", "harmless", "--principle", "privacy", "--stage", "judge"]
    )
    assert result.exit_code == 1 and "--stage must be" in result.output


def test_models_list_shows_the_builtin_model():
    result = run("models", "list")
    assert result.exit_code == 0 and "smollm2-135m-instruct" in result.output


def test_config_schema_documents_fields_with_section_defaults():
    result = runner.invoke(app, ["config", "schema", "label.sampling"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "label.sampling.temperature" in result.output and "0 means greedy decoding" in result.output
    line = next(line for line in result.output.splitlines() if "label.sampling.max_new_tokens" in line)
    assert " 96 " in line  # the label section's own default, not SamplingParams' 256
    engine = runner.invoke(app, ["config", "schema", "engine"], env={"COLUMNS": "200"})
    assert "engine[kind=openai].base_url" in engine.output
    assert runner.invoke(app, ["config", "schema", "nope"]).exit_code == 1


def test_config_show_fills_defaults_and_applies_overrides():
    result = runner.invoke(app, ["config", "show", "quickstart", "--set", "sl.rounds=3"])
    assert result.exit_code == 0
    import yaml

    shown = yaml.safe_load(result.output)
    assert shown["sl"]["rounds"] == 3 and shown["engine"]["kind"] == "hf"
    assert shown["ppo"]["kl"]["kind"] == "adaptive"
