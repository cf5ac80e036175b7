"""Pluralistic runs: each group's weight, and its share of the labels the groups disagreed on.

    cai audit runs/pluralistic --groups

A label pair on which the groups' verdicts disagree was decided for one group or another
(`LabelAudit.decided_by`); under the proportional rule each group's share of those pairs should
match its weight (its share of the population), under a per-comparison majority the heaviest
group takes nearly all of them. The table puts the two side by side: target (the weight) and
achieved (pairs the group decided / pairs on which the groups disagreed). With K = 2 and
best_worst a pair is a label.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from cai.audit.views import View
from cai.records import LabelAudit

DISAGREED = ("apportioned", "rule", "pending")
"""Reasons of a pair on which the groups with a verdict disagreed."""


class GroupShare(View):
    """One group: its weight as configured and normalised (its target), and what it decided."""

    name: str
    constitution: str
    constitution_hash: str
    raw_weight: float
    weight: float = Field(description="Normalised: the group's target share of the disagreed pairs.")
    decided: int = Field(description="Disagreed pairs this group's verdict decided.")
    achieved: float | None = Field(description="decided / disagreed pairs; None when none were disagreed.")


class GroupsTable(View):
    """The groups of a run's labels and their shares of the pairs on which they disagreed."""

    rule: str = Field(description="The rule across groups (`label.groups.rule`).")
    labels: int
    pairs: int = Field(description="Derived pairs of those labels (one per label with best_worst).")
    consensus: int = Field(description="Pairs on which every group with a verdict agreed.")
    disagreed: int = Field(description="Pairs on which the groups' verdicts disagreed.")
    no_verdict: int = Field(description="Pairs no group had a verdict on.")
    groups: list[GroupShare]


def group_shares(rows: Sequence[LabelAudit]) -> GroupsTable | None:
    """The groups table of these audit rows; None when they come from a one-group run."""
    grouped = [r for r in rows if r.groups is not None]
    if not grouped:
        return None
    heads = {g.name: g for g in grouped[0].groups or []}
    reasons = [d for r in grouped for d in r.decided_by or []]
    disagreed = [d for d in reasons if d.reason in DISAGREED]
    shares = []
    for name, head in heads.items():
        decided = sum(1 for d in disagreed if d.group == name)
        shares.append(
            GroupShare(
                name=name,
                constitution=head.constitution,
                constitution_hash=head.constitution_hash,
                raw_weight=head.raw_weight,
                weight=head.weight,
                decided=decided,
                achieved=decided / len(disagreed) if disagreed else None,
            )
        )
    return GroupsTable(
        rule=", ".join(sorted({r.outcome.rule for r in grouped})),
        labels=len(grouped),
        pairs=len(reasons),
        consensus=sum(1 for d in reasons if d.reason == "consensus"),
        disagreed=len(disagreed),
        no_verdict=sum(1 for d in reasons if d.reason == "no-verdict"),
        groups=shares,
    )


def group_table_rows(table: GroupsTable) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the groups table, shared by the terminal and the HTML report."""
    headers = ["group", "constitution", "weight (raw)", "target share", "decided", "achieved share"]
    rows = [
        [
            g.name,
            f"{g.constitution} ({g.constitution_hash[:12]})",
            f"{g.raw_weight:g}",
            f"{g.weight:.1%}",
            f"{g.decided} of {table.disagreed}",
            "n/a" if g.achieved is None else f"{g.achieved:.1%}",
        ]
        for g in table.groups
    ]
    return headers, rows


def groups_caption(table: GroupsTable) -> str:
    return (
        f"rule across groups: {table.rule}; {table.labels} labels, {table.pairs} pairs: "
        f"{table.disagreed} on which the groups disagreed, {table.consensus} consensus, "
        f"{table.no_verdict} without any group verdict"
    )
