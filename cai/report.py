"""One self-contained HTML report of a run: labels and who shaped them, PPO curves, eval results.

    cai audit runs/demo --html runs/demo/report.html

The report is meant to be mailed, attached to an issue or opened from a CI artifact years later,
so it is a single file with no external references: inline CSS, plots as base64 PNG, no
JavaScript. Everything that comes from data (prompts, responses, chain-of-thought, principle ids)
is HTML-escaped, because red-team prompts and policy outputs routinely contain markup such as
``<script>``. A section whose input is missing says "not run" instead of disappearing, so a
reader can tell a skipped stage from a stage that had nothing to say.

matplotlib is imported inside the plotting helpers and used through `Figure` objects only (never
pyplot), so writing a report neither slows `import cai` nor touches the process-wide backend.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cai.audit import (
    ContestedPair,
    JudgeQuality,
    LabelView,
    PrincipleInfluence,
    _fmt,
    _pct,
    contested_labels,
    judge_quality,
    label_view,
    principle_influence,
    quality_items,
    quality_warnings,
)
from cai.records import LabelAudit, MetricRow

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from cai.constitution import Constitution
    from cai.gate import JudgeCheck

__all__ = ["PPO_KEYS", "SECTIONS", "write_report"]

SECTIONS = {
    "summary": "Run summary",
    "gate": "Judge gate (gold pairs)",
    "judge": "Judge quality",
    "influence": "Principle influence",
    "soft-labels": "Soft labels",
    "position": "Position consistency",
    "contested": "Contested labels",
    "ppo": "PPO training",
    "eval": "Evaluation",
    "pm": "Preference model",
    "labels": "Labels",
}
"""Section id -> heading, in page order. The long per-label listing goes last so every plot
fits in the first screens."""

PPO_KEYS: dict[str, tuple[str, ...]] = {
    "step": ("step",),
    "reward": ("reward_mean", "reward"),
    "reward_std": ("reward_std",),
    "kl": ("kl",),
    "kl_coef": ("kl_coef",),
}
"""PPO history keys the report plots, each with its accepted spellings (first found wins): cai's
PPO trainer logs ``reward``, other loggers ``reward_mean``. Other keys show in the last-step table."""

MAX_TEXT = 400
"""Prompts and responses are cut here in the per-label listing; the audit file has them whole."""

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2430;margin:0;
  background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:16px 28px 48px}
h1{font-size:26px;margin:18px 0 4px}
h2{font-size:20px;margin:30px 0 8px;padding-top:8px;border-top:2px solid #d9dde3}
h3{font-size:15px;margin:18px 0 6px}
.meta{color:#5b6573;font-size:12px}
nav{font-size:13px;margin:8px 0 4px}nav a{margin-right:12px;color:#2456a6;text-decoration:none}
table{border-collapse:collapse;margin:6px 0 10px;background:#fff;font-size:13px}
th,td{border:1px solid #d9dde3;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef1f5;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
.not-run{color:#8a4b00;background:#fff4e0;border:1px solid #f0d6a8;padding:6px 10px;display:inline-block;
  border-radius:4px}
.plot{max-width:100%;height:auto;background:#fff;border:1px solid #d9dde3}
.label{background:#fff;border:1px solid #d9dde3;border-radius:4px;padding:8px 12px;margin:10px 0}
.contested{color:#b3261e;font-weight:600}.bad{color:#b3261e}
.banner{background:#fdecea;border:2px solid #b3261e;color:#5f1410;padding:10px 14px;margin:12px 0;
  border-radius:6px;font-size:15px}.banner b{color:#b3261e}
.text{white-space:pre-wrap;word-break:break-word}
ol.responses{margin:4px 0 6px 0;padding-left:28px}
"""


# --------------------------------------------------------------------------------------------
# Small HTML helpers: every piece of data passes through `_e`
# --------------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> str:
    """Numbers in tables: 4 significant digits for floats, plain for the rest."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _e(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return _e(value)
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _cut(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Iterable[int] = ()) -> str:
    """A table of escaped cells; `numeric` column indexes are right-aligned and number-formatted."""
    numeric = set(numeric)
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{_num(cell)}</td>' if n in numeric else f"<td>{_e(cell)}</td>"
            for n, cell in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _not_run(what: str) -> str:
    return f'<p class="not-run">not run: {_e(what)}</p>'


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="plot" alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _ci(row: MetricRow) -> str:
    if row.ci_low is None or row.ci_high is None:
        return "–"
    width = max(abs(row.ci_low), abs(row.ci_high))
    digits = 0 if width >= 100 else 1 if width >= 10 else 3
    return f"{row.ci_low:.{digits}f} – {row.ci_high:.{digits}f}"


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    # No metadata: the PNG (and so the report) is the same bytes for the same data.
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _plot_influence(influence: Sequence[PrincipleInfluence]) -> bytes:
    ids = [p.principle_id for p in influence]
    fig = _figure(7.5, 0.9 + 0.55 * max(len(ids), 3))
    ax = fig.add_subplot()
    series = [
        ("labels voted on", [p.labels for p in influence], "#b8c4d6"),
        ("decisive", [p.decisive for p in influence], "#2456a6"),
        ("disagreed with the label", [p.disagreed for p in influence], "#d9822b"),
    ]
    height = 0.26
    for n, (name, values, colour) in enumerate(series):
        ys = [y + (n - 1) * height for y in range(len(ids))]
        ax.barh(ys, values, height=height, color=colour, label=name)
    ax.set_yticks(range(len(ids)), ids)
    ax.invert_yaxis()  # most decisive on top, as in the table below
    ax.set_xlabel("labels")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(axis="x", color="#e3e6ea", lw=0.8)
    ax.set_axisbelow(True)
    ax.legend(
        loc="upper center",
        bbox_to_anchor=(0.5, -0.18 if len(ids) > 3 else -0.3),
        ncol=3,
        fontsize=8,
        frameon=False,
    )
    ax.set_title("Principle influence")
    return _png(fig)


def _plot_soft_labels(rows: Sequence[LabelAudit]) -> bytes:
    # Rounded so a mean that lands a hair below a bin edge (0.5999...) is binned by its exact value.
    pairs = [p for r in rows for p in r.pairs]
    calm = [round(p.soft_label, 9) for p in pairs if p.has_verdict and not p.contested]
    contested = [round(p.soft_label, 9) for p in pairs if p.contested]
    silent = [round(p.soft_label, 9) for p in pairs if not p.has_verdict]
    fig = _figure(5.6, 3.4)
    ax = fig.add_subplot()
    edges = [n / 20 for n in range(21)]
    ax.hist(
        [calm, contested, silent],
        bins=edges,
        stacked=True,
        color=["#2456a6", "#d9822b", "#b8bcc4"],
        label=["verdict, not contested", "contested", "no verdict (no signal)"],
    )
    ax.axvline(0.5, color="#555", lw=1, ls="--")
    ax.set_xlim(0, 1)
    ax.set_xlabel("soft label P(chosen better)")
    ax.set_ylabel("derived pairs")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    ax.set_title("Soft-label histogram")
    return _png(fig)


def _plot_position(influence: Sequence[PrincipleInfluence], overall: float | None) -> bytes:
    known = [p for p in influence if p.position_consistency is not None]
    known.sort(key=lambda p: (-(p.position_consistency or 0.0), p.principle_id))
    ids = [p.principle_id for p in known]
    values = [p.position_consistency or 0.0 for p in known]
    fig = _figure(5.6, 0.9 + 0.34 * max(len(ids), 3))
    ax = fig.add_subplot()
    colours = ["#2456a6" if v >= 0.8 else "#d9822b" if v >= 0.5 else "#b3261e" for v in values]
    ax.barh(range(len(ids)), values, color=colours)
    for y, value in enumerate(values):  # a 0% bar is invisible without its number
        inside = value >= 0.15
        ax.text(
            value - 0.02 if inside else value + 0.02,
            y,
            f"{value:.0%}",
            va="center",
            fontsize=8,
            ha="right" if inside else "left",
            color="white" if inside else "#1d2430",
        )
    ax.set_yticks(range(len(ids)), ids)
    ax.invert_yaxis()
    title = "Position consistency per principle"
    if overall is not None:
        ax.axvline(overall, color="#333", ls="--", lw=1)
        title += f" (all: {overall:.0%}, dashed)"
    ax.set_xlim(0, 1.0)
    ax.set_xlabel("same preference in both orders (share of comparisons)")
    ax.set_title(title, fontsize=10)
    return _png(fig)


def _series(history: Sequence[Mapping[str, Any]], name: str) -> tuple[list[float], list[float]]:
    """(steps, values) for rows carrying a finite number under one of `PPO_KEYS[name]`."""
    keys = [k for k in PPO_KEYS[name] if any(k in row for row in history)][:1]
    xs, ys = [], []
    for n, row in enumerate(history):
        value = row.get(keys[0]) if keys else None
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(float(row.get("step", n)))
            ys.append(float(value))
    return xs, ys


def _plot_ppo(history: Sequence[Mapping[str, Any]]) -> bytes:
    fig = _figure(10, 3.7)
    left, right = fig.subplots(1, 2)
    xs, ys = _series(history, "reward")
    left.plot(xs, ys, color="#2456a6", marker="o", ms=3, label="reward (PM) mean")
    sx, sd = _series(history, "reward_std")
    if sd and sx == xs:
        left.fill_between(
            xs,
            [y - s for y, s in zip(ys, sd, strict=True)],
            [y + s for y, s in zip(ys, sd, strict=True)],
            color="#2456a6",
            alpha=0.15,
            label="± 1 std",
        )
    left.set_xlabel("step")
    left.set_ylabel("reward")
    left.set_title("Reward")
    below = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.2), "ncol": 2, "fontsize": 8, "frameon": False}
    left.legend(**below)
    kx, kl = _series(history, "kl")
    right.plot(kx, kl, color="#b3261e", marker="o", ms=3, label="KL(policy ‖ SFT)")
    right.set_xlabel("step")
    right.set_ylabel("KL (nats)")
    right.set_title("KL to the reference model")
    cx, coef = _series(history, "kl_coef")
    if coef:
        twin = right.twinx()
        twin.plot(cx, coef, color="#777", ls="--", label="KL coefficient β")
        twin.set_ylabel("β")
        lines = right.get_legend_handles_labels()
        more = twin.get_legend_handles_labels()
        right.legend(lines[0] + more[0], lines[1] + more[1], **below)
    else:
        right.legend(**below)
    return _png(fig)


def _plot_eval(rows: Sequence[MetricRow]) -> bytes:
    metrics = list(dict.fromkeys(r.metric for r in rows))
    cols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / cols)
    fig = _figure(3.6 * cols, 2.9 * nrows)
    axes = fig.subplots(nrows, cols, squeeze=False)
    palette = ["#2456a6", "#d9822b", "#3a8f5c", "#8e44ad", "#b3261e", "#555"]
    policies = list(dict.fromkeys(r.policy for r in rows))
    for n, metric in enumerate(metrics):
        ax = axes[n // cols][n % cols]
        items = [r for r in rows if r.metric == metric]
        x = range(len(items))
        ax.bar(
            x,
            [r.value for r in items],
            color=[palette[policies.index(r.policy) % len(palette)] for r in items],
        )
        with_ci = [
            (n, r) for n, r in zip(x, items, strict=True) if r.ci_low is not None and r.ci_high is not None
        ]
        if with_ci:  # a figure without an interval gets no bar, rather than a misleading zero-width one
            ax.errorbar(
                [n for n, _ in with_ci],
                [r.value for _, r in with_ci],
                fmt="none",
                ecolor="#1d2430",
                capsize=4,
                yerr=[
                    [r.value - (r.ci_low or 0.0) for _, r in with_ci],
                    [(r.ci_high or 0.0) - r.value for _, r in with_ci],
                ],
            )
        ax.set_xticks(list(x), [r.policy for r in items])
        ax.set_title(f"{metric}", fontsize=10)
        if all(0.0 <= r.value <= 1.0 for r in items):
            ax.set_ylim(0, 1.05)
    for n in range(len(metrics), nrows * cols):
        axes[n // cols][n % cols].set_visible(False)
    fig.suptitle("Evaluation (error bars: 95% bootstrap interval)", fontsize=11)
    return _png(fig)


def _plot_or_error(plot: Callable[[], bytes], alt: str) -> str:
    """A plot that fails must not cost the reader the rest of the report; say so in its place."""
    try:
        return _img(plot(), alt)
    except Exception as error:  # noqa: BLE001 - reported in the page
        return f'<p class="bad">plot failed: {_e(type(error).__name__)}: {_e(error)}</p>'


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


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
        return _not_run("no stage summary (timings, tokens) was given")
    if all(isinstance(v, Mapping) for v in summary.values()):
        summary = {stage: _keys(v) for stage, v in summary.items()}
        # {stage: {elapsed_s, rows, usage: {...}}}: one row per stage, one column per figure.
        flat = {stage: _flatten(v) for stage, v in summary.items()}
        columns = list(dict.fromkeys(k for v in flat.values() for k in v))
        rows = [[stage, *(v.get(c, "") for c in columns)] for stage, v in flat.items()]
        return _table(["stage", *columns], rows, numeric=range(1, len(columns) + 1))
    flat = _flatten(summary)
    return _table(["figure", "value"], [[k, v] for k, v in flat.items()], numeric=[1])


def _banner(notes: Sequence[str]) -> str:
    """The warning a reader must see before any figure: the labels may carry no signal."""
    if not notes:
        return ""
    items = "".join(f"<li>{_e(note)}</li>" for note in notes)
    return (
        '<div class="banner" role="alert"><b>These labels carry no measurable signal, or less than '
        f"they seem.</b><ul>{items}</ul>Read the judge section before using the labels or anything "
        "trained on them.</div>"
    )


def _gate_section(gate: JudgeCheck | None, failures: Sequence[str]) -> str:
    if gate is None:
        return _not_run("the judge was not measured on gold pairs (label.gold is null)")
    verdict = '<span class="bad">Gate failed.</span>' if failures else "Gate passed."
    head = (
        f"<p>{_e(gate.judge_model)} on {gate.n} human-labelled gold pairs ({_e(gate.gold)}): "
        f"agreement <b>{gate.agreement:.2f}</b>, 95% bootstrap interval "
        f"{gate.ci[0]:.2f} – {gate.ci[1]:.2f}; a pair without a verdict counts as no agreement. "
        f"{verdict}</p>"
    )
    rows = [["all", gate.n, f"{gate.agreement:.2f}"]] + [
        [name, figure.n, f"{figure.agreement:.2f}"] for name, figure in gate.by_category.items()
    ]
    figures = [
        ["coverage (pairs with a verdict)", _fmt(gate.coverage, 2)],
        ["agreement among verdicts", _fmt(gate.agreement_given_verdict, 2)],
        ["position consistency", _pct(gate.position_consistency)],
        ["readings without a verdict", ", ".join(f"{k} {v}" for k, v in gate.no_verdict.items()) or "none"],
        ["cost", f"{gate.seconds:.0f} s, {gate.scored_tokens} scored tokens"],
    ]
    return (
        head
        + _table(["category", "n", "agreement"], rows, numeric=[1, 2])
        + _table(["figure", "value"], figures)
        + "".join(f'<p class="bad">{_e(f)}</p>' for f in failures)
    )


def _judge_section(rows: Sequence[LabelAudit], quality: JudgeQuality, gate: JudgeCheck | None) -> str:
    provenance = [
        ["judge model(s)", ", ".join(sorted({r.judge_model_id for r in rows}))],
        ["policy model(s)", ", ".join(sorted({r.policy_model_id for r in rows}))],
        ["rule(s)", ", ".join(sorted({r.rule for r in rows}))],
        [
            "constitution(s)",
            ", ".join(sorted({f"{r.constitution} ({r.constitution_hash[:12]})" for r in rows})),
        ],
        ["chain of thought", ", ".join(sorted({"yes" if r.cot else "no" for r in rows}))],
    ]
    return _table(["figure", "value"], [*map(list, quality_items(quality, gate)), *provenance])


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
            _pct(p.disagreement_rate),
            p.verdicts,
            p.no_verdicts,
            _fmt(p.mean_strength),
            _pct(p.position_consistency),
        ]
        for p in influence
    ]
    return (
        _plot_or_error(lambda: _plot_influence(influence), "principle influence bar chart")
        + '<p class="meta">Verdicts only: a reading counts when both orders prefer the same response '
        "clear of the margin. decisive: the principle is named in a derived pair's decisive list; "
        "disagreed: its verdict preferred the rejected response of a derived pair.</p>"
        + _table(headers, rows, numeric=range(1 + offset, len(headers)))
    )


def _contested_section(contested: Sequence[ContestedPair]) -> str:
    if not contested:
        return "<p>No contested labels.</p>"
    rows = [
        [
            c.label_id,
            f"{c.chosen} > {c.rejected}",
            _fmt(c.soft_label),
            ", ".join(c.agree),
            ", ".join(c.disagree),
            ", ".join(c.no_verdict),
            ", ".join(c.decisive),
        ]
        for c in contested
    ]
    return _table(
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


def _label_block(view: LabelView) -> str:
    flag = ' <span class="contested">contested</span>' if view.contested else ""
    flag += "" if view.has_verdict else ' <span class="bad">no verdict: no signal</span>'
    responses = "".join(
        f'<li value="{n}" class="text">{_e(_cut(r))}</li>' for n, r in enumerate(view.responses)
    )
    votes = _table(
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
                _fmt(v.p_ab),
                _fmt(v.p_ba),
                "abstained" if v.abstained else _fmt(v.combined),
                "–" if v.position_consistent is None else "yes" if v.position_consistent else "NO",
                f"for {v.verdict}" if v.verdict is not None else f"none: {v.no_verdict}",
                v.reasoning or "",
            ]
            for v in view.votes
        ],
    )
    pairs = _table(
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
                _fmt(p.soft_label),
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
        f'<div class="label"><h3>{_e(view.label_id)}{flag}</h3>'
        f'<p class="meta">row {_e(view.row_id)} · rule {_e(view.rule)} · ranking '
        f"{_e(' > '.join(map(str, view.ranking)))} · principle agreement {_fmt(view.principle_agreement, 2)}"
        f"{' · chain of thought' if view.cot else ''}</p>"
        f'<p class="text"><b>Prompt:</b> {_e(_cut(view.prompt))}</p>'
        f'<ol class="responses" start="0">{responses}</ol>{votes}{pairs}</div>'
    )


def _ppo_section(history: Sequence[Mapping[str, Any]] | None) -> str:
    if not history:
        return _not_run("no PPO history")
    last = history[-1]
    figures = [[k, v] for k, v in last.items() if isinstance(v, int | float | str)]
    return (
        _plot_or_error(lambda: _plot_ppo(history), "PPO reward and KL curves")
        + f"<h3>Last logged step ({len(history)} rows)</h3>"
        + _table(["key", "value"], figures, numeric=[1])
    )


def _eval_section(eval_rows: Sequence[MetricRow] | None) -> str:
    rows = [r for r in eval_rows or [] if r.policy != "pm"]
    if not rows:
        return _not_run("no evaluation results")
    table = _table(
        ["metric", "policy", "value", "95% CI", "n", "note"],
        [[r.metric, r.policy, r.value, _ci(r), r.n, r.note or ""] for r in rows],
        numeric=[2, 4],
    )
    return _plot_or_error(lambda: _plot_eval(rows), "evaluation results with intervals") + table


def _pm_section(pm_metrics: Mapping[str, Any] | None, eval_rows: Sequence[MetricRow] | None) -> str:
    pm_rows = [r for r in eval_rows or [] if r.policy == "pm"]
    parts = []
    if pm_metrics:
        parts.append(
            _table(["figure", "value"], [[k, v] for k, v in _flatten(pm_metrics).items()], numeric=[1])
        )
    if pm_rows:
        parts.append(
            _table(
                ["metric", "value", "95% CI", "n", "note"],
                [[r.metric, r.value, _ci(r), r.n, r.note or ""] for r in pm_rows],
                numeric=[1, 3],
            )
        )
    return "".join(parts) or _not_run("no preference-model metrics")


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def write_report(
    path: Path,
    *,
    audit: list[LabelAudit] | None,
    ppo_history: list[dict] | None,
    eval_rows: list[MetricRow] | None,
    pm_metrics: dict | None,
    summary: dict | None,
    title: str,
    constitution: Constitution | None = None,
    gate: JudgeCheck | None = None,
    gate_failures: Sequence[str] = (),
    max_labels: int = 50,
) -> Path:
    """Write the report to `path` (parents created) and return it.

    `ppo_history` rows are dicts with ``step``, ``reward_mean`` and ``kl`` (``reward_std`` and
    ``kl_coef`` are plotted when present). `eval_rows` with policy ``pm`` go to the preference
    model section. `constitution`, when given, adds principle tags to the influence table.
    `gate` is the judge measured on gold pairs; a failed gate, or labels mostly without a
    verdict, open the page with a banner.
    """
    from cai.atomic import atomic_write_bytes

    sections: dict[str, str] = {}
    banner: list[str] = [f"the judge failed its gate: {failure}" for failure in gate_failures]
    sections["summary"] = _summary_section(summary)
    sections["gate"] = _gate_section(gate, gate_failures) if audit or gate else _not_run("no label stage")
    if audit:
        quality = judge_quality(audit)
        influence = principle_influence(audit)
        banner = quality_warnings(quality, gate_failures)
        sections["judge"] = _judge_section(audit, quality, gate)
        sections["influence"] = _influence_section(influence, constitution)
        sections["soft-labels"] = _plot_or_error(lambda: _plot_soft_labels(audit), "soft-label histogram")
        sections["position"] = _plot_or_error(
            lambda: _plot_position(influence, quality.position_consistency),
            "position consistency per principle",
        )
        sections["contested"] = _contested_section(contested_labels(audit))
        shown = audit[:max_labels]
        more = (
            f'<p class="meta">showing {len(shown)} of {len(audit)} labels</p>'
            if len(audit) > len(shown)
            else ""
        )
        sections["labels"] = more + "".join(_label_block(label_view(row)) for row in shown)
    else:
        for key in ("judge", "influence", "soft-labels", "position", "contested", "labels"):
            sections[key] = _not_run("no label audit rows")
    sections["ppo"] = _ppo_section(ppo_history)
    sections["eval"] = _eval_section(eval_rows)
    sections["pm"] = _pm_section(pm_metrics, eval_rows)

    nav = "".join(f'<a href="#{key}">{_e(name)}</a>' for key, name in SECTIONS.items())
    body = "".join(
        f'<section id="{key}"><h2>{_e(name)}</h2>{sections[key]}</section>' for key, name in SECTIONS.items()
    )
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>"
        f'<h1>{_e(title)}</h1><p class="meta">written by cai {_e(_version())} on {stamp}</p>'
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
