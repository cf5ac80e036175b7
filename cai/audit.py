"""Queries over label audit rows: which principle shaped this label, and how far to trust it.

    cai audit runs/demo --principle privacy --contested

A preference model learns whatever the labels say, so a surprising PM is debugged by asking
which principles produced its labels. Every label's audit row (`cai.records.LabelAudit`) carries
each principle's vote in both presentation orders, the aggregation rule, the derived pairs with
their contested flag and their decisive principles; this module only reads those rows, so the
answers are reproducible from files alone and never depend on re-running a judge.

Everything here is a pure function of a list of rows except `load_audit`, so the CLI, the HTML
report (`cai.report`) and notebooks share one set of definitions:

* a principle **agrees** on a derived pair when its *verdict* preferred ``chosen``, **disagrees**
  when its verdict preferred ``rejected``; a reading without a verdict (abstained, position
  inconsistent, below the margin; see `cai.verdict`) is neither, the same reading
  `cai.aggregate` uses for agree/disagree weights. Influence tables count verdicts only;
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

from cai.aggregate import DerivedPair
from cai.records import LabelAudit, OrderVote, PairVote
from cai.rules import SCORE_DECIMALS
from cai.verdict import NO_VERDICT_REASONS

if TYPE_CHECKING:
    from rich.console import Console

    from cai.constitution import Constitution
    from cai.gate import JudgeCheck

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
    "load_gate",
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

    A run directory can hold several label folders (one per config). Which one is meant is never
    guessed from what was written last: a run directory with one finished label folder resolves
    to it; with several, to the one its `manifest.json` (written by `cai run`) names, and
    otherwise it is an error listing them (pass the folder, or `cai audit -c CONFIG`).
    """
    import orjson

    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected a run directory or an {AUDIT_FILE} file)")
    if (path / AUDIT_FILE).is_file():
        return path / AUDIT_FILE
    folders = sorted(p.parent for p in (path / LABEL_STAGE).glob(f"*/{AUDIT_FILE}"))
    if not folders:
        raise FileNotFoundError(
            f"{path} has no finished label stage (no {LABEL_STAGE}/*/{AUDIT_FILE}); run the label stage "
            f"first, or pass an {AUDIT_FILE} file"
        )
    if len(folders) == 1:
        return folders[0] / AUDIT_FILE
    manifest = path / "manifest.json"
    if manifest.is_file():
        named = orjson.loads(manifest.read_bytes()).get("stages", {}).get(LABEL_STAGE, {}).get("path")
        if named and (Path(named) / AUDIT_FILE).is_file():
            return Path(named) / AUDIT_FILE
    listing = ", ".join(str(f) for f in folders)
    raise FileNotFoundError(
        f"{path} holds {len(folders)} label folders ({listing}); pass one of them, or the config "
        "that made it (`cai audit -c CONFIG`)"
    )


def load_gate(path: Path) -> tuple[JudgeCheck | None, list[str]]:
    """The judge gate recorded next to an audit file (its stage's manifest), and its failures."""
    from cai.gate import GateResult

    manifest = audit_file(path).parent / "manifest.json"
    if not manifest.is_file():
        return None, []
    gate = orjson.loads(manifest.read_bytes()).get("summary", {}).get("gate")
    if not gate:
        return None, []
    result = GateResult.model_validate(gate)
    return result.check, result.failures


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


def _verdict_side(vote: PairVote | None, chosen: int) -> int:
    """+1 when the vote's verdict is for `chosen`, -1 against it, 0 without a verdict."""
    if vote is None or vote.verdict is None:
        return 0
    return 1 if vote.verdict == chosen else -1


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
    verdict: int | None
    no_verdict: str | None
    reasoning: str | None


class PairView(_View):
    """A derived (chosen, rejected) pair: whose verdict was for it, against it, and who had none."""

    chosen: int
    rejected: int
    soft_label: float
    contested: bool
    decisive: list[str]
    agree: list[str]
    disagree: list[str]
    no_verdict: list[str]
    training: str


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
    has_verdict: bool
    principle_agreement: float | None
    min_margin: float
    cot: bool
    judge_model_id: str
    votes: list[VoteView]
    pairs: list[PairView]


def _pair_view(row: LabelAudit, pair: DerivedPair, training: str) -> PairView:
    """Sort the row's principles into verdict for / verdict against / no verdict on one pair."""
    on_pair = _votes_on(row, pair.chosen, pair.rejected)
    sides: dict[int, list[str]] = {1: [], -1: [], 0: []}
    for principle in row.principles:
        sides[_verdict_side(on_pair.get(principle), pair.chosen)].append(principle)
    return PairView(
        chosen=pair.chosen,
        rejected=pair.rejected,
        soft_label=pair.soft_label,
        contested=pair.contested,
        decisive=list(pair.decisive),
        agree=sides[1],
        disagree=sides[-1],
        no_verdict=sides[0],
        training=training,
    )


def _pair_views(row: LabelAudit) -> list[PairView]:
    return [_pair_view(row, pair, use) for pair, use in zip(row.pairs, row.training, strict=True)]


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
                verdict=vote.verdict,
                no_verdict=vote.no_verdict,
                reasoning=_excerpt(reasoning),
            )
        )
    pairs = _pair_views(row)
    return LabelView(
        label_id=row.label_id,
        row_id=row.row_id,
        prompt=_prompt_text(row),
        responses=list(row.responses),
        rule=row.rule,
        ranking=list(row.outcome.ranking),
        scores=list(row.outcome.scores),
        contested=row.contested,
        has_verdict=row.has_verdict,
        principle_agreement=row.principle_agreement,
        min_margin=row.min_margin,
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
        decided = _decisive_ids(row)
        views = _pair_views(row)
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
        for view in _pair_views(row)
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


class JudgeQuality(_View):
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


# --------------------------------------------------------------------------------------------
# Terminal rendering (rich imported lazily: `import cai.audit` stays cheap)
# --------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _yes_no(value: bool | None) -> str:
    return "–" if value is None else "yes" if value else "NO"


def _verdict_cell(vote: VoteView) -> str:
    if vote.verdict is not None:
        return f"for {vote.verdict}"
    return f"none ({vote.no_verdict})"


def print_label(console: Console, view: LabelView) -> None:
    """One label: prompt, responses, every reading in both orders, and the derived pairs."""
    from rich.table import Table
    from rich.text import Text

    # Data goes in as Text, never as markup: a prompt containing "[bold]" must print literally.
    head = Text.assemble(
        (view.label_id, "bold"),
        f"  row {view.row_id}  rule {view.rule}  ranking ",
        " > ".join(map(str, view.ranking)),
        ("  CONTESTED" if view.contested else "", "bold red"),
        ("" if view.has_verdict else "  NO VERDICT (no signal)", "bold yellow"),
    )
    console.print(head)
    console.print(Text("prompt: ") + Text(view.prompt))
    for n, response in enumerate(view.responses):
        console.print(Text(f"  [{n}] ") + Text(_excerpt(response, 200) or ""))
    votes = Table(
        title="readings: P(i better) with i shown first (ab) and second (ba); "
        f"verdict margin {view.min_margin:g}",
        title_justify="left",
    )
    votes.add_column("principle", no_wrap=True)
    for column in ("pair", "P ab", "P ba", "combined", "verdict", "reasoning"):
        votes.add_column(column, overflow="fold")
    for v in view.votes:
        votes.add_row(
            Text(v.principle_id),
            f"{v.i} vs {v.j}",
            _fmt(v.p_ab),
            _fmt(v.p_ba),
            "abstained" if v.abstained else _fmt(v.combined),
            _verdict_cell(v),
            Text(v.reasoning or ""),
        )
    console.print(votes)
    title = f"derived pairs (principle agreement {_fmt(view.principle_agreement, 2)})"
    if _narrow(console):
        console.print(Text(title, style="italic"))
        for p in view.pairs:
            _print_pair_block(console, f"{p.chosen} > {p.rejected}", p)
        return
    pairs = Table(title=title, title_justify="left")
    for column in ("chosen > rejected", "soft label", "training", "contested", "decisive", "for", "against"):
        pairs.add_column(column, overflow="fold")
    pairs.add_column("no verdict", overflow="fold")
    for p in view.pairs:
        pairs.add_row(
            f"{p.chosen} > {p.rejected}",
            _fmt(p.soft_label),
            p.training,
            "yes" if p.contested else "no",
            Text(", ".join(p.decisive) or "none"),
            Text(", ".join(p.agree)),
            Text(", ".join(p.disagree)),
            Text(", ".join(p.no_verdict)),
        )
    console.print(pairs)


NARROW = 120
"""Below this many columns, tables whose cells list principle ids print one block per row
instead, so ids are never cut or folded (an 80-column terminal shows every id whole)."""


def _narrow(console: Console) -> bool:
    return console.width < NARROW


def _print_pair_block(console: Console, head: str, p: PairView) -> None:
    """One derived pair as a few labelled lines; ids are joined by ", " so lines break between them."""
    from rich.text import Text

    flags = [p.training] + (["CONTESTED"] if p.contested else [])
    console.print(Text.assemble((head, "bold"), f"  soft label {_fmt(p.soft_label)}  ", " · ".join(flags)))
    for name, ids in (("decisive", p.decisive), ("for", p.agree), ("against", p.disagree)):
        console.print(Text(f"  {name:<11}") + Text(", ".join(ids) or "none"))
    console.print(Text(f"  {'no verdict':<11}") + Text(", ".join(p.no_verdict) or "none"))


def print_influence(
    console: Console, influence: Sequence[PrincipleInfluence], constitution: Constitution | None = None
) -> None:
    """Per-principle influence (verdicts only); ids are never cut, even at 80 columns."""
    from rich.table import Table
    from rich.text import Text

    tags = {p.id: ", ".join(p.tags) for p in constitution.principles} if constitution else {}
    title = "principle influence (verdicts only)"

    def against(p: PrincipleInfluence) -> str:
        return f"{p.disagreed} ({_pct(p.disagreement_rate)})" if p.opinionated else "–"

    if _narrow(console):
        console.print(Text(title, style="italic"))
        for p in influence:
            head = Text(p.principle_id, style="bold")
            if tags:
                head += Text(f"  [{tags.get(p.principle_id, '?')}]")
            console.print(head)
            console.print(
                f"  labels {p.labels} · decisive {p.decisive} · against {against(p)} · verdicts {p.verdicts} "
                f"· no verdict {p.no_verdicts} · |p-.5| {_fmt(p.mean_strength, 2)} "
                f"· consistent {_pct(p.position_consistency)}",
                highlight=False,
            )
        return
    table = Table(title=title, title_justify="left")
    table.add_column("principle", no_wrap=True)
    if tags:
        table.add_column("tags", overflow="fold")
    for column in ("labels", "decisive", "against", "verdicts", "no verdict", "|p-.5|", "consistent"):
        table.add_column(column, justify="right", overflow="fold")
    for p in influence:
        table.add_row(
            Text(p.principle_id),
            *([Text(tags.get(p.principle_id, "?"))] if tags else []),
            str(p.labels),
            str(p.decisive),
            against(p),
            str(p.verdicts),
            str(p.no_verdicts),
            _fmt(p.mean_strength, 2),
            _pct(p.position_consistency),
        )
    console.print(table)


def print_contested(console: Console, contested: Sequence[ContestedPair]) -> None:
    """Contested pairs with the principles on each side."""
    from rich.table import Table
    from rich.text import Text

    title = f"contested pairs ({len(contested)})"
    if _narrow(console):
        console.print(Text(title, style="italic"))
        for c in contested:
            _print_pair_block(console, f"{c.label_id}  {c.chosen} > {c.rejected}", c)
        return
    table = Table(title=title, title_justify="left")
    table.add_column("label", no_wrap=True)
    for column in ("pair", "soft", "for", "against", "decisive"):
        table.add_column(column, overflow="fold")
    for c in contested:
        table.add_row(
            Text(c.label_id),
            f"{c.chosen} > {c.rejected}",
            _fmt(c.soft_label, 2),
            Text(", ".join(c.agree)),
            Text(", ".join(c.disagree)),
            Text(", ".join(c.decisive)),
        )
    console.print(table)


def print_quality(
    console: Console, quality: JudgeQuality, gate: JudgeCheck | None = None, failures: Sequence[str] = ()
) -> None:
    """Run-level judge quality as a two-column table, gold agreement first when measured."""
    from rich.table import Table

    table = Table(title="judge quality", title_justify="left", show_header=False)
    table.add_column("figure")
    table.add_column("value", justify="right", overflow="fold")
    for name, value in quality_items(quality, gate):
        table.add_row(name, value)
    console.print(table)
    for warning in quality_warnings(quality, failures):
        console.print(f"[bold yellow]note[/] {warning}", highlight=False)


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
            f"{q.labels_with_verdict} ({_pct(q.labels_with_verdict / q.labels if q.labels else None)})",
        ),
        ("training rows", f"{q.training_rows} of {q.derived_pairs} derived pairs (not rows: {uses})"),
        ("verdicts", f"{q.verdicts} of {q.comparisons} comparisons (none: {reasons})"),
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
