"""Queries over label audit rows: which principle shaped this label, and how far to trust it.

    cai audit runs/demo --principle privacy --contested

A preference model learns whatever the labels say, so a surprising PM is debugged by asking
which principles produced its labels. Every label's audit row (`cai.records.LabelAudit`) carries
each principle's vote in both presentation orders, the aggregation rule, the derived pairs with
their contested flag and their decisive principles; this module only reads those rows, so the
answers are reproducible from files alone and never depend on re-running a judge.

Everything here is a pure function of a list of rows except `load_audit`, so the CLI, the HTML
report (`cai.report`) and notebooks share one set of definitions:

* a principle **agrees** on a derived pair when it preferred ``chosen``, **disagrees** when it
  preferred ``rejected``; abstaining or judging within ``TIE_TOL`` of 0.5 is neither, the same
  reading `cai.aggregate` uses for agree/disagree weights;
* a principle is **decisive** on a label when a derived pair lists it (see
  `cai.aggregate.aggregate` for when that is pivotal and when it means "largest contributor");
* **position consistency** of one (principle, pair) vote is recorded by the judge; votes where
  either order abstained have none and are left out of every rate rather than counted as failures.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from cai.aggregate import SCORE_DECIMALS, TIE_TOL, DerivedPair
from cai.records import LabelAudit, OrderVote, PairVote

if TYPE_CHECKING:
    from rich.console import Console

    from cai.constitution import Constitution

__all__ = [
    "AUDIT_FILE",
    "LABEL_STAGE",
    "PREFERENCES_FILE",
    "ContestedPair",
    "JudgeQuality",
    "LabelView",
    "PairView",
    "PrincipleInfluence",
    "VoteView",
    "audit_file",
    "contested_labels",
    "filter_labels",
    "judge_quality",
    "label_view",
    "load_audit",
    "principle_influence",
    "print_contested",
    "print_influence",
    "print_label",
    "print_quality",
    "quality_items",
    "soft_label_histogram",
]

LABEL_STAGE = "label"
"""The stage folder (``<run_dir>/label/<hash>/``) whose outputs hold the audit rows."""

AUDIT_FILE = "audit.jsonl"
"""One `LabelAudit` per line, written by the label stage next to its preference rows."""

PREFERENCES_FILE = "preferences.jsonl"
"""The label stage's `PreferenceRow`s; they join the audit rows through ``label_id``."""

EXCERPT_CHARS = 160
"""Chain-of-thought excerpts are cut here: enough to see the verdict, short enough for a table."""


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def audit_file(path: Path) -> Path:
    """Resolve a JSONL file, a label stage folder or a run directory to the audit rows file.

    A run directory can hold several label folders (one per config); the one named by
    ``label/LATEST`` is what the last ``cai label`` produced, which is what a user auditing
    "this run" means.
    """
    from cai.store import latest

    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected a run directory or an {AUDIT_FILE} file)")
    if (path / AUDIT_FILE).is_file():
        return path / AUDIT_FILE
    store = latest(path, LABEL_STAGE)
    if store is None:
        raise FileNotFoundError(
            f"{path} has no label stage ({path / LABEL_STAGE / 'LATEST'} is missing or stale); "
            f"run the label stage first, or pass an {AUDIT_FILE} file"
        )
    file = store.path / AUDIT_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} is missing (label stage status: {store.manifest.status}); audit rows are "
            "written when the stage finishes"
        )
    return file


def load_audit(path: Path) -> list[LabelAudit]:
    """Read and validate audit rows from a JSONL file, a label stage folder or a run directory.

    Every row is validated, and a bad one is reported by file and line: a report built on a
    half-parsed file would answer "which principle shaped this label" wrongly without a trace.
    """
    file = audit_file(path)
    rows: list[LabelAudit] = []
    with file.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(LabelAudit.model_validate(orjson.loads(line)))
            except (orjson.JSONDecodeError, ValidationError) as error:
                raise ValueError(f"{file}:{number}: not a valid label audit row: {error}") from None
    return rows


# --------------------------------------------------------------------------------------------
# Small readings of one row
# --------------------------------------------------------------------------------------------


def _side(p: float | None) -> int:
    """+1 prefers the first response of the pair read, -1 the second, 0 no preference."""
    if p is None or abs(p - 0.5) <= TIE_TOL:
        return 0
    return 1 if p > 0.5 else -1


def _order_p_i(vote: OrderVote) -> float | None:
    """P(response i better) in one order: option A is i in order ab, j in order ba."""
    if vote.abstained or vote.error is not None or len(vote.probs) != 2:
        return None
    return vote.probs[0] if vote.order == "ab" else vote.probs[1]


def _p_for(vote: PairVote, chosen: int, rejected: int) -> float | None:
    """P(chosen better) from a vote that may have been recorded in either direction."""
    if vote.p_i_better is None:
        return None
    return vote.p_i_better if (vote.i, vote.j) == (chosen, rejected) else 1.0 - vote.p_i_better


def _votes_on(row: LabelAudit, chosen: int, rejected: int) -> dict[str, PairVote]:
    """Each principle's vote on the unordered pair {chosen, rejected}."""
    pair = {chosen, rejected}
    return {v.principle_id: v for v in row.votes if {v.i, v.j} == pair}


def _excerpt(text: str | None, limit: int = EXCERPT_CHARS) -> str | None:
    if text is None:
        return None
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _prompt_text(row: LabelAudit) -> str:
    """The last user turn: the question the responses answer."""
    for message in reversed(row.prompt):
        if message["role"] == "user":
            return message["content"]
    return row.prompt[-1]["content"] if row.prompt else ""


# --------------------------------------------------------------------------------------------
# Per-label view
# --------------------------------------------------------------------------------------------


class _View(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VoteView(_View):
    """One principle on one pair: P(response i better) as shown first (ab) and second (ba)."""

    principle_id: str
    weight: float
    i: int
    j: int
    p_ab: float | None
    p_ba: float | None
    combined: float | None
    position_consistent: bool | None
    abstained: bool
    reasoning: str | None


class PairView(_View):
    """A derived (chosen, rejected) pair and who was for it, against it, or silent."""

    chosen: int
    rejected: int
    soft_label: float
    contested: bool
    decisive: list[str]
    agree: list[str]
    disagree: list[str]
    abstain: list[str]


class LabelView(_View):
    """Everything a reviewer reads to judge one label, in the order they read it."""

    label_id: str
    row_id: str
    prompt: str
    responses: list[str]
    rule: str
    ranking: list[int]
    scores: list[float]
    contested: bool
    principle_agreement: float
    cot: bool
    judge_model_id: str
    votes: list[VoteView]
    pairs: list[PairView]


def _pair_view(row: LabelAudit, pair: DerivedPair) -> PairView:
    """Sort the row's principles into for / against / silent on one derived pair."""
    on_pair = _votes_on(row, pair.chosen, pair.rejected)
    sides: dict[int, list[str]] = {1: [], -1: [], 0: []}
    for principle in row.principles:
        vote = on_pair.get(principle)
        sides[0 if vote is None else _side(_p_for(vote, pair.chosen, pair.rejected))].append(principle)
    return PairView(
        chosen=pair.chosen,
        rejected=pair.rejected,
        soft_label=pair.soft_label,
        contested=pair.contested,
        decisive=list(pair.decisive),
        agree=sides[1],
        disagree=sides[-1],
        abstain=sides[0],
    )


def label_view(row: LabelAudit) -> LabelView:
    """Flatten one audit row into what `print_label` and the HTML report show."""
    votes = []
    for vote in row.votes:
        by_order = {o.order: o for o in vote.orders}
        reasoning = next((o.reasoning for o in vote.orders if o.reasoning), None)
        votes.append(
            VoteView(
                principle_id=vote.principle_id,
                weight=vote.weight,
                i=vote.i,
                j=vote.j,
                p_ab=_order_p_i(by_order["ab"]) if "ab" in by_order else None,
                p_ba=_order_p_i(by_order["ba"]) if "ba" in by_order else None,
                combined=vote.p_i_better,
                position_consistent=vote.position_consistent,
                abstained=vote.p_i_better is None,
                reasoning=_excerpt(reasoning),
            )
        )
    pairs = [_pair_view(row, pair) for pair in row.pairs]
    return LabelView(
        label_id=row.label_id,
        row_id=row.row_id,
        prompt=_prompt_text(row),
        responses=list(row.responses),
        rule=row.rule,
        ranking=list(row.outcome.ranking),
        scores=list(row.outcome.scores),
        contested=row.contested,
        principle_agreement=row.principle_agreement,
        cot=row.cot,
        judge_model_id=row.judge_model_id,
        votes=votes,
        pairs=pairs,
    )


# --------------------------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------------------------


def _tag_members(rows: Sequence[LabelAudit], tag: str, constitution: Constitution) -> set[str]:
    """Principle ids carrying `tag`, refusing rows whose principles the constitution lacks.

    An unknown id means the constitution is not the one the run used; a tag filter would then
    silently drop labels, so it is an error instead.
    """
    known = {p.id: set(p.tags) for p in constitution.principles}
    unknown = sorted({pid for row in rows for pid in row.principles} - known.keys())
    if unknown:
        raise ValueError(
            f"constitution {constitution.name!r} has no principle(s) {', '.join(unknown)}; "
            "pass the constitution the run used to filter by tag"
        )
    all_tags = sorted({t for tags in known.values() for t in tags})
    if tag not in all_tags:
        raise ValueError(
            f"no principle of {constitution.name!r} has tag {tag!r}; tags: {', '.join(all_tags)}"
        )
    return {pid for pid, tags in known.items() if tag in tags}


def _decisive_ids(row: LabelAudit) -> set[str]:
    return {pid for pair in row.pairs for pid in pair.decisive}


def filter_labels(
    rows: Sequence[LabelAudit],
    principle: str | None = None,
    tag: str | None = None,
    contested: bool | None = None,
    constitution: Constitution | None = None,
    *,
    decisive: bool = False,
) -> list[LabelAudit]:
    """Labels matching every given filter (None means "any"), in input order.

    `principle` / `tag` keep labels whose ensemble included that principle (or any principle
    with that tag); with ``decisive=True`` only labels it was decisive on. Tags live in the
    constitution, not in audit rows, so a tag filter needs `constitution`.
    """
    members: set[str] | None = None
    if tag is not None:
        if constitution is None:
            raise ValueError(
                f"filtering by tag {tag!r} needs the constitution (audit rows record principle "
                "ids, not tags); pass constitution=load_constitution(...) or --constitution"
            )
        members = _tag_members(rows, tag, constitution)
    kept = []
    for row in rows:
        pool = _decisive_ids(row) if decisive else set(row.principles)
        if principle is not None and principle not in pool:
            continue
        if members is not None and not members & pool:
            continue
        if contested is not None and row.contested != contested:
            continue
        kept.append(row)
    return kept


# --------------------------------------------------------------------------------------------
# Aggregate queries
# --------------------------------------------------------------------------------------------


class PrincipleInfluence(_View):
    """How one principle shaped the labels it took part in.

    Counts are of labels; strength and consistency are over the principle's pair votes.
    ``disagreement_rate`` divides by labels where it expressed a preference on some derived pair,
    so a principle that mostly abstains is not credited with agreeing.
    """

    principle_id: str
    labels: int
    decisive: int
    opinionated: int
    disagreed: int
    disagreement_rate: float | None
    abstentions: int
    mean_strength: float | None
    position_consistency: float | None


_COUNTS = ("labels", "decisive", "opinionated", "disagreed", "abstentions", "consistent", "known")


def principle_influence(rows: Iterable[LabelAudit]) -> list[PrincipleInfluence]:
    """Per principle: labels voted on, decided, disagreed with; most decisive first."""
    stats: dict[str, dict[str, int]] = {}
    strengths: dict[str, list[float]] = {}
    for row in rows:
        decided = _decisive_ids(row)
        views = [_pair_view(row, pair) for pair in row.pairs]
        for principle in row.principles:
            s = stats.setdefault(principle, dict.fromkeys(_COUNTS, 0))
            s["labels"] += 1
            s["decisive"] += principle in decided
            s["opinionated"] += any(principle in v.agree or principle in v.disagree for v in views)
            s["disagreed"] += any(principle in v.disagree for v in views)
        for vote in row.votes:
            s = stats.setdefault(vote.principle_id, dict.fromkeys(_COUNTS, 0))
            if vote.p_i_better is None:
                s["abstentions"] += 1
            else:
                strengths.setdefault(vote.principle_id, []).append(abs(vote.p_i_better - 0.5))
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
        ContestedPair(label_id=row.label_id, row_id=row.row_id, **_pair_view(row, pair).model_dump())
        for row in rows
        for pair in row.pairs
        if pair.contested
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


class JudgeQuality(_View):
    """Run-level signals of how trustworthy the AI labels are."""

    labels: int
    derived_pairs: int
    contested_labels: int
    comparisons: int
    position_known: int
    position_consistent: int
    position_consistency: float | None
    abstentions: int
    abstained_orders: int
    principle_agreement_mean: float | None
    soft_labels: list[float]
    soft_label_histogram: list[int]


def judge_quality(rows: Sequence[LabelAudit]) -> JudgeQuality:
    """Position consistency, agreement, abstentions and the soft-label distribution.

    Position consistency is the share of (principle, pair) comparisons that prefer the same
    response in both orders; a judge far below 1 is answering "A" or "B" by position, and its
    soft labels mean little. Abstained comparisons are excluded, not counted as inconsistent.
    """
    votes = [v for row in rows for v in row.votes]
    known = [v.position_consistent for v in votes if v.position_consistent is not None]
    soft = [p.soft_label for row in rows for p in row.pairs]
    return JudgeQuality(
        labels=len(rows),
        derived_pairs=len(soft),
        contested_labels=sum(row.contested for row in rows),
        comparisons=len(votes),
        position_known=len(known),
        position_consistent=sum(known),
        position_consistency=sum(known) / len(known) if known else None,
        abstentions=sum(v.p_i_better is None for v in votes),
        abstained_orders=sum(o.abstained for v in votes for o in v.orders),
        principle_agreement_mean=sum(r.principle_agreement for r in rows) / len(rows) if rows else None,
        soft_labels=soft,
        soft_label_histogram=soft_label_histogram(soft),
    )


# --------------------------------------------------------------------------------------------
# Terminal rendering (rich imported lazily: `import cai.audit` stays cheap)
# --------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _yes_no(value: bool | None) -> str:
    return "–" if value is None else "yes" if value else "NO"


def print_label(console: Console, view: LabelView) -> None:
    """One label: prompt, responses, every vote in both orders, and the derived pairs."""
    from rich.table import Table
    from rich.text import Text

    # Data goes in as Text, never as markup: a prompt containing "[bold]" must print literally.
    head = Text.assemble(
        (view.label_id, "bold"),
        f"  row {view.row_id}  rule {view.rule}  ranking ",
        " > ".join(map(str, view.ranking)),
        ("  CONTESTED" if view.contested else "", "bold red"),
    )
    console.print(head)
    console.print(Text("prompt: ") + Text(view.prompt))
    for n, response in enumerate(view.responses):
        console.print(Text(f"  [{n}] ") + Text(_excerpt(response, 200) or ""))
    votes = Table(
        title="votes (P(i better) with i shown first = ab, shown second = ba)", title_justify="left"
    )
    for column in ("principle", "pair", "P ab", "P ba", "combined", "consistent", "reasoning"):
        votes.add_column(column, overflow="fold")
    for v in view.votes:
        votes.add_row(
            Text(v.principle_id),
            f"{v.i} vs {v.j}",
            _fmt(v.p_ab),
            _fmt(v.p_ba),
            "abstained" if v.abstained else _fmt(v.combined),
            _yes_no(v.position_consistent),
            Text(v.reasoning or ""),
        )
    console.print(votes)
    pairs = Table(
        title=f"derived pairs (principle agreement {view.principle_agreement:.2f})", title_justify="left"
    )
    for column in ("chosen > rejected", "soft label", "contested", "decisive", "for", "against", "abstained"):
        pairs.add_column(column, overflow="fold")
    for p in view.pairs:
        pairs.add_row(
            f"{p.chosen} > {p.rejected}",
            _fmt(p.soft_label),
            "yes" if p.contested else "no",
            Text(", ".join(p.decisive)),
            Text(", ".join(p.agree)),
            Text(", ".join(p.disagree)),
            Text(", ".join(p.abstain)),
        )
    console.print(pairs)


def print_influence(
    console: Console, influence: Sequence[PrincipleInfluence], constitution: Constitution | None = None
) -> None:
    """Per-principle influence table; tags shown when the constitution is known."""
    from rich.table import Table
    from rich.text import Text

    tags = {p.id: ", ".join(p.tags) for p in constitution.principles} if constitution else {}
    table = Table(title="principle influence", title_justify="left")
    columns = [
        "principle",
        *(["tags"] if tags else []),
        "labels",
        "decisive",
        "disagreed",
        "disagree rate",
        "abstained",
        "mean |p-0.5|",
        "position consistent",
    ]
    for column in columns:
        table.add_column(column, justify="left" if column in ("principle", "tags") else "right")
    for p in influence:
        cells = [
            Text(p.principle_id),
            *([Text(tags.get(p.principle_id, "?"))] if tags else []),
            str(p.labels),
            str(p.decisive),
            str(p.disagreed),
            _pct(p.disagreement_rate),
            str(p.abstentions),
            _fmt(p.mean_strength),
            _pct(p.position_consistency),
        ]
        table.add_row(*cells)
    console.print(table)


def print_contested(console: Console, contested: Sequence[ContestedPair]) -> None:
    """Contested pairs with the principles on each side."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"contested pairs ({len(contested)})", title_justify="left")
    for column in ("label", "chosen > rejected", "soft label", "for", "against", "abstained", "decisive"):
        table.add_column(column, overflow="fold")
    for c in contested:
        table.add_row(
            Text(c.label_id),
            f"{c.chosen} > {c.rejected}",
            _fmt(c.soft_label),
            Text(", ".join(c.agree)),
            Text(", ".join(c.disagree)),
            Text(", ".join(c.abstain)),
            Text(", ".join(c.decisive)),
        )
    console.print(table)


def print_quality(console: Console, quality: JudgeQuality) -> None:
    """Run-level judge quality as a two-column table."""
    from rich.table import Table

    table = Table(title="judge quality", title_justify="left", show_header=False)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, value in quality_items(quality):
        table.add_row(name, value)
    console.print(table)


def quality_items(q: JudgeQuality) -> list[tuple[str, str]]:
    """Shared by the terminal and HTML views so both say the same thing in the same words."""
    return [
        ("labels", str(q.labels)),
        ("derived pairs", str(q.derived_pairs)),
        (
            "contested labels",
            f"{q.contested_labels} ({_pct(q.contested_labels / q.labels if q.labels else None)})",
        ),
        (
            "position consistency",
            f"{_pct(q.position_consistency)} ({q.position_consistent}/{q.position_known} comparisons)",
        ),
        ("principle agreement (mean)", _fmt(q.principle_agreement_mean)),
        (
            "abstentions",
            f"{q.abstentions} of {q.comparisons} comparisons (orders abstained: {q.abstained_orders})",
        ),
        ("soft label mean", _fmt(sum(q.soft_labels) / len(q.soft_labels) if q.soft_labels else None)),
    ]
