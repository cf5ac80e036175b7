"""SIGKILL-and-resume harness shared by the stage crash tests (sl, label).

The stage runs in a subprocess (`stage_crash_script.py`) on the echo engine, which logs every
request; the harness kills it at random points, runs it again, and checks the final output is
byte-identical to an uninterrupted run and that nothing committed was ever requested again.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

SCRIPT = Path(__file__).with_name("stage_crash_script.py")


def _requests(log):
    if not Path(log).exists():
        return []
    return [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]


def _run_script(run_dir, log, stage, kill_after=None, **kw):
    """Run the stage; with `kill_after`, SIGKILL it that many seconds after its first request."""
    # the label stage makes 2 engine calls per chunk, the SL stage 5: slow it to the same pace
    delay = 0.15 if stage == "sl" else 0.4
    args = [sys.executable, str(SCRIPT), str(run_dir), str(log), f"--delay={delay}", f"--stage={stage}"]
    args += [f"--{k}={v}" for k, v in kw.items()]
    size = Path(log).stat().st_size if Path(log).exists() else 0
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if kill_after is None:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err.decode()[-2000:]
        return True
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:
        if Path(log).exists() and Path(log).stat().st_size > size:
            break
        time.sleep(0.02)
    time.sleep(kill_after)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return False
    assert process.returncode == 0, process.stderr.read().decode()[-2000:]
    return True


def _final_rows(run_dir, stage):
    (folder,) = (Path(run_dir) / stage).glob("*/rows.jsonl")
    return folder.read_bytes()


def _requests(log):
    if not Path(log).exists():
        return []
    return [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]


def _prompt_of(row) -> str:
    return f"prompt number {int(row['row_id'].split(':')[1]) // 2}"


def _committed_prompts(run_dir, stage) -> list[str]:
    ledgers = list((Path(run_dir) / stage).glob("*/ledger.jsonl"))
    if not ledgers:
        return []
    rows = []
    for line in ledgers[0].read_bytes().split(b"\n"):
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass  # a torn tail, which the next attempt cuts and redoes
    return [_prompt_of(r) for r in rows]


def crash_and_resume(tmp_path, stage: str, kills: int, seed: int):
    """Kill the stage with SIGKILL `kills` times at random points, resume, compare with a clean run."""
    reference = tmp_path / "ref"
    _run_script(reference, tmp_path / "ref.log", stage)
    all_prompts = Counter(f"prompt number {i // 2}" for i in range(40))
    run_dir, log = tmp_path / "crashy", tmp_path / "crashy.log"
    rng = random.Random(seed)
    killed, attempts, finished = 0, [], False
    while not finished and len(attempts) < kills * 3:
        # what was durable when this attempt started, and a marker in the engine's call log
        attempts.append(Counter(_committed_prompts(run_dir, stage)))
        with log.open("a") as handle:
            handle.write(json.dumps({"kind": "start", "items": []}) + "\n")
        finished = _run_script(
            run_dir, log, stage, kill_after=None if killed >= kills else rng.uniform(0.0, 1.2)
        )
        killed += not finished
    assert finished and killed >= min(kills, 3), "the run finished before it could be killed often enough"
    assert _final_rows(run_dir, stage) == _final_rows(reference, stage)
    rows = [json.loads(line) for line in _final_rows(run_dir, stage).splitlines()]
    assert len({r["row_id"] for r in rows}) == len(rows) == 40
    assert [_prompt_of(r) for r in rows].count("prompt number 0") == 2  # duplicate texts both kept
    ledger = next((run_dir / stage).glob("*/ledger.jsonl")).read_text().splitlines()
    assert len(ledger) == 40  # nothing committed twice
    # Per attempt, the engine was asked for initial answers only of rows not yet committed when
    # that attempt started: nothing finished is ever requested again.
    per_attempt: list[Counter] = []
    for call in _requests(log):
        if call["kind"] == "start":
            per_attempt.append(Counter())
        elif call["items"][0].startswith("prompt number"):
            per_attempt[-1].update(call["items"])
    assert len(per_attempt) == len(attempts)
    for committed, requested in zip(attempts, per_attempt, strict=True):
        assert not requested - (all_prompts - committed), "a committed row was requested again"
    return killed
