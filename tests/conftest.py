import os
import random
import sys

# Tests import their shared helpers as a plain module.
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402
import tempfile  # noqa: E402

from hypothesis import settings  # noqa: E402
from hypothesis.database import DirectoryBasedExampleDatabase  # noqa: E402

# Timings on a shared 2-core machine are noise: no deadline in any profile.
# dev (the default): a quick search, the same every run.
# ci (HYPOTHESIS_PROFILE=ci, set by .ci/run): more examples, still the same every run: a
# landing gate must not be a lottery.
# hunt (HYPOTHESIS_PROFILE=hunt): many examples from a fresh seed each run (printed in the
# header); a failure prints the blob that replays it (@reproduce_failure), and what it finds
# is kept in a database outside the repository. Run it to look for counterexamples, then pin
# each one found as an @example.
settings.register_profile("dev", max_examples=15, deadline=None, derandomize=True)
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, print_blob=True)
settings.register_profile(
    "hunt", max_examples=200, deadline=None, derandomize=False, print_blob=True,
    database=DirectoryBasedExampleDatabase(os.path.join(tempfile.gettempdir(), "camfunc-hypothesis")))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.hookimpl(tryfirst=True)  # before hypothesis' own plugin reads the seed
def pytest_configure(config):
    """Under the hunt profile, one fresh seed for the whole run, unless one is given, so a
    failure found once can be replayed with ``--hypothesis-seed``."""
    if settings.get_current_profile_name() == "hunt" and config.getoption("hypothesis_seed") is None:
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
