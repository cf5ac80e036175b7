"""`cai audit` in a terminal: rich tables, never markup from data, every principle id whole.

Below `NARROW` columns, tables whose cells list principle ids print one block per row instead.
The disagreement matrix (`print_conflicts`) prints only when it fits the console; otherwise the
pairs print as a sorted list.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from cai.audit.conflicts import ConflictCell, ConflictTable, conflict_notes
from cai.audit.groups import GroupsTable, group_table_rows, groups_caption
from cai.audit.summary import (
    AuditSummary,
    ContestedPair,
    JudgeQuality,
    PrincipleInfluence,
    fmt,
    pct,
    quality_items,
    quality_warnings,
)
from cai.audit.views import LabelView, PairView, VoteView, excerpt

if TYPE_CHECKING:
    from rich.console import Console

    from cai.constitution import Constitution
    from cai.gate import JudgeCheck


def _verdict_cell(vote: VoteView) -> str:
    if vote.verdict is not None:
        return f"for {vote.verdict}"
    return f"none ({vote.no_verdict})"


def print_label(console: Console, view: LabelView) -> None:
    """One label: prompt, responses, every reading (in both orders, or the two responses' scores of
    an orderless judge), and the derived pairs."""
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
        console.print(Text(f"  [{n}] ") + Text(excerpt(response, 200) or ""))
    # likelihood and classifier judges read each response on its own: no presentation order
    ordered = view.judge == "choice"
    read = (
        "with i shown first (ab) and second (ba)"
        if ordered
        else f"from the {view.judge} judge's scores of i and j (no presentation order)"
    )
    votes = Table(
        title=f"readings: P(i better) {read}; verdict margin {view.min_margin:g}", title_justify="left"
    )
    votes.add_column("principle", no_wrap=True)
    readings = ("P ab", "P ba") if ordered else ("score i", "score j")
    for column in ("pair", *readings, "combined", "verdict", *(["reasoning"] if ordered else [])):
        votes.add_column(column, overflow="fold")
    for v in view.votes:
        values = (v.p_ab, v.p_ba) if ordered else tuple(v.scores or (None, None))
        votes.add_row(
            Text(v.principle_id),
            f"{v.i} vs {v.j}",
            *map(fmt, values),
            "abstained" if v.abstained else fmt(v.combined),
            _verdict_cell(v),
            *([Text(v.reasoning or "")] if ordered else []),
        )
    console.print(votes)
    title = f"derived pairs (principle agreement {fmt(view.principle_agreement, 2)})"
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
            fmt(p.soft_label),
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
    console.print(Text.assemble((head, "bold"), f"  soft label {fmt(p.soft_label)}  ", " · ".join(flags)))
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
        return f"{p.disagreed} ({pct(p.disagreement_rate)})" if p.opinionated else "–"

    if _narrow(console):
        console.print(Text(title, style="italic"))
        for p in influence:
            head = Text(p.principle_id, style="bold")
            if tags:
                head += Text(f"  [{tags.get(p.principle_id, '?')}]")
            console.print(head)
            console.print(
                f"  labels {p.labels} · decisive {p.decisive} · against {against(p)} · verdicts {p.verdicts} "
                f"· no verdict {p.no_verdicts} · |p-.5| {fmt(p.mean_strength, 2)} "
                f"· consistent {pct(p.position_consistency)}",
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
            fmt(p.mean_strength, 2),
            pct(p.position_consistency),
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
            fmt(c.soft_label, 2),
            Text(", ".join(c.agree)),
            Text(", ".join(c.disagree)),
            Text(", ".join(c.decisive)),
        )
    console.print(table)


def print_summary(console: Console, summary: AuditSummary, constitution: Constitution | None = None) -> None:
    """`cai audit`'s page: judge quality (with the gate), principle influence, contested pairs."""
    print_quality(console, summary.quality, summary.gate, summary.gate_failures)
    print_influence(console, summary.influence, constitution)
    print_contested(console, summary.contested)
    if summary.groups is not None:
        print_groups(console, summary.groups)


def print_groups(console: Console, groups: GroupsTable) -> None:
    """Each group's weight and its share of the pairs the groups disagreed on (target vs achieved)."""
    from rich.table import Table

    headers, rows = group_table_rows(groups)
    caption = groups_caption(groups)
    table = Table(title="groups", title_justify="left", caption=caption, caption_justify="left")
    for n, header in enumerate(headers):
        table.add_column(header, justify="left" if n < 2 else "right", overflow="fold")
    for row in rows:
        table.add_row(*row)
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


TOP = 10
"""Most contested units and pairs listed at most (the matrix, when it fits, shows every pair)."""


def _rate_cell(cell: ConflictCell | None, min_n: int) -> str:
    """A rate only from `min_n` shared verdicts up; below, only n; nothing when none were shared."""
    if cell is None:
        return "·"
    if cell.n == 0:
        return ""
    if cell.n < min_n or cell.rate is None:
        return f"– n{cell.n}"
    return f"{cell.rate:.0%} n{cell.n}"


def _conflict_matrix(console: Console, table: ConflictTable) -> bool:
    """The symmetric matrix of rates with n, when it fits the console; False when it does not."""
    from rich.table import Table
    from rich.text import Text

    units = table.units
    rows = [[_rate_cell(table.cell(a, b), table.min_n) for b in units] for a in units]
    widths = [max(len(str(len(units))), 1), max(len(u) for u in units)]
    widths += [max(len(str(n + 1)), *(len(r[n]) for r in rows)) for n in range(len(units))]
    if sum(w + 2 for w in widths) > console.width:
        return False
    matrix = Table(box=None, padding=(0, 1), show_edge=False)
    matrix.add_column("", justify="right", no_wrap=True)
    matrix.add_column(table.kind, no_wrap=True)
    for n in range(len(units)):
        matrix.add_column(str(n + 1), justify="right", no_wrap=True)
    for n, (unit, cells) in enumerate(zip(units, rows, strict=True)):
        matrix.add_row(str(n + 1), Text(unit), *cells)
    console.print(matrix)
    return True


def print_conflicts(console: Console, table: ConflictTable, top: int = TOP) -> None:
    """How often two principles (or groups) gave opposite verdicts on the same pair of responses."""
    from rich.text import Text

    kind = table.kind
    console.print(
        Text(
            f"contested {kind}s: how often two {kind}s' verdicts on the same pair of responses "
            f"disagreed (n: pairs both gave a verdict on)",
            style="italic",
        )
    )
    if len(table.units) >= 2 and _conflict_matrix(console, table):
        console.print(
            Text(f"  columns are the numbered rows; '– nN': fewer than {table.min_n} shared verdicts")
        )
    if table.most_contested_units:
        console.print(Text(f"most contested {kind}s (against all others, n >= {table.min_n}):"))
        for u in table.most_contested_units[:top]:
            console.print(
                Text(f"  {pct(u.rate):>6}  {u.disagreements} of {u.n} shared verdicts  ") + Text(u.unit)
            )
    pairs = table.most_contested_pairs
    if pairs:
        console.print(Text(f"most contested pairs of {kind}s (n >= {table.min_n}):"))
        for c in pairs[:top]:
            console.print(
                Text(f"  {pct(c.rate):>6}  {c.disagreements} of {c.n} shared verdicts  ")
                + Text(c.a)
                + Text(" × ")
                + Text(c.b)
            )
        if len(pairs) > top:
            console.print(Text(f"  … and {len(pairs) - top} more"))
    for note in conflict_notes(table):
        console.print(Text.assemble(("note ", "bold yellow"), note))
