"""The run-level figures of an audit: principle influence, contested pairs, judge quality.

`summarize` gathers them, with the judge gate and the principle-by-principle disagreement
(`cai.audit.conflicts`), into one typed `AuditSummary` that the terminal
(`cai audit`) and the HTML report only render: both say the same things in the same words.
Influence and agreement count verdicts only; **position consistency** of one (principle, pair)
reading is recorded by the judge, and readings where an order abstained are left out of it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from cai.audit.conflicts import ConflictTable, group_conflicts, principle_conflicts
from cai.audit.groups import GroupsTable, group_shares
from cai.audit.views import LabelView, PairView, View, decisive_ids, label_view, pair_views
from cai.gate import JudgeCheck
from cai.records import LabelAudit
from cai.rules import SCORE_DECIMALS
from cai.verdict import NO_VERDICT_REASONS


class PrincipleInfluence(View):
    """How one principle shaped the labels it took part in, counting its verdicts only.

    Counts of labels: taken part, decisive on, gave a verdict on a derived pair (`opinionated`),
    gave a verdict against the label (`disagreed`). Counts of (pair) readings: `verdicts`,
    `no_verdicts` (abstained, position-inconsistent or below the margin), of which `abstentions`.
    ``disagreement_rate`` divides by opinionated labels, so a principle that seldom commits is
    not credited with agreeing; strength is |p - 0.5| over its verdicts.
    """

    principle_id: str
    labels: int
    decisive: int
    opinionated: int
    disagreed: int
    disagreement_rate: float | None
    verdicts: int
    no_verdicts: int
    abstentions: int
    mean_strength: float | None
    position_consistency: float | None


_COUNTS = (
    "labels",
    "decisive",
    "opinionated",
    "disagreed",
    "verdicts",
    "no_verdicts",
    "abstentions",
    "consistent",
    "known",
)


def principle_influence(rows: Iterable[LabelAudit]) -> list[PrincipleInfluence]:
    """Per principle: labels voted on, decided, disagreed with; most decisive first."""
    stats: dict[str, dict[str, int]] = {}
    strengths: dict[str, list[float]] = {}
    for row in rows:
        decided = decisive_ids(row)
        views = pair_views(row)
        for principle in row.principles:
            s = stats.setdefault(principle, dict.fromkeys(_COUNTS, 0))
            s["labels"] += 1
            s["decisive"] += principle in decided
            s["opinionated"] += any(principle in v.agree or principle in v.disagree for v in views)
            s["disagreed"] += any(principle in v.disagree for v in views)
        for vote in row.votes:
            s = stats.setdefault(vote.principle_id, dict.fromkeys(_COUNTS, 0))
            s["abstentions"] += vote.p_i_better is None
            if vote.verdict is None:
                s["no_verdicts"] += 1
            else:
                s["verdicts"] += 1
                strengths.setdefault(vote.principle_id, []).append(abs((vote.p_i_better or 0.5) - 0.5))
            if vote.position_consistent is not None:
                s["known"] += 1
                s["consistent"] += vote.position_consistent
    out = [
        PrincipleInfluence(
            principle_id=pid,
            labels=s["labels"],
            decisive=s["decisive"],
            opinionated=s["opinionated"],
            disagreed=s["disagreed"],
            disagreement_rate=s["disagreed"] / s["opinionated"] if s["opinionated"] else None,
            verdicts=s["verdicts"],
            no_verdicts=s["no_verdicts"],
            abstentions=s["abstentions"],
            mean_strength=sum(strengths[pid]) / len(strengths[pid]) if strengths.get(pid) else None,
            position_consistency=s["consistent"] / s["known"] if s["known"] else None,
        )
        for pid, s in stats.items()
    ]
    return sorted(out, key=lambda p: (-p.decisive, -p.labels, p.principle_id))


class ContestedPair(PairView):
    """A contested derived pair with its label: the principles on each side, for a human to judge."""

    label_id: str
    row_id: str


def contested_labels(rows: Iterable[LabelAudit]) -> list[ContestedPair]:
    """Every contested derived pair, in input order (a K>2 label can contribute several)."""
    return [
        ContestedPair(label_id=row.label_id, row_id=row.row_id, **view.model_dump())
        for row in rows
        for view in pair_views(row)
        if view.contested
    ]


def soft_label_histogram(values: Sequence[float], bins: int = 10) -> list[int]:
    """Counts in `bins` equal bins over [0, 1]; 1.0 falls in the last bin.

    Values are rounded before binning so that a mean like (0.8 + 0.3 + 0.7) / 3, which lands a
    hair below 0.6 in floating point, counts in the bin its exact value belongs to.
    """
    counts = [0] * bins
    for value in values:
        counts[max(0, min(math.floor(round(value * bins, SCORE_DECIMALS)), bins - 1))] += 1
    return counts


class JudgeQuality(View):
    """Run-level signals of how far the AI labels can be trusted."""

    labels: int
    labels_with_verdict: int
    derived_pairs: int
    training_rows: int
    pairs_by_use: dict[str, int]
    contested_labels: int
    comparisons: int
    verdicts: int
    no_verdict: dict[str, int]
    position_known: int
    position_consistent: int
    position_consistency: float | None
    abstentions: int
    abstained_orders: int
    principle_agreement_mean: float | None
    soft_labels: list[float]
    soft_label_histogram: list[int]

    @property
    def mostly_without_verdict(self) -> bool:
        """Most labels carry no verdict: the labels' soft values are noise, not preferences."""
        return self.labels > 0 and self.labels_with_verdict * 2 < self.labels


def judge_quality(rows: Sequence[LabelAudit]) -> JudgeQuality:
    """Verdicts, position consistency, agreement, abstentions and the soft-label distribution.

    Position consistency is the share of (principle, pair) comparisons that prefer the same
    response in both orders; a judge far below 1 is answering "A" or "B" by position, and its
    readings give no verdicts. Abstained comparisons are excluded, not counted as inconsistent.
    Principle agreement is averaged over the labels that have verdicts.
    """
    votes = [v for row in rows for v in row.votes]
    known = [v.position_consistent for v in votes if v.position_consistent is not None]
    soft = [p.soft_label for row in rows for p in row.pairs]
    agreement = [r.principle_agreement for r in rows if r.principle_agreement is not None]
    uses: dict[str, int] = {}
    for row in rows:
        for use in row.training:
            uses[use] = uses.get(use, 0) + 1
    reasons = {reason: sum(v.no_verdict == reason for v in votes) for reason in NO_VERDICT_REASONS}
    return JudgeQuality(
        labels=len(rows),
        labels_with_verdict=sum(row.has_verdict for row in rows),
        derived_pairs=len(soft),
        training_rows=uses.get("row", 0),
        pairs_by_use=uses,
        contested_labels=sum(row.contested for row in rows),
        comparisons=len(votes),
        verdicts=sum(v.verdict is not None for v in votes),
        no_verdict={k: v for k, v in reasons.items() if v},
        position_known=len(known),
        position_consistent=sum(known),
        position_consistency=sum(known) / len(known) if known else None,
        abstentions=sum(v.p_i_better is None for v in votes),
        abstained_orders=sum(o.abstained for v in votes for o in v.orders),
        principle_agreement_mean=sum(agreement) / len(agreement) if agreement else None,
        soft_labels=soft,
        soft_label_histogram=soft_label_histogram(soft),
    )


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def gold_item(gate: JudgeCheck | None) -> str:
    if gate is None:
        return "not measured (label.gold is null)"
    return f"{gate.agreement:.2f} [{gate.ci[0]:.2f}, {gate.ci[1]:.2f}] on {gate.n} pairs"


def quality_items(q: JudgeQuality, gate: JudgeCheck | None = None) -> list[tuple[str, str]]:
    """Shared by the terminal and HTML views so both say the same thing in the same words."""
    reasons = ", ".join(f"{k} {v}" for k, v in q.no_verdict.items()) or "none"
    uses = ", ".join(f"{k} {v}" for k, v in sorted(q.pairs_by_use.items()) if k != "row") or "none"
    return [
        ("gold agreement (95% CI)", gold_item(gate)),
        ("labels", str(q.labels)),
        (
            "labels with a verdict",
            f"{q.labels_with_verdict} ({pct(q.labels_with_verdict / q.labels if q.labels else None)})",
        ),
        ("training rows", f"{q.training_rows} of {q.derived_pairs} derived pairs (not rows: {uses})"),
        ("verdicts", f"{q.verdicts} of {q.comparisons} comparisons (none: {reasons})"),
        (
            "contested labels",
            f"{q.contested_labels} ({pct(q.contested_labels / q.labels if q.labels else None)})",
        ),
        (
            "position consistency",
            f"{pct(q.position_consistency)} ({q.position_consistent}/{q.position_known} comparisons)"
            if q.position_known
            else "n/a (no comparison read in both orders)",
        ),
        ("principle agreement (mean)", fmt(q.principle_agreement_mean)),
        (
            "abstentions",
            f"{q.abstentions} of {q.comparisons} comparisons (orders abstained: {q.abstained_orders})",
        ),
        ("soft label mean", fmt(sum(q.soft_labels) / len(q.soft_labels) if q.soft_labels else None)),
    ]


def quality_warnings(q: JudgeQuality, failures: Sequence[str] = ()) -> list[str]:
    """What a reader must know before trusting the labels, in plain words (terminal and report)."""
    notes = []
    if q.mostly_without_verdict:
        notes.append(
            f"{q.labels - q.labels_with_verdict} of {q.labels} labels had no verdict: their soft labels "
            "are position bias or noise, and these labels carry no measurable signal"
        )
    notes += [f"the judge failed its gate: {failure}" for failure in failures]
    return notes


class AuditSummary(View):
    """Everything a page about a run's labels shows, computed once; renderers only format it."""

    quality: JudgeQuality
    quality_rows: list[tuple[str, str]]
    warnings: list[str]
    provenance: list[tuple[str, str]]
    influence: list[PrincipleInfluence]
    contested: list[ContestedPair]
    conflicts: ConflictTable
    group_conflicts: ConflictTable | None  # None: no vote names a group (a single-group run)
    labels: list[LabelView]
    gate: JudgeCheck | None
    gate_failures: list[str]
    groups: GroupsTable | None = None


def summarize(
    rows: Sequence[LabelAudit], gate: JudgeCheck | None = None, gate_failures: Sequence[str] = ()
) -> AuditSummary:
    """The audit of a run (or of a selection of its labels), with its judge gate."""
    quality = judge_quality(rows)
    provenance = [
        ("judge model(s)", ", ".join(sorted({r.judge_model_id for r in rows}))),
        ("policy model(s)", ", ".join(sorted({r.policy_model_id for r in rows}))),
        ("rule(s)", ", ".join(sorted({r.rule for r in rows}))),
        (
            "constitution(s)",
            ", ".join(sorted({f"{r.constitution} ({r.constitution_hash[:12]})" for r in rows})),
        ),
        ("chain of thought", ", ".join(sorted({"yes" if r.cot else "no" for r in rows}))),
        ("verdict margin", ", ".join(sorted({f"{r.min_margin:g}" for r in rows}))),
    ]
    return AuditSummary(
        quality=quality,
        quality_rows=quality_items(quality, gate),
        warnings=quality_warnings(quality, gate_failures),
        provenance=provenance,
        influence=principle_influence(rows),
        contested=contested_labels(rows),
        conflicts=principle_conflicts(rows),
        group_conflicts=group_conflicts(rows),
        labels=[label_view(row) for row in rows],
        gate=gate,
        gate_failures=list(gate_failures),
        groups=group_shares(rows),
    )
