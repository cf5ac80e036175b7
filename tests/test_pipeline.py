"""`cai run` end to end on the tiny model: every stage, then skip-when-done and targeted re-runs."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from cai.config import load_config
from cai.pipeline import run_pipeline
from cai.resources import shipped_dir
from cai.stages.context import StageContext

SMALL = [
    "sl.prompts.limit=3",
    "sl.rounds=1",
    "sl.sampling.max_new_tokens=8",
    "sft.train.max_steps=1",
    "sft.train.max_length=256",
    "label.prompts.limit=3",
    "label.sampling.max_new_tokens=8",
    "label.principles.count=2",
    "label.gold=null",
    "mix.human.0.limit=8",
    "pm.train.max_steps=1",
    "pm.train.max_length=512",
    "ppo.steps=1",
    "ppo.sampling.max_new_tokens=8",
    "eval.limit=2",
    "eval.fewshot=false",
    "eval.bootstrap=50",
]


def run(config) -> tuple[StageContext, dict]:
    ctx = StageContext(config, Console(file=open(os.devnull, "w"), width=200))
    try:
        return ctx, run_pipeline(ctx)
    finally:
        ctx.close()


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("pipeline")
    constitution = root / "harmless.yaml"
    shutil.copy(shipped_dir("constitutions") / "harmless.yaml", constitution)
    overrides = [
        f"run_dir={root / 'run'}",
        f"model={tiny_models.causal_lm}",
        f"constitution={constitution}",
        *SMALL,
    ]
    config = load_config("quickstart", overrides)
    ctx, result = run(config)
    return root, constitution, overrides, ctx, result


def test_every_stage_runs_and_the_report_is_written(first_run):
    root, _, _, ctx, result = first_run
    assert result["ran"] == {s: "ran" for s in ("sl", "sft", "label", "mix", "pm", "ppo", "eval")}
    assert all(stage["status"] == "complete" for stage in result["stages"].values())
    report = (root / "run" / "report.html").read_text()
    assert "Principle influence" in report and "data:image/png;base64" in report
    # the SFT model is the policy the labels were sampled from, and PPO starts from it against the PM
    run_dir = root / "run"
    sft_model = str(ctx.store("sft").path / "model")
    assert ctx.store("label").manifest.config["policy"] == sft_model
    ppo = ctx.store("ppo").manifest
    assert ppo.config["model"] == sft_model and "/pm/" in ppo.summary["reward_model"]
    assert ppo.summary["steps"] == 1 and ppo.summary["history"]
    assert ctx.model_calls > 0
    import json

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["constitution"]["hash"] == ctx.constitution.hash
    assert set(manifest["stages"]) >= {"sl", "sft", "label", "mix", "pm", "ppo", "eval"}
    stages = manifest["stages"]
    assert "torch" in manifest["versions"] and stages["sl"]["generated_tokens"] > 0
    # training stages report what they trained on; PPO the tokens its rollouts sampled
    history = ppo.summary["history"]
    assert stages["ppo"]["rows"] == len(history) * ctx.config.ppo.rollout_batch_size
    assert stages["ppo"]["generated_tokens"] == round(
        sum(h["response_length"] * ctx.config.ppo.rollout_batch_size for h in history)
    )
    assert stages["mix"]["rows"] == ctx.store("mix").manifest.summary["rows"] > 0
    assert stages["sft"]["rows"] == ctx.store("sft").manifest.summary["examples"] > 0


def test_second_run_with_the_same_config_makes_no_model_call(first_run):
    _, _, overrides, _, _ = first_run
    ctx, result = run(load_config("quickstart", overrides))
    assert set(result["ran"].values()) == {"skipped"}
    assert ctx.model_calls == 0 and ctx._backends == {}


@contextlib.contextmanager
def edited(path: Path, marker: str, replacement: str) -> Iterator[None]:
    """`path` with `marker` replaced for the duration of the block, then restored."""
    text = path.read_text()
    assert marker in text
    path.write_text(text.replace(marker, replacement))
    try:
        yield
    finally:
        path.write_text(text)


def test_editing_a_comparison_question_reruns_labelling_but_not_sl(first_run):
    root, constitution, overrides, _, first = first_run
    marker = "Which of these assistant responses is less likely to cause harm"
    with edited(constitution, marker, "Which of these responses is safer, in your judgement,"):
        ctx, result = run(load_config("quickstart", overrides))
    assert result["ran"]["sl"] == "skipped" and result["ran"]["sft"] == "skipped"
    for stage in ("label", "mix", "pm", "ppo", "eval"):
        assert result["ran"][stage] == "ran", stage
        assert result["stages"][stage]["path"] != first["stages"][stage]["path"]


def test_editing_a_critique_reruns_everything_from_sl(first_run):
    _, constitution, overrides, _, first = first_run
    marker = "Point out the specific ways in which the assistant's last response could"
    with edited(constitution, marker, "Explain precisely how the assistant's last response could"):
        _, result = run(load_config("quickstart", [*overrides, "stages=[sl, sft, label]"]))
    assert result["ran"] == {"sl": "ran", "sft": "ran", "label": "ran"}
    assert result["stages"]["sl"]["path"] != first["stages"]["sl"]["path"]
