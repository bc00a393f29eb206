"""The pytest plugin (entry point ``camfunc``), used the way a researcher would: a test file
of a few lines run by pytest in a fresh process."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.core

RESEARCHERS_TESTS = '''
import camfunc
import camfunc.testing
from hypothesis import given


def batch_normalised_gradcam(split, x, cls, **options):
    raw = camfunc.gradcam(split, x, cls, normalize=False)
    return raw / raw.amax().clamp_min(1e-12)   # over the whole batch: a bug


def test_gradcam(camfunc_check):
    camfunc_check(camfunc.gradcam, ["batch_independent", "class_axis_consistent"])


def test_planted_bug_with_the_fixture(camfunc_check):
    camfunc_check(batch_normalised_gradcam, ["batch_independent"])


@given(camfunc.testing.cases())
def test_planted_bug_with_plain_hypothesis(case):
    camfunc.testing.PROPERTIES["batch_independent"](batch_normalised_gradcam, case)


def test_the_fixed_case(camfunc_case, camfunc_properties, camfunc_examples):
    assert camfunc_examples == 25
    camfunc_properties["deterministic"](camfunc.gradcam, camfunc_case)
'''


def test_a_researchers_file_finds_the_planted_bug_and_says_how_to_replay_it(pytester):
    pytester.makepyfile(test_mine=RESEARCHERS_TESTS)
    result = pytester.runpytest_subprocess("--camfunc-examples", "25", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(["camfunc: 25 hypothesis examples per test"])
    out = result.stdout.str()
    assert out.count("alone vs in its batch") >= 2 and "on Case(" in out
    assert out.count("@reproduce_failure(") >= 2  # each failure prints how to replay it
    assert "Falsifying example" in out or "Failing test case" in out  # hypothesis' words vary


def test_a_bad_example_count_is_a_usage_error(pytester):
    pytester.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess("--camfunc-examples", "0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--camfunc-examples takes a positive count, got 0*"])


def test_the_plugin_loads_without_importing_torch_and_can_be_turned_off(pytester):
    code = "import sys, pytest_camfunc; assert 'torch' not in sys.modules and 'camfunc' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    pytester.makepyfile(test_fixture="def test_fixture(camfunc_case):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:camfunc")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'camfunc_case' not found*"])
