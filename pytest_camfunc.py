"""camfunc's pytest plugin, registered as ``camfunc`` (the ``pytest11`` entry point): fixtures
for property-based tests of CAM methods, and ``--camfunc-examples N``.

It lives outside the ``camfunc`` package and imports camfunc (and torch) only when a test
asks for one of its fixtures, so installing camfunc costs other test suites nothing.
Turn it off with ``-p no:camfunc``.

    def test_my_cam(camfunc_check):
        camfunc_check(my_cam)                          # every eager property; raises the first
        camfunc_check(my_cam, ["batch_independent"])   # counterexample, shrunk
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest

#: Hypothesis examples per property in ``camfunc_check`` without ``--camfunc-examples``.
DEFAULT_EXAMPLES = 20


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("camfunc", "camfunc: property-based tests of CAM methods")
    group.addoption("--camfunc-examples", type=int, default=None, metavar="N",
                    help="hypothesis examples per test for the whole run (and per property in "
                         "camfunc_check); failures print their @reproduce_failure blob")


def pytest_configure(config: pytest.Config) -> None:
    examples = config.getoption("camfunc_examples")
    if examples is None:
        return
    if examples < 1:
        raise pytest.UsageError(f"--camfunc-examples takes a positive count, got {examples}")
    from hypothesis import settings

    # On top of whatever profile is loaded: only the count and the replay blob change.
    settings.register_profile("camfunc-examples", parent=settings.default, max_examples=examples,
                              print_blob=True)
    settings.load_profile("camfunc-examples")


def pytest_report_header(config: pytest.Config) -> str | None:
    examples = config.getoption("camfunc_examples")
    return None if examples is None else f"camfunc: {examples} hypothesis examples per test"


@pytest.fixture
def camfunc_examples(request: pytest.FixtureRequest) -> int:
    """Examples per property: ``--camfunc-examples``, else 20."""
    examples = request.config.getoption("camfunc_examples")
    return DEFAULT_EXAMPLES if examples is None else int(examples)


@pytest.fixture
def camfunc_properties() -> dict[str, Callable[..., None]]:
    """``camfunc.testing.PROPERTIES``: name -> ``check(method, case, **options)``."""
    from camfunc.testing import PROPERTIES

    return PROPERTIES


@pytest.fixture
def camfunc_case() -> Any:
    """One fixed case, the same in every run: a 2-D KitNet with a skip connection across
    the cut and batch norm, a batch of three 6x6 inputs, one class per sample."""
    import torch

    from camfunc.testing import Case, KitNet

    net = KitNet(2, 4, 3, skip=True, batchnorm=True, deep_tail=False, activation="relu",
                 inplace=True, seed=0)
    x = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    return Case.of(net, "body", x, torch.tensor([0, 2, 1]))


@pytest.fixture
def camfunc_check(camfunc_examples: int) -> Callable[..., None]:
    """``check(method, properties=None, **options)``: searches ``camfunc_examples`` drawn
    cases per property (default: every property but ``compile_equivalent``) and raises the
    first counterexample, shrunk, as an ``AssertionError``."""
    from hypothesis import HealthCheck, given, settings

    from camfunc.testing import CASES_FOR, PROPERTIES, cases

    def check(method: Callable[..., Any], properties: Sequence[str] | None = None,
              **options: Any) -> None:
        def search(name: str) -> Callable[[], None]:
            @settings(max_examples=camfunc_examples, deadline=None, print_blob=True,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
            @given(case=cases(**CASES_FOR.get(name, {})))
            def holds(case: Any) -> None:
                PROPERTIES[name](method, case, **options)

            return holds

        names = [p for p in PROPERTIES if p != "compile_equivalent"] if properties is None \
            else list(properties)
        unknown = [p for p in names if p not in PROPERTIES]
        if unknown:
            raise ValueError(f"unknown properties {unknown}; choose from {list(PROPERTIES)}")
        for name in names:
            search(name)()

    return check
