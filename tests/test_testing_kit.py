"""camfunc.testing, tested by use: camfunc's methods satisfy its properties, and a few
lines of a researcher's test find the planted bugs the issue names."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import camfunc
import camfunc.testing as kit

pytestmark = pytest.mark.core

EAGER_PROPERTIES = [name for name in kit.PROPERTIES if name != "compile_equivalent"]
# Layer-CAM's maps barely move when the tail is redrawn (docs/properties.md says why).
HOLDING = [(m, name) for m in (camfunc.gradcam, camfunc.layercam, camfunc.hirescam)
           for name in EAGER_PROPERTIES
           if (m, name) != (camfunc.layercam, "randomisation_sensitive")]


@pytest.mark.parametrize("method, name", HOLDING, ids=lambda v: getattr(v, "__name__", v))
@given(data=st.data())
def test_camfuncs_methods_have_the_kits_properties(method, name, data):
    case = data.draw(kit.cases(**kit.CASES_FOR.get(name, {})))
    kit.PROPERTIES[name](method, case)


@settings(max_examples=4)  # examples: each is a torch.compile, seconds on 2 cores
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
    @settings(max_examples=100, database=None)  # examples: a researcher's budget, whatever the profile
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


def _cut(split, x):
    carry = split.head(x)
    return carry[0] if isinstance(carry, tuple) else carry


def channel_index_weighted(split, x, cls, **options):
    """A planted bug: channel k weighted by k + 1, so the map depends on how channels are stored."""
    a = _cut(split, x)
    w = torch.arange(1, a.shape[1] + 1, dtype=a.dtype).view(1, -1, *[1] * (a.ndim - 2))
    return camfunc.normalize((w * a).sum(1).clamp_min(0))


def stem_weighted(split, x, cls, **options):
    """A planted bug: channels weighted by the stem's stored weights, not by what the model computes."""
    a = _cut(split, x)
    w = split.model.stem.weight.detach().flatten(1).sum(1).view(1, -1, *[1] * (a.ndim - 2))
    return camfunc.normalize((w * a).sum(1).clamp_min(0))


def centre_biased_gradcam(split, x, cls, **options):
    """A planted bug: a map tilted towards one end of the last axis."""
    maps = camfunc.gradcam(split, x, cls, normalize=False)
    return camfunc.normalize(maps * torch.linspace(1.0, 2.0, maps.shape[-1]))


@pytest.mark.parametrize("bug, name, message, options", [
    (channel_index_weighted, "channel_permutation_invariant", "channels permuted as", {}),
    (stem_weighted, "implementation_invariant", "functionally equal model built otherwise",
     {"layouts": ("channels_first",)}),
    (centre_biased_gradcam, "translation_equivariant", "shifted by 1", {}),
    (camfunc.eigencam, "randomisation_sensitive", "Spearman rank correlation of 1.000", {}),
])
def test_a_few_lines_find_each_planted_bug_of_the_model_properties(bug, name, message, options):
    @settings(max_examples=100, database=None)  # examples: a researcher's budget, whatever the profile
    @given(case=kit.cases(**{**options, **kit.CASES_FOR.get(name, {})}))
    def researchers_test(case):
        kit.PROPERTIES[name](bug, case)

    with pytest.raises(AssertionError, match=message) as failure:
        researchers_test()
    assert "on Case(" in str(failure.value)


@given(case=kit.cases())
def test_a_kit_models_twin_computes_the_same_function_and_its_redraw_another(case):
    with torch.no_grad():
        want = case.model(case.x)
        assert torch.allclose(case.model.twin()(case.x), want, atol=1e-5, rtol=1e-4)
        redrawn = kit.randomised(case.model, seed=3)
        assert not torch.equal(redrawn(case.x), want)
        assert torch.equal(_cut(case.with_model(redrawn, "redrawn").split, case.x), _cut(case.split, case.x))
    tail = {id(p) for m in case.model.tail_modules() for p in m.parameters()}
    for p, q in zip(case.model.parameters(), redrawn.parameters()):
        assert torch.equal(p, q) == (id(p) not in tail)  # the tail redrawn, the rest kept


@given(case=kit.cases(circular=True), shift=st.integers(1, 3))
def test_circular_kit_models_have_scores_invariant_to_shifts(case, shift):
    dims = tuple(range(2, case.x.ndim))
    with torch.no_grad():
        moved = case.model(case.x.roll((shift,) * len(dims), dims))
        assert torch.allclose(moved, case.model(case.x), atol=1e-5, rtol=1e-4)


def test_model_properties_refuse_cases_they_cannot_judge():
    plain = kit.Case.of(kit.KitNet(2, 3, 4, skip=False, batchnorm=False, deep_tail=False,
                                   activation="relu", inplace=False, seed=1),
                        "body", torch.randn(2, 2, 5, 5), 0)
    with pytest.raises(ValueError, match="circular"):
        kit.translation_equivariant(camfunc.gradcam, plain)
    other = kit.KitNet(2, 3, 4, skip=False, batchnorm=False, deep_tail=False, activation="relu",
                       inplace=False, seed=2)
    with pytest.raises(ValueError, match="another function"):
        kit.implementation_invariant(camfunc.gradcam, plain, twin=other)
    users_model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                      torch.nn.LazyLinear(2))
    users_model(torch.randn(1, 2, 5, 5))
    users = kit.Case.of(users_model.eval(), "1", torch.randn(2, 2, 5, 5), 0)
    with pytest.raises(ValueError, match="twin="):
        kit.implementation_invariant(camfunc.gradcam, users)
    with pytest.raises(ValueError, match="randomised="):
        kit.randomisation_sensitive(camfunc.gradcam, users)


def test_the_tutorial_runs_as_written():
    import doctest
    from pathlib import Path

    tutorial = Path(__file__).resolve().parent.parent / "docs" / "testing.md"
    result = doctest.testfile(str(tutorial), module_relative=False, report=True,
                              optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 10 and result.failed == 0
