"""Reading label audit rows: from a JSONL file, a label stage folder, or a run directory.

rows = load_audit("runs/quickstart")          # the run's label folder (never guessed)
gate, failures = load_gate("runs/quickstart")  # the judge gate stored beside them
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import orjson
from pydantic import ValidationError

from cai.records import LabelAudit

if TYPE_CHECKING:
    from cai.gate import JudgeCheck

LABEL_STAGE = "label"
"""The stage folder (``<run_dir>/label/<hash>/``) whose outputs hold the audit rows."""

AUDIT_FILE = "audit.jsonl"
"""One `LabelAudit` per line, written by the label stage next to its preference rows."""


def audit_file(path: Path) -> Path:
    """Resolve a JSONL file, a label stage folder or a run directory to the audit rows file.

    A run directory can hold several label folders (one per config). Which one is meant is never
    guessed from what was written last: a run directory with one finished label folder resolves
    to it; with several, to the one its `manifest.json` (written by `cai run`) names, and
    otherwise it is an error listing them (pass the folder, or `cai audit -c CONFIG`).
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected a run directory or an {AUDIT_FILE} file)")
    if (path / AUDIT_FILE).is_file():
        return path / AUDIT_FILE
    folders = sorted(p.parent for p in (path / LABEL_STAGE).glob(f"*/{AUDIT_FILE}"))
    if not folders:
        raise FileNotFoundError(
            f"{path} has no finished label stage (no {LABEL_STAGE}/*/{AUDIT_FILE}); run the label stage "
            f"first, or pass an {AUDIT_FILE} file"
        )
    if len(folders) == 1:
        return folders[0] / AUDIT_FILE
    manifest = path / "manifest.json"
    if manifest.is_file():
        named = orjson.loads(manifest.read_bytes()).get("stages", {}).get(LABEL_STAGE, {}).get("path")
        if named and (Path(named) / AUDIT_FILE).is_file():
            return Path(named) / AUDIT_FILE
    listing = ", ".join(str(f) for f in folders)
    raise FileNotFoundError(
        f"{path} holds {len(folders)} label folders ({listing}); pass one of them, or the config "
        "that made it (`cai audit -c CONFIG`)"
    )


def load_gate(path: Path) -> tuple[JudgeCheck | None, list[str]]:
    """The judge gate recorded next to an audit file (its stage's manifest), and its failures."""
    from cai.gate import GateResult

    manifest = audit_file(path).parent / "manifest.json"
    if not manifest.is_file():
        return None, []
    gate = orjson.loads(manifest.read_bytes()).get("summary", {}).get("gate")
    if not gate:
        return None, []
    result = GateResult.model_validate(gate)
    return result.check, result.failures


def load_audit(path: Path) -> list[LabelAudit]:
    """Read and validate audit rows from a JSONL file, a label stage folder or a run directory.

    Every row is validated, and a bad one is reported by file and line: a report built on a
    half-parsed file would answer "which principle shaped this label" wrongly without a trace.
    """
    file = audit_file(path)
    rows: list[LabelAudit] = []
    with file.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(LabelAudit.model_validate(orjson.loads(line)))
            except (orjson.JSONDecodeError, ValidationError) as error:
                raise ValueError(f"{file}:{number}: not a valid label audit row: {error}") from None
    return rows
