"""`cai judge check`: the config's judge measured on gold pairs by scripted judges with known answers.

Every engine the command opens is an `EchoBackend` (`make_backend` is replaced), so the judge's
answers are a function of the comparison prompt and every figure can be worked out by hand.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest
from rich.console import Console
from typer.testing import CliRunner

from cai.cli import app
from cai.config import load_config
from cai.gate import CATEGORIES, load_gold
from cai.stages.context import StageContext
from cai.stages.label import GATE_FILE, run_label
from cai.testing import EchoBackend
from tests.echo_recipe import knows_the_answer as scripted_judge
from tests.echo_recipe import options

GOLD = load_gold("gold_harmless.jsonl")
PREFERRED = {g.response_a if g.preferred == "a" else g.response_b: g for g in GOLD}
BASE = [
    "model=echo",
    "label.judge=choice",  # scripted multiple-choice judges
    "label.principles.count=1",
    "label.prompts.limit=2",
    "label.chunk_size=2",
    "stages=[label]",
]


def always_a(prompt, opts):
    return [0.8, 0.2]


def knows_the_answer(categories=CATEGORIES):
    return scripted_judge(categories)


@pytest.fixture
def engines(monkeypatch):
    """Every engine opened is an echo judge scored by `engines.judge`; `engines.opened`: (model, kind)."""
    made = SimpleNamespace(judge=always_a, opened=[])

    def make_backend(engine, model):
        made.opened.append((model, engine.kind))
        return EchoBackend(model_id=model, score_fn=lambda prompt, opts: made.judge(prompt, opts))

    monkeypatch.setattr("cai.backends.registry.make_backend", make_backend)
    return made


def overrides(run_dir: Path, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", *BASE, *extra]


def judge_check(run_dir: Path, *extra: str, args: tuple[str, ...] = (), json_path: Path | None = None):
    command = ["judge", "check", "-c", "quickstart"]
    for override in overrides(run_dir, *extra):
        command += ["--set", override]
    if json_path is not None:
        command += ["--json", str(json_path)]
    return CliRunner().invoke(app, [*command, *args], env={"COLUMNS": "400"})


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def write_gold(path: Path, pairs: list[dict]) -> Path:
    path.write_bytes(b"\n".join(orjson.dumps(pair) for pair in pairs) + b"\n")
    return path


# --------------------------------------------------------------------------- the figures


def test_a_judge_that_knows_every_answer_scores_one_everywhere(tmp_path, engines):
    engines.judge = knows_the_answer()
    result = judge_check(tmp_path / "run", json_path=tmp_path / "check.json")
    assert result.exit_code == 0, result.output
    data = orjson.loads((tmp_path / "check.json").read_bytes())
    assert data["n"] == len(GOLD) and data["agreement"] == 1.0 and data["ci"] == [1.0, 1.0]
    assert data["position_consistency"] == 1.0 and data["coverage"] == 1.0 and data["no_verdict"] == {}
    assert data["by_category"] == {
        c: {"n": n, "agreement": 1.0} for c, n in Counter(g.category for g in GOLD).items()
    }
    assert data["comparisons"] == len(GOLD) and data["seconds"] >= 0
    assert data["judge"] == {
        "model": "echo",
        "engine": "hf",
        "mode": "choice",
        "principles": {"count": 1, "tags": [], "ids": [], "weighted": True},
        "min_margin": 0.05,
    }
    assert data["gate"] == {
        "min_agreement": 0.6,
        "min_consistency": 0.5,
        "action": "warn",
        "passed": True,
        "failures": [],
    }
    assert "warning" not in result.output and "judge: echo (engine hf), mode choice" in result.output
    assert engines.opened == [("echo", "hf")]  # the judge only: no policy, no stage
    assert not (tmp_path / "run").exists()


def test_a_judge_that_always_answers_a_has_no_verdict_and_only_a_warning(tmp_path, engines):
    engines.judge = always_a
    result = judge_check(tmp_path / "run", json_path=tmp_path / "check.json")
    assert result.exit_code == 0, result.output  # a measurement, not a gate
    data = orjson.loads((tmp_path / "check.json").read_bytes())
    assert data["position_consistency"] == 0.0 and data["agreement"] == 0.0 and data["coverage"] == 0.0
    assert data["n"] == len(GOLD) and data["no_verdict"] == {"position-inconsistent": len(GOLD)}
    assert data["gate"]["passed"] is False and len(data["gate"]["failures"]) == 2
    assert "warning: gold agreement 0.00" in result.output and "label.gate" in result.output
    assert "position consistency" in result.output and "0%" in result.output


def test_by_category_figures_match_a_hand_worked_custom_gold_set(tmp_path, engines):
    def pair(i, category, preferred):
        good, bad = f"good answer {i}", f"bad answer {i}"
        a, b = (good, bad) if preferred == "a" else (bad, good)
        return {
            "id": f"g{i}",
            "category": category,
            "prompt": f"q{i}",
            "response_a": a,
            "response_b": b,
            "preferred": preferred,
        }

    pairs = [
        pair(0, "harm", "a"),
        pair(1, "harm", "b"),
        pair(2, "harm", "a"),
        pair(3, "helpful", "b"),
        pair(4, "helpful", "a"),
    ]
    gold = write_gold(tmp_path / "mine.jsonl", pairs)

    def right_on_harm_only(prompt, opts):
        # prefers "good" on harm pairs (ids 0-2) and, consistently in both orders, "bad" on helpful ones
        a, b = options(prompt)
        wanted = "good" if int(a.split()[-1]) < 3 else "bad"
        return [0.9, 0.1] if a.startswith(wanted) else [0.1, 0.9]

    engines.judge = right_on_harm_only
    # --gold wins over a config without gold pairs
    result = judge_check(
        tmp_path / "run", "label.gold=null", args=("--gold", str(gold)), json_path=tmp_path / "c.json"
    )
    assert result.exit_code == 0, result.output
    data = orjson.loads((tmp_path / "c.json").read_bytes())
    assert data["gold"] == str(gold) and data["n"] == 5
    assert data["by_category"] == {"harm": {"n": 3, "agreement": 1.0}, "helpful": {"n": 2, "agreement": 0.0}}
    assert data["agreement"] == pytest.approx(3 / 5) and data["coverage"] == 1.0
    assert data["agreement_given_verdict"] == pytest.approx(3 / 5) and data["position_consistency"] == 1.0
    assert "warning" not in result.output  # 0.6 meets min_agreement 0.6


def test_the_mode_says_chain_of_thought_and_the_judge_engine_is_the_configured_one(tmp_path, engines):
    result = judge_check(
        tmp_path / "run",
        "label.cot=true",
        "label.judge_model=judge-echo",
        "label.judge_engine={kind: openai}",
        "label.principles.tags=[harm]",
        json_path=tmp_path / "c.json",
    )
    assert result.exit_code == 0, result.output
    judge = orjson.loads((tmp_path / "c.json").read_bytes())["judge"]
    assert (judge["model"], judge["engine"], judge["mode"]) == ("judge-echo", "openai", "choice+CoT")
    assert judge["principles"]["tags"] == ["harm"]
    assert engines.opened == [("judge-echo", "openai")]
    assert "mode choice+CoT" in result.output and "tags=harm" in result.output


# --------------------------------------------------------------------------- bad input


def test_a_malformed_gold_file_names_file_and_line_and_writes_nothing(tmp_path, engines):
    good = GOLD[0].model_dump()
    bad = {k: v for k, v in good.items() if k != "preferred"}
    gold = write_gold(tmp_path / "bad.jsonl", [good, bad])
    result = judge_check(tmp_path / "run", args=("--gold", str(gold)), json_path=tmp_path / "c.json")
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert f"{gold}:2: field 'preferred'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "c.json").exists() and not (tmp_path / "run").exists()
    assert engines.opened == []  # the gold file fails before a model is loaded


def test_no_gold_pairs_at_all_is_a_clear_error(tmp_path, engines):
    result = judge_check(tmp_path / "run", "label.gold=null", json_path=tmp_path / "c.json")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "label.gold is null" in result.output and "--gold FILE" in result.output
    assert not (tmp_path / "c.json").exists() and engines.opened == []


def test_a_missing_gold_file_is_named(tmp_path, engines):
    result = judge_check(tmp_path / "run", args=("--gold", str(tmp_path / "nope.jsonl")))
    assert result.exit_code == 1 and "nope.jsonl" in result.output and "gold file" in result.output
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- the gate and the check agree


def run_label_stage(run_dir: Path, *extra: str):
    config = load_config("quickstart", overrides(run_dir, *extra))
    ctx = StageContext(config, Console(file=open(os.devnull, "w")), config_source="quickstart")
    try:
        return run_label(ctx)
    finally:
        ctx.close()


def test_the_label_gate_and_judge_check_give_the_same_figures(tmp_path, engines):
    engines.judge = knows_the_answer(("harm", "helpful"))
    extra = ("label.judge_model=judge-echo",)
    store = run_label_stage(tmp_path / "run", *extra)
    assert ("judge-echo", "hf") in engines.opened  # the gate and the labels opened the configured judge
    gate = orjson.loads((store.path / GATE_FILE).read_bytes())
    engines.opened = []
    result = judge_check(tmp_path / "run", *extra, json_path=tmp_path / "check.json")
    assert result.exit_code == 0, result.output
    check = orjson.loads((tmp_path / "check.json").read_bytes())
    assert engines.opened == [("judge-echo", "hf")]
    assert 0 < check["agreement"] < 1  # a partly right judge: the figures are not trivially equal
    same = (
        "n",
        "agreement",
        "ci",
        "by_category",
        "coverage",
        "position_consistency",
        "no_verdict",
        "gold",
        "gold_hash",
    )
    assert {k: check[k] for k in same} == {k: gate[k] for k in same}
    assert check["judge_model"] == gate["judge_model"] == "judge-echo"


def test_judge_check_leaves_the_run_directory_untouched(tmp_path, engines):
    engines.judge = knows_the_answer()
    run_dir = tmp_path / "run"
    run_label_stage(run_dir)
    before = snapshot(run_dir)
    assert any(name.endswith(GATE_FILE) for name in before)
    result = judge_check(run_dir, json_path=tmp_path / "check.json")
    assert result.exit_code == 0, result.output
    assert snapshot(run_dir) == before
    assert (tmp_path / "check.json").is_file()


def test_a_judge_without_option_order_prints_consistency_as_not_applicable(tmp_path, engines):
    from cai.stages.judge_check import JudgeCheckReport, print_report

    result = judge_check(tmp_path / "run", json_path=tmp_path / "c.json")
    assert result.exit_code == 0, result.output
    report = JudgeCheckReport.model_validate_json((tmp_path / "c.json").read_bytes())
    console = Console(record=True, width=300)
    print_report(console, report.model_copy(update={"position_consistency": None}))
    text = console.export_text()
    assert (
        "n/a (no option order)" in text and "0%" not in text.split("position consistency")[1].split("\n")[0]
    )
