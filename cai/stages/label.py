"""Stage `label`: responses from the policy, judged under principles -> preferences + audit rows.

    cai label --config configs/quickstart.yaml

Writes, in its stage folder: `audit.jsonl` (one row per label: every principle's votes in both
orders, the rule, the decisive principles), `preferences.jsonl` / `preferences.parquet` (TRL
preference format with `label_id` joining the audit rows) and a dataset card. The judge-quality
figures (position consistency, principle agreement, agreement with the human gold set) are
printed at the end and stored in the manifest summary.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from cai.judge import LabelMeta, build_label, choose_principles, judge, judge_quality
from cai.records import LabelAudit, LabelResult, PreferenceRow
from cai.sources import load_prompts
from cai.stages.base import StageContext, Timer, skip_message, usage_since
from cai.store import StageStore, atomic_write_jsonl

STAGE = "label"


def resolve_policy(ctx: StageContext) -> tuple[str, dict[str, str]]:
    """The policy model and the upstream stage it came from (the run's SFT model if there is one)."""
    cfg = ctx.config.label
    if cfg.policy:
        return cfg.policy, {}
    from cai.stages.ppo import stage_model

    sft = ctx.upstream_or_none("sft")
    if sft is not None:
        return stage_model(sft), {"sft": sft.config_hash}
    return ctx.config.model, {}


def label_store(ctx: StageContext) -> tuple[StageStore, str]:
    cfg = ctx.config.label
    policy, upstream = resolve_policy(ctx)
    config = {
        "label": cfg.model_dump(mode="json"),
        "policy": policy,
        "judge_model": cfg.judge_model or ctx.config.model,
        "engine": ctx.config.engine.model_dump(mode="json"),
        "seed": ctx.config.seed,
        "constitution": ctx.constitution.name,
        # only what this stage reads: editing another stage's texts must not redo this one
        "constitution_stage_hash": ctx.constitution.stage_hash("compare"),
        "templates": ctx.builder.template_hashes(cfg.template_names()),
    }
    return StageStore(ctx.run_dir, STAGE, config, upstream=upstream), policy


def run_label(ctx: StageContext, fresh: bool = False) -> StageStore:
    cfg = ctx.config.label
    store, policy = label_store(ctx)
    if fresh:
        store.discard()
    if store.is_complete:
        skip_message(ctx, store)
        return store
    timer = Timer()
    judge_model = cfg.judge_model or ctx.config.model
    examples = ctx.constitution.examples.compare[: cfg.few_shot]
    with store:
        done = store.committed()
        items = load_prompts(cfg.prompts)
        rows = [(f"{item.key}:{item.index}", item) for item in items]
        chunks = [rows[i : i + cfg.chunk_size] for i in range(0, len(rows), cfg.chunk_size)]
        todo = [(n, [r for r in chunk if r[0] not in done]) for n, chunk in enumerate(chunks)]
        todo = [(n, chunk) for n, chunk in todo if chunk]
        if done:
            ctx.console.print(f"resuming {STAGE}: {len(done)} of {len(rows)} labels already committed")
        meta = LabelMeta(
            judge_model_id=judge_model,
            policy_model_id=policy,
            constitution=ctx.constitution.name,
            constitution_hash=ctx.constitution.hash,
            template_hashes=store.config["templates"],
            config_hash=store.config_hash,
        )
        if todo:
            policy_backend = ctx.backend(policy)
            judge_backend = ctx.backend(judge_model, cfg.judge_engine)
            with ctx.progress(f"{STAGE}: K={cfg.responses}, judged in both orders", len(rows)) as advance:
                advance(len(rows) - sum(len(c) for _, c in todo))
                for number, chunk in todo:
                    before = [b.usage.model_copy() for b in (policy_backend, judge_backend)]
                    results = label_chunk(ctx, chunk, number, policy_backend, judge_backend, examples, meta)
                    usage = usage_since(policy_backend, before[0])
                    if judge_backend is not policy_backend:
                        usage = usage.plus(usage_since(judge_backend, before[1]))
                    store.commit(results, usage=usage)
                    ctx.model_calls += 1
                    advance(len(chunk))
        results = sorted(store.rows(LabelResult), key=lambda r: _order_key(r.row_id))
        audits = [r.audit for r in results if r.audit is not None]
        preferences = [p for r in results for p in r.preferences]
        gold = gold_agreement(ctx, judge_model, examples) if cfg.gold else (None, 0)
        quality = judge_quality(audits, *gold)
        summary = {
            **quality,
            "preference_rows": len(preferences),
            "failed_labels": sum(1 for r in results if r.error),
            "seconds": round(timer.seconds, 1),
        }
        store.finalize(
            outputs={
                "audit.jsonl": lambda path: atomic_write_jsonl(path, audits),
                "preferences.jsonl": lambda path: atomic_write_jsonl(path, preferences),
                "preferences.parquet": lambda path: _write_parquet(path, preferences),
                "README.md": lambda path: _write_card(path, store, summary, ctx.constitution.hash),
            },
            order=lambda row: _order_key(row["row_id"]),
            summary=summary,
        )
    print_quality(ctx, summary)
    ctx.console.print(
        f"[green]✓[/] {STAGE}: {len(audits)} labels, {len(preferences)} preference rows -> {store.path}"
    )
    return store


def _order_key(row_id: str) -> tuple[str, int]:
    source, _, index = row_id.rpartition(":")
    return source, int(index)


def label_chunk(ctx, chunk, number, policy_backend, judge_backend, examples, meta) -> list[LabelResult]:
    """Sample K responses per prompt (one call), judge them all (one scoring call)."""
    from cai.constitution import derive_seed

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
        principles = choose_principles(ctx.constitution, cfg.principles, ctx.config.seed, row_id)
        ready.append((row_id, item, [s.text for s in completion.samples], principles))
    votes = judge(
        judge_backend,
        ctx.builder,
        [item.prompt for _, item, _, _ in ready],
        [responses for _, _, responses, _ in ready],
        [principles for _, _, _, principles in ready],
        cfg,
        examples,
        seed=derive_seed(ctx.config.seed, "cot", number),
    )
    for (row_id, item, responses, _), label_votes in zip(ready, votes, strict=True):
        audit, preferences = build_label(row_id, item.prompt, responses, label_votes, cfg, meta)
        results.append(
            LabelResult(row_id=row_id, config_hash=meta.config_hash, audit=audit, preferences=preferences)
        )
    return results


def gold_agreement(ctx: StageContext, judge_model: str, examples) -> tuple[float | None, int]:
    """Share of human-labelled gold pairs where the judge's label agrees with the human's."""
    from cai.aggregate import aggregate
    from cai.judge import principle_votes
    from cai.resources import data_path

    cfg = ctx.config.label
    path = Path(cfg.gold)
    path = path if path.exists() else data_path(cfg.gold)
    gold = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    conversations = [[{"role": "user", "content": g["prompt"]}] for g in gold]
    responses = [[g["response_a"], g["response_b"]] for g in gold]
    principles = [choose_principles(ctx.constitution, cfg.principles, ctx.config.seed, g["id"]) for g in gold]
    votes = judge(
        ctx.backend(judge_model, cfg.judge_engine),
        ctx.builder,
        conversations,
        responses,
        principles,
        cfg,
        examples,
    )
    agree = 0
    for g, label_votes in zip(gold, votes, strict=True):
        winner = aggregate(principle_votes(label_votes, 2), cfg.rule).ranking[0]
        agree += winner == (0 if g["preferred"] == "a" else 1)
    return (agree / len(gold) if gold else None), len(gold)


def _write_parquet(path: Path, rows: list[PreferenceRow]) -> None:
    from cai.export import write_parquet

    write_parquet(path, rows)


def _write_card(path: Path, store: StageStore, summary: dict, constitution_hash: str) -> None:
    from cai.export import dataset_card, write_card

    config = store.config
    card = dataset_card(
        title=f"Constitutional AI preference labels ({config['constitution']})",
        summary=(
            "Responses sampled from the policy and compared by an AI judge under principles of the "
            "constitution, in both presentation orders; the normalised option probabilities are soft "
            "labels. Every row's `label_id` joins the audit rows, which hold each principle's vote."
        ),
        provenance={
            "constitution": config["constitution"],
            "constitution_hash": constitution_hash,
            "policy": config["policy"],
            "judge_model": config["judge_model"],
            "rule": config["label"]["rule"],
            "principles_per_label": config["label"]["principles"]["count"],
            "templates": ", ".join(f"{k}={v[:12]}" for k, v in config["templates"].items()),
            "config_hash": store.config_hash,
        },
        files={
            "preferences.parquet": "TRL preference format (prompt, chosen, rejected) + provenance columns",
            "preferences.jsonl": "the same rows as JSON lines",
            "audit.jsonl": "per label: every principle's votes in both orders, the rule, decisive principles",
        },
        columns={
            "prompt / chosen / rejected": "conversational messages",
            "source": "ai-harmless",
            "soft_label": "P(chosen is better) from the judge, aggregated over principles",
            "margin": "logit of the soft label",
            "weight / contested": "training weight and whether principles disagreed",
            "label_id": "joins audit.jsonl",
        },
        counts={k: v for k, v in summary.items() if isinstance(v, int)},
    )
    write_card(path, card)


def print_quality(ctx: StageContext, summary: dict) -> None:
    table = Table(title="judge quality", show_header=True)
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("what it means")

    def fmt(value):
        return "n/a" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))

    table.add_row(
        "position consistency",
        fmt(summary["position_consistency"]),
        "same verdict in both orders (1 = no position bias)",
    )
    table.add_row(
        "principle agreement", fmt(summary["principle_agreement"]), "principle weight agreeing with the label"
    )
    table.add_row(
        "contested labels", fmt(summary["contested_labels"]), "principles disagreed beyond the threshold"
    )
    table.add_row(
        "abstentions", fmt(summary["abstentions"]), f"of {summary['comparisons']} order-level comparisons"
    )
    table.add_row(
        "gold agreement",
        fmt(summary["gold_agreement"]),
        f"agreement with {summary['gold_n']} human-labelled pairs",
    )
    ctx.console.print(table)


def load_audits(store: StageStore) -> list[LabelAudit]:
    return [
        LabelAudit.model_validate_json(line) for line in (store.path / "audit.jsonl").read_text().splitlines()
    ]
