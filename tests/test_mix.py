"""Human preference loaders, mixing, and the mixed dataset in trl's trainers.

HF_HUB_OFFLINE=1 python -m pytest -q tests/test_mix.py
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from cai.mix import PreferenceSource, load_preferences, mix
from cai.preferences import (
    MAX_PROBLEMS,
    HHParseError,
    hh_pair_to_row,
    load_hh,
    load_trl_preferences,
    parse_hh_transcript,
    read_preferences,
    to_dataset,
    write_preferences,
)
from cai.records import PreferenceRow
from cai.resources import data_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def hh(*turns: str) -> str:
    """Alternating Human/Assistant turns in HH-RLHF's transcript form."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def ai_rows(n: int) -> list[PreferenceRow]:
    """AI harmlessness rows as the judge writes them: soft label, margin, audit join key."""
    return [
        PreferenceRow(
            prompt=[user(f"How do I get into my neighbour's shed #{i}?")],
            chosen=[assistant("Ask your neighbour; if it is urgent, call a locksmith together.")],
            rejected=[assistant("Force the padlock with a crowbar.")],
            source="ai-harmless",
            label_id=f"label-{i}",
            soft_label=0.8,
            margin=1.386,
            weight=0.5 if i % 2 else 1.0,
            contested=bool(i % 2),
        )
        for i in range(n)
    ]


def rows_named(name: str, n: int) -> list[PreferenceRow]:
    return [
        PreferenceRow(
            prompt=[user(f"{name} {i}")], chosen=[assistant("yes")], rejected=[assistant("no")], source=name
        )
        for i in range(n)
    ]


# --------------------------------------------------------------------------- HH transcripts


def test_parse_single_turn_strips_content() -> None:
    assert parse_hh_transcript("\n\nHuman:  Hi there \n\nAssistant: Hello! ") == [
        user("Hi there"),
        assistant("Hello!"),
    ]


def test_parse_multi_turn() -> None:
    assert parse_hh_transcript(hh("a", "b", "c", "d")) == [
        user("a"),
        assistant("b"),
        user("c"),
        assistant("d"),
    ]


def test_role_words_inside_a_turn_are_content() -> None:
    text = (
        "\n\nHuman: Write a script line starting with Human: and one with\nAssistant: please"
        "\n\nAssistant: Human: hi"
    )
    assert parse_hh_transcript(text) == [
        user("Write a script line starting with Human: and one with\nAssistant: please"),
        assistant("Human: hi"),
    ]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "no turns"),
        ("just some text", "no turns"),
        ("Preamble\n\nHuman: a\n\nAssistant: b", "must start with 'Human:'"),
        ("\n\nAssistant: b\n\nHuman: a\n\nAssistant: c", "first turn is Assistant"),
        ("\n\nHuman: a\n\nHuman: again\n\nAssistant: b", "two Human turns in a row"),
        ("\n\nHuman: a\n\nAssistant: b\n\nAssistant: c", "two Assistant turns in a row"),
        ("\n\nHuman: a\n\nAssistant: b\n\nHuman: c", "missing final Assistant turn"),
        ("\n\nHuman: a\n\nAssistant:", "empty Assistant turn (turn 2)"),
        ("\n\nHuman:   \n\nAssistant: b", "empty Human turn (turn 1)"),
        (None, "not a string"),
        (["\n\nHuman: a"], "not a string"),
    ],
)
def test_parse_malformed(text: object, fragment: str) -> None:
    with pytest.raises(HHParseError) as info:
        parse_hh_transcript(text)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_pair_to_row_splits_shared_prompt() -> None:
    row = hh_pair_to_row(hh("q1", "a1", "q2", "good"), hh("q1", "a1", "q2", "bad"), source="human-helpful")
    assert row.prompt == [user("q1"), assistant("a1"), user("q2")]
    assert (row.chosen, row.rejected) == ([assistant("good")], [assistant("bad")])
    assert row.source == "human-helpful" and row.margin is None and row.label_id is None


@pytest.mark.parametrize(
    ("chosen", "rejected", "fragment"),
    [
        (hh("q1", "good"), hh("q2", "bad"), "prompts differ (from turn 1)"),
        (hh("q", "a", "q2", "good"), hh("q", "b", "q2", "bad"), "prompts differ (from turn 2)"),
        (hh("q", "same"), hh("q", "same"), "identical"),
        (hh("q", "good"), hh("q"), "rejected: ends with a Human turn"),
        (42, hh("q", "bad"), "chosen: transcript is not a string"),
    ],
)
def test_pair_malformed(chosen: object, rejected: object, fragment: str) -> None:
    with pytest.raises(HHParseError) as info:
        hh_pair_to_row(chosen, rejected, "human")  # type: ignore[arg-type]
    assert fragment in str(info.value)


# --------------------------------------------------------------------------- load_hh


def test_load_shipped_hh_sample() -> None:
    rows, report = load_hh(data_path("hh_helpful.jsonl"))
    assert (len(rows), report.rows, report.malformed, report.problems) == (48, 48, 0, [])
    assert all(r.source == "human-helpful" and r.prompt[-1]["role"] == "user" for r in rows)
    assert any(len(r.prompt) > 1 for r in rows)  # the sample has multi-turn conversations


def test_load_hh_gz_counts_bad_lines_and_keeps_going(tmp_path: Path) -> None:
    good = {"chosen": hh("q", "good"), "rejected": hh("q", "bad")}
    lines = [
        json.dumps(good),  # 1
        "{not json",  # 2
        json.dumps({"chosen": hh("q", "good")}),  # 3: missing rejected
        "",  # 4: blank, skipped silently
        json.dumps({"chosen": hh("q", "a"), "rejected": hh("q", "x", "y", "z") + "\n\nHuman: more"}),  # 5
        json.dumps({"chosen": 7, "rejected": hh("q", "bad")}),  # 6
        json.dumps([1, 2]),  # 7
        json.dumps({**good, "extra": "HH files sometimes carry more keys"}),  # 8
        json.dumps(
            {"chosen": hh("q", "a") + "\n\nHuman: b\n\nHuman: c\n\nAssistant: d", "rejected": hh("q")}
        ),  # 9
        json.dumps(good),  # 10
    ]
    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))

    rows, report = load_hh(path, source="human")
    assert (len(rows), report.rows, report.malformed) == (3, 3, 6)
    assert [p.split(": ", 1)[0] for p in report.problems] == [f"{path}:{n}" for n in (2, 3, 5, 6, 7, 9)]
    assert "bad JSON" in report.problems[0]
    assert "missing key 'rejected'" in report.problems[1]
    assert "rejected: ends with a Human turn" in report.problems[2]
    assert "chosen: transcript is not a string" in report.problems[3]
    assert "expected a JSON object" in report.problems[4]
    assert "two Human turns in a row" in report.problems[5]
    assert {r.source for r in rows} == {"human"}

    limited, _ = load_hh(path, limit=2)
    assert len(limited) == 2


def test_load_hh_survives_broken_utf8_and_truncated_gzip(tmp_path: Path) -> None:
    good = json.dumps({"chosen": hh("q", "good"), "rejected": hh("q", "bad")}).encode() + b"\n"
    plain = tmp_path / "utf8.jsonl"
    plain.write_bytes(good + b'{"chosen": "\xff"}\n' + good)
    rows, report = load_hh(plain)
    assert (len(rows), report.malformed) == (2, 1) and f"{plain}:2: bad JSON" in report.problems[0]

    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(gzip.compress(good * 50)[:-12])  # lost its end, as interrupted downloads do
    rows, report = load_hh(truncated)
    assert report.malformed == 1 and "unreadable from here on" in report.problems[0]
    assert report.rows == len(rows) < 50


def test_load_hh_caps_problem_list(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("garbage\n" * (MAX_PROBLEMS + 5))
    rows, report = load_hh(path)
    assert rows == [] and report.malformed == MAX_PROBLEMS + 5 and len(report.problems) == MAX_PROBLEMS


def test_load_hh_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_hh(tmp_path / "nope.jsonl")


# --------------------------------------------------------------------------- TRL formats


def test_trl_explicit_strings_from_disk(tmp_path: Path) -> None:
    from datasets import Dataset

    Dataset.from_dict(
        {"prompt": ["Sky colour?", "2+2?"], "chosen": ["Blue.", "4"], "rejected": ["Green.", "4"]}
    ).save_to_disk(tmp_path / "ds")
    rows, report = load_trl_preferences(tmp_path / "ds", source="human")
    assert rows == [
        PreferenceRow(
            prompt=[user("Sky colour?")],
            chosen=[assistant("Blue.")],
            rejected=[assistant("Green.")],
            source="human",
        )
    ]
    assert report.malformed == 1 and "row 1: chosen and rejected are identical" in report.problems[0]


def test_trl_explicit_conversational_split(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    def split(word: str) -> Dataset:
        return Dataset.from_list(
            [
                {
                    "prompt": [{"role": "system", "content": "Be brief."}, user(word)],
                    "chosen": [assistant("ok")],
                    "rejected": [assistant("no")],
                }
            ]
        )

    DatasetDict({"train": split("train"), "test": split("test")}).save_to_disk(tmp_path / "dd")
    rows, _ = load_trl_preferences(tmp_path / "dd", source="human", split="test")
    assert rows[0].prompt == [{"role": "system", "content": "Be brief."}, user("test")]
    with pytest.raises(KeyError, match="no split 'dev'"):
        load_trl_preferences(tmp_path / "dd", source="human", split="dev")


def test_trl_implicit_prompt_is_longest_common_prefix(tmp_path: Path) -> None:
    from datasets import Dataset

    Dataset.from_list(
        [
            {
                "chosen": [user("q"), assistant("a"), user("q2"), assistant("good")],
                "rejected": [user("q"), assistant("a"), user("q2"), assistant("bad")],
            },
            {"chosen": [user("q"), assistant("x")], "rejected": [user("other"), assistant("y")]},
        ]
    ).save_to_disk(tmp_path / "implicit")
    rows, report = load_trl_preferences(tmp_path / "implicit", source="human")
    assert rows[0].prompt == [user("q"), assistant("a"), user("q2")]
    assert (rows[0].chosen, rows[0].rejected) == ([assistant("good")], [assistant("bad")])
    assert report.malformed == 1 and "no shared prompt" in report.problems[0]


def test_trl_parquet_hh_strings_and_dispatch(tmp_path: Path) -> None:
    """HH-RLHF as published through datasets: implicit prompt, transcripts as strings."""
    from datasets import Dataset

    path = tmp_path / "hh.parquet"
    Dataset.from_dict(
        {
            "chosen": [hh("q", "good"), hh("a", "b", "c", "d")],
            "rejected": [hh("q", "bad"), hh("a", "b", "c", "e")],
        }
    ).to_parquet(path)
    rows, report = load_preferences(PreferenceSource(path=str(path), format="trl", source="human-helpful"))
    assert (report.rows, report.malformed) == (2, 0)
    assert rows[1].prompt == [user("a"), assistant("b"), user("c")] and rows[1].rejected == [assistant("e")]


# --------------------------------------------------------------------------- config entries


def test_preference_source_resolves_shipped_names_and_forbids_extras() -> None:
    rows, report = load_preferences(PreferenceSource(path="hh_helpful.jsonl", limit=5))
    assert len(rows) == 5 and report.path == str(data_path("hh_helpful.jsonl"))
    with pytest.raises(ValueError, match="extra"):
        PreferenceSource(path="hh_helpful.jsonl", fromat="hh")
    with pytest.raises(FileNotFoundError, match="neither an existing path"):
        PreferenceSource(path="no_such_file.jsonl").resolved_path()


def test_jsonl_keeps_row_source_unless_config_sets_one(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    write_preferences(ai_rows(2), path)
    with path.open("a") as handle:  # a plain TRL-shaped line without provenance
        handle.write(json.dumps({"prompt": "hi", "chosen": "hello", "rejected": "go away"}) + "\n")
    rows, report = load_preferences(PreferenceSource(path=str(path), format="jsonl"))
    assert [r.source for r in rows] == ["ai-harmless", "ai-harmless", "human-helpful"]
    assert rows[:2] == ai_rows(2) and report.malformed == 0  # soft labels, margins, ids survive
    rows, _ = load_preferences(PreferenceSource(path=str(path), format="jsonl", source="relabelled"))
    assert {r.source for r in rows} == {"relabelled"}


# --------------------------------------------------------------------------- mixing


def test_mix_exact_counts_preserve_sources() -> None:
    groups = {"ai": rows_named("ai", 10), "human": rows_named("human", 6)}
    mixed = mix(groups, counts={"ai": 7, "human": 6})
    assert len(mixed) == 13
    assert sum(r.source == "ai" for r in mixed) == 7 and sum(r.source == "human" for r in mixed) == 6
    assert len({r.prompt[0]["content"] for r in mixed}) == 13  # without replacement


def test_mix_ratios_largest_remainder_by_hand() -> None:
    # 7 * (0.5, 0.3, 0.2) = (3.5, 2.1, 1.4) -> floors (3, 2, 1) = 6; the one left over goes to
    # the largest remainder, 0.5 (group a): (4, 2, 1).
    groups = {name: rows_named(name, 10) for name in "abc"}
    mixed = mix(groups, ratios={"a": 0.5, "b": 0.3, "c": 0.2}, total=7)
    assert [sum(r.source == n for r in mixed) for n in "abc"] == [4, 2, 1]
    # 10 * (1/3, 1/3, 1/3) = 3.33 each -> (3, 3, 3) + 1 left, a tie broken by listing order.
    mixed = mix(groups, ratios={"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, total=10)
    assert [sum(r.source == n for r in mixed) for n in "abc"] == [4, 3, 3]


def test_mix_ratios_default_total_is_largest_without_replacement() -> None:
    # 'small' has 3 rows at 0.25. Worked by hand (quotas -> largest-remainder counts):
    # 14 -> (10.5, 3.5) -> floors (10, 3), the tie on .5 goes to 'big', listed first: (11, 3) fits;
    # 15 -> (11.25, 3.75) -> (11, 4): 'small' is short; 16 -> (12, 4) and beyond: short too.
    groups = {"big": rows_named("big", 100), "small": rows_named("small", 3)}
    mixed = mix(groups, ratios={"big": 0.75, "small": 0.25})
    assert [sum(r.source == n for r in mixed) for n in ("big", "small")] == [11, 3]
    # 0.5 / 0.5 of groups of 3 and 4: 6 -> (3, 3); 7 -> (3.5, 3.5) -> (4, 3) asks 'a' for 4.
    groups = {"a": rows_named("a", 3), "b": rows_named("b", 4)}
    assert len(mix(groups, ratios={"a": 0.5, "b": 0.5})) == 6


def test_mix_is_seeded() -> None:
    groups = {"ai": rows_named("ai", 20), "human": rows_named("human", 20)}
    first = mix(groups, counts={"ai": 10, "human": 10}, seed=3)
    again = mix(groups, counts={"ai": 10, "human": 10}, seed=3)
    other = mix(groups, counts={"ai": 10, "human": 10}, seed=4)
    assert first == again and first != other
    # Each group samples with its own generator: more AI rows leave the human sample alone.
    more_ai = mix(groups, counts={"ai": 15, "human": 10}, seed=3)
    assert {r.prompt[0]["content"] for r in more_ai if r.source == "human"} == {
        r.prompt[0]["content"] for r in first if r.source == "human"
    }


def test_mix_everything_by_default() -> None:
    groups = {"ai": rows_named("ai", 3), "human": rows_named("human", 2)}
    assert sorted(r.prompt[0]["content"] for r in mix(groups)) == sorted(
        r.prompt[0]["content"] for rows in groups.values() for r in rows
    )


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"counts": {"ai": 2, "human": 9}}, "group 'human' has 5 rows, 9 requested"),
        ({"ratios": {"ai": 0.5, "human": 0.5}, "total": 12}, "group 'human' has 5 rows, 6 requested"),
        ({"ratios": {"ai": 0.5, "human": 0.4}}, "must sum to 1"),
        ({"counts": {"ai": 2}}, "missing ['human']"),
        ({"counts": {"ai": 1, "human": 1, "typo": 1}}, "unknown ['typo']"),
        ({"counts": {"ai": 1, "human": 1}, "ratios": {"ai": 0.5, "human": 0.5}}, "not both"),
    ],
)
def test_mix_errors(kwargs: dict, fragment: str) -> None:
    groups = {"ai": rows_named("ai", 10), "human": rows_named("human", 5)}
    with pytest.raises(ValueError) as info:
        mix(groups, **kwargs)
    assert fragment in str(info.value)


# --------------------------------------------------------------------------- files


def test_write_read_round_trip(tmp_path: Path) -> None:
    rows = ai_rows(3) + load_hh(data_path("hh_helpful.jsonl"), limit=2)[0]
    path = tmp_path / "out" / "prefs.jsonl"
    write_preferences(rows, path)
    write_preferences(rows, path)  # overwrite in place
    assert read_preferences(path) == rows
    assert sorted(p.name for p in path.parent.iterdir()) == ["prefs.jsonl"]  # no temp file left


def test_read_preferences_names_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "prefs.jsonl"
    write_preferences(ai_rows(1), path)
    with path.open("a") as handle:
        handle.write('{"prompt": []}\n')
    with pytest.raises(ValueError, match=r"prefs.jsonl:2: not a preference row"):
        read_preferences(path)


# --------------------------------------------------------------------------- trl trainers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from cai.testing import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def mixed_dataset():
    human, _ = load_hh(data_path("hh_helpful.jsonl"))
    rows = mix({"ai": ai_rows(6), "human": human}, counts={"ai": 6, "human": 10}, seed=0)
    return to_dataset(rows)


def test_to_dataset_columns(mixed_dataset) -> None:
    assert mixed_dataset.column_names == [
        "prompt",
        "chosen",
        "rejected",
        "source",
        "label_id",
        "soft_label",
        "margin",
        "weight",
        "contested",
        "verdict",
        "raters",
        "group",
    ]
    human = mixed_dataset.filter(lambda r: r["source"] == "human-helpful")
    assert set(human["margin"]) == {0.0} and set(human["soft_label"]) == {None}
    assert human["raters"] == [None] * len(human)  # one rating per pair: not aggregated
    assert set(human["verdict"]) == {None}  # only AI rows say whether a judge gave a verdict
    assert to_dataset(rows_named("h", 2)).features["soft_label"].dtype == "float64"  # not arrow's null type


def quiet_cpu_args(output: Path, steps: int, batch: int) -> dict:
    """trl trainer arguments for a few quiet CPU steps that save nothing."""
    return {
        "output_dir": str(output),
        "max_steps": steps,
        "per_device_train_batch_size": batch,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "logging_steps": 1,
        "max_length": 512,
        "disable_tqdm": True,
    }


def test_mixed_dataset_trains_reward_model(tmp_path: Path, tiny, mixed_dataset) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    model = AutoModelForSequenceClassification.from_pretrained(tiny.classifier)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = RewardConfig(**quiet_cpu_args(tmp_path / "pm", steps=2, batch=4))
    trainer = RewardTrainer(model=model, args=args, train_dataset=mixed_dataset)
    assert trainer.train().global_step == 2
    assert any(not torch.equal(before[name], p) for name, p in model.named_parameters())


def test_mixed_dataset_trains_dpo(tmp_path: Path, tiny, mixed_dataset) -> None:
    import math

    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**quiet_cpu_args(tmp_path / "dpo", steps=1, batch=2))
    trainer = DPOTrainer(model=str(tiny.causal_lm), args=args, train_dataset=mixed_dataset)
    assert len(trainer.train_dataset) == len(mixed_dataset)
    assert math.isfinite(trainer.train().training_loss)
