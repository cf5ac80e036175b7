"""One label as a reviewer reads it, and filters over labels by principle, tag or contest.

Every figure is read from the audit row itself (`cai.records.LabelAudit`), so the answers are
reproducible from files alone. A principle **agrees** on a derived pair when its *verdict*
preferred ``chosen``, **disagrees** when its verdict preferred ``rejected``; a reading without a
verdict (abstained, position inconsistent, below the margin; `cai.verdict`) is neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from cai.aggregate import DerivedPair
from cai.records import LabelAudit, OrderVote, PairVote

if TYPE_CHECKING:
    from cai.constitution import Constitution

EXCERPT_CHARS = 160
"""Chain-of-thought excerpts are cut here: enough to see the verdict, short enough for a table."""


def _order_p_i(vote: OrderVote) -> float | None:
    """P(response i better) in one order: option A is i in order ab, j in order ba."""
    if vote.abstained or vote.error is not None or len(vote.probs) != 2:
        return None
    return vote.probs[0] if vote.order == "ab" else vote.probs[1]


def _verdict_side(vote: PairVote | None, chosen: int) -> int:
    """+1 when the vote's verdict is for `chosen`, -1 against it, 0 without a verdict."""
    if vote is None or vote.verdict is None:
        return 0
    return 1 if vote.verdict == chosen else -1


def _votes_on(row: LabelAudit, chosen: int, rejected: int) -> dict[str, PairVote]:
    """Each principle's vote on the unordered pair {chosen, rejected}."""
    pair = {chosen, rejected}
    return {v.principle_id: v for v in row.votes if {v.i, v.j} == pair}


def excerpt(text: str | None, limit: int = EXCERPT_CHARS) -> str | None:
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


class View(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VoteView(View):
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
    scores: list[float | None] | None = None  # orderless judges: the scores of i and j behind `combined`


class PairView(View):
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

    @property
    def has_verdict(self) -> bool:
        return bool(self.agree or self.disagree)


class LabelView(View):
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
    judge: str = "choice"
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


def pair_views(row: LabelAudit) -> list[PairView]:
    return [_pair_view(row, pair, use) for pair, use in zip(row.pairs, row.training, strict=True)]


def label_view(row: LabelAudit) -> LabelView:
    """Flatten one audit row into what `print_label` and the HTML report show."""
    votes = []
    for vote in row.votes:
        by_order = {o.order: o for o in vote.orders}
        reasoning = next((o.reasoning for o in vote.orders if o.reasoning), None)
        if vote.likelihood is not None:
            scores: list[float | None] | None = [r.score for r in vote.likelihood]
        elif vote.classifier_scores is not None:
            scores = [s.score for s in vote.classifier_scores]
        else:
            scores = None
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
                reasoning=excerpt(reasoning),
                scores=scores,
            )
        )
    pairs = pair_views(row)
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
        judge=row.judge,
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


def decisive_ids(row: LabelAudit) -> set[str]:
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
        pool = decisive_ids(row) if decisive else set(row.principles)
        if principle is not None and principle not in pool:
            continue
        if members is not None and not members & pool:
            continue
        if contested is not None and row.contested != contested:
            continue
        kept.append(row)
    return kept
