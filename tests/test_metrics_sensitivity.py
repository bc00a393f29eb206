"""Infidelity and max-sensitivity against captum 0.9.0, and by hand."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from captum.metrics import infidelity as captum_infidelity
from captum.metrics import sensitivity_max as captum_sensitivity_max
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import camfunc
from camfunc import metrics
from helpers import assert_unchanged, small_cnn, snapshot

CLASSES = torch.tensor([0, 2, 4])


@pytest.fixture(scope="module")
def setting():
    model = small_cnn()
    split = camfunc.split(model, "4")
    torch.manual_seed(1)
    x = torch.randn(3, 3, 10, 12)
    return model, split, x


def captum_rows(per_sample: torch.Tensor) -> torch.Tensor:
    """``(N, B, ...)`` -> captum's expanded order, row ``b * N + n``."""
    return per_sample.transpose(0, 1).reshape(-1, *per_sample.shape[2:])


def broadcast_attribution(maps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The attribution tensor the docs promise: upsampled, repeated over channels."""
    return camfunc.upsample(maps, like.shape[2:]).unsqueeze(1).expand_as(like).contiguous()


class WeightedSum(nn.Module):
    """f(x) = sum(w * x), one output column."""

    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.weights = nn.Parameter(weights)

    def forward(self, x):
        return (x * self.weights).flatten(1).sum(1, keepdim=True)


# ----------------------------------------------------------------------------
# Infidelity


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("batch_size", [4, 64])
def test_infidelity_matches_captum(setting, normalize, batch_size):
    model, split, x = setting
    cams = camfunc.gradcam(split, x, CLASSES)
    samples = 6
    perturbations = 0.2 * torch.randn(samples, *x.shape, generator=torch.Generator().manual_seed(3))

    def perturb(inputs):
        flat = captum_rows(perturbations)
        return flat, inputs - flat

    expected = captum_infidelity(model, perturb, x, broadcast_attribution(cams, x), target=CLASSES,
                                 n_perturb_samples=samples, normalize=normalize)
    got = metrics.infidelity(model, x, cams, CLASSES, perturbations=perturbations,
                             normalize=normalize, batch_size=batch_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-9)


def test_infidelity_of_a_linear_model_by_hand():
    # f(x) = w . x; attribution w * x (gradient times input), perturbations I1, I2.
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x = torch.tensor([[1.0, 0.0], [2.0, 1.0]]).reshape(1, 1, 2, 2)
    model = WeightedSum(w).eval()
    perturbations = torch.tensor([[[1.0, 0.0], [0.0, 0.0]],
                                  [[0.0, 1.0], [1.0, 0.0]]]).reshape(2, 1, 1, 2, 2)
    # I.phi = (1, 6); f(x) - f(x - I) = I.w = (1, 5).
    attribution = (w * x)[:, 0]  # (1, 2, 2): one map, the input's size
    plain = metrics.infidelity(model, x, attribution, 0, perturbations=perturbations, normalize=False)
    assert plain.item() == pytest.approx(((1 - 1) ** 2 + (6 - 5) ** 2) / 2)
    # beta = (1*1 + 6*5) / (1 + 36) = 31/37: ((31/37 - 1)^2 + (186/37 - 5)^2) / 2 = 1/74.
    scaled = metrics.infidelity(model, x, attribution, 0, perturbations=perturbations)
    assert scaled.item() == pytest.approx(1 / 74)
    # The gradient itself explains a linear model exactly.
    exact = metrics.infidelity(model, x, w.unsqueeze(0), 0, perturbations=perturbations, normalize=False)
    assert exact.item() == pytest.approx(0.0, abs=1e-12)


@given(st.floats(1e-3, 1e3), st.integers(0, 2 ** 16))
def test_normalized_infidelity_ignores_the_maps_scale(scale, seed):
    model = small_cnn()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((2, 3, 6, 6), generator=g)
    maps = torch.rand((2, 3, 3), generator=g)
    perturbations = 0.2 * torch.randn((4, 2, 3, 6, 6), generator=g)
    one = metrics.infidelity(model, x, maps, [1, 2], perturbations=perturbations)
    scaled = metrics.infidelity(model, x, scale * maps, [1, 2], perturbations=perturbations)
    torch.testing.assert_close(scaled, one, rtol=1e-4, atol=1e-10)


def test_infidelity_draws_are_reproducible_and_batch_size_free(setting):
    model, split, x = setting
    cams = camfunc.gradcam(split, x, CLASSES)
    before = snapshot(model)
    x_before, cams_before = x.clone(), cams.clone()
    runs = [metrics.infidelity(model, x, cams, CLASSES, n_perturb_samples=5, batch_size=b,
                               generator=torch.Generator().manual_seed(0)) for b in (2, 64)]
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-5, atol=1e-10)
    # the same draws, given: std * standard normal per sample, in order
    g = torch.Generator().manual_seed(0)
    given_draws = torch.stack([0.2 * torch.randn(x.shape, generator=g) for _ in range(5)])
    torch.testing.assert_close(metrics.infidelity(model, x, cams, CLASSES, perturbations=given_draws),
                               runs[1], rtol=1e-5, atol=1e-10)
    assert_unchanged(before, model)
    assert torch.equal(x, x_before) and torch.equal(cams, cams_before)


def test_infidelity_default_class_is_each_images_top_class(setting):
    model, split, x = setting
    cams = camfunc.gradcam(split, x, CLASSES)
    draws = 0.2 * torch.randn(3, *x.shape, generator=torch.Generator().manual_seed(1))
    top = model(x).argmax(1)
    torch.testing.assert_close(metrics.infidelity(model, x, cams, perturbations=draws),
                               metrics.infidelity(model, x, cams, top, perturbations=draws))


# ----------------------------------------------------------------------------
# Max-sensitivity


@pytest.mark.parametrize("norm_ord", ["fro", 1, math.inf])
def test_sensitivity_max_matches_captum(setting, norm_ord):
    model, split, x = setting
    samples = 5
    g = torch.Generator().manual_seed(5)
    deltas = torch.empty(samples, *x.shape).uniform_(-0.05, 0.05, generator=g)

    def explain(inputs, target):
        inputs = inputs[0] if isinstance(inputs, tuple) else inputs
        return (broadcast_attribution(camfunc.gradcam(split, inputs, target), inputs),)

    def perturb(inputs):
        return inputs + captum_rows(deltas)

    expected = captum_sensitivity_max(explain, x, perturb_func=perturb, n_perturb_samples=samples,
                                      norm_ord=norm_ord, target=CLASSES)
    got = metrics.sensitivity_max(camfunc.gradcam, split, x, CLASSES, perturbations=deltas,
                                  norm_ord=norm_ord, batch_size=4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert bool((got > 0).all())


def test_sensitivity_max_by_hand():
    # An "explanation" equal to the input's only channel: the change is ||delta|| / ||x||.
    def identity_method(split, x, cls):
        return x[:, 0]

    model = WeightedSum(torch.ones(1, 2)).eval()
    x = torch.tensor([3.0, 4.0]).reshape(1, 1, 1, 2)
    deltas = torch.tensor([[0.01, 0.0], [0.03, 0.04], [0.0, -0.02]]).reshape(3, 1, 1, 1, 2)
    got = metrics.sensitivity_max(identity_method, model, x, 0, perturbations=deltas)
    assert got.item() == pytest.approx(0.05 / 5)  # max(0.01, 0.05, 0.02) / 5
    l1 = metrics.sensitivity_max(identity_method, model, x, 0, perturbations=deltas, norm_ord=1)
    assert l1.item() == pytest.approx(0.07 / 7)


def test_sensitivity_of_an_input_blind_method_is_zero(setting):
    model, split, x = setting

    def constant_method(split, x, cls):
        return torch.ones(x.shape[0], 2, 2)

    got = metrics.sensitivity_max(constant_method, split, x, CLASSES,
                                  generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, torch.zeros(3))


def test_sensitivity_fixes_classes_on_the_clean_input_and_keeps_the_model(setting):
    model, split, x = setting
    before = snapshot(model)
    seen = []

    def recording_gradcam(split, x, cls):
        seen.append(cls)
        return camfunc.gradcam(split, x, cls)

    top = metrics.sensitivity_max(recording_gradcam, split, x, camfunc.topk(1), n_perturb_samples=3,
                                  generator=torch.Generator().manual_seed(0), batch_size=4)
    best = split(x).argmax(1)
    assert torch.equal(seen[0], best)
    # 3 perturbations x 3 samples, row r of sample r % 3, in chunks of 4 rows
    sample = torch.arange(9) % 3
    assert [c.tolist() for c in seen[1:]] == [best[sample[i:i + 4]].tolist() for i in (0, 4, 8)]
    by_index = metrics.sensitivity_max(camfunc.gradcam, split, x, best, n_perturb_samples=3,
                                       generator=torch.Generator().manual_seed(0), batch_size=4)
    torch.testing.assert_close(top, by_index)
    assert_unchanged(before, model)
    partial = functools.partial(camfunc.gradcam, normalize=False)
    assert metrics.sensitivity_max(partial, split, x, best, n_perturb_samples=2).shape == (3,)


# ----------------------------------------------------------------------------
# Errors


def test_errors(setting):
    model, split, x = setting
    cams = camfunc.gradcam(split, x, CLASSES)
    with pytest.raises(ValueError, match="perturbations must be a tensor of shape"):
        metrics.infidelity(model, x, cams, CLASSES, perturbations=torch.zeros(2, 3, 3, 10))
    with pytest.raises(ValueError, match="perturbations must be a tensor of shape"):
        metrics.infidelity(model, x, cams, CLASSES, n_perturb_samples=3,
                           perturbations=torch.zeros(2, *x.shape))
    with pytest.raises(ValueError, match="std must be"):
        metrics.infidelity(model, x, cams, CLASSES, std=-1.0)
    with pytest.raises(ValueError, match="n_perturb_samples"):
        metrics.infidelity(model, x, cams, CLASSES, n_perturb_samples=0)
    with pytest.raises(ValueError, match="maps per image"):
        metrics.infidelity(model, x, torch.stack([cams, cams], 1), CLASSES)
    with pytest.raises(ValueError, match="norm_ord"):
        metrics.sensitivity_max(camfunc.gradcam, split, x, CLASSES, norm_ord="nuc")
    with pytest.raises(ValueError, match="radius"):
        metrics.sensitivity_max(camfunc.gradcam, split, x, CLASSES, radius=float("nan"))
    with pytest.raises(TypeError, match="fuse"):
        metrics.sensitivity_max(camfunc.gradcam, camfunc.split(model, ["1", "4"]), x, CLASSES)
    with pytest.raises(TypeError, match="method must be"):
        metrics.sensitivity_max("gradcam", split, x, CLASSES)
    with pytest.raises(IndexError, match="out of range"):
        metrics.sensitivity_max(camfunc.gradcam, split, x, 9)
