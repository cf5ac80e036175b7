"""Verified revision (`sl.verify`): the judge checks every revision against the answer it revised."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from cai.records import SLRecord
from cai.stages.report import write_run_report
from cai.stages.sl import key, run_sl
from cai.store import StageStore
from cai.testing import EchoBackend
from tests.echo_recipe import echo_context, write_config

ROWS = 4  # the echo recipe's SL prompts


class ScriptedJudge(EchoBackend):
    """The echo engine, whose judge gives every revision of round r the verdict `script[r]`:
    True (the revision is better), False (worse) or None (a tie: no verdict).

    It knows the round because a chunk's round is ONE scoring call (which the tests check), and
    which option is the revision because the revisions are what its last `generate` call wrote.
    `fail_at`: the generate call (1-based) that raises, to kill the stage mid-run.
    """

    def __init__(self, script: dict[int, bool | None], rounds: int, fail_at: int | None = None):
        super().__init__(score_fn=self._score)
        self.script, self.rounds, self.fail_at = script, rounds, fail_at
        self.revisions: set[str] = set()
        self.chats: list[list] = []

    def generate(self, chats, params):
        if self.fail_at is not None and self.usage.generate_calls + 1 == self.fail_at:
            raise RuntimeError("the engine died")
        self.chats.append(chats)
        out = super().generate(chats, params)
        self.revisions = {c.samples[0].text for c in out if c.ok}
        return out

    def _score(self, prompt, options):
        wish = self.script[(self.usage.score_calls - 1) % self.rounds + 1]
        if wish is None:
            return [0.5, 0.5]
        a = prompt.chat[-1]["content"].split("Option (A): ")[1].split("\n")[0]
        return [0.9, 0.1] if (a in self.revisions) == wish else [0.1, 0.9]


def config(tmp_path: Path, verify: str, rounds: int = 3, chunk_size: int = 4, **label) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_config(tmp_path / "config.yaml", tmp_path / "run", ["sl"], **label)
    data = yaml.safe_load(path.read_text())
    data["sl"].update(rounds=rounds, chunk_size=chunk_size, verify=verify)
    path.write_text(yaml.safe_dump(data))
    return path


def context(path: Path, backend: EchoBackend):
    ctx = echo_context(path)
    for name in ctx._backends:  # the judge is the policy model on the same engine: one backend
        ctx._backends[name] = backend
    ctx.console = Console(file=io.StringIO(), width=300)
    return ctx


def rows_of(store: StageStore) -> list[SLRecord]:
    lines = (store.path / "rows.jsonl").read_text().splitlines()
    return [SLRecord.model_validate_json(line) for line in lines]


SCRIPT = {1: True, 2: False, 3: None}  # round 1 better, round 2 worse, round 3 a tie


def test_filter_keeps_round_one_and_revises_it_again(tmp_path):
    backend = ScriptedJudge(SCRIPT, rounds=3)
    store = run_sl(context(config(tmp_path, "filter"), backend))
    rows = rows_of(store)
    assert len(rows) == ROWS and all(len(r.rounds) == 3 for r in rows)
    assert backend.usage.score_calls == 3  # one judge call per round for the whole chunk
    for row in rows:
        first, second, third = (r.verify for r in row.rounds)
        assert (first.verdict, first.accepted, first.against_round) == ("better", True, 0)
        assert (second.verdict, second.accepted, second.against_round) == ("worse", False, 1)
        assert third.verdict == "no-verdict" and third.no_verdict == "position-inconsistent"
        assert not third.accepted and third.against_round == 1
        assert row.final_revision == row.rounds[0].revision != row.rounds[-1].revision
    # round 3's critique (generate call 6: initial, then critique and revision per round) was of
    # round 1's revision, not of the rejected round 2 one
    critiqued = [chat[-2]["content"] for chat in backend.chats[5]]
    assert critiqued == [row.rounds[0].revision for row in rows]
    sft = [json.loads(line) for line in (store.path / "sft.jsonl").read_text().splitlines()]
    assert [s["messages"][-1]["content"] for s in sft] == [r.rounds[0].revision for r in rows]


def test_filter_keeps_the_initial_answer_when_nothing_is_better(tmp_path):
    store = run_sl(context(config(tmp_path, "filter", rounds=2), ScriptedJudge({1: False, 2: None}, 2)))
    for row in rows_of(store):
        assert row.final_revision == row.initial_response
        assert [r.verify.against_round for r in row.rounds] == [0, 0]


def test_record_keeps_the_last_revision_and_stores_verdicts(tmp_path):
    store = run_sl(context(config(tmp_path, "record"), ScriptedJudge(SCRIPT, rounds=3)))
    rows = rows_of(store)
    for row in rows:
        assert row.final_revision == row.rounds[-1].revision
        verdicts = [(r.verify.verdict, r.verify.p_revision_better, r.verify.accepted) for r in row.rounds]
        assert verdicts == [
            ("better", pytest.approx(0.9), True),
            ("worse", pytest.approx(0.1), True),
            ("no-verdict", pytest.approx(0.5), True),
        ]
        assert [r.verify.against_round for r in row.rounds] == [0, 1, 2]
        assert all(r.verify.judge_model_id == "echo" for r in row.rounds)
    # recording changes nothing the policy wrote: the same texts as with verify off
    off = run_sl(context(config(tmp_path / "off", "off"), ScriptedJudge(SCRIPT, rounds=3)))
    stripped = [{**r.model_dump(), "config_hash": None, "template_hashes": None} for r in rows]
    for r in stripped:
        for rnd in r["rounds"]:
            rnd.pop("verify")
    plain = [{**r.model_dump(), "config_hash": None, "template_hashes": None} for r in rows_of(off)]
    assert stripped == plain


def test_off_keeps_the_stage_key_and_rows_of_before(tmp_path):
    path = config(tmp_path, "off")
    backend = ScriptedJudge(SCRIPT, rounds=3)
    ctx = context(path, backend)
    store = key(ctx)
    cfg = ctx.config.sl
    # the key's config exactly as the stage built it before sl.verify existed
    before = {
        "sl": cfg.model_dump(mode="json", exclude={"verify"}),
        "model": "echo",
        "engine": ctx.config.engine.model_dump(mode="json"),
        "seed": ctx.config.seed,
        "constitution": ctx.constitution.name,
        "constitution_stage_hash": ctx.constitution.stage_hash("sl"),
        "templates": ctx.builder.template_hashes(cfg.template_names()),
    }
    assert store.config == before
    assert store.config_hash == StageStore(ctx.run_dir, "sl", before).config_hash
    run_sl(ctx)
    assert backend.usage.score_calls == 0  # no judge
    text = (store.path / "rows.jsonl").read_text()
    assert '"verify"' not in text and "summary" in store.manifest.model_dump()
    assert "verify" not in (store.manifest.summary or {})
    # on, the key changes, and with it what the judge reads (off ignores the judge's settings)
    record = key(context(config(tmp_path / "r", "record"), backend))
    assert record.config_hash != store.config_hash and "judge" in record.config
    margin = key(context(config(tmp_path / "m", "record", min_margin=0.2), backend))
    assert margin.config_hash != record.config_hash
    off_margin = key(context(config(tmp_path / "o", "off", min_margin=0.2), backend))
    assert off_margin.config_hash == store.config_hash


def test_resume_after_a_crash_gives_the_same_files(tmp_path):
    script = {1: True, 2: False}
    whole_config = config(tmp_path / "whole", "filter", rounds=2, chunk_size=2)
    whole = run_sl(context(whole_config, ScriptedJudge(script, 2)))

    path = config(tmp_path / "crash", "filter", rounds=2, chunk_size=2)
    # a chunk makes 5 generate calls (answer, then critique + revision per round): die in chunk 2
    with pytest.raises(RuntimeError, match="engine died"):
        run_sl(context(path, ScriptedJudge(script, 2, fail_at=6)))
    crashed = key(context(path, ScriptedJudge(script, 2)))
    assert len(crashed.committed()) == 2 and not crashed.is_complete
    again = ScriptedJudge(script, 2)
    resumed = run_sl(context(path, again))
    assert again.usage.generate_calls == 5 and again.usage.score_calls == 2  # only chunk 2 was redone
    for name in ("rows.jsonl", "sft.jsonl", "data.parquet"):
        assert (resumed.path / name).read_bytes() == (whole.path / name).read_bytes(), name


def test_summary_counts_per_principle_match_the_rows(tmp_path):
    ctx = context(config(tmp_path, "filter"), ScriptedJudge(SCRIPT, rounds=3))
    store = run_sl(ctx)
    rows = rows_of(store)
    verify = store.manifest.summary["verify"]
    expected: dict[str, dict[str, int]] = {}
    for row in rows:
        for r in row.rounds:
            tally = expected.setdefault(
                r.principle_id, {"accepted": 0, "rejected": 0, "better": 0, "worse": 0, "no_verdict": 0}
            )
            tally["accepted" if r.verify.accepted else "rejected"] += 1
            tally[r.verify.verdict.replace("-", "_")] += 1
    assert verify["by_principle"] == expected
    assert (verify["mode"], verify["accepted"], verify["rejected"], verify["no_verdict"]) == (
        "filter",
        ROWS,
        2 * ROWS,
        ROWS,
    )
    line = ctx.console.file.getvalue()
    assert f"verify=filter: {ROWS} revisions accepted, {2 * ROWS} rejected ({ROWS} without a verdict)" in line
    page = write_run_report(ctx, tmp_path / "report.html").read_text()
    principle = rows[0].rounds[0].principle_id
    counts = "".join(f'<td class="num">{n}</td>' for n in expected[principle].values())
    assert f"<td>{principle}</td>{counts}" in page


def test_a_principle_without_a_comparison_question_is_refused_before_any_write(tmp_path):
    path = config(tmp_path, "record")
    ctx = context(path, ScriptedJudge(SCRIPT, rounds=3))
    drawn = ctx.constitution.select(stages=["critique", "revision"])
    ctx.constitution.principles[ctx.constitution.principles.index(drawn[0])] = drawn[0].model_copy(
        update={"compare": None}
    )
    with pytest.raises(ValueError, match=f"{drawn[0].id} have none"):
        run_sl(ctx)
    assert not (tmp_path / "run" / "sl").exists()
