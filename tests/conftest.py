import hashlib
import os
import random
import subprocess
import sys

# pytester runs a researcher's test files against the installed plugin (tests/test_pytest_plugin.py).
pytest_plugins = ["pytester"]

# Tests import their shared helpers as a plain module.
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402
import tempfile  # noqa: E402

from hypothesis import settings  # noqa: E402
from hypothesis.database import DirectoryBasedExampleDatabase  # noqa: E402

# Timings on a shared 2-core machine are noise: no deadline in any profile.
# dev (the default): a quick search, the same every run.
# ci (HYPOTHESIS_PROFILE=ci, set by .ci/run): more examples, from a seed taken from the code
# and tests under test (git's tree hashes of camfunc/ and tests/). A new change explores new
# examples, yet one commit always runs the same ones: the gate is reproducible (what passed
# here passes on CI), not a lottery. The seed is printed in the header; a failure also
# prints its @reproduce_failure blob.
# hunt (HYPOTHESIS_PROFILE=hunt): many examples from a fresh seed each run, and a database
# of what it finds kept outside the repository. Run it to look for counterexamples, then pin
# each one found as an @example.
# dev and ci keep no example database: replaying examples saved by earlier runs (a hunt, a
# run against broken code) would make the same command test different examples.
settings.register_profile("dev", max_examples=15, deadline=None, derandomize=True, database=None)
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=False, database=None,
                          print_blob=True)
settings.register_profile(
    "hunt", max_examples=200, deadline=None, derandomize=False, print_blob=True,
    database=DirectoryBasedExampleDatabase(os.path.join(tempfile.gettempdir(), "camfunc-hypothesis")))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def code_seed() -> int:
    """A seed from the committed trees of camfunc/ and tests/ (0 outside a git checkout)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        trees = subprocess.run(["git", "rev-parse", "HEAD:camfunc", "HEAD:tests"], cwd=root,
                               capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    return int(hashlib.sha256(trees.encode()).hexdigest()[:8], 16)


@pytest.hookimpl(tryfirst=True)  # before hypothesis' own plugin reads the seed
def pytest_configure(config):
    """One seed for the whole run unless one is given, so that a failure can be replayed with
    ``--hypothesis-seed``: the code's under ci, a fresh one under hunt."""
    if config.getoption("hypothesis_seed") is not None:
        return
    profile = settings.get_current_profile_name()
    if profile == "ci":
        config.option.hypothesis_seed = str(code_seed())
    elif profile == "hunt":
        config.option.hypothesis_seed = str(random.SystemRandom().randrange(2**32))


def pytest_report_header(config):
    seed = config.getoption("hypothesis_seed")
    if seed is not None:
        return f"hypothesis seed {seed}: rerun a failure with --hypothesis-seed={seed}"
    return None


def pytest_ignore_collect(collection_path, config):
    """A core run (``pytest -m core``, as on the oldest torch) does not import the modules
    that hold no core tests: they need the reference libraries, which are not installed there."""
    if config.getoption("markexpr") == "core" and collection_path.name.startswith("test_") \
            and collection_path.suffix == ".py":
        return "pytestmark = pytest.mark.core" not in collection_path.read_text(encoding="utf-8")
    return None


@pytest.fixture(autouse=True)
def _keep_subnormal_floats():
    """Older inductor builds its CPU kernels with -ffast-math; with gcc 12, loading one turns on
    flush-to-zero for the whole thread, and later tests (hypothesis' float strategies among
    them) would see subnormals vanish. Each test starts with IEEE floats."""
    torch.set_flush_denormal(False)
    yield
