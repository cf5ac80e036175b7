"""The report's "Contested principles" section: a heatmap of pairwise disagreement.

An HTML table, not a plot, so every cell carries its n as text and an empty cell reads as
"never gave verdicts on the same pair". The background goes from white (they always agreed) to
the report's disagreement orange (they always disagreed); a pair with fewer than `min_n` shared
verdicts shows its n on grey and no rate. It renders one `cai.audit.ConflictTable`.
"""

from __future__ import annotations

from cai.audit import ConflictCell, ConflictTable, conflict_notes
from cai.report.html import e, pct, table

TOP = 10
"""Most contested units and pairs listed under the heatmap at most."""

HOT = (0xD9, 0x82, 0x2B)  # rate 1: the report's disagreement colour (plots use it too)


def rate_colour(rate: float) -> str:
    """White at 0, `HOT` at 1, linear in between."""
    r = max(0.0, min(1.0, rate))
    return "#" + "".join(f"{round(255 + (c - 255) * r):02x}" for c in HOT)


def _cell(cell: ConflictCell | None, min_n: int) -> str:
    if cell is None:
        return '<td class="hm self"></td>'
    if cell.n == 0:
        return '<td class="hm"></td>'
    pair = f"{cell.a} × {cell.b}: {cell.disagreements} of {cell.n} shared verdicts disagreed"
    if cell.n < min_n or cell.rate is None:
        return (
            f'<td class="hm few" title="{e(pair)} (too few shared verdicts for a rate)">'
            f'<span class="n">n={cell.n}</span></td>'
        )
    return (
        f'<td class="hm" style="background:{rate_colour(cell.rate)}" title="{e(pair)}">'
        f'{pct(cell.rate)}<br><span class="n">n={cell.n}</span></td>'
    )


def heatmap(conflicts: ConflictTable) -> str:
    """The symmetric matrix: rows are numbered units, columns their numbers."""
    units = conflicts.units
    head = "".join(f'<th title="{e(u)}">{n + 1}</th>' for n, u in enumerate(units))
    body = "".join(
        f'<tr><th class="unit">{n + 1} · {e(a)}</th>'
        + "".join(_cell(conflicts.cell(a, b), conflicts.min_n) for b in units)
        + "</tr>"
        for n, a in enumerate(units)
    )
    return (
        f'<table class="heatmap" data-kind="{e(conflicts.kind)}"><thead><tr>'
        f"<th>{e(conflicts.kind)}</th>{head}</tr></thead><tbody>{body}</tbody></table>"
    )


def _tables(conflicts: ConflictTable) -> str:
    kind, parts = conflicts.kind, []
    if conflicts.most_contested_units:
        parts.append(f"<h3>Most contested {e(kind)}s (against all others, n ≥ {conflicts.min_n})</h3>")
        parts.append(
            table(
                [kind, "disagreement", "disagreed", "shared verdicts (n)"],
                [[u.unit, pct(u.rate), u.disagreements, u.n] for u in conflicts.most_contested_units[:TOP]],
                numeric=[2, 3],
            )
        )
    if conflicts.most_contested_pairs:
        parts.append(f"<h3>Most contested pairs of {e(kind)}s (n ≥ {conflicts.min_n})</h3>")
        parts.append(
            table(
                [kind, kind, "disagreement", "disagreed", "shared verdicts (n)"],
                [[c.a, c.b, pct(c.rate), c.disagreements, c.n] for c in conflicts.most_contested_pairs[:TOP]],
                numeric=[3, 4],
            )
        )
    notes = "".join(f'<p class="meta">Note: {e(note)}</p>' for note in conflict_notes(conflicts))
    return "".join(parts) + notes


def conflicts_section(principles: ConflictTable, groups: ConflictTable | None) -> str:
    """The heatmap of principles (and of groups in a multi-group run) with the most contested."""
    intro = (
        "<p>How often two principles preferred different responses of the same pair, counted "
        "over the pairs on which both gave a verdict (n in each cell; a reading without a verdict "
        "is not counted). White: they always agreed; orange: they always disagreed; an empty cell: "
        f"they never gave verdicts on the same pair. A rate on fewer than {principles.min_n} shared "
        "verdicts is not a finding, so such cells show only n, in grey.</p>"
    )
    out = intro + heatmap(principles) + _tables(principles)
    if groups is not None:
        out += (
            "<h3>Between groups</h3><p>The same, group against group: a group's verdict on a pair is "
            "the majority of its principles' verdicts (a tie is no verdict).</p>"
            + heatmap(groups)
            + _tables(groups)
        )
    return out
