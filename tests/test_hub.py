"""Hub-ready means loadable: `datasets.load_dataset(stage_folder)` works on what the stages write.

The sl, label and mix stages run on the deterministic echo engine (seconds); each folder is then
loaded the way the Hub and its users load a dataset folder: the card's default config is the
training view, every other config loads by name with the row model's types, nothing else in the
folder is read, and the preference view goes straight into trl's data utilities.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import orjson
import pytest
from pydantic import BaseModel

from cai.export import HubConfig, arrow_schema, dataset_card
from cai.records import LabelAudit, PreferenceRow, SFTRow, SLRecord
from cai.stages.registry import STAGES
from cai.store import BOOKKEEPING
from tests.echo_recipe import echo_context, prefers_later, write_config

CONFIGS = {  # stage -> config -> the one file it loads; the first is the default
    "sl": {"sft": "sft.parquet", "rows": "data.parquet"},
    "label": {"preferences": "preferences.parquet", "audit": "audit.parquet"},
    "mix": {"preferences": "preferences.parquet"},
}
PREFERENCE_COLUMNS = list(PreferenceRow.model_fields)


def same_letter(prompt, options):
    """A judge that always answers (A): position-inconsistent, so no pair gets a verdict."""
    return [0.8, 0.2]


def run_stages(root: Path, judge, stages: tuple[str, ...]) -> dict[str, Path]:
    # no sft: the label stage samples the base (echo) model
    path = write_config(root / f"{judge.__name__}.yaml", root / "run", ["sl", "label", "mix"])
    ctx = echo_context(path, judge)
    try:
        return {stage: STAGES[stage].run(ctx).path for stage in stages}
    finally:
        ctx.close()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    return run_stages(tmp_path_factory.mktemp("hub"), prefers_later, ("sl", "label", "mix"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("datasets-cache"))


def load(folder: Path, cache: str, name: str | None = None):
    """What the Hub and users run on a dataset folder; one `train` split per config.

    One cache per folder: `datasets` keys a local folder's cache by its name and card, not by its
    files, and two runs here write folders of the same name (the same config hash).
    """
    from datasets import load_dataset

    cache_dir = Path(cache) / hashlib.sha1(str(folder).encode()).hexdigest()[:16]
    loaded = load_dataset(str(folder), name, cache_dir=str(cache_dir))
    assert list(loaded) == ["train"]
    return loaded["train"]


def jsonl(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


# --------------------------------------------------------------------------- every stage


@pytest.mark.parametrize("stage", list(CONFIGS))
def test_the_card_names_one_parquet_file_per_config_and_the_default_first(folders, cache, stage):
    from datasets import get_dataset_config_names, get_dataset_default_config_name, load_dataset_builder

    folder = folders[stage]
    assert get_dataset_config_names(str(folder)) == list(CONFIGS[stage])
    assert get_dataset_default_config_name(str(folder)) == next(iter(CONFIGS[stage]))
    for name, file in CONFIGS[stage].items():
        builder = load_dataset_builder(str(folder), name, cache_dir=cache)
        assert builder.name == "parquet"
        assert {split: [Path(f) for f in files] for split, files in builder.config.data_files.items()} == {
            "train": [folder / file]
        }


@pytest.mark.parametrize("stage", list(CONFIGS))
def test_files_in_no_config_are_never_read(folders, cache, tmp_path, stage):
    """Bookkeeping, gate.json and the JSON-lines twins turned to garbage: every config still loads."""
    copy = shutil.copytree(folders[stage], tmp_path / stage)
    listed = set(CONFIGS[stage].values()) | {"README.md"}
    unlisted = sorted(p.name for p in copy.iterdir() if p.name not in listed)
    assert set(BOOKKEEPING) <= set(unlisted)
    for name in unlisted:
        (copy / name).write_bytes(b"\x00 not data {")
    for name in CONFIGS[stage]:
        assert load(copy, cache, name).num_rows == load(folders[stage], cache, name).num_rows


# --------------------------------------------------------------------------- what each config holds


def test_sl_loads_the_sft_view_by_default_and_every_round_by_name(folders, cache):
    records = [SLRecord.model_validate(row) for row in jsonl(folders["sl"] / "rows.jsonl")]
    assert len(records) == 4 and not any(r.error for r in records)
    sft = load(folders["sl"], cache)
    assert sft.column_names == ["messages", "row_id"]
    assert [SFTRow.model_validate(row) for row in sft] == [
        SFTRow(messages=r.messages(), row_id=r.row_id) for r in records
    ]
    rows = load(folders["sl"], cache, "rows")
    assert [SLRecord.model_validate(row) for row in rows] == records  # every nested field, typed


def test_label_loads_preferences_by_default_and_the_audit_rows_by_name(folders, cache):
    folder = folders["label"]
    preferences = [PreferenceRow.model_validate(row) for row in jsonl(folder / "preferences.jsonl")]
    assert preferences, "the position-consistent echo judge gives verdicts, hence rows"
    default = load(folder, cache)
    assert default.column_names == PREFERENCE_COLUMNS
    assert [PreferenceRow.model_validate(row) for row in default] == preferences
    # audit rows: lists of structs (votes -> orders) with optional ints, floats and strings
    audits = [LabelAudit.model_validate(row) for row in jsonl(folder / "audit.jsonl")]
    loaded = load(folder, cache, "audit")
    assert [LabelAudit.model_validate(row) for row in loaded] == audits
    assert {row["label_id"] for row in default} <= {row["label_id"] for row in loaded}


def test_mix_has_a_card_naming_what_it_read_and_loads_both_sources(folders, cache):
    folder = folders["mix"]
    summary = orjson.loads((folder / "manifest.json").read_bytes())["summary"]
    rows = load(folder, cache)
    assert rows.column_names == PREFERENCE_COLUMNS and rows.num_rows == summary["rows"]
    by_source = {name: rows["source"].count(name) for name in set(rows["source"])}
    assert by_source == summary["by_source"] == {"ai-harmless": 4, "human-helpful": 6}
    card = (folder / "README.md").read_text()
    label_hash = orjson.loads((folder / "manifest.json").read_bytes())["upstream"]["label"]
    assert label_hash == orjson.loads((folders["label"] / "manifest.json").read_bytes())["config_hash"]
    assert f"label/{label_hash[:12]}" in card and label_hash in card
    assert "human-helpful: hh_helpful.jsonl (hh, 6 read, 0 malformed)" in card
    assert "`preferences` (default): `preferences.parquet`, 10 rows" in card


def test_features_come_from_the_row_models_not_from_the_values(folders, cache, tmp_path):
    """A judge without verdicts: audit fields that were all null in the other run keep their type."""
    import pyarrow.parquet as pq
    from datasets import get_dataset_config_names

    other = run_stages(tmp_path, same_letter, ("label",))["label"]
    assert other.name == folders["label"].name  # same config, another run directory
    # no preference rows: datasets cannot load an empty split, so the card lists the audit only
    assert get_dataset_config_names(str(other)) == ["audit"]
    assert "`preferences` (default): `preferences.parquet`, 0 rows" in (other / "README.md").read_text()
    schema = pq.read_schema(other / "preferences.parquet")
    assert schema.names == PREFERENCE_COLUMNS
    assert schema == pq.read_schema(folders["label"] / "preferences.parquet")
    assert load(other, cache).column_names == list(LabelAudit.model_fields)  # the only config
    audits = load(other, cache, "audit")
    reasons = {vote["no_verdict"] for row in audits for vote in row["votes"]}
    assert reasons == {"position-inconsistent"}
    verdicts = load(folders["label"], cache, "audit")
    assert {vote["no_verdict"] for row in verdicts for vote in row["votes"]} == {None}
    assert audits.features == verdicts.features  # `no_verdict` is a string column in both runs


# --------------------------------------------------------------------------- into trl


def test_the_preference_view_goes_through_trl_data_utilities_into_the_reward_collator(folders, cache):
    from trl.data_utils import is_conversational, maybe_apply_chat_template, maybe_extract_prompt
    from trl.trainer.reward_trainer import DataCollatorForPreference

    from cai.testing import build_tokenizer

    tokenizer = build_tokenizer()
    raw = load(folders["mix"], cache)
    assert all(is_conversational(row) for row in raw)
    assert raw.map(maybe_extract_prompt)["prompt"] == raw["prompt"]  # explicit prompts stay as they are
    texts = raw.map(maybe_apply_chat_template, fn_kwargs={"processing_class": tokenizer})
    for row, text in zip(raw, texts, strict=True):
        assert text["prompt"].endswith("<|im_start|>assistant\n")
        for side in ("chosen", "rejected"):
            whole = tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=False)
            assert text["prompt"] + text[side] == whole
            assert text[side].startswith(row[side][0]["content"])
    # what RewardTrainer batches: token ids of prompt + answer, and a margin the card says to fill
    examples = [
        {
            "chosen_ids": tokenizer(text["prompt"] + text["chosen"])["input_ids"],
            "rejected_ids": tokenizer(text["prompt"] + text["rejected"])["input_ids"],
            "margin": text["margin"] or 0.0,
        }
        for text in texts
    ]
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(examples)
    assert batch["input_ids"].shape[0] == 2 * raw.num_rows
    assert batch["margin"].tolist() == pytest.approx([m or 0.0 for m in raw["margin"]])
    assert sum(m is None for m in raw["margin"]) == 6  # the human rows: why the card says to fill


def test_the_sft_view_renders_with_the_chat_template(folders, cache):
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    from cai.testing import build_tokenizer

    tokenizer = build_tokenizer()
    sft = load(folders["sl"], cache)
    assert all(is_conversational(row) for row in sft)
    texts = sft.map(maybe_apply_chat_template, fn_kwargs={"processing_class": tokenizer})["text"]
    for row, text in zip(sft, texts, strict=True):
        assert text.endswith(row["messages"][-1]["content"] + "<|im_end|>\n")


# --------------------------------------------------------------------------- the building blocks


class _Mixed(BaseModel):
    name: str
    value: int | str


class _Hashes(BaseModel):
    hashes: dict[str, str]


def test_a_field_without_one_column_type_is_refused_by_name():
    with pytest.raises(TypeError, match=r"_Mixed\.value: .* mixes types"):
        arrow_schema(_Mixed)


def test_open_keyed_dicts_name_the_keys_the_rows_carry():
    import pyarrow as pa

    schema = arrow_schema(_Hashes, [{"hashes": {"b.j2": "2"}}, {"hashes": {"a.j2": "1"}}])
    assert schema.field("hashes").type == pa.struct([("a.j2", pa.string()), ("b.j2", pa.string())])
    assert arrow_schema(_Hashes).field("hashes").type == pa.null()  # no rows, no keys to name
    with pytest.raises(ValueError, match=r"_Hashes\.hashes: every row's dict is empty"):
        arrow_schema(_Hashes, [{"hashes": {}}])


@pytest.mark.parametrize(
    ("configs", "problem"),
    [
        ([HubConfig("a", "a.parquet", 1, "", {}), HubConfig("b", "b.parquet", 1, "", {})], "one default"),
        ([HubConfig("a", "a.jsonl", 1, "", {}, default=True)], "not a Parquet data file"),
        ([HubConfig("a", "rows.jsonl", 1, "", {}, default=True)], "not a Parquet data file"),
    ],
)
def test_a_card_the_loader_would_misread_is_refused(configs, problem):
    with pytest.raises(ValueError, match=problem):
        dataset_card("t", "s", {}, configs, {})
