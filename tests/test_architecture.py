"""The package's layering: imports point down, never up, and never in a circle.

Read from the source (every import, at module level or inside a function, and
``importlib.import_module("camfunc...")`` / ``__import__`` with a literal name), so
a call-time import that works around a cycle is caught too. Every module belongs
to a listed group; ``camfunc`` (the package's namespace) is the ``__init__`` alone.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

import camfunc

pytestmark = pytest.mark.core

PACKAGE = pathlib.Path(camfunc.__file__).parent

# Each group may import only groups with a smaller rank (and itself). The applications
# (testing, runs, cli) sit above the package's namespace: they are built on the public API.
RANK = {
    "camfunc._version": 0, "camfunc._util": 0,
    "camfunc._core": 1, "camfunc.io": 1,
    "camfunc._methods": 2, "camfunc.zoo": 2, "camfunc.viz": 2, "camfunc.targets": 2,
    "camfunc._tools": 3,
    "camfunc.metrics": 4, "camfunc.losses": 4,
    "camfunc.models": 5,
    "camfunc.evidence": 6,
    "camfunc": 7,
    "camfunc.testing": 8, "camfunc.runs": 8,
    "camfunc.cli": 9,
    "camfunc.__main__": 10,
}
APPLICATIONS = ("camfunc.testing", "camfunc.runs", "camfunc.cli", "camfunc.__main__")
# The namespace hands out ``camfunc.runs`` on first use (its ``__getattr__``), once the
# namespace is whole: not an edge at import time.
LAZY = {("camfunc", "camfunc.runs")}
# Inside the core: the Split value first, the capture and the splitter (layer choice and
# layouts) last.
CORE_ORDER = ["split", "targets", "ops", "contrastive", "validate", "layout", "cut", "engine", "detection",
              "splitter"]


def module_files() -> dict[str, pathlib.Path]:
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("camfunc", *path.relative_to(PACKAGE).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    return files


MODULES = module_files()


def dynamic_import(node: ast.AST) -> str | None:
    """The literal module name of ``import_module("...")``, ``importlib.import_module("...")``
    or ``__import__("...")``."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    function = node.func
    called = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
    first = node.args[0]
    if called in ("import_module", "__import__") and isinstance(first, ast.Constant) \
            and isinstance(first.value, str):
        return first.value
    return None


def imports_of(name: str, source_text: str | None = None) -> list[tuple[str, str]]:
    """``(module, imported name)`` for each ``from module import name`` (name '' for ``import``
    and for a dynamic import of a literal name)."""
    path = MODULES.get(name)
    package = name if path is not None and path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    text = source_text if source_text is not None else path.read_text()
    for node in ast.walk(ast.parse(text)):
        literal = dynamic_import(node)
        if literal is not None and literal.split(".")[0] == "camfunc":
            found.append((literal, ""))
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join([*base, node.module] if node.module else base) if node.level else node.module
            if source and source.split(".")[0] == "camfunc":
                found += [(source, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.split(".")[0] == "camfunc"]
    return found


def targets_of(name: str, source_text: str | None = None) -> set[str]:
    targets = set()
    for source, imported in imports_of(name, source_text):
        as_module = f"{source}.{imported}"
        targets.add(as_module if as_module in MODULES else source)
    return {t for t in targets if t in MODULES and t != name}


def edges() -> dict[str, set[str]]:
    return {name: {t for t in targets_of(name) if (name, t) not in LAZY} for name in MODULES}


def in_group(name: str, group_name: str) -> bool:
    """``camfunc`` holds the package's ``__init__`` only; every other group its sub-modules too."""
    return name == group_name or (group_name != "camfunc" and name.startswith(group_name + "."))


def group(name: str) -> str:
    return max((g for g in RANK if in_group(name, g)), key=len)


def core_position(name: str) -> int:
    return CORE_ORDER.index(name.split(".")[2])


def test_every_module_belongs_to_a_ranked_group():
    assert [m for m in MODULES if not any(in_group(m, g) for g in RANK)] == []
    # A new top-level module is in no group until it is ranked: it cannot hide in "camfunc".
    assert not any(in_group("camfunc.newtool", g) for g in RANK)
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
                if RANK[mine] <= RANK["camfunc"]:
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
    assert upward_edges({"camfunc.metrics._sanity": {"camfunc"}}) != []
    assert upward_edges({"camfunc.runs._settings": {"camfunc"}}) == []  # an application
    assert upward_edges({"camfunc.testing._properties": {"camfunc.runs._job"}}) != []
    assert upward_edges({"camfunc._tools.guided": {"camfunc._methods._gradient"}}) == []
    assert cycles_in({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_a_dynamic_import_is_an_edge_like_any_other():
    planted = ("import importlib\n"
               "def later():\n"
               "    return importlib.import_module('camfunc.runs._job')\n"
               "def sooner():\n"
               "    return __import__('camfunc.cli')\n")
    found = targets_of("camfunc._core.engine", planted)
    assert found == {"camfunc.runs._job", "camfunc.cli"}
    assert upward_edges({"camfunc._core.engine": found}) != []
    # A user's module named at run time (a model spec) is not the package's edge.
    assert targets_of("camfunc.models._loading", "import importlib\nimportlib.import_module(name)\n") == set()


def is_public(module: str) -> bool:
    return not any(part.startswith("_") for part in module.split(".")[1:])


def private_reaches(imports: dict[str, list[tuple[str, str]]]) -> list[str]:
    """Each import by an application of a private module or name outside the application:
    ``camfunc._core``, ``camfunc.models._loading``, another application's ``_job``, ..."""
    reaches = []
    for name, found in imports.items():
        application = next((a for a in APPLICATIONS if in_group(name, a)), None)
        if application is None:
            continue
        for source, imported in found:
            as_module = f"{source}.{imported}"
            target = as_module if as_module in MODULES else source
            if in_group(target, application):
                continue
            private_name = imported.startswith("_") and imported != "__version__"
            if not is_public(target) or (target == source and private_name):
                reaches.append(f"{name}: from {source} import {imported or '*'}")
    return reaches


def test_applications_import_only_public_names():
    # testing, runs and cli are built on what users get: camfunc's namespace, its public
    # modules (io, metrics, models, viz, zoo, ...), and other applications' public names.
    assert private_reaches({name: imports_of(name) for name in MODULES}) == []


def test_the_public_boundary_catches_planted_reaches():
    planted = ("from camfunc._core import engine\n"
               "from camfunc.models._loading import load_model\n"
               "from camfunc.runs._dataset import open_data\n"
               "from camfunc import _methods\n"
               "from camfunc import split, models\n"
               "from camfunc.cli._common import table\n")
    found = private_reaches({"camfunc.cli._explain": imports_of("camfunc.cli._explain", planted)})
    assert found == ["camfunc.cli._explain: from camfunc._core import engine",
                     "camfunc.cli._explain: from camfunc.models._loading import load_model",
                     "camfunc.cli._explain: from camfunc.runs._dataset import open_data",
                     "camfunc.cli._explain: from camfunc import _methods"]
    # The rule is for applications only: the methods build on the core.
    assert private_reaches({"camfunc._methods._gradient": imports_of("camfunc._methods._gradient")}) == []
    assert private_reaches({"camfunc.runs._job": imports_of("camfunc.runs._job")}) == []


def test_the_namespace_loads_runs_on_first_use():
    # What LAZY claims: importing camfunc does not import runs, and camfunc.runs still works.
    code = ("import sys, camfunc\n"
            "assert 'camfunc.runs' not in sys.modules\n"
            "assert camfunc.runs.run is sys.modules['camfunc.runs'].run\n"
            "assert 'runs' in dir(camfunc)\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)


def test_the_namespace_lists_its_names_explicitly():
    # __all__ is one literal list, with no star import: what camfunc exports is read, not run.
    tree = ast.parse(MODULES["camfunc"].read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                and any(alias.name == "*" for alias in n.names)]
    listed = [n.value for n in tree.body if isinstance(n, ast.Assign)
              and [getattr(t, "id", None) for t in n.targets] == ["__all__"]]
    assert len(listed) == 1 and isinstance(listed[0], ast.List)
    names = [element.value for element in listed[0].elts if isinstance(element, ast.Constant)]
    assert names == camfunc.__all__ and len(set(names)) == len(names)
    assert [n for n in names if not hasattr(camfunc, n)] == []
    assert sorted(set(camfunc.METHODS) - set(names)) == []


def test_the_methods_package_exports_every_registered_method():
    import camfunc._methods as methods

    assert sorted(set(camfunc.METHODS) - set(methods.__all__)) == []
    assert [n for n in methods.__all__ if not hasattr(methods, n)] == []
    assert [n for n in methods.__all__ if n in camfunc.METHODS or n == "sess"] == [
        n for n in camfunc.__all__ if n in camfunc.METHODS or n == "sess"]  # one order


def test_types_are_checked_strictly_and_nothing_is_ignored():
    import tomllib

    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["mypy"]
    strict = ("disallow_untyped_defs", "disallow_incomplete_defs", "warn_return_any",
              "no_implicit_reexport")
    assert {flag: config.get(flag) for flag in strict} == dict.fromkeys(strict, True)
    ignored = [path.name for path in PACKAGE.rglob("*.py") if "type: ignore" in path.read_text()]
    assert ignored == []
