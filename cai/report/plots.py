"""The report's plots, as PNG bytes: principle influence, soft labels, position consistency,
PPO curves and evaluation figures.

matplotlib is imported inside the helpers and used through `Figure` objects only (never pyplot),
so writing a report neither slows `import cai` nor touches the process-wide backend. A plot that
fails must not cost the reader the rest of the report: `plot_or_error` says so in its place.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from cai.audit import LabelView, PrincipleInfluence
from cai.records import MetricRow
from cai.report.html import e, img

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PPO_KEYS: dict[str, tuple[str, ...]] = {
    "step": ("step",),
    "reward": ("reward_mean", "reward"),
    "reward_std": ("reward_std",),
    "kl": ("kl",),
    "kl_coef": ("kl_coef",),
}
"""PPO history keys the report plots, each with its accepted spellings (first found wins): cai's
PPO trainer logs ``reward``, other loggers ``reward_mean``. Other keys show in the last-step table."""


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    # No metadata: the PNG (and so the report) is the same bytes for the same data.
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def plot_influence(influence: Sequence[PrincipleInfluence]) -> bytes:
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


def plot_soft_labels(labels: Sequence[LabelView]) -> bytes:
    # Rounded so a mean that lands a hair below a bin edge (0.5999...) is binned by its exact value.
    pairs = [p for view in labels for p in view.pairs]
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


def plot_position(influence: Sequence[PrincipleInfluence], overall: float | None) -> bytes:
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


def series(history: Sequence[Mapping[str, Any]], name: str) -> tuple[list[float], list[float]]:
    """(steps, values) for rows carrying a finite number under one of `PPO_KEYS[name]`."""
    keys = [k for k in PPO_KEYS[name] if any(k in row for row in history)][:1]
    xs, ys = [], []
    for n, row in enumerate(history):
        value = row.get(keys[0]) if keys else None
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(float(row.get("step", n)))
            ys.append(float(value))
    return xs, ys


def plot_ppo(history: Sequence[Mapping[str, Any]]) -> bytes:
    fig = _figure(10, 3.7)
    left, right = fig.subplots(1, 2)
    xs, ys = series(history, "reward")
    left.plot(xs, ys, color="#2456a6", marker="o", ms=3, label="reward (PM) mean")
    sx, sd = series(history, "reward_std")
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
    kx, kl = series(history, "kl")
    right.plot(kx, kl, color="#b3261e", marker="o", ms=3, label="KL(policy ‖ SFT)")
    right.set_xlabel("step")
    right.set_ylabel("KL (nats)")
    right.set_title("KL to the reference model")
    cx, coef = series(history, "kl_coef")
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


def plot_eval(rows: Sequence[MetricRow]) -> bytes:
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


def plot_or_error(plot: Callable[[], bytes], alt: str) -> str:
    """A plot that fails must not cost the reader the rest of the report; say so in its place."""
    try:
        return img(plot(), alt)
    except Exception as error:  # noqa: BLE001 - reported in the page
        return f'<p class="bad">plot failed: {e(type(error).__name__)}: {e(error)}</p>'
