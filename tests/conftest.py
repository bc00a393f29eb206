import os
import sys

# Tests import their shared helpers as a plain module.
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# Timings on a shared 2-core machine are noise, and CI must be reproducible:
# no deadline, a fixed search, and a modest number of examples per property.
settings.register_profile("camfunc", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("camfunc")


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
