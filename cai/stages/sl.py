"""Stage `sl`: critique -> revision data, crash-safe and resumable.

    cai generate sl --config configs/quickstart.yaml

Rows are cut into fixed chunks (`sl.chunk_size`); a chunk is generated round by round and
committed as a whole, so after a kill the same command redoes only unfinished chunks, with the
same seeds and the same batch composition: the final `rows.jsonl` is byte-identical to an
uninterrupted run. With `sl.verify` on, the judge of `label.*` checks every revision
(`cai/verify.py`); the summary and the final line count the revisions it accepted and rejected.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from cai.atomic import atomic_write_jsonl
from cai.critique import SLConfig, SLMeta, make_jobs, run_chunk
from cai.export import HubConfig, dataset_card, write_card, write_parquet
from cai.records import SFTRow, SLRecord
from cai.sources import load_prompts
from cai.stages.base import Stage, Timer, open_or_skip, usage_since
from cai.stages.parallel import DataParallel
from cai.store import StageStore
from cai.verify import Verifier, check_principles, verify_summary

if TYPE_CHECKING:
    from cai.stages.context import StageContext

NAME = "sl"


def key(ctx: StageContext) -> StageStore:
    """The store this config maps to (hash of the section, model, engine, constitution, templates;
    with `verify` on also everything its judge reads)."""
    cfg = ctx.config.sl
    model = cfg.model or ctx.config.model
    config = {
        # verify: off is left out, so runs from before verification existed keep their folders
        "sl": cfg.model_dump(mode="json", exclude={"verify"} if cfg.verify == "off" else None),
        "model": model,
        "engine": ctx.config.engine.model_dump(mode="json"),
        "seed": ctx.config.seed,
        "constitution": ctx.constitution.name,
        # only what this stage reads: editing another stage's texts must not redo this one
        "constitution_stage_hash": ctx.constitution.stage_hash("sl"),
        "templates": ctx.builder.template_hashes(cfg.template_names()),
    }
    if cfg.verify != "off":
        label = ctx.config.label
        config["judge"] = {
            "settings": label.judge_settings(),
            "few_shot": label.few_shot,
            "model": label.judge_model or ctx.config.model,
            "engine": label.judge_engine.model_dump(mode="json") if label.judge_engine else None,
            "constitution_stage_hash": ctx.constitution.stage_hash("compare", label.judge),
            "templates": ctx.builder.template_hashes(label.template_names()),
        }
    return StageStore(ctx.run_dir, NAME, config)


def make_verifier(ctx: StageContext) -> Verifier | None:
    """The judge of `label.*` for verified revision; `ctx.backend` hands back the policy's own
    engine when the judge is the same model on the same engine."""
    cfg, label = ctx.config.sl, ctx.config.label
    if cfg.verify == "off":
        return None
    from cai.stages.label import open_judge

    backend = open_judge(ctx)  # the label judge, whatever its mode
    return Verifier(
        mode=cfg.verify,
        backend=backend,
        builder=ctx.builder,
        config=label,
        examples=ctx.constitution.examples.compare[: label.few_shot],
    )


def run_sl(ctx: StageContext, fresh: bool = False) -> StageStore:
    cfg = ctx.config.sl
    store, done = open_or_skip(ctx, NAME, fresh)
    if done:
        return store
    timer = Timer()
    model = cfg.model or ctx.config.model
    jobs = make_jobs(load_prompts(cfg.prompts), cfg.samples_per_prompt)  # bad input fails before any write
    if cfg.verify != "off":
        stages = ["critique", "revision"] if cfg.critique else ["revision"]
        check_principles(ctx.constitution.select(stages=stages, tags=cfg.tags, ids=cfg.principles))
    part = DataParallel(ctx, store)  # one process: the store alone, as always
    with part:
        todo = part.pending_chunks(jobs, lambda job: job.row_id, cfg.chunk_size, "rows")
        if todo:
            backend = ctx.backend(model)
            verifier = make_verifier(ctx)
            judge_templates = store.config["judge"]["templates"] if verifier else {}
            meta = SLMeta(
                model_id=model,
                seed=ctx.config.seed,
                constitution=ctx.constitution.name,
                constitution_hash=ctx.constitution.hash,
                template_hashes={**store.config["templates"], **judge_templates},
                config_hash=store.config_hash,
            )
            with ctx.progress(f"{NAME}: critique -> revision x{cfg.rounds}", len(jobs)) as advance:
                advance(len(jobs) - sum(len(c) for _, c in todo))
                for number, chunk in todo:
                    judge = verifier.backend if verifier and verifier.backend is not backend else None
                    before = [b.usage.model_copy() for b in (backend, judge) if b is not None]
                    records = run_chunk(
                        chunk,
                        backend,
                        ctx.builder,
                        ctx.constitution,
                        cfg,
                        meta,
                        chunk_key=f"chunk{number}",
                        verifier=verifier,
                    )
                    usage = usage_since(backend, before[0])
                    if judge is not None:
                        usage = usage.plus(usage_since(judge, before[1]))
                    part.commit(records, usage=usage)
                    ctx.model_calls += 1
                    advance(len(chunk))
        if part.gather():  # rank 0, with every rank's rows in its ledger
            rows = sorted_rows(list(store.rows(SLRecord)))
            sft = [SFTRow(messages=r.messages(), row_id=r.row_id) for r in rows if not r.error]
            summary = sl_summary(rows)
            if cfg.verify != "off":
                summary["verify"] = verify_summary(rows, cfg.verify)
            card = sl_card(ctx, store, summary, len(sft))
            store.finalize(
                outputs={
                    "sft.jsonl": lambda path: atomic_write_jsonl(path, sft),
                    "sft.parquet": lambda path: write_parquet(path, sft, SFTRow),
                    "data.parquet": lambda path: write_parquet(path, rows, SLRecord),
                    "README.md": lambda path: write_card(path, card),
                },
                order=lambda row: (row["source"], row["index"], row["sample"]),
                summary={**summary, "seconds": round(timer.seconds, 1), **part.summary()},
            )
    if not part.main:
        return store
    checked = ""
    if "verify" in summary:
        v = summary["verify"]
        checked = (
            f", verify={v['mode']}: {v['accepted']} revisions accepted, {v['rejected']} rejected "
            f"({v['no_verdict']} without a verdict)"
        )
    rows_line = f"{summary['rows']} rows ({summary['errors']} with errors)"
    ctx.console.print(f"[green]✓[/] {NAME}: {rows_line}{checked} -> {store.path}", highlight=False)
    example = next((r for r in rows if not r.error and r.rounds), None)
    if example is not None:
        show_example(ctx.console, example)
    return store


def show_example(console, row: SLRecord, width: int = 400) -> None:
    """One finished row, so the user sees what the loop really produced (texts cut at `width`)."""
    from rich.markup import escape

    def cut(text: str | None) -> str:
        text = " ".join((text or "").split())
        return escape(text if len(text) <= width else text[:width] + " ...")

    console.print(f"[bold]example[/] {row.row_id}")
    console.print(f"  [cyan]prompt[/]    {cut(row.prompt[-1]['content'])}")
    console.print(f"  [cyan]answer[/]    {cut(row.initial_response)}")
    for r in row.rounds:
        console.print(f"  [cyan]round {r.round}[/]   principle [bold]{r.principle_id}[/]")
        if r.critique is not None:
            console.print(f"  [cyan]critique[/]  {cut(r.critique)}")
        console.print(f"  [cyan]revision[/]  {cut(r.revision)}")
        if r.verify is not None:
            p = "n/a" if r.verify.p_revision_better is None else f"{r.verify.p_revision_better:.2f}"
            kept = "accepted" if r.verify.accepted else "rejected"
            console.print(f"  [cyan]judge[/]     {r.verify.verdict} (p={p}), {kept}")


def sorted_rows(rows: list[SLRecord]) -> list[SLRecord]:
    return sorted(rows, key=lambda r: (r.source, r.index, r.sample))


def sl_summary(rows: list[SLRecord]) -> dict:
    principles = Counter(r.principle_id for row in rows for r in row.rounds)
    tokens = sum(r.critique_tokens + r.revision_tokens for row in rows for r in row.rounds)
    changed = sum(1 for r in rows if r.final_revision.strip() != r.initial_response.strip())
    return {
        "rows": len(rows),
        "errors": sum(1 for r in rows if r.error),
        "rounds": sum(len(r.rounds) for r in rows),
        "revised": changed,
        "round_tokens": tokens,
        "principles": dict(principles.most_common()),
    }


def sl_card(ctx: StageContext, store: StageStore, summary: dict, sft_rows: int) -> str:
    config = store.config
    constitution_hash = ctx.constitution.hash
    return dataset_card(
        title=f"Constitutional AI SL data ({config['constitution']})",
        summary=(
            "Red-team prompts answered by a model, then critiqued and revised against principles "
            "sampled from the constitution at every round (Bai et al., 2022). The final revisions "
            "are the supervised fine-tuning targets."
        ),
        provenance={
            "constitution": config["constitution"],
            "constitution_hash": constitution_hash,
            "model": config["model"],
            "templates": ", ".join(f"{k}={v[:12]}" for k, v in config["templates"].items()),
            "rounds": config["sl"]["rounds"],
            "critique": config["sl"]["critique"],
            "seed": config["seed"],
            **({"verify": config["sl"]["verify"]} if "judge" in config else {}),
            "config_hash": store.config_hash,
        },
        configs=[
            HubConfig(
                name="sft",
                file="sft.parquet",
                rows=sft_rows,
                default=True,
                text="TRL's conversational format for SFTTrainer; rows whose model calls failed are "
                "left out.",
                columns={
                    "messages": "the red-team prompt, then the final revision as the assistant's answer",
                    "row_id": "joins the `rows` config",
                },
            ),
            HubConfig(
                name="rows",
                file="data.parquet",
                rows=summary["rows"],
                text="Every row with every round: what the loop did and what shaped it.",
                columns={
                    "prompt": "the red-team conversation",
                    "initial_response": "the model's first answer",
                    "rounds": "per round: principle_id, critique, revision, token counts"
                    + (", the judge's verdict on the revision (verify)" if "judge" in config else ""),
                    "final_revision": "the SFT target",
                    "constitution_hash / template_hashes / config_hash": "what shaped the row",
                    "error": "why a model call failed for this row (null when none did)",
                },
            ),
        ],
        other_files={"sft.jsonl": "the `sft` rows as JSON lines (what `cai train sft` reads)"},
        counts={k: v for k, v in summary.items() if isinstance(v, int)},
    )


STAGE = Stage(
    name=NAME,
    command="cai generate sl",
    help="Answer red-team prompts, then critique and revise them for N rounds (resumable).",
    reads=(),
    key=key,
    run=run_sl,
    config=SLConfig,
    about="Supervised stage: critique -> revision.",
)
