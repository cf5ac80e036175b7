"""Tests for cai.store: atomic writes, the ledger, locking, and resuming after `kill -9`.

The crash tests drive tests/crashy_stage.py as a subprocess, kill it at random moments, and
compare the resumed result byte for byte with an uninterrupted run.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import orjson
import pytest
from pydantic import BaseModel, ConfigDict

from cai.atomic import atomic_write_bytes, atomic_write_json, atomic_write_jsonl
from cai.backends.base import Usage
from cai.ledger import LedgerCorruptError, StoreError
from cai.manifest import StageManifest, versions
from cai.store import StageLockedError, StageStore

CRASHY = Path(__file__).with_name("crashy_stage.py")
CONFIG = {"model": "tiny", "sampling": {"temperature": 0.7, "seed": 1}}


class Row(BaseModel):
    model_config = ConfigDict(extra="forbid")

    row_id: str
    text: str


class HashedRow(Row):
    config_hash: str


def rows_of(*ids: str) -> list[dict[str, str]]:
    return [{"row_id": i, "text": f"text of {i}"} for i in ids]


def ledger_lines(store: StageStore) -> list[bytes]:
    return (store.path / "ledger.jsonl").read_bytes().splitlines(keepends=True)


def no_temp_files(folder: Path) -> bool:
    return not list(folder.glob(".*.tmp"))


# --------------------------------------------------------------------------- atomic writes


def test_failed_replace_leaves_old_file_and_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    atomic_write_json(target, {"version": "old"})
    before = target.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk vanished")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk vanished"):
        atomic_write_json(target, {"version": "new"})
    assert target.read_bytes() == before
    assert no_temp_files(tmp_path)


def test_row_that_fails_to_serialise_leaves_old_jsonl(tmp_path):
    target = tmp_path / "rows.jsonl"
    atomic_write_jsonl(target, rows_of("a", "b"))
    before = target.read_bytes()

    def rows_then_crash():
        yield {"row_id": "c"}
        raise RuntimeError("generator died")

    with pytest.raises(RuntimeError):
        atomic_write_jsonl(target, rows_then_crash())
    assert target.read_bytes() == before
    assert no_temp_files(tmp_path)


def test_json_is_sorted_indented_and_models_are_dumped(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "a.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    atomic_write_jsonl(tmp_path / "r.jsonl", [Row(row_id="1", text="x"), {"z": 1, "a": 2}])
    assert (tmp_path / "r.jsonl").read_text() == '{"row_id":"1","text":"x"}\n{"a":2,"z":1}\n'
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.bin").stat().st_mode & 0o077 != 0o000  # not mkstemp's private 0600


def test_versions_reads_metadata_without_importing_torch():
    found = versions()
    assert found["python"].count(".") == 2
    assert found["cai"]
    assert set(found) <= {"python", "cai", "torch", "transformers", "trl", "datasets", "vllm"}
    code = "import sys, cai.store; cai.store.versions(); print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    )


# --------------------------------------------------------------------------- commit and rows


def test_commit_and_rows_round_trip(tmp_path):
    with StageStore(tmp_path, "sl", CONFIG) as store:
        assert store.committed() == set()
        store.commit(rows_of("b", "a"))
        store.commit(
            [
                Row(row_id="c", text="model row"),
                HashedRow(row_id="d", text="x", config_hash=store.config_hash),
            ]
        )
        assert store.committed() == {"a", "b", "c", "d"}
    assert [r["row_id"] for r in store.rows()] == ["b", "a", "c", "d"]  # ledger order
    assert all(r["config_hash"] == store.config_hash for r in store.rows())
    # A model without the field still validates (extra="forbid"); one with it gets it.
    assert [r.text for r in store.rows(Row)][2] == "model row"
    assert {r.config_hash for r in store.rows(HashedRow)} == {store.config_hash}
    assert StageStore(tmp_path, "sl", CONFIG).committed() == {"a", "b", "c", "d"}  # read without open


def test_duplicate_row_id_is_an_error_never_a_second_row(tmp_path):
    with StageStore(tmp_path, "sl", CONFIG) as store:
        store.commit(rows_of("a"))
        with pytest.raises(ValueError, match="'a' is already committed"):
            store.commit(rows_of("b", "a"))
        with pytest.raises(ValueError, match="'c' is already committed"):
            store.commit(rows_of("c", "c"))
    with StageStore(tmp_path, "sl", CONFIG) as store:
        with pytest.raises(ValueError, match="already committed"):
            store.commit(rows_of("a"))
    assert [r["row_id"] for r in store.rows()] == ["a"]  # the refused batches wrote nothing


def test_rows_must_have_an_id_and_this_config_hash(tmp_path):
    with StageStore(tmp_path, "sl", CONFIG) as store:
        with pytest.raises(ValueError, match="string row_id"):
            store.commit([{"text": "no id"}])
        with pytest.raises(ValueError, match="string row_id"):
            store.commit([{"row_id": 3}])
        with pytest.raises(ValueError, match="made under another config"):
            store.commit([HashedRow(row_id="a", text="x", config_hash="0" * 64)])
    assert store.committed() == set()


def test_commit_needs_an_open_store(tmp_path):
    with pytest.raises(StoreError, match="not open"):
        StageStore(tmp_path, "sl", CONFIG).commit(rows_of("a"))


def test_config_hash_keys_the_folder(tmp_path):
    base = StageStore(tmp_path, "sl", CONFIG)
    reordered = StageStore(tmp_path, "sl", {"sampling": {"seed": 1, "temperature": 0.7}, "model": "tiny"})
    hotter = StageStore(tmp_path, "sl", {**CONFIG, "sampling": {"temperature": 1.0, "seed": 1}})
    other_upstream = StageStore(tmp_path, "sl", CONFIG, upstream={"constitution": "abc"})
    other_stage = StageStore(tmp_path, "label", CONFIG)
    assert reordered.path == base.path
    paths = {s.path for s in (base, hotter, other_upstream, other_stage)}
    assert len(paths) == 4
    assert base.path == tmp_path / "sl" / base.config_hash[:12]
    assert not (tmp_path / "sl").exists()  # constructing a store writes nothing
    with base:
        base.commit(rows_of("a"))
    with hotter:
        assert hotter.committed() == set()  # a new config never sees the old rows


def test_manifest_counts_attempts_usage_and_time(tmp_path):
    with StageStore(tmp_path, "sl", CONFIG, upstream={"prompts": "p" * 64}) as store:
        store.commit(rows_of("a", "b"), usage=Usage(generate_calls=1, prompt_tokens=10, completion_tokens=7))
        time.sleep(0.02)
    with StageStore(tmp_path, "sl", CONFIG, upstream={"prompts": "p" * 64}) as store:
        store.commit(rows_of("c"), usage=Usage(generate_calls=1, prompt_tokens=4, completion_tokens=3))
        store.commit([], usage=Usage(failed_items=2))  # a batch that cost tokens but yielded nothing
    manifest = StageManifest.model_validate_json((store.path / "manifest.json").read_bytes())
    assert manifest.attempts == 2
    assert manifest.rows == 3
    assert manifest.status == "running"
    assert manifest.usage["prompt_tokens"] == 14
    assert manifest.usage["completion_tokens"] == 10
    assert manifest.usage["generate_calls"] == 2
    assert manifest.usage["failed_items"] == 2
    assert manifest.elapsed_s >= 0.02
    assert manifest.versions["cai"] and manifest.versions["python"]
    assert manifest.config == CONFIG and manifest.upstream == {"prompts": "p" * 64}
    assert manifest.config_hash == store.config_hash
    for stamp in (manifest.created_at, manifest.updated_at):
        assert datetime.fromisoformat(stamp).utcoffset().total_seconds() == 0


# --------------------------------------------------------------------------- ledger repair


def test_torn_tail_is_cut_and_redone(tmp_path, caplog):
    with StageStore(tmp_path, "sl", CONFIG) as store:
        store.commit(rows_of("a", "b"))
    good = (store.path / "ledger.jsonl").read_bytes()
    torn = b'{"config_hash":"' + store.config_hash.encode() + b'","row_id":"c","te'
    with open(store.path / "ledger.jsonl", "ab") as handle:
        handle.write(torn)

    with caplog.at_level(logging.WARNING, logger="cai.store"):
        reopened = StageStore(tmp_path, "sl", CONFIG)
        assert reopened.open() == {"a", "b"}
    assert reopened.repair is not None
    assert (reopened.repair.lines_dropped, reopened.repair.bytes_dropped) == (1, len(torn))
    assert f"{len(torn)} byte(s)" in caplog.text
    assert (store.path / "ledger.jsonl").read_bytes() == good
    assert reopened.committed() == {"a", "b"}
    reopened.commit(rows_of("c"))
    reopened.close()
    lines = ledger_lines(reopened)
    assert len(lines) == 3 and all(line.endswith(b"\n") for line in lines)
    assert [orjson.loads(line)["row_id"] for line in lines] == ["a", "b", "c"]


@pytest.mark.parametrize(
    "tail",
    [b"\x00\x00\x00\x00", b"not json\n", b'{"row_id":"z","config_hash":"elsewhere"}\n', b"[1, 2]\n"],
    ids=["zeros-no-newline", "garbage-line", "other-config", "not-an-object"],
)
def test_any_bad_tail_is_cut(tmp_path, tail):
    with StageStore(tmp_path, "sl", CONFIG) as store:
        store.commit(rows_of("a"))
    with open(store.path / "ledger.jsonl", "ab") as handle:
        handle.write(tail)
    with StageStore(tmp_path, "sl", CONFIG) as store:
        assert store.committed() == {"a"}
        assert store.repair is not None and store.repair.bytes_dropped == len(tail)


def test_damaged_middle_line_is_an_error_naming_the_line(tmp_path):
    with StageStore(tmp_path, "sl", CONFIG) as store:
        store.commit(rows_of("a", "b"))
    lines = ledger_lines(store)
    damaged = lines[0] + b"{garbage\n" + lines[1]
    (store.path / "ledger.jsonl").write_bytes(damaged)
    with pytest.raises(LedgerCorruptError, match=r"line 2 is damaged \(not valid JSON\).*line 3"):
        StageStore(tmp_path, "sl", CONFIG).open()
    assert (store.path / "ledger.jsonl").read_bytes() == damaged  # good data after it is kept
    (store.path / "ledger.jsonl").write_bytes(b"".join(lines))  # once a human repairs it...
    with StageStore(tmp_path, "sl", CONFIG) as store:  # ...it opens: the failed open released its lock
        assert store.committed() == {"a", "b"}


def test_clean_open_reports_no_repair(tmp_path):
    with StageStore(tmp_path, "sl", CONFIG) as store:
        store.commit(rows_of("a"))
    with StageStore(tmp_path, "sl", CONFIG) as store:
        assert store.repair is None


# --------------------------------------------------------------------------- locking


def test_second_open_on_the_same_stage_is_refused(tmp_path):
    first = StageStore(tmp_path, "sl", CONFIG)
    first.open()
    try:
        with pytest.raises(StageLockedError, match="already open in another process"):
            StageStore(tmp_path, "sl", CONFIG).open()
        code = (
            "import sys; from pathlib import Path; from cai.store import StageStore, StageLockedError\n"
            f"try:\n    StageStore(Path(sys.argv[1]), 'sl', {CONFIG!r}).open()\n"
            "except StageLockedError:\n    print('locked')\n"
        )
        other = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
        assert other.stdout.strip() == "locked", other.stderr
        assert StageStore(tmp_path, "sl", {"other": "config"}).open() == set()  # other folders are free
    finally:
        first.close()
    with StageStore(tmp_path, "sl", CONFIG) as again:
        assert again.manifest.attempts == 2


# --------------------------------------------------------------------------- finalize, keys, discard


def test_finalize_sorts_by_row_id_by_default(tmp_path):
    with StageStore(tmp_path, "sl", CONFIG) as store:
        store.commit(rows_of("b", "c"))
        store.commit(rows_of("a"))
        store.finalize()
    lines = (store.path / "rows.jsonl").read_bytes().splitlines()
    assert [orjson.loads(line)["row_id"] for line in lines] == ["a", "b", "c"]
    assert sorted(lines) == sorted(line.rstrip(b"\n") for line in ledger_lines(store))  # same bytes


def test_finalize_sorts_canonically_and_runs_writers(tmp_path):
    with StageStore(tmp_path, "sl", CONFIG) as store:
        store.commit([{"row_id": "c", "k": 1}, {"row_id": "a", "k": 2}])
        store.commit([{"row_id": "b", "k": 1}])

        def write_count(path: Path) -> None:
            atomic_write_bytes(path, str(len(store.committed())).encode())

        with pytest.raises(ValueError, match="plain file name"):
            store.finalize(outputs={"ledger.jsonl": write_count})
        store.finalize(
            outputs={"count.txt": write_count}, order=lambda row: row["k"], summary={"agreement": 0.5}
        )
        with pytest.raises(StoreError, match="is complete"):
            store.commit([{"row_id": "d"}])
    # Ties on k=1 fall back on row_id, never on commit order.
    assert [orjson.loads(x)["row_id"] for x in (store.path / "rows.jsonl").read_bytes().splitlines()] == [
        "b",
        "c",
        "a",
    ]
    assert (store.path / "count.txt").read_text() == "3"
    manifest = store.manifest
    assert manifest.status == "complete" and store.is_complete
    assert manifest.outputs == {"rows": "rows.jsonl", "count.txt": "count.txt"}
    assert manifest.summary == {"agreement": 0.5}
    assert manifest.rows == 3


def test_a_store_is_found_by_its_key_and_nothing_points_at_the_last_one(tmp_path):
    first = StageStore(tmp_path, "sl", CONFIG)
    with first:
        first.commit(rows_of("a"))
        first.finalize()
    second = StageStore(tmp_path, "sl", {"model": "other"}, upstream={"x": "1"})
    with second:
        second.commit(rows_of("b"))
    # the folder written last is not special: no pointer file exists that a reader could follow
    assert sorted(p.name for p in (tmp_path / "sl").iterdir()) == sorted([first.path.name, second.path.name])
    again = StageStore(tmp_path, "sl", CONFIG)  # the same key reaches the same complete folder
    assert again.path == first.path and again.is_complete
    assert [r["row_id"] for r in again.rows()] == ["a"]
    other = StageStore(tmp_path, "sl", {"model": "other"}, upstream={"x": "1"})
    assert other.path == second.path and not other.is_complete
    assert StageStore(tmp_path, "sl", {"model": "other"}).path != second.path  # upstream is in the key


def test_discard_removes_the_run_and_allows_a_fresh_one(tmp_path):
    store = StageStore(tmp_path, "sl", CONFIG)
    with store:
        store.commit(rows_of("a"))
    holder = StageStore(tmp_path, "sl", CONFIG)
    holder.open()
    with pytest.raises(StageLockedError):
        store.discard()  # never delete a folder another process is writing
    holder.close()
    store.discard()
    assert not store.path.exists() and not store.is_complete
    with store:
        assert store.committed() == set() and store.manifest.attempts == 1


# --------------------------------------------------------------------------- crash tests


def crashy(root: Path, n: int, sleep: float, *, dup: bool = True) -> list[str]:
    cmd = [sys.executable, str(CRASHY), "--root", str(root), "--n", str(n), "--batch", "7", "--seed", "3"]
    return cmd + ["--sleep", str(sleep)] + (["--dup"] if dup else [])


def run_to_end(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done.stderr


def stage_dir(root: Path) -> Path:
    (folder,) = (root / "crashy").glob("*/")
    return folder


def committed_ids(root: Path) -> list[str]:
    """Read the ledger independently of cai.store: only complete lines count as committed."""
    ledger = next((root / "crashy").glob("*/ledger.jsonl"), None)
    if ledger is None:
        return []
    lines = ledger.read_bytes().split(b"\n")[:-1]  # the piece after the last newline is torn
    return [orjson.loads(line)["row_id"] for line in lines]


def attempts(root: Path) -> int:
    manifest = next((root / "crashy").glob("*/manifest.json"), None)
    return orjson.loads(manifest.read_bytes())["attempts"] if manifest else 0


def is_complete(root: Path) -> bool:
    manifest = next((root / "crashy").glob("*/manifest.json"), None)
    return manifest is not None and orjson.loads(manifest.read_bytes())["status"] == "complete"


def requests(root: Path) -> list[tuple[int, list[str]]]:
    log_file = root / "calls.log"
    if not log_file.exists():
        return []
    return [
        (int(a), ids.split(","))
        for a, ids in (line.split("\t") for line in log_file.read_text().splitlines())
    ]


def wait_for_first_request(root: Path, size_before: int, proc: subprocess.Popen) -> None:
    log_file = root / "calls.log"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        if log_file.exists() and log_file.stat().st_size > size_before:
            return
        time.sleep(0.002)


def tear_last_line(root: Path, rng: random.Random) -> None:
    """Simulate a power cut during the last append: only part of its last line reached the disk."""
    ledger = stage_dir(root) / "ledger.jsonl"
    data = ledger.read_bytes()
    start = data.rfind(b"\n", 0, len(data) - 1) + 1
    if len(data) - start > 2:
        ledger.write_bytes(data[: rng.randint(start + 1, len(data) - 2)])


def crash_and_resume(tmp_path: Path, kills: int, n: int, seed: int) -> None:
    rng = random.Random(seed)
    reference, crashed = tmp_path / "A", tmp_path / "B"
    run_to_end(crashy(reference, n, sleep=0))

    before_attempt: dict[int, set[str]] = {}  # attempt number -> rows committed when it started
    for _ in range(4 * kills):  # kills that land before open() don't count towards `kills`
        if attempts(crashed) >= kills:
            break
        started_as = attempts(crashed) + 1
        before_attempt[started_as] = set(committed_ids(crashed))
        size = (crashed / "calls.log").stat().st_size if (crashed / "calls.log").exists() else 0
        proc = subprocess.Popen(
            crashy(crashed, n, sleep=0.04), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        if rng.random() < 0.75:
            wait_for_first_request(crashed, size, proc)  # mid-batch, mid-commit
        # else: counted from spawn, so kills also land in start-up, ledger repair or manifest writes
        time.sleep(rng.uniform(0.05, 0.6))
        assert proc.poll() is None, f"stage finished before the kill: raise n ({proc.stderr.read()})"
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        if committed_ids(crashed) and not is_complete(crashed) and rng.random() < 0.3:
            tear_last_line(crashed, rng)

    assert attempts(crashed) == kills
    before_attempt[attempts(crashed) + 1] = set(committed_ids(crashed))
    run_to_end(crashy(crashed, n, sleep=0))

    final = stage_dir(crashed)
    assert (final / "rows.jsonl").read_bytes() == (stage_dir(reference) / "rows.jsonl").read_bytes()
    assert (final / "responses.txt").read_bytes() == (stage_dir(reference) / "responses.txt").read_bytes()
    ledger_ids = committed_ids(crashed)
    assert len(ledger_ids) == len(set(ledger_ids)) == n
    rows = [orjson.loads(line) for line in (final / "rows.jsonl").read_bytes().splitlines()]
    assert len({row["row_id"] for row in rows}) == n
    assert len({row["prompt"] for row in rows}) < n  # duplicate prompt texts are both kept

    # Nothing committed before an attempt started is requested by it: only rows of torn or
    # uncommitted batches are ever requested twice.
    log = requests(crashed)
    for attempt, ids in log:
        again = set(ids) & before_attempt[attempt]
        assert not again, f"attempt {attempt} re-requested committed rows {sorted(again)[:5]}"
    assert {i for _, ids in log for i in ids} == set(ledger_ids)
    # And each row sits in the ledger where its last request put it: the committed copy is the
    # one from the last request, so the ledger follows the order of last requests.
    last_request = {i: position for position, (_, ids) in enumerate(log) for i in ids}
    positions = [last_request[i] for i in ledger_ids]
    assert positions == sorted(positions)
    assert len({a for a, _ in log}) > 1  # the kills did interrupt work
    assert orjson.loads((final / "manifest.json").read_bytes())["attempts"] == max(before_attempt)


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    crash_and_resume(tmp_path, kills=5, n=600, seed=11)


@pytest.mark.faults
def test_many_kills_and_resumes_match_uninterrupted_run(tmp_path):
    crash_and_resume(tmp_path, kills=20, n=2400, seed=12)


def test_crashy_stage_skips_a_complete_stage(tmp_path):
    run_to_end(crashy(tmp_path, 20, sleep=0))
    log_before = (tmp_path / "calls.log").read_bytes()
    run_to_end(crashy(tmp_path, 20, sleep=0))
    assert (tmp_path / "calls.log").read_bytes() == log_before
    assert attempts(tmp_path) == 1
