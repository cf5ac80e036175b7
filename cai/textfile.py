"""Reading a user's text file: refuse binary and non-UTF-8 files by name before parsing them.

A leaf module: YAML files (constitutions, configs) and prompt files share this one check, so a
wrong file gets the same sentence whichever command read it.
"""

from __future__ import annotations

from pathlib import Path


def decode_text(path: Path, data: bytes, *, kind: str, error: type[ValueError]) -> str:
    """`data` (read from `path`) as UTF-8 text, or `error` naming the file and what is wrong.

    `kind` completes "a binary file (it holds NUL bytes), not ...", e.g. "YAML text".
    """
    if b"\0" in data:
        raise error(f"{path}: a binary file (it holds NUL bytes), not {kind}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
