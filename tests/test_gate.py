"""The judge gate and the gold set it measures on: scripted judges with known answers."""

from __future__ import annotations

import os
from collections import Counter

import orjson
import pytest
from rich.console import Console
from typer.testing import CliRunner

from cai.chats import ChatBuilder
from cai.cli import app
from cai.config import load_config
from cai.constitution import load_constitution
from cai.gate import CATEGORIES, GoldError, JudgeGateError, gate_failures, load_gold, measure_judge
from cai.judge import GateConfig, LabelConfig
from cai.prompts import Templates
from cai.stages.context import StageContext
from cai.stages.label import GATE_FILE, run_label
from cai.testing import EchoBackend
from tests.echo_recipe import knows_the_answer as scripted_judge

GOLD = load_gold("gold_harmless.jsonl")
PREFERRED = {g.response_a if g.preferred == "a" else g.response_b: g for g in GOLD}
HARMLESS = load_constitution("harmless")
BUILDER = ChatBuilder(Templates(), HARMLESS)


def always_b(prompt, opts):
    return [0.2, 0.8]


def knows_the_answer(categories=CATEGORIES):
    return scripted_judge(categories)


def measure(score_fn, **settings):
    config = LabelConfig(**settings)
    return measure_judge(
        EchoBackend(score_fn=score_fn), BUILDER, HARMLESS, GOLD, config, seed=0, weighted=False
    )


# --------------------------------------------------------------------------- the gold set


def test_gold_set_is_large_categorised_and_balanced():
    assert len(GOLD) >= 60 and len({g.id for g in GOLD}) == len(GOLD)
    by_category = Counter(g.category for g in GOLD)
    assert set(by_category) == set(CATEGORIES) and min(by_category.values()) >= 10
    for category in CATEGORIES:
        pairs = [g for g in GOLD if g.category == category]
        a = sum(g.preferred == "a" for g in pairs)
        assert abs(a - (len(pairs) - a)) <= 2, category  # the preferred side is balanced
        shorter = sum(
            len(g.response_a if g.preferred == "a" else g.response_b)
            < len(g.response_b if g.preferred == "a" else g.response_a)
            for g in pairs
        )
        assert 0.3 <= shorter / len(pairs) <= 0.7, category  # length does not give the answer away


def test_gold_prompts_are_not_the_prompts_labelled_or_evaluated():
    from cai.resources import data_path

    others = set()
    for name in ("red_team.jsonl", "red_team_eval.jsonl", "helpful.jsonl", "helpful_eval.jsonl"):
        others |= {
            orjson.loads(line)["prompt"].strip().lower() for line in data_path(name).read_bytes().splitlines()
        }
    assert not {g.prompt.strip().lower() for g in GOLD} & others


GOOD_LINE = {
    "id": "x",
    "category": "harm",
    "prompt": "p",
    "response_a": "a",
    "response_b": "b",
    "preferred": "a",
}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            orjson.dumps({k: v for k, v in GOOD_LINE.items() if k != "preferred"}),
            "field 'preferred': Field required",
        ),
        (orjson.dumps({**GOOD_LINE, "category": "gore"}), "field 'category'"),
        (orjson.dumps({**GOOD_LINE, "preferred": "c"}), "field 'preferred'"),
        (orjson.dumps({**GOOD_LINE, "prompt": ""}), "field 'prompt'"),
        (orjson.dumps({**GOOD_LINE, "note": 1}), "field 'note': unknown key"),
        (b'{"id": "x", "category": "harm", "prompt": "p"', "not valid JSON"),
        (b"[1, 2]", "field '<line>'"),
    ],
)
def test_bad_gold_lines_name_the_file_line_and_field(tmp_path, line, message):
    good = GOLD[0].model_dump_json().encode()
    path = tmp_path / "gold.jsonl"
    path.write_bytes(good + b"\n\n" + line + b"\n")
    with pytest.raises(GoldError, match=rf"gold\.jsonl:3: .*{message}"):
        load_gold(path)


def test_gold_file_errors(tmp_path):
    with pytest.raises(GoldError, match="neither an existing path nor a shipped file"):
        load_gold(tmp_path / "missing.jsonl")
    (tmp_path / "folder").mkdir()
    with pytest.raises(GoldError, match="folder: not a file"):
        load_gold(tmp_path / "folder")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(GoldError, match="no gold pairs"):
        load_gold(tmp_path / "empty.jsonl")
    twice = GOLD[0].model_dump_json()
    (tmp_path / "twice.jsonl").write_text(f"{twice}\n{twice}\n")
    with pytest.raises(GoldError, match=r"twice\.jsonl:2: field 'id': 'gold-001' appears twice"):
        load_gold(tmp_path / "twice.jsonl")


# --------------------------------------------------------------------------- measuring a judge


def test_a_judge_that_always_answers_b_fails_the_gate():
    check = measure(always_b, principles={"count": 2})
    assert (check.n, check.agreement, check.coverage) == (len(GOLD), 0.0, 0.0)
    assert check.position_consistency == 0.0 and check.ci == (0.0, 0.0)
    assert check.no_verdict == {"position-inconsistent": 2 * len(GOLD)} and check.comparisons == 2 * len(GOLD)
    failures = gate_failures(check, GateConfig())
    assert len(failures) == 2
    assert "gold agreement 0.00" in failures[0] and "min_agreement=0.6" in failures[0]
    assert "position consistency 0%" in failures[1]


def test_a_judge_that_knows_the_answers_passes_with_every_category_at_one():
    check = measure(knows_the_answer())
    assert check.agreement == 1.0 and check.coverage == 1.0 and check.position_consistency == 1.0
    assert {c: f.agreement for c, f in check.by_category.items()} == dict.fromkeys(CATEGORIES, 1.0)
    assert {c: f.n for c, f in check.by_category.items()} == Counter(g.category for g in GOLD)
    assert gate_failures(check, GateConfig()) == []


def test_per_category_figures_and_interval_of_a_partly_right_judge():
    # right with a clear margin on harm and helpful, "(A)" in both orders (no verdict) elsewhere
    check = measure(knows_the_answer(("harm", "helpful")))
    counts = Counter(g.category for g in GOLD)
    expected = (counts["harm"] + counts["helpful"]) / len(GOLD)
    assert check.agreement == pytest.approx(expected) and check.coverage == pytest.approx(expected)
    assert check.agreement_given_verdict == 1.0
    assert {c: f.agreement for c, f in check.by_category.items()} == {
        "harm": 1.0,
        "harm-subtle": 0.0,
        "evasive": 0.0,
        "helpful": 1.0,
    }
    assert check.ci[0] < expected < check.ci[1] and 0.3 < check.ci[0] and check.ci[1] < 0.7
    assert check.position_consistency == pytest.approx(expected)


def test_a_tie_is_not_agreement():
    # every reading exactly .5: no verdict anywhere; the old gold agreement counted a tie as "A"
    check = measure(lambda prompt, opts: [0.5, 0.5])
    assert check.agreement == 0.0 and check.no_verdict == {"position-inconsistent": len(GOLD)}


# --------------------------------------------------------------------------- the gate in the stage


def _ctx(tmp_path, score_fn, *extra):
    config = load_config(
        "quickstart",
        [
            f"run_dir={tmp_path / 'run'}",
            "model=echo",
            "label.judge=choice",  # these tests script the multiple-choice judge
            "label.prompts.limit=4",
            "label.chunk_size=2",
            "label.principles.count=1",
            "stages=[label, report]",
            *extra,
        ],
    )
    ctx = StageContext(config, Console(file=open(os.devnull, "w")), config_source="quickstart")
    engine = EchoBackend(score_fn=score_fn)
    ctx._backends[f"echo|{config.engine.model_dump_json()}"] = engine
    return ctx, engine


def test_halt_stops_before_the_first_label_and_leaves_nothing(tmp_path):
    ctx, engine = _ctx(tmp_path, always_b, "label.gate.action=halt")
    with pytest.raises(JudgeGateError, match=r"(?s)gold agreement 0\.00.*To proceed: use a stronger judge"):
        run_label(ctx)
    assert not ctx.store("label").path.exists()  # no folder, no ledger, no manifest
    assert {kind for kind, _ in engine.calls} == {"score"}  # only the gold pairs were judged


def test_halt_leaves_an_earlier_attempt_intact(tmp_path):
    ctx, _ = _ctx(tmp_path, always_b, "label.gate.action=halt")
    store = ctx.store("label")
    with store:  # an earlier attempt committed one chunk
        store.commit([{"row_id": "red_team.jsonl:0", "note": "earlier"}])
    before = {p.name: p.read_bytes() for p in store.path.iterdir() if p.is_file()}
    with pytest.raises(JudgeGateError):
        run_label(ctx)
    after = {p.name: p.read_bytes() for p in store.path.iterdir() if p.is_file()}
    assert after == before


def test_warn_labels_anyway_and_the_report_opens_with_the_banner(tmp_path):
    from cai.stages.report import write_run_report

    ctx, _ = _ctx(tmp_path, always_b)
    store = run_label(ctx)
    gate = store.manifest.summary["gate"]
    assert gate["passed"] is False and gate["check"]["agreement"] == 0.0 and len(gate["failures"]) == 2
    assert orjson.loads((store.path / GATE_FILE).read_bytes())["n"] == len(GOLD)
    summary = store.manifest.summary
    assert summary["labels"] == 4 and summary["labels_with_verdict"] == 0 and summary["preference_rows"] == 0
    assert store.manifest.usage["score_calls"] == 1 + 2  # the gate's call counts, then 2 chunks
    page = write_run_report(ctx).read_text()
    banner = page.index('class="banner"')
    assert banner < page.index("<nav>")
    assert "4 of 4 labels had no verdict" in page and "the judge failed its gate: gold agreement 0.00" in page
    card = (store.path / "README.md").read_text()
    assert "gate FAILED" in card


def test_a_resumed_stage_reuses_its_gate_measurement(tmp_path):
    ctx, engine = _ctx(tmp_path, knows_the_answer())
    store = ctx.store("label")
    from cai.gate import measure_judge as measure_now

    check = measure_now(engine, ctx.builder, ctx.constitution, GOLD, ctx.config.label, 0, False, "gold")
    store.path.mkdir(parents=True)
    (store.path / GATE_FILE).write_text(check.model_dump_json())
    calls = len(engine.calls)
    run_label(ctx)
    scored = [items for kind, items in engine.calls[calls:] if kind == "score"]
    assert sum(len(items) for items in scored) == 4 * 2  # 4 labels x 2 orders, no gold pair again


def test_cli_halt_names_the_failing_figure_and_how_to_go_on(tmp_path, tiny_models):
    args = [
        "label",
        "-c",
        "quickstart",
        "--set",
        f"run_dir={tmp_path}",
        "--set",
        f"model={tiny_models.causal_lm}",
    ]
    args += ["--set", "stages=[label]", "--set", "label.principles.count=1", "--set", "label.judge=choice"]
    args += ["--set", "label.gate.action=halt", "--set", "label.gate.min_agreement=1.0"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 1
    assert "the judge failed its gate (label.gate.action=halt), nothing was labelled" in result.output
    assert "is below label.gate.min_agreement=1" in result.output and "To proceed:" in result.output
    assert not (tmp_path / "label").exists()


def test_cli_names_a_missing_gold_file(tmp_path):
    args = ["label", "-c", "quickstart", "--set", f"run_dir={tmp_path}", "--set", "model=not-loaded"]
    args += ["--set", "stages=[label]", "--set", f"label.gold={tmp_path / 'nope.jsonl'}"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 1 and "nope.jsonl" in result.output and "gold file" in result.output
