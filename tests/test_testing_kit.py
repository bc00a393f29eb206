"""camfunc.testing, tested by use: camfunc's methods satisfy its properties, and a few
lines of a researcher's test find the planted bugs the issue names."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import camfunc
import camfunc.testing as kit

pytestmark = pytest.mark.core

EAGER_PROPERTIES = [name for name in kit.PROPERTIES if name != "compile_equivalent"]


@pytest.mark.parametrize("method", [camfunc.gradcam, camfunc.layercam, camfunc.hirescam],
                         ids=lambda m: m.__name__)
@pytest.mark.parametrize("name", EAGER_PROPERTIES)
@given(case=kit.cases())
def test_camfuncs_methods_have_the_kits_properties(method, name, case):
    kit.PROPERTIES[name](method, case)


@settings(max_examples=4)
@given(case=kit.cases(dims=st.just(2)))
def test_compiled_gradcam_equals_eager(case):
    kit.compile_equivalent(camfunc.gradcam, case)


def batch_normalised_gradcam(split, x, cls, **options):
    """A planted bug: normalising over the whole batch, not per map."""
    raw = camfunc.gradcam(split, x, cls, normalize=False)
    return raw / raw.amax().clamp_min(1e-12)


def classes_in_reverse(split, x, cls, **options):
    """A planted bug: a (B, K) call's maps in the wrong order."""
    maps = camfunc.gradcam(split, x, cls)
    return maps.flip(1) if isinstance(cls, torch.Tensor) and cls.ndim == 2 else maps


@pytest.mark.parametrize("bug, name, message", [
    (batch_normalised_gradcam, "batch_independent", "alone vs in its batch"),
    (classes_in_reverse, "class_axis_consistent", "class column"),
])
def test_a_few_lines_find_each_planted_bug(bug, name, message):
    @settings(max_examples=100, database=None)
    @given(case=kit.cases())
    def researchers_test(case):
        kit.PROPERTIES[name](bug, case)

    with pytest.raises(AssertionError, match=message) as failure:
        researchers_test()
    assert "on Case(" in str(failure.value)  # the shrunk counterexample, readable


def test_properties_name_the_failing_case():
    case = kit.Case.of(kit.KitNet(2, 3, 4, skip=True, batchnorm=False, deep_tail=False,
                                  activation="relu", inplace=False, seed=1),
                       "body", torch.randn(3, 2, 5, 5), torch.tensor([0, 1, 2]))
    with pytest.raises(AssertionError, match=r"sample \d alone.*\n  on Case\(KitNet at 'body'"):
        kit.batch_independent(batch_normalised_gradcam, case)
    with pytest.raises(AssertionError, match="maps hold NaN"):
        kit.unit_range(lambda s, x, c: torch.full((3, 5, 5), float("nan")), case)
    with pytest.raises(AssertionError, match="span"):
        kit.unit_range(lambda s, x, c: torch.full((3, 5, 5), 2.0), case)


@given(case=kit.cases(batch=st.just(3), forms=("classes",)))
def test_cases_draw_what_they_say(case):
    assert case.x.shape[0] == 3 and case.x.shape[1] == 2
    assert isinstance(case.cls, torch.Tensor) and case.cls.ndim == 2 and case.cls.shape[0] == 3
    with torch.no_grad():
        assert torch.allclose(case.split(case.x), case.model(case.x), atol=1e-5)


def test_property_matrix_finds_grad_campps_temperature_dependence():
    matrix = kit.property_matrix(["gradcam", "gradcampp"], ["logit_scale_invariant"], examples=10)
    assert matrix.cells["gradcam"]["logit_scale_invariant"].verdict == "holds"
    failure = matrix.cells["gradcampp"]["logit_scale_invariant"]
    assert failure.verdict == "fails" and "on Case(" in failure.detail
    with pytest.raises(ValueError, match="unknown properties"):
        kit.property_matrix(["gradcam"], ["no_such_property"])
