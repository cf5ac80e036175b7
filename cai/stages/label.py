"""Stage `label`: responses from the policy, judged under principles -> preferences + audit rows.

    cai label --config configs/quickstart.yaml

First the judge gate (`cai.gate`): the same judge is measured on the human-labelled gold pairs
and its figures printed; under `label.gate.action: halt` a failing judge stops the stage before
anything is written. Then, in its stage folder: `audit.jsonl` / `audit.parquet` (one row per
label: every principle's reading in both orders, its verdict or why there is none, the rule, the
decisive principles, what became of each pair), `preferences.jsonl` / `preferences.parquet` (TRL
preference format with `label_id` joining the audit rows; only pairs with a verdict by default),
`gate.json` and a dataset card whose configs load the two Parquet files (`cai.export`). The
judge-quality figures are printed at the end and stored in the manifest summary.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cai.atomic import atomic_write_json, atomic_write_jsonl
from cai.backends.base import Backend, Usage
from cai.classifier import open_classifier
from cai.export import HubConfig, dataset_card, preference_config, write_card, write_parquet
from cai.gate import (
    HOW_TO_PROCEED,
    GateResult,
    GoldPair,
    JudgeCheck,
    JudgeGateError,
    gate_failures,
    gate_result,
    gold_hash,
    load_gold,
    measure_judge,
    print_check,
    resolve_gold,
)
from cai.group_labels import settle
from cai.judge import LabelConfig, LabelMeta, build_label, choose_principles, judge, weighting
from cai.records import LabelAudit, LabelResult, PreferenceRow
from cai.sources import load_prompts
from cai.stages.base import Stage, Timer, open_or_skip, usage_since
from cai.stages.label_groups import groups_key, groups_summary, judge_groups
from cai.stages.parallel import DataParallel
from cai.store import StageStore

if TYPE_CHECKING:
    from cai.audit.summary import JudgeQuality
    from cai.stages.context import StageContext

NAME = "label"
GATE_FILE = "gate.json"


def key(ctx: StageContext) -> StageStore:
    cfg = ctx.config.label
    policy, upstream = ctx.starting_model(cfg.policy)
    config = {
        # the gate decides whether labelling goes ahead, not what the labels are
        "label": cfg.model_dump(mode="json", exclude={"gate", "gold"}),
        "policy": policy,
        "judge_model": judge_model(ctx),
        "engine": ctx.config.engine.model_dump(mode="json"),
        "seed": ctx.config.seed,
        "constitution": ctx.constitution.name,
        # only what this stage reads: editing another stage's texts must not redo this one
        "constitution_stage_hash": ctx.constitution.stage_hash("compare", cfg.judge),
        "templates": ctx.builder.template_hashes(cfg.template_names()),
        **groups_key(ctx),  # nothing in one-group runs: their keys stay as they were
    }
    return StageStore(ctx.run_dir, NAME, config, upstream=upstream)


def run_label(ctx: StageContext, fresh: bool = False) -> StageStore:
    cfg = ctx.config.label
    store, done = open_or_skip(ctx, NAME, fresh)
    if done:
        return store
    timer = Timer()
    policy, _ = ctx.starting_model(cfg.policy, complete=True)
    items = load_prompts(cfg.prompts)  # bad input fails before the gate loads a model, and before any write
    if cfg.judge == "classifier":  # a label index the classifier lacks fails before any work
        open_classifier(ctx, cfg.classifier, "label.classifier")
    part = DataParallel(ctx, store)  # one process: the store alone, as always
    # the gate is measured once, by rank 0; under halt the other ranks stop with its error
    gate, gate_usage = part.on_main(lambda: run_gate(ctx, store)) or (None, None)
    with part:
        if gate is not None and gate_usage is not None:  # measured now: its cost is this stage's
            atomic_write_json(store.path / GATE_FILE, gate)
            store.add_elapsed(gate.seconds)
            store.commit([], usage=gate_usage)
        rows = [(f"{item.key}:{item.index}", item) for item in items]
        todo = part.pending_chunks(rows, lambda row: row[0], cfg.chunk_size, "labels")
        meta = LabelMeta(
            judge_model_id=judge_model(ctx),
            policy_model_id=policy,
            constitution=ctx.constitution.name,
            constitution_hash=ctx.constitution.hash,
            template_hashes=store.config["templates"],
            config_hash=store.config_hash,
            weighting=weighting(ctx.constitution, cfg.principles),
        )
        if todo:
            policy_backend = ctx.backend(policy)
            judge_backend = open_judge(ctx)
            with ctx.progress(f"{NAME}: K={cfg.responses}, judged in both orders", len(rows)) as advance:
                advance(len(rows) - sum(len(c) for _, c in todo))
                for number, chunk in todo:
                    before = [b.usage.model_copy() for b in (policy_backend, judge_backend)]
                    results = label_chunk(ctx, chunk, number, policy_backend, judge_backend, meta)
                    usage = usage_since(policy_backend, before[0])
                    if judge_backend is not policy_backend:
                        usage = usage.plus(usage_since(judge_backend, before[1]))
                    part.commit(results, usage=usage)
                    ctx.model_calls += 1
                    advance(len(chunk))
        if part.gather():  # rank 0, with every rank's labels in its ledger
            results = sorted(store.rows(LabelResult), key=lambda r: _order_key(r.row_id))
            if ctx.groups:  # proportional: the contested pairs are apportioned now, from the rows alone
                results = settle(results, cfg, ctx.config.seed)
            audits = [r.audit for r in results if r.audit is not None]
            preferences = [p for r in results for p in r.preferences]
            from cai.audit import judge_quality

            quality = judge_quality(audits)
            summary = label_summary(quality, preferences, gate, cfg.gate)
            summary.update(failed_labels=sum(1 for r in results if r.error), seconds=round(timer.seconds, 1))
            if ctx.groups:
                summary["groups"] = groups_summary(ctx, audits)
            outputs = {
                "audit.jsonl": lambda path: atomic_write_jsonl(path, audits),
                "audit.parquet": lambda path: write_parquet(path, audits, LabelAudit),
                "preferences.jsonl": lambda path: atomic_write_jsonl(path, preferences),
                "preferences.parquet": lambda path: write_parquet(path, preferences, PreferenceRow),
                "README.md": lambda path: _write_card(path, store, summary, ctx.constitution.hash),
            }
            if gate is not None:
                outputs[GATE_FILE] = lambda path: atomic_write_json(path, gate)
            store.finalize(
                outputs=outputs,
                order=lambda row: _order_key(row["row_id"]),
                summary={**summary, **part.summary()},
            )
    if not part.main:
        return store
    from cai.audit import print_quality

    print_quality(ctx.console, quality, gate, gate_failures(gate, cfg.gate) if gate else [])
    ctx.console.print(
        f"[green]✓[/] {NAME}: {len(audits)} labels, {summary['labels_with_verdict']} with a verdict, "
        f"{len(preferences)} preference rows -> {store.path}",
        highlight=False,
    )
    return store


def judge_model(ctx: StageContext) -> str:
    """The model this config judges with: `label.judge_model`, else the run's model."""
    label = ctx.config.label
    if label.judge == "classifier" and label.classifier is not None:
        return label.classifier.model  # what the audit rows name as the judge
    return label.judge_model or ctx.config.model


def judge_examples(ctx: StageContext) -> list:
    """The few-shot comparison examples every judge prompt of this config carries."""
    return ctx.constitution.examples.compare[: ctx.config.label.few_shot]


def open_judge(ctx: StageContext) -> Backend:
    """The judge this config labels with, opened once per command and shared by its callers.

    The one place a judge is opened (the gate, the labels, `cai judge check`): a new kind of
    judge is built here and everything that measures or uses the judge gets it.
    """
    label = ctx.config.label
    if label.judge == "classifier":
        return open_classifier(ctx, label.classifier, "label.classifier")  # type: ignore[return-value]
    return ctx.backend(judge_model(ctx), label.judge_engine)


def measure_config_judge(
    ctx: StageContext, gold: Sequence[GoldPair], source: str
) -> tuple[JudgeCheck, Usage]:
    """Measure this config's judge on `gold` (read from `source`), exactly as the gate does.

    Returns the check and what it cost. Shared by the gate and `cai judge check`, so the two
    give the same figures for the same config and gold pairs.
    """
    cfg = ctx.config.label
    backend = open_judge(ctx)
    before = backend.usage.model_copy()
    check = measure_judge(
        backend,
        ctx.builder,
        ctx.constitution,
        gold,
        cfg,
        seed=ctx.config.seed,
        weighted=weighting(ctx.constitution, cfg.principles) == "aggregation",
        gold_name=str(resolve_gold(source)),
        examples=judge_examples(ctx),
    )
    return check, usage_since(backend, before)


def run_gate(ctx: StageContext, store: StageStore) -> tuple[JudgeCheck | None, Usage | None]:
    """Measure the judge on the gold pairs, or reuse the measurement of an earlier attempt.

    Returns the check and, when it was measured now, what it cost. Runs before the stage folder
    is opened: under `action: halt` a failing judge leaves nothing behind and nothing of an
    earlier attempt is touched.
    """
    cfg = ctx.config.label
    if cfg.gold is None:
        ctx.console.print("[yellow]judge gate: off (label.gold is null): the judge is not measured[/]")
        return None, None
    gold = load_gold(cfg.gold)
    check, usage = _earlier_check(store, gold), None
    if check is None:
        check, usage = measure_config_judge(ctx, gold, cfg.gold)
    failures = gate_failures(check, cfg.gate)
    print_check(ctx.console, check, failures)
    if failures and cfg.gate.action == "halt":
        raise JudgeGateError(
            "the judge failed its gate (label.gate.action=halt), nothing was labelled:\n  - "
            + "\n  - ".join(failures)
            + f"\nTo proceed: {HOW_TO_PROCEED}."
        )
    return check, usage


def _earlier_check(store: StageStore, gold) -> JudgeCheck | None:
    """The gate measured by an earlier attempt of this stage on the same gold pairs."""
    file = store.path / GATE_FILE
    if not file.is_file():
        return None
    check = JudgeCheck.model_validate_json(file.read_bytes())
    return check if check.gold_hash == gold_hash(gold) else None


def label_summary(
    quality: JudgeQuality, preferences: list[PreferenceRow], gate: JudgeCheck | None, gate_config
) -> dict:
    """The manifest summary: judge quality, verdict counts, rows, and the gate's figures."""
    summary = quality.model_dump(exclude={"soft_labels", "soft_label_histogram"})
    summary["preference_rows"] = len(preferences)
    if gate is not None:
        summary["gate"] = gate_result(gate, gate_config).model_dump(mode="json")
    return summary


def _order_key(row_id: str) -> tuple[str, int]:
    source, _, index = row_id.rpartition(":")
    return source, int(index)


def label_chunk(ctx, chunk, number, policy_backend, judge_backend, meta) -> list[LabelResult]:
    """Sample K responses per prompt (one call), judge them all (one scoring call)."""
    from cai.hashing import derive_seed

    cfg = ctx.config.label
    params = cfg.sampling.model_copy(
        update={"n": cfg.responses, "seed": derive_seed(cfg.sampling.seed, ctx.config.seed, "label", number)}
    )
    completions = policy_backend.generate([item.prompt for _, item in chunk], params)
    results: list[LabelResult] = []
    ready = []
    for (row_id, item), completion in zip(chunk, completions, strict=True):
        if not completion.ok or len(completion.samples) < cfg.responses:
            results.append(
                LabelResult(row_id=row_id, config_hash=meta.config_hash, error=f"policy: {completion.error}")
            )
            continue
        if ctx.groups:
            ready.append((row_id, item, [s.text for s in completion.samples]))
            continue
        principles = choose_principles(ctx.constitution, cfg.principles, ctx.config.seed, row_id)
        ready.append((row_id, item, [s.text for s in completion.samples], principles))
    if ctx.groups:
        return results + judge_groups(ctx, ready, number, judge_backend, meta)
    votes = judge(
        judge_backend,
        ctx.builder,
        [item.prompt for _, item, _, _ in ready],
        [responses for _, _, responses, _ in ready],
        [principles for _, _, _, principles in ready],
        cfg,
        judge_examples(ctx),
        seed=derive_seed(ctx.config.seed, "cot", number),
        weighted=meta.weighting == "aggregation",
    )
    for (row_id, item, responses, _), label_votes in zip(ready, votes, strict=True):
        audit, preferences = build_label(row_id, item.prompt, responses, label_votes, cfg, meta)
        results.append(
            LabelResult(row_id=row_id, config_hash=meta.config_hash, audit=audit, preferences=preferences)
        )
    return results


def _write_card(path: Path, store: StageStore, summary: dict, constitution_hash: str) -> None:
    from cai.audit import gold_item

    config = store.config
    gate = GateResult.model_validate(summary["gate"]) if "gate" in summary else None
    card = dataset_card(
        title=f"Constitutional AI preference labels ({config['constitution']})",
        summary=(
            "Responses sampled from the policy and compared by an AI judge under principles of the "
            "constitution, in both presentation orders; the normalised option probabilities are soft "
            "labels. A principle's reading is a verdict only when both orders prefer the same response "
            f"by at least {config['label']['min_margin']} from 0.5; pairs without a verdict carry no "
            "signal. Every row's `label_id` joins the audit rows, which hold each principle's reading."
        ),
        provenance={
            "constitution": config["constitution"],
            "constitution_hash": constitution_hash,
            "policy": config["policy"],
            "judge_model": config["judge_model"],
            "rule": config["label"]["rule"],
            "principles_per_label": config["label"]["principles"]["count"],
            "min_margin": config["label"]["min_margin"],
            "no_verdict": config["label"]["no_verdict"],
            "gold_agreement": "not measured"
            if gate is None
            else gold_item(gate.check) + ("" if gate.passed else " (gate FAILED)"),
            "templates": ", ".join(f"{k}={v[:12]}" for k, v in config["templates"].items()),
            "config_hash": store.config_hash,
            "upstream": ", ".join(f"{k}={v[:12]}" for k, v in store.upstream.items()) or "none",
        },
        configs=[
            preference_config(summary["preference_rows"], "ai-harmless"),
            HubConfig(
                name="audit",
                file="audit.parquet",
                rows=summary["labels"],
                text="One row per label: everything that shaped it, so 'which principle decided this "
                "pair?' is answerable from this config alone.",
                columns={
                    "label_id": "joins the `label_id` of the preference rows",
                    "prompt / responses": "the conversation and the K sampled responses",
                    "votes": "per principle and pair: both orders' option log-probs and probabilities, the "
                    "verdict or why there is none (`no_verdict`)",
                    "rule / outcome / pairs": "the aggregation rule, its ranking and scores, every derived "
                    "pair with its decisive principles",
                    "training": "per derived pair: a training row, or why not",
                },
            ),
        ],
        other_files={
            "preferences.jsonl": "the `preferences` rows as JSON lines (what `cai mix` reads)",
            "audit.jsonl": "the `audit` rows as JSON lines (what `cai audit` reads)",
            GATE_FILE: "the judge measured on human-labelled gold pairs before labelling (when measured)",
        },
        counts={k: v for k, v in summary.items() if isinstance(v, int) and not isinstance(v, bool)},
    )
    write_card(path, card)


STAGE = Stage(
    name=NAME,
    command="cai label",
    help="Sample K responses per prompt and judge them under principles, in both orders (resumable).",
    reads=("sft",),
    key=key,
    run=run_label,
    config=LabelConfig,
    about="Feedback stage: AI preference labels.",
)
