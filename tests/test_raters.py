"""Several human ratings of one pair, voted into one row (`mix.human[].rater_column`).

    PYTHONPATH=. python -m pytest tests/test_raters.py

The hand-worked file: pair X rated by r3 (B over A, the line written B-first), r1 and r2 (A over
B); pair Y by r1 (C) and r2 (D), a tie; pair Z by r2 alone. Equal weights: X -> A by 2 to 1, Y
dropped, Z unanimous. With r3 weighing 3: X -> B by 3.0 to 2.0.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from pydantic import ValidationError
from rich.console import Console

from cai.judge import margin_from_soft_label
from cai.mix import PreferenceSource, load_preferences, load_source
from cai.preferences import PreferenceDataError, load_jsonl, to_dataset
from cai.raters import pair_key
from cai.records import PreferenceRow, RaterSplit
from tests.echo_recipe import echo_context, write_config

OLD_FIELDS = ["prompt", "chosen", "rejected", "source", "label_id", "soft_label", "margin", "weight"]
OLD_FIELDS += ["contested", "verdict"]


def rating(prompt: str, chosen: str, rejected: str, rater: str | None) -> dict:
    line = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return line if rater is None else {**line, "rater": rater}


RATINGS = [
    rating("px", "B", "A", "r3"),  # line 1: X, a vote for B (written the other way round)
    rating("py", "C", "D", "r1"),  # line 2: Y
    rating("px", "A", "B", "r1"),  # line 3: X
    rating("pz", "E", "F", "r2"),  # line 4: Z, alone
    rating("py", "D", "C", "r2"),  # line 5: Y, the other side: a tie
    rating("px", "A", "B", "r2"),  # line 6: X
]


def write_jsonl(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture
def rated(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "rated.jsonl", RATINGS)


def source(path: Path, **kwargs) -> PreferenceSource:
    return PreferenceSource(path=str(path), format="jsonl", rater_column="rater", **kwargs)


def text(chat: list) -> str:
    return chat[-1]["content"]


def chat(content: str, role: str = "assistant") -> list:
    return [{"role": role, "content": content}]


def test_pair_key_ignores_which_side_was_chosen() -> None:
    ab = PreferenceRow(prompt=chat("p", "user"), chosen=chat("A"), rejected=chat("B"), source="h")
    ba = ab.model_copy(update={"chosen": ab.rejected, "rejected": ab.chosen})
    other_prompt = ab.model_copy(update={"prompt": chat("q", "user")})
    other_answer = ab.model_copy(update={"rejected": chat("C")})
    assert pair_key(ab) == pair_key(ba)
    assert len({pair_key(ab), pair_key(other_prompt), pair_key(other_answer)}) == 3


def test_weighted_majority_by_hand(rated: Path) -> None:
    rows, report, summary = load_source(source(rated))
    assert report.rows == 6 and report.malformed == 0
    assert [(text(r.prompt), text(r.chosen), text(r.rejected)) for r in rows] == [
        ("px", "A", "B"),  # 2 votes to 1, though the pair's first line chose B
        ("pz", "E", "F"),
    ]
    assert rows[0].raters == RaterSplit(n=3, for_chosen=2, against=1, weight_for=2.0, weight_against=1.0)
    assert rows[1].raters == RaterSplit(n=1, for_chosen=1, against=0, weight_for=1.0, weight_against=0.0)
    assert all(r.soft_label is None and r.margin is None for r in rows)  # a hard label
    assert summary is not None
    assert summary.model_dump() == {
        "rule": "weighted_majority",
        "ratings": 6,
        "pairs": 3,
        "unanimous": 1,
        "split": 1,
        "ties_dropped": 1,
        "rows": 2,
    }


def test_soft_labels_are_weight_shares(rated: Path) -> None:
    rows, _, summary = load_source(source(rated, raters_rule="soft"))
    x, z = rows
    assert text(x.chosen) == "A" and x.soft_label == 2 / 3
    assert x.margin == margin_from_soft_label(2 / 3) == pytest.approx(math.log(2))
    assert z.soft_label == 1.0 and z.margin == pytest.approx(math.log(999))  # capped at 0.999
    assert summary is not None and summary.ties_dropped == 1 and summary.rule == "soft"


def test_weights_change_the_winner(rated: Path) -> None:
    rows, _, summary = load_source(source(rated, rater_weights={"r3": 3.0}, raters_rule="soft"))
    x = rows[0]
    assert (text(x.chosen), text(x.rejected)) == ("B", "A")
    assert x.raters == RaterSplit(n=3, for_chosen=1, against=2, weight_for=3.0, weight_against=2.0)
    assert x.soft_label == 3 / 5
    assert summary is not None and (summary.split, summary.ties_dropped) == (1, 1)  # Y: r1 and r2 weigh 1


def test_weights_can_break_a_tie(rated: Path) -> None:
    rows, _, summary = load_source(source(rated, rater_weights={"r2": 1.5}))
    assert [text(r.chosen) for r in rows] == ["A", "D", "E"]  # Y goes to r2's D
    assert summary is not None and summary.ties_dropped == 0 and summary.split == 2


def test_limit_counts_pairs_after_voting(rated: Path) -> None:
    rows, report, summary = load_source(source(rated, limit=1))
    assert report.rows == 6  # every rating was read, so pair X got all three votes
    assert len(rows) == 1 and rows[0].raters is not None and rows[0].raters.n == 3
    assert summary is not None and summary.rows == 1


def test_without_rater_column_every_line_is_a_row(rated: Path) -> None:
    spec = PreferenceSource(path=str(rated), format="jsonl")
    rows, report, summary = load_source(spec)
    assert summary is None and len(rows) == 6 == report.rows
    assert rows == load_jsonl(rated, keep_row_source=True)[0] == load_preferences(spec)[0]
    line = json.loads(rows[0].model_dump_json())
    assert list(line) == OLD_FIELDS  # no `raters` key: JSON lines as before raters existed
    assert report.model_dump() == {  # the rater lists are never dumped into a summary
        "path": str(rated),
        "rows": 6,
        "malformed": 0,
        "problems": [],
        "stopped": None,
    }


def test_a_rating_without_a_rater_names_file_line_and_field(tmp_path: Path) -> None:
    lines = [*RATINGS[:3], rating("pz", "E", "F", None), *RATINGS[4:]]
    path = write_jsonl(tmp_path / "h.jsonl", lines)
    with pytest.raises(PreferenceDataError, match=r"h\.jsonl:4: no rater in field 'rater' \(it is missing\)"):
        load_source(source(path))
    lines[3] = {**lines[3], "rater": ""}
    write_jsonl(path, lines)
    with pytest.raises(PreferenceDataError, match=r"h\.jsonl:4: no rater in field 'rater' \(got ''\)"):
        load_source(source(path))


def test_a_rater_voting_twice_on_a_pair_is_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "h.jsonl", [*RATINGS, rating("px", "B", "A", "r1")])
    twice = r"h\.jsonl:7: rater 'r1' already rated this pair at .*h\.jsonl:3"
    with pytest.raises(PreferenceDataError, match=twice):
        load_source(source(path))


def test_integer_rater_ids_are_names(tmp_path: Path) -> None:
    lines = [{**r, "rater": int(r["rater"][1:])} for r in RATINGS]
    rows, _, _ = load_source(source(write_jsonl(tmp_path / "h.jsonl", lines), rater_weights={"3": 3.0}))
    assert text(rows[0].chosen) == "B"


def test_rater_config_errors(rated: Path) -> None:
    unknown = r"config error: mix.human entry .* rater_weights names raters the file does not have: \['r9'\]"
    with pytest.raises(PreferenceDataError, match=unknown):
        load_source(source(rated, rater_weights={"r9": 2.0}))
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ValidationError, match="rater weights must be positive"):
            source(rated, rater_weights={"r1": bad})
    with pytest.raises(ValidationError, match="need rater_column"):
        PreferenceSource(path=str(rated), raters_rule="soft")
    with pytest.raises(ValidationError, match="raters_rule"):
        source(rated, raters_rule="proportional")


def test_all_ties_is_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "h.jsonl", [RATINGS[1], RATINGS[4]])
    with pytest.raises(PreferenceDataError, match=r"every rated pair is a tie \(2 ratings -> 1 pairs"):
        load_source(source(path))


def test_rows_with_raters_round_trip_and_fill_the_arrow_column(rated: Path) -> None:
    rows, _, _ = load_source(source(rated))
    assert [PreferenceRow.model_validate_json(r.model_dump_json()) for r in rows] == rows
    dataset = to_dataset(rows + [PreferenceRow(**rows[0].model_dump(exclude={"raters"}))])
    assert dataset["raters"][0] == rows[0].raters.model_dump() and dataset["raters"][2] is None


# --------------------------------------------------------------------------- the mix stage


def run_mix(tmp_path: Path, human: list[dict], said: io.StringIO | None = None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = write_config(tmp_path / "c.yaml", tmp_path / "run", ["sl", "label", "mix"])
    data = yaml.safe_load(config.read_text())
    data["mix"]["human"] = human
    config.write_text(yaml.safe_dump(data))
    ctx = echo_context(config)
    ctx.stage("label").run(ctx)
    if said is not None:
        ctx.console = Console(file=said, width=200)
    return ctx.stage("mix").run(ctx)


def test_stage_without_rater_column_keeps_its_key_and_jsonl(tmp_path: Path) -> None:
    """The key and bytes of the echo recipe's mix as commit 1abfc6e (before raters) wrote them."""
    store = run_mix(tmp_path, [{"path": "hh_helpful.jsonl", "format": "hh", "limit": 6}])
    assert list(store.config["mix"]["human"][0]) == ["path", "format", "source", "split", "limit"]
    assert store.config_hash.startswith("23e4b900eb85")
    digest = hashlib.sha256((store.path / "preferences.jsonl").read_bytes()).hexdigest()
    assert digest.startswith("a4c6dbf937762401")
    assert "raters" not in store.manifest.summary["sources"][0]
    column = pq.read_table(store.path / "preferences.parquet").column("raters")
    assert column.null_count == len(column) == 10  # the fixed schema has the column, all null


def test_stage_with_raters_reports_the_split(tmp_path: Path, rated: Path) -> None:
    said = io.StringIO()
    store = run_mix(tmp_path, [{"path": str(rated), "format": "jsonl", "rater_column": "rater"}], said)
    line = "6 ratings -> 3 pairs (1 unanimous, 1 split, 1 ties dropped), 2 rows by weighted_majority"
    assert f"rated.jsonl: {line}" in said.getvalue().replace("\n", "")
    plain = run_mix(tmp_path / "plain", [{"path": str(rated), "format": "jsonl"}])
    assert store.config_hash != plain.config_hash
    summary = store.manifest.summary
    assert summary["by_source"]["human-helpful"] == 2
    assert summary["sources"][0]["raters"]["ties_dropped"] == 1 and summary["sources"][0]["rows"] == 6
    table = pq.read_table(store.path / "preferences.parquet").to_pylist()
    splits = [r["raters"] for r in table if r["source"] == "human-helpful"]
    assert sorted(s["n"] for s in splits) == [1, 3]
    card = (store.path / "README.md").read_text()
    assert "6 ratings -> 3 pairs by weighted_majority: 1 unanimous, 1 split, 1 ties dropped" in card


def test_the_readme_example_is_a_valid_source() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = next(b for b in readme.split("```yaml\n")[1:] if "rater_column" in b.split("```")[0])
    (entry,) = yaml.safe_load(block.split("```")[0])["mix"]["human"]
    spec = PreferenceSource.model_validate(entry)
    assert (spec.rater_column, spec.raters_rule, spec.rater_weights) == ("annotator", "soft", {"a7": 2.0})


def test_cli_errors_name_the_file_line_and_field(tmp_path: Path, rated: Path) -> None:
    from typer.testing import CliRunner

    from cai.cli import app

    run_mix(tmp_path, [{"path": str(rated), "format": "jsonl"}])  # a finished label stage
    missing = write_jsonl(tmp_path / "h.jsonl", [*RATINGS[:2], rating("px", "A", "B", None)])

    def mix(path: Path, *sets: str) -> str:
        args = ["mix", "-c", str(tmp_path / "c.yaml")]
        args += [a for s in (f"mix.human.0.path={path}", *sets) for a in ("--set", s)]
        result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
        assert result.exit_code == 1, result.output
        return " ".join(result.output.split())

    assert "h.jsonl:3: no rater in field 'rater'" in mix(missing, "mix.human.0.rater_column=rater")
    unknown = mix(rated, "mix.human.0.rater_column=rater", "mix.human.0.rater_weights={r4: 2}")
    assert "config error" in unknown and "['r4']" in unknown and "r1, r2, r3" in unknown
    assert "need rater_column" in mix(rated, "mix.human.0.raters_rule=soft")
