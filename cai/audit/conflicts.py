"""Contested principles: how often two principles (or two groups) gave opposite verdicts.

    cai audit runs/demo --conflicts

Two units (principles, or groups in a multi-group run) are compared on every (label, pair of
responses) on which *both* gave a verdict: they **disagree** there when their verdicts prefer
different responses. A reading without a verdict (abstained, position-inconsistent, below the
margin) is not an opinion and is left out, so `n` is the number of shared verdicts, and a rate
is shown as a finding only when `n >= min_n` (`MIN_SHARED`): one shared verdict that disagrees
is a coincidence, not a conflict.

The computation is over plain observations ``(unit, label, pair, verdict)``, so the same code
serves principles and groups. A unit with several verdicts on one (label, pair) (a group whose
principles all voted) takes their majority; a tie within the unit is no verdict of its own.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from itertools import combinations
from typing import NamedTuple

from cai.audit.views import View
from cai.records import LabelAudit

MIN_SHARED = 3
"""Shared verdicts two units need before their disagreement rate is called a finding."""


class Observation(NamedTuple):
    """One unit's reading of one pair of one label; `verdict` None means no verdict."""

    unit: str
    label: Hashable
    pair: Hashable
    verdict: int | None


class ConflictCell(View):
    """Two units on the (label, pair)s both gave a verdict on: `n` of them, `disagreements` opposed."""

    a: str
    b: str
    n: int
    disagreements: int
    rate: float | None  # disagreements / n; None when n == 0


class UnitContest(View):
    """One unit against all others, weighted by n: its disagreements over all its shared verdicts."""

    unit: str
    n: int
    disagreements: int
    rate: float | None


class ConflictTable(View):
    """Every pair of units, and the most contested units and pairs among those with n >= `min_n`."""

    kind: str  # "principle" or "group": what a unit is
    min_n: int
    units: list[str]
    cells: list[ConflictCell]  # one per unordered pair of units, in `units` order (a before b)
    most_contested_units: list[UnitContest]  # n >= min_n, highest rate first
    most_contested_pairs: list[ConflictCell]  # n >= min_n, highest rate first

    def cell(self, a: str, b: str) -> ConflictCell | None:
        """The cell of `a` and `b` in either order (None for a unit with itself or an unknown one)."""
        for c in self.cells:
            if {c.a, c.b} == {a, b} and a != b:
                return c
        return None

    @property
    def few(self) -> list[ConflictCell]:
        """Pairs that shared some verdicts, but fewer than `min_n`: no rate is a finding there."""
        return [c for c in self.cells if 0 < c.n < self.min_n]


def _unit_verdicts(observations: Iterable[Observation]) -> tuple[list[str], dict[Hashable, dict[str, int]]]:
    """Units in order of first appearance, and per (label, pair) each unit's own verdict."""
    units: dict[str, None] = {}
    seen: dict[tuple[Hashable, Hashable], dict[str, Counter[int]]] = {}
    for obs in observations:
        units.setdefault(obs.unit, None)
        votes = seen.setdefault((obs.label, obs.pair), {}).setdefault(obs.unit, Counter())
        if obs.verdict is not None:
            votes[obs.verdict] += 1
    verdicts: dict[Hashable, dict[str, int]] = {}
    for key, by_unit in seen.items():
        for unit, votes in by_unit.items():
            ranked = votes.most_common(2)
            if ranked and (len(ranked) == 1 or ranked[0][1] > ranked[1][1]):
                verdicts.setdefault(key, {})[unit] = ranked[0][0]
    return list(units), verdicts


def _by_rate(item: ConflictCell | UnitContest) -> tuple[float, int]:
    return (-(item.rate or 0.0), -item.n)


def conflict_table(observations: Iterable[Observation], kind: str, min_n: int = MIN_SHARED) -> ConflictTable:
    """Pairwise disagreement over shared verdicts, and the most contested units and pairs."""
    units, verdicts = _unit_verdicts(observations)
    position = {u: n for n, u in enumerate(units)}
    shared: Counter[tuple[str, str]] = Counter()
    opposed: Counter[tuple[str, str]] = Counter()
    for by_unit in verdicts.values():
        for a, b in combinations(sorted(by_unit, key=position.__getitem__), 2):
            shared[a, b] += 1
            opposed[a, b] += by_unit[a] != by_unit[b]
    cells = [
        ConflictCell(
            a=a,
            b=b,
            n=shared[a, b],
            disagreements=opposed[a, b],
            rate=opposed[a, b] / shared[a, b] if shared[a, b] else None,
        )
        for a, b in combinations(units, 2)
    ]
    totals = {u: [0, 0] for u in units}  # unit -> [n, disagreements] against all others
    for c in cells:
        for unit in (c.a, c.b):
            totals[unit][0] += c.n
            totals[unit][1] += c.disagreements
    contests = [
        UnitContest(unit=u, n=n, disagreements=d, rate=d / n if n else None) for u, (n, d) in totals.items()
    ]
    # sorted() is stable: equal rates and n keep the units' order of first appearance
    return ConflictTable(
        kind=kind,
        min_n=min_n,
        units=units,
        cells=cells,
        most_contested_units=sorted((c for c in contests if c.n >= min_n), key=_by_rate),
        most_contested_pairs=sorted((c for c in cells if c.n >= min_n), key=_by_rate),
    )


def _group(vote: object) -> str | None:
    # `PairVote.group` arrives with multi-group runs; rows written before it have no such field.
    return getattr(vote, "group", None)


def principle_observations(rows: Iterable[LabelAudit]) -> list[Observation]:
    """Each vote as an observation of its principle (``group/principle`` in multi-group runs)."""
    return [
        Observation(
            unit=f"{group}/{vote.principle_id}" if (group := _group(vote)) else vote.principle_id,
            label=row.label_id,
            pair=(min(vote.i, vote.j), max(vote.i, vote.j)),
            verdict=vote.verdict,
        )
        for row in rows
        for vote in row.votes
    ]


def group_observations(rows: Iterable[LabelAudit]) -> list[Observation]:
    """Each group's own verdict (by its rule, as recorded in `LabelAudit.groups`) on each derived
    pair of each label; empty in single-group runs."""
    observations = []
    for row in rows:
        for group in getattr(row, "groups", None) or []:
            for pair, verdict in zip(row.pairs, group.verdict, strict=True):
                key = (min(pair.chosen, pair.rejected), max(pair.chosen, pair.rejected))
                observations.append(
                    Observation(unit=group.name, label=row.label_id, pair=key, verdict=verdict)
                )
    return observations


def principle_conflicts(rows: Sequence[LabelAudit], min_n: int = MIN_SHARED) -> ConflictTable:
    return conflict_table(principle_observations(rows), "principle", min_n)


def group_conflicts(rows: Sequence[LabelAudit], min_n: int = MIN_SHARED) -> ConflictTable | None:
    """The same table between groups; None when no row has groups (a single-group run)."""
    observations = group_observations(rows)
    return conflict_table(observations, "group", min_n) if observations else None


def conflict_notes(table: ConflictTable) -> list[str]:
    """What a reader must know about the table's sample sizes (terminal and report)."""
    name = f"{table.kind}s"
    if len(table.units) < 2:
        return [f"fewer than two {name} gave readings: nothing to compare"]
    notes = []
    if not table.most_contested_pairs:
        notes.append(
            f"no two {name} share {table.min_n} or more verdicts: too few shared verdicts to call "
            "any of them contested"
        )
    alone = [u for u in table.units if not any(c.n for c in table.cells if u in (c.a, c.b))]
    if alone:
        notes.append(f"{', '.join(alone)} shared no verdict with any other {table.kind}")
    if table.few:
        notes.append(
            f"{len(table.few)} pair(s) of {name} share fewer than {table.min_n} verdicts: too few "
            "shared verdicts for a rate, so only their n is shown"
        )
    return notes
