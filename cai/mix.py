"""One mixed preference dataset out: AI harmlessness labels + human helpfulness preferences.

    cai mix --config configs/quickstart.yaml

Constitutional AI trains its preference model on AI-labelled harmlessness comparisons *mixed
with* human-labelled helpfulness comparisons; without the human half the PM learns that the
safest answer is always the evasive one. The human half comes from `cai.preferences`' loaders
(one config entry each, `PreferenceSource`); `mix` takes exact counts or ratios of each group.
A source with a `rater_column` holds several ratings per pair; `cai.raters` votes them into one
row per pair.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from cai.preferences import LoadReport, PreferenceDataError, load_hh, load_jsonl, load_trl_preferences
from cai.raters import RatersRule, RaterSummary, aggregate_ratings, check_weights
from cai.records import PreferenceRow
from cai.sections import Section

RATIO_TOL = 1e-6
"""Ratios come from YAML (0.3 + 0.7 is not exactly 1.0 in floats), hence a tolerance."""

_QUOTA_DECIMALS = 9
"""Quotas are rounded before taking floors, so 0.3 * 10 = 3.0000000000000004 cannot matter."""


# --------------------------------------------------------------------------------------------
# Config entry
# --------------------------------------------------------------------------------------------


class PreferenceSource(Section):
    """One entry of a run config's list of preference data to mix in."""

    path: str = Field(description="A file or datasets folder, or the name of a file shipped in cai/data.")
    format: Literal["hh", "trl", "jsonl"] = Field("hh", description="HH-RLHF, a TRL dataset, or plain JSONL.")
    source: str = Field(
        "human-helpful",
        description="Written to each row's `source` column (for jsonl, only rows without one unless set).",
    )
    split: str = Field("train", description="Split of a datasets folder holding a DatasetDict (trl only).")
    limit: int | None = Field(
        None, ge=0, description="Keep at most this many rows (the first ones; with rater_column, pairs)."
    )
    rater_column: str | None = Field(
        None,
        min_length=1,
        description="Field naming each rating's rater or group: ratings of one pair (same prompt, same "
        "two responses either way round) become one row by raters_rule. None: each line is a row.",
    )
    rater_weights: dict[str, float] | None = Field(
        None, description="Weight per rater id (unlisted raters weigh 1); each must be a rater of the file."
    )
    raters_rule: RatersRule = Field(
        "weighted_majority",
        description="weighted_majority: the side with more rater weight is chosen (a hard label); soft: "
        "the same side, with soft_label = its share of the weight and margin = logit of that. A tie is "
        "no consensus: the pair is dropped and counted.",
    )

    @field_validator("rater_weights")
    @classmethod
    def _positive(cls, weights: dict[str, float] | None) -> dict[str, float] | None:
        bad = {k: w for k, w in (weights or {}).items() if not (math.isfinite(w) and w > 0)}
        if bad:
            raise ValueError(f"rater weights must be positive and finite: {bad}")
        return weights

    @model_validator(mode="after")
    def _raters_need_a_column(self) -> PreferenceSource:
        # Values, not fields set: `--set` re-validates a dump with every default filled in.
        voting = self.rater_weights is not None or self.raters_rule != "weighted_majority"
        if self.rater_column is None and voting:
            raise ValueError("rater_weights and raters_rule need rater_column (the field naming the rater)")
        return self

    def resolved_path(self) -> Path:
        """A real path wins, so a user's own file is never shadowed by a shipped one."""
        from cai.resources import resolve_data

        return resolve_data(self.path, "preference source", FileNotFoundError)


def load_preferences(spec: PreferenceSource) -> tuple[list[PreferenceRow], LoadReport]:
    """Load one config entry with the loader its `format` names (see `load_source`)."""
    rows, report, _ = load_source(spec)
    return rows, report


def load_source(spec: PreferenceSource) -> tuple[list[PreferenceRow], LoadReport, RaterSummary | None]:
    """Load one config entry, voting its ratings into pairs when it has a `rater_column`.

    Loaders skip (and count) bad rows; a source that yields no usable pair at all is an error,
    because a mix silently missing its human half trains a PM that prefers evasive answers.
    """
    path = spec.resolved_path()
    column = spec.rater_column
    limit = spec.limit if column is None else None  # with raters, the limit counts pairs
    if spec.format == "hh":
        rows, report = load_hh(path, spec.source, limit, rater_column=column)
    elif spec.format == "trl":
        rows, report = load_trl_preferences(path, spec.source, spec.split, limit, rater_column=column)
    else:
        keep = "source" not in spec.model_fields_set
        rows, report = load_jsonl(path, spec.source, limit, keep_row_source=keep, rater_column=column)
    if not rows and spec.limit != 0:
        raise PreferenceDataError(_nothing_usable(path, spec, report))
    if column is None:
        return rows, report, None
    check_weights(spec.rater_weights, report.raters, f"mix.human entry {spec.path!r} ({path})")
    rows, summary = aggregate_ratings(
        rows, report.raters, report.rater_lines, spec.raters_rule, spec.rater_weights
    )
    if not rows and spec.limit != 0:
        raise PreferenceDataError(f"{path}: every rated pair is a tie ({summary.line()})")
    rows = rows[: spec.limit]
    summary.rows = len(rows)
    return rows, report, summary


def _nothing_usable(path: Path, spec: PreferenceSource, report: LoadReport) -> str:
    """Why a preference source gave nothing, with the first problems and a hint when one fits."""
    if not report.malformed:
        return f"{path}: holds no preference pairs (mix.human entry with format {spec.format!r})"
    first = "; ".join(report.problems[:3])
    hints = [f"Reading stopped early: {report.stopped}."] if report.stopped else []
    if path.is_file() and path.read_bytes()[:1024].lstrip()[:1] == b"[":
        hints.append("It looks like a JSON array: cai reads JSON Lines, one object per line (jq -c '.[]').")
    elif spec.format == "hh":
        hints.append("Is it HH-RLHF? Set format: trl or jsonl for other shapes.")
    return (
        f"{path}: none of its {report.malformed} rows is a usable preference pair (first: {first}). "
        + " ".join(hints)
    )


# --------------------------------------------------------------------------------------------
# Mixing
# --------------------------------------------------------------------------------------------


def _largest_remainder(ratios: dict[str, float], total: int) -> dict[str, int]:
    """Integer counts summing exactly to `total`; leftover units go to the largest fractions.

    Ties go to the group listed first, the only order the caller controls.
    """
    quotas = {name: round(r * total, _QUOTA_DECIMALS) for name, r in ratios.items()}
    counts = {name: math.floor(q) for name, q in quotas.items()}
    left = total - sum(counts.values())
    by_fraction = sorted(quotas, key=lambda name: -(quotas[name] - counts[name]))  # stable: ties keep order
    for name in by_fraction[:left]:
        counts[name] += 1
    return counts


def _check_names(kind: str, given: Mapping[str, object], groups: Mapping[str, object]) -> None:
    unknown, missing = sorted(set(given) - set(groups)), sorted(set(groups) - set(given))
    if unknown or missing:
        raise ValueError(
            f"{kind} must name every group exactly: unknown {unknown or '-'}, missing {missing or '-'} "
            f"(groups: {', '.join(groups)})"
        )


def _ratio_counts(
    groups: dict[str, list[PreferenceRow]], ratios: dict[str, float], total: int | None
) -> dict[str, int]:
    _check_names("ratios", ratios, groups)
    if any(r < 0 or not math.isfinite(r) for r in ratios.values()):
        raise ValueError(f"ratios must be finite and non-negative: {ratios}")
    if abs(sum(ratios.values()) - 1.0) > RATIO_TOL:
        raise ValueError(f"ratios must sum to 1 (within {RATIO_TOL}), got {sum(ratios.values())}")
    norm = {name: r / sum(ratios.values()) for name, r in ratios.items()}
    if total is not None:
        return _largest_remainder(norm, total)
    # The largest total whose counts fit. Rounding can make a group fit past n / r (its floor
    # stays n) and not fit below it, so feasibility is not monotone: start where some group's
    # floor alone exceeds its rows (nothing above can fit) and step down to the first fit.
    sizes = {name: len(rows) for name, rows in groups.items()}
    total = min([sum(sizes.values())] + [math.floor((sizes[n] + 1) / r) for n, r in norm.items() if r > 0])
    while any(c > sizes[n] for n, c in _largest_remainder(norm, total).items()):
        total -= 1
    return _largest_remainder(norm, total)


def mix(
    groups: dict[str, list[PreferenceRow]],
    counts: dict[str, int] | None = None,
    ratios: dict[str, float] | None = None,
    total: int | None = None,
    seed: int = 0,
) -> list[PreferenceRow]:
    """Exactly `counts` (or `ratios` of `total`) rows per group, shuffled together with `seed`.

    Each group is sampled with its own generator seeded by (seed, group name), so changing one
    group's count leaves the other groups' samples unchanged. Rows keep their own `source`.
    """
    if counts is not None and ratios is not None:
        raise ValueError("give counts or ratios, not both")
    if total is not None and ratios is None:
        raise ValueError("total only applies with ratios")
    if total is not None and total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    if counts is not None:
        _check_names("counts", counts, groups)
        if any(not isinstance(c, int) or c < 0 for c in counts.values()):
            raise ValueError(f"counts must be non-negative integers: {counts}")
    elif ratios is not None:
        counts = _ratio_counts(groups, ratios, total)
    else:
        counts = {name: len(rows) for name, rows in groups.items()}
    mixed: list[PreferenceRow] = []
    for name, rows in groups.items():
        if counts[name] > len(rows):
            raise ValueError(f"group {name!r} has {len(rows)} rows, {counts[name]} requested")
        picked = random.Random(f"{seed}:{name}").sample(range(len(rows)), counts[name])
        mixed += [rows[i] for i in sorted(picked)]
    random.Random(seed).shuffle(mixed)
    return mixed


class MixConfig(Section):
    """How AI harmlessness labels and human helpfulness preferences are combined for the PM."""

    human: list[PreferenceSource] = Field(
        default_factory=lambda: [PreferenceSource(path="hh_helpful.jsonl")],
        description="Human preference data to mix in (HH-RLHF, TRL or JSONL files).",
    )
    counts: dict[str, int] | None = Field(
        None, description="Exact rows per source name (e.g. {ai-harmless: 40, human-helpful: 40})."
    )
    ratios: dict[str, float] | None = Field(None, description="Share per source name, summing to 1.")
    total: int | None = Field(
        None, ge=1, description="Total rows with `ratios` (default: the most possible)."
    )
