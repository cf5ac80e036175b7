"""The shape of the package: imports flow one way, modules fit in a head, registries are complete.

The import graph is read with `ast`, every import statement counted, function-local (deferred)
ones included; only `if TYPE_CHECKING:` blocks are left out, because they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cai"
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The cai module an import names (`cai.a.b.func` -> `cai.a.b`), or None outside cai."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imported(module: str) -> set[str]:
    path = MODULES[module]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from the module's own package upwards
                    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                    base = ".".join(package[: len(package) - child.level + 1] + ([base] if base else []))
                for alias in child.names:  # `from pkg import module` names the module itself
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {target for name in found if (target := _resolve(name)) and target != module}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_of_cai_has_no_cycle():
    graph = {module: imported(module) for module in MODULES}
    assert graph["cai.config"] >= {"cai.sections", "cai.stages.registry"}  # the reader sees real edges
    assert cycles(graph) == []


@pytest.mark.parametrize("leaf", ["cai.sections", "cai.hashing", "cai.verdict", "cai.textfile", "cai.world"])
def test_leaf_modules_import_nothing_of_cai(leaf):
    assert imported(leaf) == set()


def test_no_module_is_longer_than_a_head_can_hold():
    lengths = {module: len(path.read_text(encoding="utf-8").splitlines()) for module, path in MODULES.items()}
    too_long = {module: n for module, n in lengths.items() if n > MAX_LINES}
    assert too_long == {}


def test_the_engine_registry_covers_every_engine_kind():
    import typing

    from cai.backends.registry import ENGINES, engine_class
    from cai.sections import EngineConfig

    union = typing.get_args(typing.get_args(EngineConfig)[0])
    kinds = {cls.model_fields["kind"].default for cls in union}
    assert kinds == set(ENGINES)
    for kind in ("hf", "openai"):  # importable here without the optional vLLM
        cls = engine_class(kind)
        assert all(callable(getattr(cls, method, None)) for method in ("generate", "score_choices", "close"))
    with pytest.raises(ValueError, match="unknown engine kind 'nope'"):
        engine_class("nope")


def test_every_stage_is_declared_once_and_read_by_the_run_config():
    from cai.config import RunConfig
    from cai.stages.registry import STAGE_ORDER, STAGES

    assert tuple(STAGES) == STAGE_ORDER and len(set(STAGE_ORDER)) == len(STAGE_ORDER)
    for name, stage in STAGES.items():
        assert stage.name == name
        assert set(stage.reads) <= set(STAGES), name
        if stage.config is not None:  # each stage's section sits in the run config under its name
            assert RunConfig.model_fields[name].annotation is stage.config
    default = RunConfig().stages
    assert default == [name for name, stage in STAGES.items() if stage.default]
