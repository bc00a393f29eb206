"""The package's layering: imports point down, never up, and never in a circle.

Read from the source (every import, at module level or inside a function), so a
call-time import that works around a cycle is caught too.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import camfunc

pytestmark = pytest.mark.core

PACKAGE = pathlib.Path(camfunc.__file__).parent

# Each group may import only groups with a smaller rank (and itself).
RANK = {
    "camfunc._version": 0, "camfunc._util": 0,
    "camfunc._core": 1,
    "camfunc._methods": 2, "camfunc.zoo": 2, "camfunc.viz": 2,
    "camfunc._tools": 3,
    "camfunc.metrics": 4, "camfunc.testing": 4, "camfunc.losses": 4,
    "camfunc.runs": 5,
    "camfunc.cli": 6,
    "camfunc": 7,
    "camfunc.__main__": 8,
}
# Inside the core: the Split value first, the capture and the splitter (layer choice and
# layouts) last.
CORE_ORDER = ["split", "targets", "ops", "contrastive", "validate", "layout", "cut", "engine",
              "splitter"]


def module_files() -> dict[str, pathlib.Path]:
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("camfunc", *path.relative_to(PACKAGE).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    return files


MODULES = module_files()


def imports_of(name: str) -> list[tuple[str, str]]:
    """``(module, imported name)`` for each ``from module import name`` (name '' for ``import``)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join([*base, node.module] if node.module else base) if node.level else node.module
            if source and source.split(".")[0] == "camfunc":
                found += [(source, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.split(".")[0] == "camfunc"]
    return found


def edges() -> dict[str, set[str]]:
    graph = {}
    for name in MODULES:
        targets = set()
        for source, imported in imports_of(name):
            as_module = f"{source}.{imported}"
            targets.add(as_module if as_module in MODULES else source)
        graph[name] = {t for t in targets if t in MODULES and t != name}
    return graph


def group(name: str) -> str:
    return max((g for g in RANK if name == g or name.startswith(g + ".")), key=len)


def core_position(name: str) -> int:
    return CORE_ORDER.index(name.split(".")[2])


def test_every_module_belongs_to_a_ranked_group():
    assert [m for m in MODULES if not any(m == g or m.startswith(g + ".") for g in RANK)] == []
    assert sorted({m.split(".")[2] for m in MODULES if m.startswith("camfunc._core.")}) == sorted(CORE_ORDER)


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    upward = []
    for name, targets in graph.items():
        for target in targets:
            mine, theirs = group(name), group(target)
            if mine == theirs:
                inside_core = mine == "camfunc._core" and mine not in (name, target)
                if inside_core and core_position(target) > core_position(name):
                    upward.append(f"{name} -> {target}")
            elif theirs == "camfunc":
                if mine != "camfunc.__main__":
                    upward.append(f"{name} -> camfunc (the package's namespace; import the module)")
            elif RANK[theirs] >= RANK[mine]:
                upward.append(f"{name} -> {target}")
    return upward


def cycles_in(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    return cycles


def test_imports_point_down():
    assert upward_edges(edges()) == []


def test_no_import_cycle():
    assert cycles_in(edges()) == []


def test_private_names_stay_in_their_module():
    # Shared internals have public names inside private packages; a leading underscore
    # means "this module only".
    crossing = []
    for name in MODULES:
        for source, imported in imports_of(name):
            if imported.startswith("_") and f"{source}.{imported}" not in MODULES:
                if imported != "__version__":
                    crossing.append(f"{name}: from {source} import {imported}")
    assert crossing == []


def test_the_checks_read_real_edges_and_catch_planted_ones():
    # The checks above would pass on an empty graph: show that they see the real edges,
    # and that each rule fires on an edge planted against it.
    graph = edges()
    assert "camfunc._core.engine" in graph["camfunc._methods._gradient"]
    assert "camfunc._core.split" in graph["camfunc._core.engine"]
    assert upward_edges({"camfunc._core.engine": {"camfunc._methods._gradient"}}) != []
    assert upward_edges({"camfunc._core.split": {"camfunc._core.engine"}}) != []
    assert upward_edges({"camfunc.viz._figure": {"camfunc.zoo._scenes"}}) != []  # same rank
    assert upward_edges({"camfunc.runs._settings": {"camfunc"}}) != []
    assert upward_edges({"camfunc._tools.guided": {"camfunc._methods._gradient"}}) == []
    assert cycles_in({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
