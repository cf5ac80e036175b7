"""Safe YAML loading that remembers line numbers, so errors in user files can point at a line.

Used for constitutions, run configs, `--set` values and example files alike. Duplicate keys are
errors: YAML would silently keep the last one, and a principle edited twice by mistake must not
pass unnoticed. Documents are bounded before anything walks them: a file over `MAX_BYTES`, or a
document whose aliases (`&anchor` ... `*anchor`) would expand it past `MAX_NODES` nodes (a
"billion laughs" file is a few hundred bytes and expands to 10^9), is refused at once with the
line of the anchor that blows up, instead of taking minutes and gigabytes to validate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cai.textfile import decode_text

LineIndex = dict[tuple, int]

MAX_BYTES = 1_000_000
"""The largest YAML file cai reads (the shipped constitutions are about 30 KB)."""

MAX_NODES = 100_000
"""The most nodes a document may have once its aliases are expanded."""


class YAMLLimitError(yaml.YAMLError):
    """A document too large, or one whose aliases expand past the node limit."""

    def __init__(self, problem: str, mark: Any = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.problem_mark = mark


class YAMLFileError(ValueError):
    """A YAML file cannot be read as text: missing, too large, binary or not UTF-8."""


def read_yaml_file(path: Path) -> str:
    """The text of a YAML file, refused with a clear reason before it is parsed."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise YAMLFileError(f"{path}: cannot read it ({exc.strerror})") from None
    if size > MAX_BYTES:
        raise YAMLFileError(f"{path}: {size:,} bytes is over the {MAX_BYTES:,}-byte limit for a YAML file")
    return decode_text(path, path.read_bytes(), kind="YAML text", error=YAMLFileError)


def describe(exc: yaml.YAMLError) -> str:
    """What went wrong, for a user: the limit that was hit, or the syntax problem."""
    if isinstance(exc, YAMLLimitError):
        return exc.problem
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    return f"YAML syntax: {problem}" + (f" ({context})" if context and context not in problem else "")


class _LineLoader(yaml.SafeLoader):
    """A SafeLoader (no arbitrary objects) that refuses duplicate mapping keys."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _index(node: yaml.Node | None, path: tuple, out: LineIndex) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key_path = (*path, key_node.value)
            out[key_path] = key_node.start_mark.line + 1
            _index(value_node, key_path, out)
    elif isinstance(node, yaml.SequenceNode):
        for position, item in enumerate(node.value):
            out[(*path, position)] = item.start_mark.line + 1
            _index(item, (*path, position), out)


def _check_expansion(node: yaml.Node | None, limit: int) -> None:
    """Refuse a document whose aliases expand it past `limit` nodes, naming the anchor's line.

    An alias is the same node object as its anchor, so sizes are memoised per node: the check is
    linear in the document as written, whatever it would expand to.
    """
    sizes: dict[int, int] = {}

    def size(current: yaml.Node) -> int:
        if id(current) in sizes:
            return sizes[id(current)]
        total = 1
        if isinstance(current, yaml.MappingNode):
            total += sum(size(key) + size(value) for key, value in current.value)
        elif isinstance(current, yaml.SequenceNode):
            total += sum(size(item) for item in current.value)
        if total > limit:
            line = current.start_mark.line + 1
            raise YAMLLimitError(
                f"this document expands to more than {limit:,} values through aliases (&anchor / *anchor); "
                f"the part starting on line {line} alone has {total:,}. Write the values out, or reuse fewer",
                current.start_mark,
            )
        sizes[id(current)] = total
        return total

    if node is not None:
        size(node)


def load_yaml_with_lines(text: str) -> tuple[Any, LineIndex]:
    """Parse YAML safely; return the data and a map from key paths to 1-based lines.

    Raises yaml.YAMLError (with `problem_mark`) on syntax errors, duplicate keys and documents
    over the size limits (`YAMLLimitError`).
    """
    if len(text) > MAX_BYTES:
        raise YAMLLimitError(f"{len(text):,} characters is over the {MAX_BYTES:,}-character limit")
    loader = _LineLoader(text)
    try:
        node = loader.get_single_node()
        _check_expansion(node, MAX_NODES)
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    lines: LineIndex = {}
    _index(node, (), lines)
    return data, lines


def load_yaml_value(text: str) -> Any:
    """One YAML value (a `--set` override, an example file), with the same limits."""
    data, _ = load_yaml_with_lines(text)
    return data


def file_loc(lines: LineIndex, loc: tuple) -> tuple:
    """A pydantic error location as a path in the file: drops the tags pydantic inserts for
    discriminated unions (`engine.hf.batch_size` -> `engine.batch_size`)."""
    path: tuple = ()
    for position, part in enumerate(loc):
        is_last = position == len(loc) - 1
        if (*path, part) in lines or is_last or not isinstance(part, str):
            path = (*path, part)
        elif (*path, loc[position + 1]) not in lines:
            path = (*path, part)
    return path


def line_of(lines: LineIndex, loc: tuple) -> int | None:
    """The line of the deepest known prefix of a pydantic error location."""
    loc = file_loc(lines, loc)
    for end in range(len(loc), 0, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def yaml_error_line(exc: yaml.YAMLError) -> int | None:
    mark = getattr(exc, "problem_mark", None)
    return mark.line + 1 if mark is not None else None
