"""Contested principles (`cai.audit.conflicts`) on hand-built audit rows worked out below.

Three principles p1, p2, p3 over five labels; "v" is a verdict for that response, "-" a reading
without a verdict (its reason in brackets), a blank no vote at all.

  label  K  pair   p1        p2          p3
  L1     2  0-1    v0        v0          v1
  L2     3  0-1    v0        v0          v0
            0-2    v2        v2          - (position-inconsistent)
            1-2    v1        - (below)   v2
  L3     3  0-1    v1        v1          - (abstained)
            0-2    - (below) v0          v2
            1-2              v1          v1
  L4     2  0-1    - (below) - (below)   v0
  L5     2  0-1              v0          v1

Shared verdicts (both gave one on the same label and pair), and disagreements:
  p1 x p2: L1, L2 0-1, L2 0-2, L3 0-1                  n 4, disagree 0       rate 0
  p1 x p3: L1 (0/1), L2 0-1, L2 1-2 (1/2)              n 3, disagree 2       rate 2/3
  p2 x p3: L1, L2 0-1, L3 0-2, L3 1-2, L5              n 5, disagree 3       rate 3/5
Against all others (weighted by n): p1 2/7, p2 3/9, p3 5/8 -> most contested p3, p2, p1.
"""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest
from rich.console import Console
from typer.testing import CliRunner

from cai.audit import (
    MIN_SHARED,
    Observation,
    conflict_table,
    group_conflicts,
    load_audit,
    principle_conflicts,
    print_conflicts,
    summarize,
)
from cai.records import GroupVerdict, LabelAudit, PairVote
from cai.report import write_report
from cai.report.heatmap import rate_colour

FIXTURE = Path(__file__).parent / "fixtures" / "audit_rows.jsonl"

# label -> K, then (principle, i, j, verdict or a no-verdict reason)
READINGS: dict[str, tuple[int, list[tuple[str, int, int, int | str]]]] = {
    "L1": (2, [("p1", 0, 1, 0), ("p2", 0, 1, 0), ("p3", 0, 1, 1)]),
    "L2": (
        3,
        [
            ("p1", 0, 1, 0),
            ("p2", 0, 1, 0),
            ("p3", 0, 1, 0),
            ("p1", 0, 2, 2),
            ("p2", 0, 2, 2),
            ("p3", 0, 2, "position-inconsistent"),
            ("p1", 1, 2, 1),
            ("p2", 1, 2, "below-margin"),
            ("p3", 1, 2, 2),
        ],
    ),
    "L3": (
        3,
        [
            ("p1", 0, 1, 1),
            ("p2", 0, 1, 1),
            ("p3", 0, 1, "abstained"),
            ("p1", 0, 2, "below-margin"),
            ("p2", 0, 2, 0),
            ("p3", 0, 2, 2),
            ("p2", 1, 2, 1),
            ("p3", 1, 2, 1),
        ],
    ),
    "L4": (2, [("p1", 0, 1, "below-margin"), ("p2", 0, 1, "below-margin"), ("p3", 0, 1, 0)]),
    "L5": (2, [("p2", 0, 1, 0), ("p3", 0, 1, 1)]),
}


class GroupedVote(PairVote):
    """A stand-in for the multi-group `PairVote` that gains `group` (absent from cai's own yet)."""

    group: str | None = None


def vote(principle: str, i: int, j: int, reading: int | str, group: str | None = None) -> PairVote:
    verdict = reading if isinstance(reading, int) else None
    p = None if reading == "abstained" else 0.5 if verdict is None else 0.8 if verdict == i else 0.2
    fields = dict(
        principle_id=principle,
        weight=1.0,
        i=i,
        j=j,
        orders=[],
        p_i_better=p,
        verdict=verdict,
        no_verdict=None if verdict is not None else reading,
    )
    return GroupedVote(**fields, group=group) if group else PairVote(**fields)


@pytest.fixture(scope="module")
def template() -> LabelAudit:
    """A real audit row (K=2, valid pairs and rule outcome) whose votes the tests replace."""
    return load_audit(FIXTURE)[0]


def label(template: LabelAudit, label_id: str, k: int, votes: list[PairVote]) -> LabelAudit:
    return template.model_copy(
        update={
            "label_id": label_id,
            "row_id": f"row-{label_id}",
            "responses": [f"response {n}" for n in range(k)],
            "principles": list(dict.fromkeys(v.principle_id for v in votes)),
            "votes": votes,
        }
    )


@pytest.fixture(scope="module")
def rows(template) -> list[LabelAudit]:
    return [
        label(template, name, k, [vote(*reading) for reading in readings])
        for name, (k, readings) in READINGS.items()
    ]


def figures(table, a: str, b: str) -> tuple[int, int, float | None]:
    cell = table.cell(a, b)
    assert cell is not None
    return cell.n, cell.disagreements, cell.rate


# ------------------------------------------------------------------------- the computation


def test_pairwise_n_and_rates(rows):
    table = principle_conflicts(rows)
    assert table.kind == "principle" and table.min_n == MIN_SHARED == 3
    assert table.units == ["p1", "p2", "p3"]
    assert [(c.a, c.b) for c in table.cells] == [("p1", "p2"), ("p1", "p3"), ("p2", "p3")]
    assert figures(table, "p1", "p2") == (4, 0, 0.0)
    assert figures(table, "p3", "p1") == (3, 2, pytest.approx(2 / 3))  # either order finds the cell
    assert figures(table, "p2", "p3") == (5, 3, pytest.approx(3 / 5))
    assert table.cell("p1", "p1") is None
    assert table.few == []


def test_a_reading_without_verdict_is_not_counted(rows, template):
    # L2 0-2: p3 was position-inconsistent, so p1 and p3 share 3 verdicts, not 4 ...
    assert figures(principle_conflicts(rows), "p1", "p3")[0] == 3
    # ... and giving p3 a verdict there (for 2, as p1) makes it 4, with the same 2 disagreements.
    k, readings = READINGS["L2"]
    decided = [(p, i, j, 2 if r == "position-inconsistent" else r) for p, i, j, r in readings]
    changed = [
        label(template, "L2", k, [vote(*r) for r in decided]) if r.label_id == "L2" else r for r in rows
    ]
    assert figures(principle_conflicts(changed), "p1", "p3") == (4, 2, 0.5)


def test_most_contested_principles_and_pairs(rows):
    table = principle_conflicts(rows)
    units = [(u.unit, u.n, u.disagreements) for u in table.most_contested_units]
    assert units == [("p3", 8, 5), ("p2", 9, 3), ("p1", 7, 2)]
    assert [u.rate for u in table.most_contested_units] == pytest.approx([5 / 8, 3 / 9, 2 / 7])
    pairs = [(c.a, c.b, c.n) for c in table.most_contested_pairs]
    assert pairs == [("p1", "p3", 3), ("p2", "p3", 5), ("p1", "p2", 4)]


def test_minimum_n(rows):
    four = principle_conflicts(rows, min_n=4)
    # p1 x p3 shares only 3 verdicts: not a finding at min_n 4, however high its rate
    assert [(c.a, c.b) for c in four.most_contested_pairs] == [("p2", "p3"), ("p1", "p2")]
    assert [(c.a, c.b, c.n) for c in four.few] == [("p1", "p3", 3)]
    nobody = principle_conflicts(rows, min_n=6)
    assert nobody.most_contested_pairs == [] and len(nobody.few) == 3
    assert [u.unit for u in nobody.most_contested_units] == ["p3", "p2", "p1"]  # 8, 9, 7 >= 6
    assert [u.unit for u in principle_conflicts(rows, min_n=8).most_contested_units] == ["p3", "p2"]
    # one shared verdict that disagrees is never listed as a finding
    alone = principle_conflicts(rows[:1])
    assert figures(alone, "p1", "p3") == (1, 1, 1.0)
    assert alone.most_contested_pairs == [] and alone.most_contested_units == []


def test_a_unit_with_several_verdicts_takes_their_majority():
    obs = [
        Observation("g", "L", (0, 1), 0),
        Observation("g", "L", (0, 1), 0),
        Observation("g", "L", (0, 1), 1),
        Observation("h", "L", (0, 1), 1),
        Observation("g", "M", (0, 1), 0),  # g split 1:1 on M: no verdict of its own there
        Observation("g", "M", (0, 1), 1),
        Observation("h", "M", (0, 1), 1),
        Observation("h", "N", (0, 1), None),  # h without a verdict on N
        Observation("g", "N", (0, 1), 1),
    ]
    table = conflict_table(obs, "group", min_n=1)
    assert table.units == ["g", "h"]
    assert figures(table, "g", "h") == (1, 1, 1.0)


# ------------------------------------------------------------------------- groups


@pytest.fixture(scope="module")
def grouped(template) -> list[LabelAudit]:
    """safety = {p1, p2}, helpful = {p3, p4}; every label has K=2 and one pair (0, 1).

    G1: safety 0 0, helpful 1 1 -> disagree;  G2: safety 0 1 (tie: no group verdict), helpful 0;
    G3: safety 1 1, helpful 1 - -> agree;     G4: safety 0 -, helpful 1 1 -> disagree.
    safety x helpful: n 3, disagreements 2.
    """
    readings = {
        "G1": [0, 0, 1, 1],
        "G2": [0, 1, 0, "below-margin"],
        "G3": [1, 1, 1, "abstained"],
        "G4": [0, "below-margin", 1, 1],
    }
    members = [("safety", "p1"), ("safety", "p2"), ("helpful", "p3"), ("helpful", "p4")]
    # each group's own verdict (its rule over its principles), as the label stage records it
    group_verdicts = {"G1": (0, 1), "G2": (None, 0), "G3": (1, 1), "G4": (0, 1)}
    rows = []
    for name, rs in readings.items():
        row = label(
            template, name, 2, [vote(p, 0, 1, r, group=g) for (g, p), r in zip(members, rs, strict=True)]
        )
        groups = [
            GroupVerdict(
                name=g,
                weight=0.5,
                raw_weight=1.0,
                constitution=g,
                constitution_hash="h",
                principles=[],
                ranking=None,
                p=[None if v is None else 0.8 if v == row.pairs[0].chosen else 0.2],
                verdict=[v],
            )
            for g, v in zip(("safety", "helpful"), group_verdicts[name], strict=True)
        ]
        rows.append(row.model_copy(update={"groups": groups}))
    return rows


def test_group_table_from_the_recorded_group_verdicts(grouped, rows):
    groups = group_conflicts(grouped)
    assert groups is not None and groups.kind == "group"
    assert groups.units == ["safety", "helpful"]
    assert figures(groups, "safety", "helpful") == (3, 2, pytest.approx(2 / 3))
    assert [u.unit for u in groups.most_contested_units] == ["safety", "helpful"]
    # the principle table names each principle with its group
    principles = principle_conflicts(grouped)
    assert principles.units == ["safety/p1", "safety/p2", "helpful/p3", "helpful/p4"]
    assert figures(principles, "safety/p1", "helpful/p3") == (4, 2, 0.5)  # G1, G4 against; G2, G3 with
    assert figures(principles, "safety/p1", "safety/p2") == (3, 1, pytest.approx(1 / 3))
    # a single-group run (no row has groups) has no group table
    assert group_conflicts(rows) is None
    assert summarize(rows).group_conflicts is None and summarize(grouped).group_conflicts is not None


# ------------------------------------------------------------------------- terminal and CLI


def test_terminal_matrix_and_lists_fit_80_columns(rows, grouped):
    console = Console(record=True, width=80, color_system=None)
    print_conflicts(console, principle_conflicts(rows))
    text = console.export_text()
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80
    matrix = {line.split()[1]: line.split()[2:] for line in text.splitlines() if re.match(r" *\d  p\d", line)}
    assert matrix == {
        "p1": ["·", "0%", "n4", "67%", "n3"],
        "p2": ["0%", "n4", "·", "60%", "n5"],
        "p3": ["67%", "n3", "60%", "n5", "·"],
    }
    assert "62.5%  5 of 8 shared verdicts  p3" in text
    assert "66.7%  2 of 3 shared verdicts  p1 × p3" in text
    assert text.index("p1 × p3") < text.index("p2 × p3") < text.index("p1 × p2")
    assert "note" not in text  # every pair shares at least 3 verdicts

    console = Console(record=True, width=80, color_system=None)
    print_conflicts(console, principle_conflicts(rows[:1]))
    text = console.export_text()
    assert "– n1" in text and "100" not in text  # n=1: no rate at all
    assert "too few shared verdicts" in text and "most contested" not in text

    console = Console(record=True, width=80, color_system=None)
    print_conflicts(console, group_conflicts(grouped))
    text = console.export_text()
    assert "contested groups" in text and "66.7%  2 of 3 shared verdicts  safety × helpful" in text


def test_terminal_lists_pairs_when_the_matrix_does_not_fit(rows):
    long = [
        r.model_copy(
            update={"votes": [v.model_copy(update={"principle_id": v.principle_id * 20}) for v in r.votes]}
        )
        for r in rows
    ]
    console = Console(record=True, width=60, color_system=None)
    print_conflicts(console, principle_conflicts(long))
    text = console.export_text()
    assert "·" not in text  # no matrix
    assert "p1" * 20 in text.replace("\n", "")  # ids are whole, even when a line wraps
    assert "66.7%  2 of 3 shared verdicts" in text


def test_cli_conflicts(rows, tmp_path, monkeypatch):
    from cai.cli import app
    from cai.cli.app import console

    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r.model_dump(mode="json")) + b"\n" for r in rows))
    monkeypatch.setattr(console, "width", 80)
    result = CliRunner().invoke(app, ["audit", str(path), "--conflicts"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "5 of 5 labels selected" in result.output
    assert "66.7%  2 of 3 shared verdicts  p1 × p3" in result.output
    assert "62.5%  5 of 8 shared verdicts  p3" in result.output
    assert "judge quality" not in result.output  # --conflicts shows only the conflicts
    # a filter narrows the labels the table is computed over: without L5, p2 x p3 share 4 verdicts
    result = CliRunner().invoke(app, ["audit", str(path), "--conflicts", "--principle", "p1"])
    assert result.exit_code == 0, result.output
    assert "4 of 5 labels selected" in result.output
    assert "50.0%  2 of 4 shared verdicts  p2 × p3" in result.output


# ------------------------------------------------------------------------- HTML report


def cell_html(page: str, row: str, column: int) -> str:
    """The `column`-th (from 1) data cell of the heatmap row whose header names `row`."""
    heatmap = page[page.index('<table class="heatmap"') :]
    heatmap = heatmap[: heatmap.index("</table>")]
    line = re.search(rf'<tr><th class="unit">\d+ · {re.escape(row)}</th>(.*?)</tr>', heatmap)
    assert line is not None, heatmap
    return re.findall(r"<td.*?</td>", line.group(1))[column - 1]


def test_report_heatmap(rows, tmp_path):
    page = write_report(
        tmp_path / "r.html",
        audit=summarize(rows),
        ppo_history=None,
        eval_rows=None,
        pm_metrics=None,
        summary=None,
        title="t",
    ).read_text()
    section = page[page.index('<section id="conflicts">') :]
    assert section.startswith('<section id="conflicts"><h2>Contested principles</h2><p>How often')
    p1_p3 = cell_html(page, "p1", 3)
    assert f"background:{rate_colour(2 / 3)}" in p1_p3 and "66.7%" in p1_p3 and "n=3" in p1_p3
    assert cell_html(page, "p3", 1) == p1_p3  # symmetric
    assert "background:#ffffff" in cell_html(page, "p1", 2) and "n=4" in cell_html(page, "p1", 2)
    assert cell_html(page, "p2", 2) == '<td class="hm self"></td>'
    assert "<td>p1</td><td>p3</td>" in page  # the most contested pair comes first
    assert rate_colour(0) == "#ffffff" and rate_colour(1) == "#d9822b"


def test_report_heatmap_small_and_empty_cells(rows, tmp_path):
    one = write_report(
        tmp_path / "one.html",
        audit=summarize(rows[:1]),
        ppo_history=None,
        eval_rows=None,
        pm_metrics=None,
        summary=None,
        title="t",
    ).read_text()
    cell = cell_html(one, "p1", 3)
    assert "few" in cell and "n=1" in cell and "%" not in cell and "background" not in cell
    assert "too few shared verdicts" in one
    none = write_report(
        tmp_path / "none.html",
        audit=summarize(rows[3:4]),
        ppo_history=None,
        eval_rows=None,
        pm_metrics=None,
        summary=None,
        title="t",
    ).read_text()  # L4: only p3 gave a verdict
    assert cell_html(none, "p1", 2) == '<td class="hm"></td>'
    assert "no two principles share 3 or more verdicts" in none
    assert "p1, p2, p3 shared no verdict with any other principle" in none
