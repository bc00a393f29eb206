import os
import sys

# Tests import their shared helpers as a plain module.
sys.path.insert(0, os.path.dirname(__file__))

from hypothesis import settings  # noqa: E402

# Timings on a shared 2-core machine are noise, and CI must be reproducible:
# no deadline, a fixed search, and a modest number of examples per property.
settings.register_profile("camfunc", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("camfunc")
