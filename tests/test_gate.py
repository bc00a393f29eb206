"""The gate itself: what CI selects and replays is what the suite means.

- A core run (``pytest -m core``, on the oldest torch) collects every file that marks a
  test core, however the mark is written; conftest decides from the source, checked here
  against the marks the imported modules really carry.
- Tests keep the profile's example count unless they say why.
- No explicit ``@example`` is thrown away by ``assume()``: one that is would never run.
- The ci profile replays the committed example database read-only, from a fixed seed.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import re
import warnings
from pathlib import Path

import conftest
from hypothesis import settings
from hypothesis.database import ReadOnlyDatabase
from hypothesis.errors import HypothesisDeprecationWarning, UnsatisfiedAssumption

TESTS = Path(__file__).parent
TEST_FILES = sorted(TESTS.glob("test_*.py"))


def _marks(obj) -> list:
    marks = getattr(obj, "pytestmark", [])
    return marks if isinstance(marks, list) else [marks]


def carries_core(module) -> bool:
    """Whether the imported module has a test marked core (module, class or function mark)."""
    if any(m.name == "core" for m in _marks(module)):
        return True
    return any(any(m.name == "core" for m in _marks(obj)) for name, obj in vars(module).items()
               if name.startswith(("test", "Test")))


def test_a_core_run_collects_every_file_that_marks_a_test_core():
    disagree = [path.name for path in TEST_FILES
                if conftest.declares_core(path) != carries_core(importlib.import_module(path.stem))]
    assert disagree == []
    assert conftest.declares_core(TESTS / "test_compile_inductor.py")  # marks written as a list


def test_the_core_reading_sees_each_way_of_writing_the_mark(tmp_path):
    for text, core in [("pytestmark = pytest.mark.core\n", True),
                       ("pytestmark = [pytest.mark.core, pytest.mark.slow]\n", True),
                       ("import pytest\n@pytest.mark.core\ndef test_a():\n    pass\n", True),
                       ("pytestmark = pytest.mark.slow\n# pytestmark = pytest.mark.core\n", False),
                       ("x = 'pytestmark = pytest.mark.core'\n", False)]:
        (tmp_path / "test_x.py").write_text(text)
        assert conftest.declares_core(tmp_path / "test_x.py") is core, text


def test_tests_keep_the_profiles_example_count_unless_they_say_why():
    unexplained = [f"{path.name}:{number}" for path in TEST_FILES
                   for number, line in enumerate(path.read_text().splitlines(), 1)
                   if "max_examples=" in line and "# examples:" not in line]
    assert unexplained == []


def _parametrized(function) -> list[dict]:
    """Every combination of the function's pytest.mark.parametrize arguments."""
    axes = []
    for mark in _marks(function):
        if mark.name != "parametrize":
            continue
        names = [n.strip() for n in mark.args[0].split(",")] if isinstance(mark.args[0], str) \
            else list(mark.args[0])
        rows = [row.values if hasattr(row, "values") else row for row in mark.args[1]]
        axes.append([dict(zip(names, row if len(names) > 1 else (row,))) for row in rows])
    return [dict(item for part in combo for item in part.items()) for combo in itertools.product(*axes)]


def explicit_examples():
    for path in TEST_FILES:
        module = importlib.import_module(path.stem)
        for name, function in vars(module).items():
            examples = getattr(function, "hypothesis_explicit_examples", None)
            if name.startswith("test") and examples:
                yield path.stem, name, function, examples


def test_no_explicit_example_is_rejected_by_assume(tmp_path):
    found, rejected = 0, []
    for module, name, function, examples in explicit_examples():
        inner = function.hypothesis.inner_test
        wanted = set(inspect.signature(inner).parameters)
        for fixed, example in itertools.product(_parametrized(function), examples):
            arguments = {**fixed, **example.kwargs, **({"tmp_path": tmp_path} if "tmp_path" in wanted else {})}
            found += 1
            try:
                with warnings.catch_warnings():  # assume() outside @given warns, then rejects
                    warnings.simplefilter("ignore", HypothesisDeprecationWarning)
                    inner(*example.args, **arguments)
            except UnsatisfiedAssumption:
                rejected.append(f"{module}.{name}({fixed}, {example.kwargs})")
    assert found > 0
    assert rejected == []


def test_ci_replays_the_committed_examples_read_only_from_a_fixed_seed():
    ci = settings.get_profile("ci")
    assert isinstance(ci.database, ReadOnlyDatabase)
    assert Path(conftest.EXAMPLES).is_dir()
    assert isinstance(conftest.CI_SEED, int)
    assert not ci.derandomize  # the fixed seed decides, not a hash of each test's source
    source = inspect.getsource(conftest.pytest_configure)
    assert re.search(r"hypothesis_seed = str\(CI_SEED\)", source)


def test_the_hunt_turns_pytests_report_into_pinnable_examples():
    import hunt

    report = ("Falsifying example: test_raw_map_is_the_papers_formula_for_drawn_inputs(\n"
              "    name='xgradcam',\n    dims=2,\n    seed=43,\n    scale=1.78515625,\n"
              "    classes=[0, 0],\n)\nFAILED tests/test_paper_formulas.py::x - AssertionError\n")
    assert hunt.findings(report) == [(
        "test_raw_map_is_the_papers_formula_for_drawn_inputs",
        "@example(name='xgradcam', dims=2, seed=43, scale=1.78515625, classes=[0, 0])")]
    as_pytest_prints_it = ("E       Failing test case: test_a(\nE           edits=['add a hook', "
                           "'remove a hook'],\nE       )\n")
    assert hunt.findings(as_pytest_prints_it) == [
        ("test_a", "@example(edits=['add a hook', 'remove a hook'])")]
