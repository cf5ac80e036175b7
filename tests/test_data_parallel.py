"""Data-parallel sl / label / eval: N processes write what one process writes, and resume from any kill.

The launches are real (`accelerate launch` with 2 CPU processes on gloo, marked `distributed`):
the CLI on the tiny model, and `stage_crash_script.py` on the echo engine where a test needs to
pace or kill a rank. The rest drives `DataParallel` in this process with a stand-in for the
collectives: shards of other configs, shards a killed launch left, ranks that die or hang.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from filelock import FileLock

from cai.shards import shard_files
from cai.stages.parallel import DataParallel, RankFailedError, deal
from cai.stages.sl import run_sl
from cai.world import World, world
from tests.echo_recipe import echo_context, write_config

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "tests" / "stage_crash_script.py"
OUTPUTS = {
    "sl": ["rows.jsonl", "sft.jsonl", "sft.parquet", "data.parquet", "README.md"],
    "label": [
        "rows.jsonl",
        "audit.jsonl",
        "audit.parquet",
        "preferences.jsonl",
        "preferences.parquet",
        "README.md",
    ],
}
# one thread per process in every run compared: float sums then add up in the same order
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def launch(processes: int, *args: str, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    """`accelerate launch` of `args` (`-m cai ...` or a script) on `processes` CPU processes."""
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--config_file", str(ROOT / "configs/accelerate/cpu_ddp.yaml")]
    command += ["--num_processes", str(processes), *args]
    if not wait:
        output = tempfile.TemporaryFile()  # a file, not a pipe: a full pipe would stall the ranks
        return subprocess.Popen(command, env=ENV, stdout=output, stderr=subprocess.STDOUT)
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def one_process(*args: str) -> None:
    done = subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def folder(run_dir: Path, stage: str) -> Path:
    (path,) = (run_dir / stage).glob("*/manifest.json")
    return path.parent


def assert_same_outputs(one: Path, many: Path, stage: str) -> None:
    for name in OUTPUTS[stage]:
        assert (one / name).read_bytes() == (many / name).read_bytes(), f"{stage}/{name} differs"
    config_hash = json.loads((many / "manifest.json").read_text())["config_hash"]
    assert not shard_files(many, config_hash), "rank 0 deletes the shards it merged"


def summary(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())["summary"]


def echo_run(run_dir: Path, log: Path, n: int, stage: str = "sl", delay: float = 0.0) -> list[str]:
    return [
        str(SCRIPT),
        str(run_dir),
        str(log),
        f"--n={n}",
        "--chunk=2",
        "--rounds=1",
        f"--delay={delay}",
        f"--stage={stage}",
    ]


# --------------------------------------------------------------------------- real launches


@pytest.mark.distributed
def test_sl_and_label_on_two_processes_write_the_bytes_of_one(tmp_path, tiny_models):
    def config(name: str) -> Path:
        data = {
            "run_dir": str(tmp_path / name),
            "model": str(tiny_models.causal_lm),
            "sl": {
                "prompts": {"path": "red_team.jsonl", "limit": 6},
                "rounds": 1,
                "chunk_size": 2,
                "sampling": {"max_new_tokens": 8},
            },
            "label": {
                "prompts": {"path": "red_team.jsonl", "offset": 6, "limit": 4},
                "gold": None,
                "chunk_size": 1,
                "sampling": {"max_new_tokens": 8},
                "principles": {"count": 2},
            },
            "stages": ["sl", "label"],
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    one, two = config("one"), config("two")
    one_process("-m", "cai", "run", str(one))
    launch(2, "-m", "cai", "generate", "sl", "-c", str(two))
    launch(2, "-m", "cai", "label", "-c", str(two))
    for stage in ("sl", "label"):
        single, double = folder(tmp_path / "one", stage), folder(tmp_path / "two", stage)
        assert single.name == double.name  # the same config hash: the same folder
        assert_same_outputs(single, double, stage)
        ranks = summary(double)["ranks"]
        assert [r["rank"] for r in ranks] == [0, 1]
        assert all(r["rows"] > 0 and r["tokens"] > 0 for r in ranks), ranks
        assert sum(r["rows"] for r in ranks) == summary(single)["rows" if stage == "sl" else "labels"]
        assert "ranks" not in summary(single)  # one process: the summary it always had


@pytest.mark.distributed
def test_gated_label_and_eval_on_two_processes_write_the_bytes_of_one(tmp_path, tiny_models, lively_tiny_lm):
    gold = tmp_path / "gold.jsonl"
    shipped = (ROOT / "cai/data/gold_harmless.jsonl").read_text().splitlines()
    gold.write_text("".join(line + "\n" for line in shipped[:4]))  # four gold pairs

    def config(name: str) -> Path:
        data = {
            "run_dir": str(tmp_path / name),
            "model": str(tiny_models.causal_lm),
            "label": {
                "prompts": {"path": "red_team.jsonl", "limit": 3},
                "gold": str(gold),  # the gate is on: rank 0 measures it, rank 1 waits
                "judge": "choice",
                "chunk_size": 1,
                "sampling": {"max_new_tokens": 8},
                "principles": {"count": 2},
            },
            # two policies, dealt one to each rank; rank 0 judges both
            "eval": {
                "policies": {"base": str(tiny_models.causal_lm), "lively": lively_tiny_lm},
                "limit": 2,
                "bootstrap": 50,
                "sampling": {"max_new_tokens": 8},
            },
            "stages": ["label", "eval"],
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    one, two = config("one"), config("two")
    one_process("-m", "cai", "run", str(one))
    launch(2, "-m", "cai", "label", "-c", str(two))
    launch(2, "-m", "cai", "eval", "-c", str(two))
    single, double = folder(tmp_path / "one", "label"), folder(tmp_path / "two", "label")
    assert single.name == double.name
    assert_same_outputs(single, double, "label")
    assert list(double.rglob("gate.json")) == [double / "gate.json"]  # measured once, by rank 0

    def timeless(check: dict) -> dict:  # all but the wall-clock seconds the measurement took
        return {k: v for k, v in check.items() if k != "seconds"}

    assert timeless(json.loads((single / "gate.json").read_text())) == timeless(
        json.loads((double / "gate.json").read_text())
    )
    gates = [summary(path)["gate"] for path in (single, double)]
    assert gates[0]["check"]["n"] == 4
    assert [{**g, "check": timeless(g["check"])} for g in gates] == [
        {**gates[0], "check": timeless(gates[0]["check"])}
    ] * 2
    assert [r["rank"] for r in summary(double)["ranks"]] == [0, 1]
    assert all(r["rows"] > 0 for r in summary(double)["ranks"])

    single, double = folder(tmp_path / "one", "eval"), folder(tmp_path / "two", "eval")
    assert single.name == double.name
    assert (single / "metrics.jsonl").read_bytes() == (double / "metrics.jsonl").read_bytes()
    assert [(r["rank"], r["rows"]) for r in summary(double)["ranks"]] == [(0, 1), (1, 1)]
    assert summary(double)["policies"] == ["base", "lively"]


@pytest.mark.distributed
def test_a_rank_killed_mid_stage_resumes_in_one_process_with_identical_output(tmp_path):
    import psutil

    one_process(*echo_run(tmp_path / "one", tmp_path / "one.log", n=16))
    run_dir = tmp_path / "two"
    launcher = launch(2, *echo_run(run_dir, tmp_path / "two.log", n=16, delay=0.3), wait=False)
    deadline, shard = time.monotonic() + 180, None
    while time.monotonic() < deadline and launcher.poll() is None:
        shard = next(run_dir.glob("sl/*/ledger.rank1.jsonl"), None)
        if shard is not None and shard.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.02)
    assert launcher.poll() is None, "the launch ended before rank 1 committed anything"
    (rank1,) = [
        p
        for p in psutil.Process(launcher.pid).children(recursive=True)
        if p.environ().get("RANK") == "1" and any("stage_crash_script" in part for part in p.cmdline())
    ]
    rank1.send_signal(signal.SIGKILL)
    launcher.wait(timeout=180)
    assert launcher.returncode != 0
    path = folder(run_dir, "sl")
    assert json.loads((path / "manifest.json").read_text())["status"] == "running"
    committed = sum(f.read_bytes().count(b"\n") for f in path.glob("ledger*.jsonl"))
    assert 0 < committed < 16

    log = tmp_path / "resume.log"
    one_process(*echo_run(run_dir, log, n=16))
    assert_same_outputs(folder(tmp_path / "one", "sl"), path, "sl")
    # only the rows not committed were made again: 3 generate calls per row (answer, critique, revision)
    redone = sum(len(json.loads(line)["items"]) for line in log.read_text().splitlines())
    assert redone == 3 * (16 - committed)


@pytest.mark.distributed
def test_more_processes_than_rows_leaves_the_idle_rank_to_finish_cleanly(tmp_path):
    one_process(*echo_run(tmp_path / "one", tmp_path / "one.log", n=1, stage="label"))
    launch(2, *echo_run(tmp_path / "two", tmp_path / "two.log", n=1, stage="label"))
    double = folder(tmp_path / "two", "label")
    assert_same_outputs(folder(tmp_path / "one", "label"), double, "label")
    assert [(r["rank"], r["rows"]) for r in summary(double)["ranks"]] == [(0, 1), (1, 0)]


# --------------------------------------------------------------------------- in this process


class Collectives:
    """What the other ranks would say: nothing committed, no failure."""

    def broadcast(self, value):
        return value

    def all_gather(self, value):
        return [value, None]

    def barrier(self) -> None:
        pass


def sl_context(tmp_path: Path, name: str):
    return echo_context(write_config(tmp_path / f"{name}.yaml", tmp_path / name, ["sl"]))


def test_shards_of_another_config_are_ignored_and_leftover_shards_are_merged(tmp_path):
    reference = sl_context(tmp_path, "one")
    run_sl(reference)
    expected = folder(tmp_path / "one", "sl")
    rows = (expected / "rows.jsonl").read_bytes().splitlines()

    ctx = sl_context(tmp_path, "two")
    path = ctx.store("sl").path
    path.mkdir(parents=True)
    # a killed 3-process launch left rank 2's shard: two rows of this very config
    (path / "ledger.rank2.jsonl").write_bytes(b"".join(line + b"\n" for line in rows[:2]))
    # and a shard of another config (rows that must never be merged)
    foreign = [{**json.loads(line), "config_hash": "f" * 64, "final_revision": "STALE"} for line in rows]
    (path / "ledger.rank1.jsonl").write_text("".join(json.dumps(row) + "\n" for row in foreign))
    run_sl(ctx)

    assert_same_outputs(expected, path, "sl")
    assert b"STALE" not in (path / "rows.jsonl").read_bytes()
    assert (path / "ledger.rank1.jsonl").exists(), "another config's shard is left alone"
    (engine,) = ctx._backends.values()
    asked = [item for kind, items in engine.calls if kind == "generate" for item in items]
    first = [
        item for kind, items in reference._backends[next(iter(reference._backends))].calls for item in items
    ]
    assert len(asked) == len(first) - 2 * 3  # the shard's two rows were not made again
    assert "ranks" not in summary(path)


def test_a_rank_that_died_is_named_and_committed_rows_are_kept(tmp_path):
    ctx = sl_context(tmp_path, "run")
    store = ctx.store("sl")
    part = DataParallel(ctx, store, here=World(rank=0, size=2))
    part._comm = Collectives()
    with pytest.raises(
        RankFailedError, match=r"rank\(s\) 1 did not finish their share \(the process is gone"
    ):
        with part:
            jobs = list(range(8))
            mine = part.pending_chunks([f"r{i}" for i in jobs], lambda r: r, 2, "rows")
            assert [n for n, _ in mine] == [0, 2]  # chunks dealt round-robin
            for _, chunk in mine:
                part.commit([{"row_id": r} for r in chunk])
            part.gather()  # rank 1 never took its lock: gone
    assert store.committed() == {"r0", "r1", "r4", "r5"}


def test_a_hung_rank_times_out_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CAI_RANK_TIMEOUT", "0.5")
    ctx = sl_context(tmp_path, "run")
    store = ctx.store("sl")
    part = DataParallel(ctx, store, here=World(rank=0, size=2))
    part._comm = Collectives()
    hung = FileLock(store.path / ".lock.rank1", timeout=0)
    with part:
        hung.acquire()  # rank 1 is alive but commits nothing
        try:
            part.pending_chunks(["a", "b", "c"], lambda r: r, 1, "rows")
            part.commit([{"row_id": "a"}, {"row_id": "c"}])  # rank 0's share
            started = time.monotonic()
            with pytest.raises(
                RankFailedError, match=r"rank\(s\) 1 .*nothing was committed for 0.5 s\); 1 of their rows"
            ):
                part.gather()
            assert time.monotonic() - started < 10
        finally:
            hung.release()


def test_deal_and_world(monkeypatch):
    assert deal(list("abcde"), 2) == [["a", "c", "e"], ["b", "d"]]
    assert deal(["a"], 3) == [["a"], [], []]  # idle ranks get nothing, and still reach the end
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert world() == World(rank=0, size=1, local_rank=0) and world().main
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")  # the second process of the second machine
    assert world() == World(rank=3, size=8, local_rank=1) and not world().main
    monkeypatch.setenv("RANK", "8")
    with pytest.raises(ValueError, match="do not describe a launch"):
        world()
