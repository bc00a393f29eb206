import ast
import os
import random
import sys
from pathlib import Path

# pytester runs a researcher's test files against the installed plugin (tests/test_pytest_plugin.py).
pytest_plugins = ["pytester"]

# Ultralytics checks for a network on import; the tests build YOLO from configs and need none.
os.environ.setdefault("YOLO_OFFLINE", "1")

# Tests import their shared helpers as a plain module.
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402
import tempfile  # noqa: E402

from hypothesis import settings  # noqa: E402
from hypothesis.database import (  # noqa: E402
    DirectoryBasedExampleDatabase,
    MultiplexedDatabase,
    ReadOnlyDatabase,
)

# Timings on a shared 2-core machine are noise: no deadline in any profile.
# dev (the default): a quick search, the same every run.
# ci (HYPOTHESIS_PROFILE=ci, set by .ci/run): more examples, from one fixed seed (CI_SEED),
# after replaying the committed example database (EXAMPLES) read-only. The examples depend
# only on the tests' strategies and the pinned hypothesis: two clones of one commit run the
# same ones, and an edit elsewhere (a comment, a new module) changes none of them.
# hunt (HYPOTHESIS_PROFILE=hunt, tests/hunt.py): many examples from a fresh seed each run,
# saving what fails to a database of its own (and, with --save, to EXAMPLES, for CI to
# replay). It never gates a change; pin what it finds as @example.
# Tests keep the profile's example count; an override says why, on its line ("# examples:").
EXAMPLES = os.path.join(os.path.dirname(__file__), "hypothesis-examples")
CI_SEED = 20261205
HUNT_DATABASE = os.environ.get("CAMFUNC_HUNT_DATABASE",
                               os.path.join(tempfile.gettempdir(), "camfunc-hypothesis"))
settings.register_profile("dev", max_examples=15, deadline=None, derandomize=True, database=None)
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=False, print_blob=True,
                          database=ReadOnlyDatabase(DirectoryBasedExampleDatabase(EXAMPLES)))
settings.register_profile(
    "hunt", max_examples=200, deadline=None, derandomize=False, print_blob=True,
    database=MultiplexedDatabase(DirectoryBasedExampleDatabase(HUNT_DATABASE),
                                 ReadOnlyDatabase(DirectoryBasedExampleDatabase(EXAMPLES))))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.hookimpl(tryfirst=True)  # before hypothesis' own plugin reads the seed
def pytest_configure(config):
    """One seed for the whole run unless one is given, so that a failure can be replayed with
    ``--hypothesis-seed``: the fixed CI_SEED under ci, a fresh one under hunt."""
    if config.getoption("hypothesis_seed") is not None:
        return
    profile = settings.get_current_profile_name()
    if profile == "ci":
        config.option.hypothesis_seed = str(CI_SEED)
    elif profile == "hunt":
        config.option.hypothesis_seed = str(random.SystemRandom().randrange(2**32))


def pytest_report_header(config):
    seed = config.getoption("hypothesis_seed")
    if seed is not None:
        return f"hypothesis seed {seed}: rerun a failure with --hypothesis-seed={seed}"
    return None


def _is_core_mark(node: ast.AST) -> bool:
    """``pytest.mark.core`` (or ``mark.core``), also inside a list or tuple of marks."""
    if isinstance(node, (ast.List, ast.Tuple)):
        return any(_is_core_mark(item) for item in node.elts)
    return isinstance(node, ast.Attribute) and node.attr == "core" and \
        isinstance(node.value, ast.Attribute) and node.value.attr == "mark"


def declares_core(path) -> bool:
    """Whether a test file marks anything core: its ``pytestmark`` (a mark or a list of
    them), or a ``@pytest.mark.core`` on a test or class. Read from the source, not imported:
    a core run must not import files that need the reference libraries."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            if _is_core_mark(node.value):
                return True
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and any(
                _is_core_mark(d) for d in node.decorator_list):
            return True
    return False


def pytest_ignore_collect(collection_path, config):
    """A core run (``pytest -m core``, as on the oldest torch) does not import the modules
    that hold no core tests: they need the reference libraries, which are not installed there."""
    if config.getoption("markexpr") == "core" and collection_path.name.startswith("test_") \
            and collection_path.suffix == ".py":
        return not declares_core(collection_path)
    return None


@pytest.fixture(autouse=True)
def _keep_subnormal_floats():
    """Older inductor builds its CPU kernels with -ffast-math; with gcc 12, loading one turns on
    flush-to-zero for the whole thread, and later tests (hypothesis' float strategies among
    them) would see subnormals vanish. Each test starts with IEEE floats."""
    torch.set_flush_denormal(False)
    yield
