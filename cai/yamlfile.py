"""Safe YAML loading that remembers line numbers, so errors in user files can point at a line.

Used for constitutions and run configs alike. Duplicate keys are errors: YAML would silently
keep the last one, and a principle edited twice by mistake must not pass unnoticed.
"""

from __future__ import annotations

from typing import Any

import yaml

LineIndex = dict[tuple, int]


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


def load_yaml_with_lines(text: str) -> tuple[Any, LineIndex]:
    """Parse YAML safely; return the data and a map from key paths to 1-based lines.

    Raises yaml.YAMLError (with `problem_mark`) on syntax errors and duplicate keys.
    """
    node = yaml.compose(text, Loader=_LineLoader)
    data = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - _LineLoader is a SafeLoader
    lines: LineIndex = {}
    _index(node, (), lines)
    return data, lines


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
