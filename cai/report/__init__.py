"""One self-contained HTML report of a run: labels and who shaped them, PPO curves, eval results.

    cai report -c configs/quickstart.yaml          # or: cai audit RUN_DIR --html report.html

The report is meant to be mailed, attached to an issue or opened from a CI artifact years later,
so it is a single file with no external references: inline CSS, plots as base64 PNG, no
JavaScript. Everything that comes from data is HTML-escaped (`cai.report.html`). A section whose
input is missing says "not run" instead of disappearing, so a reader can tell a skipped stage
from a stage that had nothing to say. The label sections render one `cai.audit.AuditSummary`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cai.audit import AuditSummary, ContestedPair, LabelView, PrincipleInfluence
from cai.audit.groups import GroupsTable, group_table_rows, groups_caption
from cai.records import MetricRow
from cai.report.heatmap import conflicts_section
from cai.report.html import CSS, ci, cut, e, fmt, not_run, pct, table
from cai.report.plots import (
    PPO_KEYS,
    plot_eval,
    plot_influence,
    plot_or_error,
    plot_position,
    plot_ppo,
    plot_soft_labels,
    series,
)

if TYPE_CHECKING:
    from cai.constitution import Constitution
    from cai.gate import JudgeCheck

__all__ = ["PPO_KEYS", "SECTIONS", "series", "write_report"]

SECTIONS = {
    "summary": "Run summary",
    "verify": "Verified revisions (SL)",
    "gate": "Judge gate (gold pairs)",
    "judge": "Judge quality",
    "influence": "Principle influence",
    "soft-labels": "Soft labels",
    "position": "Position consistency",
    "contested": "Contested labels",
    "conflicts": "Contested principles",
    "ppo": "PPO training",
    "eval": "Evaluation",
    "pm": "Preference model",
    "labels": "Labels",
}
"""Section id -> heading, in page order. The long per-label listing goes last so every plot
fits in the first screens."""

GROUPS_SECTION = "Groups"
"""Shown after the contested labels, in pluralistic runs only (`cai.audit.groups`)."""


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _keys(stage: Mapping[str, Any]) -> dict[str, Any]:
    """A stage's key and its inputs' keys as folder names (12 characters; manifest.json has them whole)."""
    shown = {k: v for k, v in stage.items() if k not in ("config_hash", "upstream", "path")}
    if "config_hash" in stage:
        shown["key"] = str(stage["config_hash"])[:12]
    if "upstream" in stage:
        shown["reads"] = ", ".join(f"{name} {key[:12]}" for name, key in stage["upstream"].items()) or "–"
    return shown


def _summary_section(summary: Mapping[str, Any] | None) -> str:
    if not summary:
        return not_run("no stage summary (timings, tokens) was given")
    if all(isinstance(v, Mapping) for v in summary.values()):
        summary = {stage: _keys(v) for stage, v in summary.items()}
        # {stage: {elapsed_s, rows, usage: {...}}}: one row per stage, one column per figure.
        flat = {stage: _flatten(v) for stage, v in summary.items()}
        columns = list(dict.fromkeys(k for v in flat.values() for k in v))
        rows = [[stage, *(v.get(c, "") for c in columns)] for stage, v in flat.items()]
        return table(["stage", *columns], rows, numeric=range(1, len(columns) + 1))
    flat = _flatten(summary)
    return table(["figure", "value"], [[k, v] for k, v in flat.items()], numeric=[1])


def _verify_section(verify: Mapping[str, Any] | None) -> str:
    """The SL stage's `summary["verify"]` (`cai.verify.verify_summary`): per principle, how many
    revisions the judge let through, and its verdicts."""
    if not verify:
        return not_run("sl.verify is off (or no SL stage): revisions were not checked by the judge")
    kept = "kept only revisions judged better" if verify["mode"] == "filter" else "kept every revision"
    head = (
        f"<p>sl.verify = {e(verify['mode'])}: the judge compared each revision with the answer it "
        f"revised; {kept}.</p>"
    )
    counts = ("accepted", "rejected", "better", "worse", "no_verdict")
    rows = [[pid, *(t[k] for k in counts)] for pid, t in verify["by_principle"].items()]
    rows.append(["all", *(verify[k] for k in counts)])
    return head + table(["principle", *(k.replace("_", " ") for k in counts)], rows, numeric=range(1, 6))


def _banner(notes: Sequence[str]) -> str:
    """The warning a reader must see before any figure: the labels may carry no signal."""
    if not notes:
        return ""
    items = "".join(f"<li>{e(note)}</li>" for note in notes)
    return (
        '<div class="banner" role="alert"><b>These labels carry no measurable signal, or less than '
        f"they seem.</b><ul>{items}</ul>Read the judge section before using the labels or anything "
        "trained on them.</div>"
    )


def _gate_section(gate: JudgeCheck | None, failures: Sequence[str]) -> str:
    if gate is None:
        return not_run("the judge was not measured on gold pairs (label.gold is null)")
    verdict = '<span class="bad">Gate failed.</span>' if failures else "Gate passed."
    head = (
        f"<p>{e(gate.judge_model)} on {gate.n} human-labelled gold pairs ({e(gate.gold)}): "
        f"agreement <b>{gate.agreement:.2f}</b>, 95% bootstrap interval "
        f"{gate.ci[0]:.2f} – {gate.ci[1]:.2f}; a pair without a verdict counts as no agreement. "
        f"{verdict}</p>"
    )
    rows = [["all", gate.n, f"{gate.agreement:.2f}"]] + [
        [name, figure.n, f"{figure.agreement:.2f}"] for name, figure in gate.by_category.items()
    ]
    figures = [
        ["coverage (pairs with a verdict)", fmt(gate.coverage, 2)],
        ["agreement among verdicts", fmt(gate.agreement_given_verdict, 2)],
        ["position consistency", pct(gate.position_consistency)],
        ["readings without a verdict", ", ".join(f"{k} {v}" for k, v in gate.no_verdict.items()) or "none"],
        ["cost", f"{gate.seconds:.0f} s, {gate.scored_tokens} scored tokens"],
    ]
    return (
        head
        + table(["category", "n", "agreement"], rows, numeric=[1, 2])
        + table(["figure", "value"], figures)
        + "".join(f'<p class="bad">{e(f)}</p>' for f in failures)
    )


def _judge_section(audit: AuditSummary) -> str:
    return table(["figure", "value"], [*map(list, audit.quality_rows), *map(list, audit.provenance)])


def _influence_section(influence: Sequence[PrincipleInfluence], constitution: Constitution | None) -> str:
    tags = {p.id: ", ".join(p.tags) for p in constitution.principles} if constitution else {}
    headers = [
        "principle",
        *(["tags"] if tags else []),
        "labels",
        "decisive",
        "disagreed",
        "disagree rate",
        "verdicts",
        "no verdict",
        "mean |p−0.5| of verdicts",
        "position consistent",
    ]
    offset = 1 if tags else 0
    rows = [
        [
            p.principle_id,
            *([tags.get(p.principle_id, "?")] if tags else []),
            p.labels,
            p.decisive,
            p.disagreed,
            pct(p.disagreement_rate),
            p.verdicts,
            p.no_verdicts,
            fmt(p.mean_strength),
            pct(p.position_consistency),
        ]
        for p in influence
    ]
    return (
        plot_or_error(lambda: plot_influence(influence), "principle influence bar chart")
        + '<p class="meta">Verdicts only: a reading counts when both orders prefer the same response '
        "clear of the margin. decisive: the principle is named in a derived pair's decisive list; "
        "disagreed: its verdict preferred the rejected response of a derived pair.</p>"
        + table(headers, rows, numeric=range(1 + offset, len(headers)))
    )


def _contested_section(contested: Sequence[ContestedPair]) -> str:
    if not contested:
        return "<p>No contested labels.</p>"
    rows = [
        [
            c.label_id,
            f"{c.chosen} > {c.rejected}",
            fmt(c.soft_label),
            ", ".join(c.agree),
            ", ".join(c.disagree),
            ", ".join(c.no_verdict),
            ", ".join(c.decisive),
        ]
        for c in contested
    ]
    return table(
        [
            "label",
            "chosen > rejected",
            "soft label",
            "principles for",
            "principles against",
            "no verdict",
            "decisive",
        ],
        rows,
    )


def _groups_section(groups: GroupsTable) -> str:
    headers, rows = group_table_rows(groups)
    return (
        f'<p class="meta">{e(groups_caption(groups))}. Target share: the group\'s weight (its share of '
        "the population); achieved: the disagreed pairs its verdict decided.</p>"
        + table(headers, rows, numeric=range(2, len(headers)))
    )


def _label_block(view: LabelView) -> str:
    flag = ' <span class="contested">contested</span>' if view.contested else ""
    flag += "" if view.has_verdict else ' <span class="bad">no verdict: no signal</span>'
    responses = "".join(
        f'<li value="{n}" class="text">{e(cut(r))}</li>' for n, r in enumerate(view.responses)
    )
    votes = table(
        [
            "principle",
            "pair i vs j",
            "P(i) shown first (ab)",
            "P(i) shown second (ba)",
            "combined",
            "position consistent",
            "verdict",
            "reasoning",
        ],
        [
            [
                v.principle_id,
                f"{v.i} vs {v.j}",
                fmt(v.p_ab),
                fmt(v.p_ba),
                "abstained" if v.abstained else fmt(v.combined),
                "–" if v.position_consistent is None else "yes" if v.position_consistent else "NO",
                f"for {v.verdict}" if v.verdict is not None else f"none: {v.no_verdict}",
                v.reasoning or "",
            ]
            for v in view.votes
        ],
    )
    pairs = table(
        [
            "chosen > rejected",
            "soft label",
            "training",
            "contested",
            "decisive",
            "for",
            "against",
            "no verdict",
        ],
        [
            [
                f"{p.chosen} > {p.rejected}",
                fmt(p.soft_label),
                p.training,
                "yes" if p.contested else "no",
                ", ".join(p.decisive),
                ", ".join(p.agree),
                ", ".join(p.disagree),
                ", ".join(p.no_verdict),
            ]
            for p in view.pairs
        ],
    )
    return (
        f'<div class="label"><h3>{e(view.label_id)}{flag}</h3>'
        f'<p class="meta">row {e(view.row_id)} · rule {e(view.rule)} · ranking '
        f"{e(' > '.join(map(str, view.ranking)))} · principle agreement {fmt(view.principle_agreement, 2)}"
        f"{' · chain of thought' if view.cot else ''}</p>"
        f'<p class="text"><b>Prompt:</b> {e(cut(view.prompt))}</p>'
        f'<ol class="responses" start="0">{responses}</ol>{votes}{pairs}</div>'
    )


def _ppo_section(history: Sequence[Mapping[str, Any]] | None) -> str:
    if not history:
        return not_run("no PPO history")
    last = history[-1]
    figures = [[k, v] for k, v in last.items() if isinstance(v, int | float | str)]
    return (
        plot_or_error(lambda: plot_ppo(history), "PPO reward and KL curves")
        + f"<h3>Last logged step ({len(history)} rows)</h3>"
        + table(["key", "value"], figures, numeric=[1])
    )


def _eval_section(eval_rows: Sequence[MetricRow] | None) -> str:
    rows = [r for r in eval_rows or [] if r.policy != "pm"]
    if not rows:
        return not_run("no evaluation results")
    listing = table(
        ["metric", "policy", "value", "95% CI", "n", "note"],
        [[r.metric, r.policy, r.value, ci(r), r.n, r.note or ""] for r in rows],
        numeric=[2, 4],
    )
    return plot_or_error(lambda: plot_eval(rows), "evaluation results with intervals") + listing


def _pm_section(pm_metrics: Mapping[str, Any] | None, eval_rows: Sequence[MetricRow] | None) -> str:
    pm_rows = [r for r in eval_rows or [] if r.policy == "pm"]
    parts = []
    if pm_metrics:
        parts.append(
            table(["figure", "value"], [[k, v] for k, v in _flatten(pm_metrics).items()], numeric=[1])
        )
    if pm_rows:
        parts.append(
            table(
                ["metric", "value", "95% CI", "n", "note"],
                [[r.metric, r.value, ci(r), r.n, r.note or ""] for r in pm_rows],
                numeric=[1, 3],
            )
        )
    return "".join(parts) or not_run("no preference-model metrics")


def write_report(
    path: Path,
    *,
    audit: AuditSummary | None,
    ppo_history: list[dict] | None,
    eval_rows: list[MetricRow] | None,
    pm_metrics: dict | None,
    summary: dict | None,
    title: str,
    constitution: Constitution | None = None,
    max_labels: int = 50,
    sl_verify: dict | None = None,
) -> Path:
    """Write the report to `path` (parents created) and return it.

    `audit` is the run's `cai.audit.summarize(rows, gate, failures)`: a failed judge gate, or
    labels mostly without a verdict, open the page with a banner. `ppo_history` rows are dicts
    with ``step``, ``reward_mean`` and ``kl`` (``reward_std`` and ``kl_coef`` are plotted when
    present). `eval_rows` with policy ``pm`` go to the preference model section.
    `constitution`, when given, adds principle tags to the influence table. `sl_verify` is the SL
    stage's `summary["verify"]` (present only when `sl.verify` was on).
    """
    from cai.atomic import atomic_write_bytes

    sections: dict[str, str] = {}
    banner: list[str] = []
    sections["summary"] = _summary_section(summary)
    sections["verify"] = _verify_section(sl_verify)
    if audit is not None:
        banner = audit.warnings
        quality = audit.quality
        sections["gate"] = _gate_section(audit.gate, audit.gate_failures)
        sections["judge"] = _judge_section(audit)
        sections["influence"] = _influence_section(audit.influence, constitution)
        sections["soft-labels"] = plot_or_error(
            lambda: plot_soft_labels(audit.labels), "soft-label histogram"
        )
        sections["position"] = plot_or_error(
            lambda: plot_position(audit.influence, quality.position_consistency),
            "position consistency per principle",
        )
        sections["contested"] = _contested_section(audit.contested)
        sections["conflicts"] = conflicts_section(audit.conflicts, audit.group_conflicts)
        if audit.groups is not None:  # pluralistic runs only
            sections["groups"] = _groups_section(audit.groups)
        shown = audit.labels[:max_labels]
        more = (
            f'<p class="meta">showing {len(shown)} of {len(audit.labels)} labels</p>'
            if len(audit.labels) > len(shown)
            else ""
        )
        sections["labels"] = more + "".join(_label_block(view) for view in shown)
    else:
        sections["gate"] = not_run("no label stage")
        for key in ("judge", "influence", "soft-labels", "position", "contested", "conflicts", "labels"):
            sections[key] = not_run("no label audit rows")
    sections["ppo"] = _ppo_section(ppo_history)
    sections["eval"] = _eval_section(eval_rows)
    sections["pm"] = _pm_section(pm_metrics, eval_rows)

    order = list(SECTIONS.items())
    if "groups" in sections:
        order.insert(list(SECTIONS).index("contested") + 1, ("groups", GROUPS_SECTION))
    nav = "".join(f'<a href="#{key}">{e(name)}</a>' for key, name in order)
    body = "".join(f'<section id="{key}"><h2>{e(name)}</h2>{sections[key]}</section>' for key, name in order)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)}</title><style>{CSS}</style></head><body><main>"
        f'<h1>{e(title)}</h1><p class="meta">written by cai {e(_version())} on {stamp}</p>'
        f"{_banner(banner)}<nav>{nav}</nav>{body}</main></body></html>\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, page.encode("utf-8"))
    return path


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("cai")
    except metadata.PackageNotFoundError:
        return "unknown"
