"""Exact provenance: every stage reads the upstream output of its own config, never the latest one.

Config A labels with 2 principles per label, config B with 1; both share one run directory.
Running A, then B, then A again (by `cai run` and by separate stage commands) must read A's
outputs everywhere. The engine is the deterministic echo backend, so these runs take seconds.
"""

from __future__ import annotations

import orjson
import pytest
import yaml
from typer.testing import CliRunner

from cai.cli import app
from cai.config import load_config
from cai.pipeline import run_pipeline
from cai.resources import shipped_dir
from cai.stages.base import StageMissingError
from cai.stages.context import StageContext
from cai.stages.registry import STAGES
from cai.store import StageStore
from tests.echo_recipe import echo_context, write_config


def config(tmp_path, name: str, count: int):
    """Config A or B: they differ only in the label stage (principles per label)."""
    stages = ["sl", "label", "mix", "report"]
    return write_config(tmp_path / f"{name}.yaml", tmp_path / "run", stages, principles={"count": count})


def context(path) -> StageContext:
    return echo_context(path)


def run(path) -> tuple[StageContext, dict]:
    ctx = context(path)
    try:
        return ctx, run_pipeline(ctx)
    finally:
        ctx.close()


def label_ids(store: StageStore) -> list[str]:
    return [
        orjson.loads(line)["label_id"]
        for line in (store.path / "preferences.jsonl").read_bytes().splitlines()
    ]


def test_a_then_b_then_a_through_cai_run_reads_a_everywhere(tmp_path):
    a, b = config(tmp_path, "a", 2), config(tmp_path, "b", 1)
    ctx_a, first = run(a)
    _, second = run(b)
    ctx_again, third = run(a)
    assert first["ran"] == {"sl": "ran", "label": "ran", "mix": "ran"}
    assert second["ran"] == {"sl": "skipped", "label": "ran", "mix": "ran"}  # sl is shared
    assert third["ran"] == {"sl": "skipped", "label": "skipped", "mix": "skipped"}
    for stage in ("sl", "label", "mix"):
        assert third["stages"][stage]["path"] == first["stages"][stage]["path"], stage
        assert third["stages"][stage]["config_hash"] == first["stages"][stage]["config_hash"]
    assert second["stages"]["label"]["path"] != first["stages"]["label"]["path"]
    # mix's recorded upstream is A's label, and the run manifest lists every exact upstream hash
    label_a = ctx_a.store("label").config_hash
    assert third["stages"]["mix"]["upstream"] == {"label": label_a}
    manifest = orjson.loads((tmp_path / "run" / "manifest.json").read_bytes())
    assert manifest["stages"]["mix"]["upstream"] == {"label": label_a}
    assert manifest["stages"]["label"]["config_hash"] == label_a
    # the report of the second A shows A's labels: two principles per label, not B's one
    page = (tmp_path / "run" / "report.html").read_text()
    assert label_a[:12] in page
    assert ctx_again.store("mix").path == ctx_a.store("mix").path


def test_a_then_b_then_a_through_separate_commands(tmp_path):
    a, b = config(tmp_path, "a", 2), config(tmp_path, "b", 1)
    for path in (a, b):
        ctx = context(path)
        STAGES["sl"].run(ctx)
        STAGES["label"].run(ctx)
    ctx = context(a)  # `cai mix -c a.yaml`, after B's label ran last
    mix = STAGES["mix"].run(ctx)
    label_a = ctx.store("label")
    assert mix.manifest.upstream == {"label": label_a.config_hash}
    mixed = {
        orjson.loads(line)["label_id"] for line in (mix.path / "preferences.jsonl").read_bytes().splitlines()
    }
    ai = mixed - {None}
    assert ai and ai <= set(label_ids(label_a))
    # and B's mix reads B's labels, whose audit rows have one principle per label
    ctx_b = context(b)
    mix_b = STAGES["mix"].run(ctx_b)
    assert mix_b.manifest.upstream == {"label": ctx_b.store("label").config_hash} != mix.manifest.upstream
    audits = [
        orjson.loads(line) for line in (ctx_b.store("label").path / "audit.jsonl").read_bytes().splitlines()
    ]
    assert {len(row["principles"]) for row in audits} == {1}


def test_a_missing_upstream_for_this_config_is_a_clear_error(tmp_path):
    a = config(tmp_path, "a", 2)
    ctx = context(a)
    with pytest.raises(StageMissingError, match=r"stage 'label' has not run for this config.*cai label -c"):
        STAGES["mix"].run(ctx)
    result = CliRunner().invoke(app, ["mix", "-c", str(a)], env={"COLUMNS": "500"})
    assert result.exit_code == 1
    assert "stage 'label' has not run for this config" in result.output
    assert f"run `cai label -c {a}` first" in result.output
    assert not (tmp_path / "run" / "mix").exists()  # nothing was written for the failed stage


def test_eval_compares_only_the_policies_of_its_own_recipe(tmp_path):
    base = {
        "run_dir": str(tmp_path / "run"),
        "model": "echo",
        "label": {"gold": None},
    }
    with_dpo = tmp_path / "dpo.yaml"
    with_dpo.write_text(yaml.safe_dump({**base, "stages": ["sl", "sft", "label", "mix", "dpo", "eval"]}))
    without = tmp_path / "plain.yaml"
    without.write_text(yaml.safe_dump({**base, "stages": ["sl", "sft", "label", "mix", "pm", "ppo", "eval"]}))
    # a finished DPO folder of the other config sits in the run directory
    other = StageContext(load_config(with_dpo))
    with other.store("dpo") as store:
        store.finalize(summary={"steps": 1})
    from cai.stages.evaluation import eval_policies

    mine, upstream = eval_policies(StageContext(load_config(without)))
    assert list(mine) == ["base", "sft", "ppo"] and "dpo" not in upstream
    theirs, _ = eval_policies(other)
    assert list(theirs) == ["base", "sft", "dpo"] and theirs["dpo"] == str(store.path / "model")
    # eval's own folder is keyed by exactly those policies, so the two never share one
    assert StageContext(load_config(without)).store("eval").path != other.store("eval").path


def test_labels_come_from_the_sft_model_only_when_the_recipe_has_one(tmp_path):
    with_sft = StageContext(load_config("quickstart", [f"run_dir={tmp_path}"]))
    policy = with_sft.store("label").config["policy"]
    assert policy == str(with_sft.store("sft").path / "model")
    assert with_sft.store("label").upstream == {"sft": with_sft.store("sft").config_hash}
    alone = StageContext(load_config("quickstart", [f"run_dir={tmp_path}", "stages=[label]"]))
    assert alone.store("label").config["policy"] == alone.config.model and alone.store("label").upstream == {}


def test_eval_is_keyed_by_every_judge_text_and_setting_it_reads(tmp_path):
    """A finished eval is reused only while the judge it used is unchanged: its settings, its
    templates (compare and harm rating) and the comparison questions of both eval constitutions."""

    def eval_key(*overrides: str) -> str:
        # no label stage in this recipe: label settings reach eval only through its judge
        recipe = ["stages=[sl, sft, eval]", "label.judge=choice", *overrides]
        return StageContext(load_config("quickstart", recipe)).store("eval").config_hash

    base = eval_key()
    assert eval_key("label.cot_max_new_tokens=64") == base  # read only under chain of thought
    assert eval_key("label.cot=true") != base
    assert eval_key("label.cot=true", "label.cot_max_new_tokens=64") != eval_key("label.cot=true")
    assert eval_key("label.min_margin=0.2") != base
    assert eval_key("label.rule=borda") == base  # eval aggregates by the mean, whatever labelling uses

    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "rate_harm.j2").write_text("Is this harmful? {{ response }}\n")
    assert eval_key(f"templates.folder={folder}") != base

    hhh = (shipped_dir("constitutions") / "hhh.yaml").read_text()
    marker = "Which of these assistant responses"
    assert marker in hhh
    own = tmp_path / "my-hhh.yaml"
    own.write_text(hhh)
    before = eval_key(f"eval.helpful_constitution={own}")
    own.write_text(hhh.replace(marker, "Which of the two responses", 1))  # same path, new question
    assert eval_key(f"eval.helpful_constitution={own}") != before
