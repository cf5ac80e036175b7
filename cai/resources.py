"""Where shipped files live: constitutions, prompt templates, example configs and prompt data.

The repository keeps `constitutions/`, `prompts/` and `configs/` at its top level (the design
card), while a wheel carries copies under `cai/_shipped/`. Everything that needs a shipped file
asks this module, so both layouts work and nothing else knows about the difference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

ShippedKind = Literal["constitutions", "prompts", "configs"]

_PACKAGE_DIR = Path(__file__).resolve().parent


def shipped_dir(kind: ShippedKind) -> Path:
    """The folder holding the shipped files of one kind (wheel copy first, then the checkout)."""
    for candidate in (_PACKAGE_DIR / "_shipped" / kind, _PACKAGE_DIR.parent / kind):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"cai's shipped '{kind}' folder is missing: looked in {_PACKAGE_DIR / '_shipped' / kind} "
        f"and {_PACKAGE_DIR.parent / kind}; reinstall cai"
    )


def data_path(name: str) -> Path:
    """A data file shipped inside the package (`cai/data/`), e.g. the demo prompts."""
    path = _PACKAGE_DIR / "data" / name
    if not path.is_file():
        known = sorted(p.name for p in (_PACKAGE_DIR / "data").glob("*") if p.is_file())
        raise FileNotFoundError(f"no shipped data file {name!r}; known: {', '.join(known)}")
    return path


def resolve_data(value: str, what: str, error: type[Exception], suffixes: tuple[str, ...] = ()) -> Path:
    """A user's path, or the name of a file shipped in cai/data (also with one of `suffixes`).

    A real path always wins, so a user's own file is never shadowed by a shipped one; otherwise
    `error` names `what` was asked for and lists the shipped files.
    """
    path = Path(value).expanduser()
    if path.exists():
        return path
    problem: FileNotFoundError | None = None
    for name in (value, *(value + suffix for suffix in suffixes)):
        try:
            return data_path(name)
        except FileNotFoundError as exc:
            problem = exc
    raise error(f"{what} {value!r} is neither an existing path nor a shipped file ({problem})") from None


def resolve_shipped(value: str | Path, kind: ShippedKind, suffixes: tuple[str, ...]) -> Path:
    """Resolve a user-given path, or the bare name of a shipped file (`harmless` -> harmless.yaml).

    A real path always wins, so a user's edited copy is never shadowed by a shipped one.
    """
    path = Path(value).expanduser()
    if path.exists():
        return path
    folder = shipped_dir(kind)
    for suffix in ("", *suffixes):
        candidate = folder / f"{value}{suffix}"
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in folder.iterdir() if p.suffix in suffixes)
    raise FileNotFoundError(
        f"{kind[:-1]} {str(value)!r} is neither an existing path nor a shipped name "
        f"(shipped: {', '.join(known)})"
    )
