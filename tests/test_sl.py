"""The supervised stage: loop logic (echo engine), real models, resumption after SIGKILL."""

from __future__ import annotations

import json
import os

import pytest
from rich.console import Console

from cai.chats import ChatBuilder
from cai.config import load_config
from cai.constitution import load_constitution, sample_principles
from cai.critique import SLConfig, SLMeta, make_jobs, run_chunk
from cai.hashing import derive_seed
from cai.prompts import Templates
from cai.records import SLRecord
from cai.sources import PromptSource, load_prompts
from cai.stages.context import StageContext
from cai.stages.sl import run_sl
from cai.testing import EchoBackend
from tests.crash_harness import crash_and_resume

META = SLMeta("echo", 0, "harmless", "h" * 64, {"t": "x"}, "c" * 64)


def chunk(config: SLConfig, backend, n=3):
    constitution = load_constitution("harmless")
    builder = ChatBuilder(Templates(), constitution)
    jobs = make_jobs(load_prompts(PromptSource(path="red_team.jsonl", limit=n)), config.samples_per_prompt)
    return run_chunk(jobs, backend, builder, constitution, config, META, "chunk0"), builder, constitution


def test_each_round_is_one_call_per_step_for_the_whole_chunk():
    backend = EchoBackend()
    records, _, _ = chunk(SLConfig(rounds=3, few_shot=0), backend, n=3)
    # initial answers, then (critique, revision) per round: 1 + 2 * 3 calls, each with all 3 rows
    assert [len(items) for _, items in backend.calls] == [3] * 7
    assert all(len(r.rounds) == 3 for r in records)


def test_exact_prompts_sent_and_principles_resampled_every_round():
    backend = EchoBackend()
    config = SLConfig(rounds=2, few_shot=0)
    records, builder, constitution = chunk(config, backend, n=2)
    first = records[0]
    candidates = constitution.select(stages=["critique", "revision"])
    expected = [
        sample_principles(candidates, 1, seed=derive_seed(META.seed, first.row_id, r))[0].id for r in (1, 2)
    ]
    assert [r.principle_id for r in first.rounds] == expected
    # round 1 critique request is the rendered template for the sampled principle
    principle = constitution.principle(expected[0])
    critique_sent = backend.calls[1][1][0]
    assert critique_sent == builder.critique_request(principle)
    # round 2 critiques the round-1 revision: the revision of round 1 is the answer shown
    revision_sent = backend.calls[2][1][0]
    assert revision_sent == builder.revision_request(principle, first.rounds[0].critique)
    assert first.final_revision == first.rounds[-1].revision
    assert first.initial_response != first.final_revision
    # the seeds make the sequence reproducible and different across rows
    again, _, _ = chunk(config, EchoBackend(), n=2)
    assert [r.model_dump() for r in again] == [r.model_dump() for r in records]


def test_revision_only_mode_sends_no_critique():
    backend = EchoBackend()
    records, builder, _ = chunk(SLConfig(rounds=2, critique=False, few_shot=0), backend, n=2)
    assert len(backend.calls) == 1 + 2  # initial + one revision call per round
    assert all(r.critique is None for rec in records for r in rec.rounds)
    assert "Use your critique" not in backend.calls[1][1][0]


def test_tag_filter_and_samples_per_prompt():
    records, _, constitution = chunk(
        SLConfig(rounds=2, tags=["privacy"], samples_per_prompt=2, few_shot=0), EchoBackend()
    )
    privacy = {p.id for p in constitution.select(tags=["privacy"])}
    assert {r.principle_id for rec in records for r in rec.rounds} <= privacy
    assert [r.row_id for r in records][:2] == ["red_team.jsonl:0:0", "red_team.jsonl:0:1"]
    assert records[0].initial_response != records[1].initial_response  # independent samples


def test_failed_item_fails_only_its_row():
    class FlakyBackend(EchoBackend):
        def generate(self, chats, params):
            out = super().generate(chats, params)
            if len(self.calls) == 2:  # the round-1 critique call: fail the middle row
                out[1] = out[1].model_copy(update={"samples": [], "error": "boom"})
            return out

    records, _, _ = chunk(SLConfig(rounds=2, few_shot=0), FlakyBackend(), n=3)
    assert records[1].error == "round 1 critique: boom" and records[1].rounds == []
    assert records[0].error is None and len(records[0].rounds) == 2 and len(records[2].rounds) == 2


def _config(tmp_path, model, *extra):
    return load_config(
        "quickstart",
        [f"run_dir={tmp_path / 'run'}", f"model={model}", "sl.prompts.limit=3", "sl.rounds=2", *extra],
    )


def test_stage_on_the_tiny_model_writes_sft_and_hub_files(tmp_path, tiny_models):
    config = _config(tmp_path, tiny_models.causal_lm, "sl.chunk_size=2", "sl.sampling.max_new_tokens=8")
    ctx = StageContext(config, Console(file=open(os.devnull, "w")))
    store = run_sl(ctx)
    rows = [
        SLRecord.model_validate_json(line) for line in (store.path / "rows.jsonl").read_text().splitlines()
    ]
    assert [r.row_id for r in rows] == [f"red_team.jsonl:{i}:0" for i in range(3)]
    assert all(len(r.rounds) == 2 and r.constitution_hash == ctx.constitution.hash for r in rows)
    sft = [json.loads(line) for line in (store.path / "sft.jsonl").read_text().splitlines()]
    assert sft[0]["messages"][-1] == {"role": "assistant", "content": rows[0].final_revision}
    card = (store.path / "README.md").read_text()
    assert ctx.constitution.hash in card and "config_hash" in card
    import pyarrow.parquet as pq

    assert pq.read_table(store.path / "data.parquet").num_rows == 3
    # same config again: complete, no model loaded, no call
    ctx2 = StageContext(config, Console(file=open(os.devnull, "w")))
    assert run_sl(ctx2).path == store.path and ctx2._backends == {}
    # a different constitution text makes a different run folder, never mixing rows
    changed = _config(
        tmp_path, tiny_models.causal_lm, "sl.chunk_size=2", "sl.sampling.max_new_tokens=8", "sl.rounds=1"
    )
    ctx3 = StageContext(changed, Console(file=open(os.devnull, "w")))
    ctx3._backends[f"{tiny_models.causal_lm}|{changed.engine.model_dump_json()}"] = EchoBackend()
    assert run_sl(ctx3).path != store.path


@pytest.mark.slow
def test_stage_on_smollm2_produces_text_revisions(tmp_path, default_model_path):
    config = _config(
        tmp_path, default_model_path, "sl.prompts.limit=2", "sl.rounds=1", "sl.sampling.max_new_tokens=32"
    )
    console = Console(file=open(os.devnull, "w"), record=True, width=200)
    store = run_sl(StageContext(config, console))
    rows = list(store.rows(SLRecord))
    assert len(rows) == 2 and all(r.error is None for r in rows)
    assert all(len(r.final_revision.split()) >= 3 for r in rows)  # real words, not empty
    assert all(r.rounds[0].critique for r in rows)
    # the user sees one real example: its principle, critique and revision
    shown = " ".join(console.export_text().split())
    first = rows[0]
    assert f"principle {first.rounds[0].principle_id}" in shown
    assert " ".join(first.rounds[0].critique.split())[:40] in shown
    assert " ".join(first.final_revision.split())[:40] in shown


def test_sigkill_at_random_points_then_resume_is_byte_identical(tmp_path):
    assert crash_and_resume(tmp_path, "sl", kills=5, seed=1) >= 3


@pytest.mark.faults
def test_many_sigkills(tmp_path):
    assert crash_and_resume(tmp_path, "sl", kills=20, seed=2) >= 10
