"""ROAD and ARCC against pytorch-grad-cam 1.5.7, and ROAD's imputation by hand."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.metrics.arcc import ARCC, Coherency, Complexity
from pytorch_grad_cam.metrics.perturbation_confidence import (PerturbationConfidenceMetric,
                                                              RemoveLeastRelevantFirst,
                                                              RemoveMostRelevantFirst)
from pytorch_grad_cam.metrics.road import (NoisyLinearImputer, ROADCombined, ROADLeastRelevantFirst,
                                           ROADLeastRelevantFirstAverage, ROADMostRelevantFirst,
                                           ROADMostRelevantFirstAverage)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget

import camfunc
from camfunc import metrics
from helpers import assert_unchanged, small_cnn, snapshot

# pytorch-grad-cam's imputer calls np.argwhere on a torch tensor; numpy 2 warns
# about that from its own module, which pyproject's filters do not cover.
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")

CLASSES = [0, 2, 4]


@pytest.fixture(scope="module")
def setting():
    model = small_cnn()
    torch.manual_seed(1)
    x = torch.randn(3, 3, 10, 12)
    cams = torch.rand(3, 5, 6)  # coarser than the input: both sides see it upsampled
    return model, x, cams, camfunc.upsample(cams, (10, 12))


def pgc_targets(classes=CLASSES, target=ClassifierOutputTarget):
    return [target(c) for c in classes]


def pgc_noise(maps: torch.Tensor, percentiles, orders, channels: int, seed: int) -> torch.Tensor:
    """The standard-normal draws pytorch-grad-cam makes after ``torch.manual_seed(seed)``.

    Per imputation (its orders and percentiles, in its loop order), per image:
    ``randn_like(res.t())`` with ``res`` scipy's (n_removed, C) solution, which
    is Fortran-ordered, so ``res.t()`` is a contiguous (C, n_removed) tensor.
    The removed pixels (its rule, restated): ``not (m < percentile(m, p))``,
    ``m`` the map or ``1 - map``, filled in row-major order.
    """
    torch.manual_seed(seed)
    batch, height, width = maps.shape
    noise = torch.zeros(len(orders) * len(percentiles), batch, channels, height, width)
    step = 0
    for order in orders:
        for p in percentiles:
            for b in range(batch):
                m = maps[b].numpy() if order == "morf" else 1 - maps[b].numpy()
                removed = torch.from_numpy(~(m < np.percentile(m, p)))
                noise[step, b][:, removed] = torch.randn(channels, int(removed.sum()))
            step += 1
    return noise


# ----------------------------------------------------------------------------
# Against pytorch-grad-cam


@pytest.mark.parametrize("percentile", [10, 35, 50, 80, 90])
@pytest.mark.parametrize("order,removal", [("morf", RemoveMostRelevantFirst),
                                           ("lerf", RemoveLeastRelevantFirst)])
def test_one_percentile_matches_pytorch_grad_cam_without_noise(setting, percentile, order, removal):
    model, x, cams, up = setting
    metric = PerturbationConfidenceMetric(removal(percentile, NoisyLinearImputer(noise=0)))
    expected = torch.from_numpy(metric(x, up.numpy(), pgc_targets(), model))
    got = metrics.road_curve(model, x, cams, CLASSES, order=order, percentiles=[percentile],
                             noise_std=0.0)
    assert got.shape == (3, 1)
    torch.testing.assert_close(got[:, 0], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("order,reference", [("morf", ROADMostRelevantFirst),
                                             ("lerf", ROADLeastRelevantFirst)])
def test_single_road_class_matches_with_its_noise(setting, order, reference):
    model, x, cams, up = setting
    noise = pgc_noise(up, [30], [order], 3, seed=3)
    torch.manual_seed(3)
    expected = torch.from_numpy(reference(30)(x, up.numpy(), pgc_targets(), model))
    got = metrics.road(model, x, cams, CLASSES, order=order, percentiles=[30], noise=noise)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("order,reference", [("morf", ROADMostRelevantFirstAverage),
                                             ("lerf", ROADLeastRelevantFirstAverage),
                                             ("combined", ROADCombined)])
def test_averages_and_combined_match_pytorch_grad_cam(setting, order, reference):
    model, x, cams, up = setting
    percentiles = [20, 40, 60, 80]
    orders = ["lerf", "morf"] if order == "combined" else [order]
    noise = pgc_noise(up, percentiles, orders, 3, seed=7)
    torch.manual_seed(7)
    expected = torch.from_numpy(reference(percentiles)(x, up.numpy(), pgc_targets(), model))
    got = metrics.road(model, x, cams, CLASSES, order=order, percentiles=percentiles, noise=noise,
                       batch_size=5)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    # The noise is part of what is compared: leaving it out moves the result.
    silent = metrics.road(model, x, cams, CLASSES, order=order, percentiles=percentiles, noise_std=0.0)
    assert (silent - expected).abs().max() > 2e-6


def test_callable_target_matches_softmax_target(setting):
    model, x, cams, up = setting
    metric = PerturbationConfidenceMetric(RemoveMostRelevantFirst(60, NoisyLinearImputer(noise=0)))
    targets = pgc_targets([3, 3, 3], ClassifierOutputSoftmaxTarget)
    expected = torch.from_numpy(metric(x, up.numpy(), targets, model))

    def probability(out):
        return out.softmax(1)[:, 3]

    got = metrics.road_curve(model, x, cams, probability, order="morf", percentiles=[60], noise_std=0.0)
    torch.testing.assert_close(got[:, 0], expected, atol=1e-6, rtol=0)


def test_arcc_matches_pytorch_grad_cam_with_gradcam():
    model = small_cnn(channels=8, seed=2)
    torch.manual_seed(4)
    x = torch.randn(4, 3, 12, 12)
    classes = [0, 1, 3, 4]
    split = camfunc.split(model, "4")
    maps = camfunc.upsample(camfunc.gradcam(split, x, classes), x.shape[2:])
    reference_model = copy.deepcopy(model)
    base = GradCAM(model=reference_model, target_layers=[reference_model[4]])
    targets = pgc_targets(classes)
    percentiles = [20, 40, 60, 80]
    noise = pgc_noise(maps, percentiles, ["lerf", "morf"], 3, seed=11)
    torch.manual_seed(11)
    expected = torch.from_numpy(ARCC(base, road_percentiles=percentiles)(x, maps.numpy(), targets,
                                                                          reference_model))
    coherency = torch.from_numpy(Coherency()(x, maps.numpy(), targets, reference_model, base))
    complexity = torch.from_numpy(Complexity()(maps.numpy()))
    before = snapshot(model)
    got, parts = metrics.arcc(camfunc.gradcam, split, x, classes, noise=noise, return_parts=True)
    assert_unchanged(before, model)
    torch.testing.assert_close(parts["coherency"], coherency, atol=1e-5, rtol=0)
    torch.testing.assert_close(parts["complexity"], complexity.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got > 1e-3).sum() >= 2  # not every score is clipped to ~0 by a negative ROAD
    # Without maps, ARCC computes the method's own, the same ones.
    again = metrics.arcc(camfunc.gradcam, split, x, classes, noise=noise)
    torch.testing.assert_close(again, got)


# ----------------------------------------------------------------------------
# The imputation by hand


@pytest.mark.parametrize("rows,pixel,expected", [
    # centre: edge neighbour 6 with weight 1/6, corner neighbour 12 with 1/12, the rest 0
    ([[0.0, 0.0, 0.0], [0.0, 99.0, 6.0], [0.0, 0.0, 12.0]], (1, 1), 6 / 6 + 12 / 12),
    # corner: 3 neighbours inside, (6/6 + 12/6 + 24/12) / (1/6 + 1/6 + 1/12) = 5 / (5/12)
    ([[99.0, 6.0, 0.0], [12.0, 24.0, 0.0], [0.0, 0.0, 0.0]], (0, 0), 12.0),
])
def test_one_imputed_pixel_is_weighted_mean_of_neighbours(rows, pixel, expected):
    image = torch.tensor(rows).reshape(1, 1, 3, 3)
    removed = torch.zeros(1, 3, 3, dtype=torch.bool)
    removed[0, pixel[0], pixel[1]] = True
    filled = metrics.road_impute(image, removed, noise_std=0.0)
    assert filled[0, 0, pixel[0], pixel[1]].item() == pytest.approx(expected)
    assert torch.equal(filled[~removed.unsqueeze(1)], image[~removed.unsqueeze(1)])


def test_two_adjacent_removed_pixels_are_solved_jointly():
    # One row: only the left and right neighbours exist (weight 1/6 each), so
    # 2 x1 = x0 + x2 and 2 x2 = x1 + x3: x1 = (2 x0 + x3) / 3, x2 = (x0 + 2 x3) / 3.
    image = torch.tensor([3.0, -50.0, 50.0, 9.0]).reshape(1, 1, 1, 4).repeat(2, 2, 1, 1)
    image[1] *= -1
    removed = torch.tensor([False, True, True, False]).reshape(1, 1, 4).repeat(2, 1, 1)
    filled = metrics.road_impute(image, removed, noise_std=0.0)
    expected = torch.tensor([3.0, 5.0, 7.0, 9.0])
    torch.testing.assert_close(filled[0, 0, 0], expected)
    torch.testing.assert_close(filled[0, 1, 0], expected)
    torch.testing.assert_close(filled[1, 0, 0], -expected)


def test_noise_is_added_to_removed_pixels_only():
    torch.manual_seed(0)
    image = torch.randn(2, 3, 4, 5)
    noise = torch.randn(2, 3, 4, 5)
    removed = torch.rand(2, 4, 5) > 0.5
    removed[:, 0, 0] = False
    plain = metrics.road_impute(image, removed, noise_std=0.0)
    noisy = metrics.road_impute(image, removed, noise_std=0.5, noise=noise)
    mask = removed.unsqueeze(1).expand_as(image)
    torch.testing.assert_close(noisy[mask], plain[mask] + 0.5 * noise[mask])
    assert torch.equal(noisy[~mask], image[~mask])


def test_fully_removed_image_becomes_zeros_and_others_are_unaffected():
    torch.manual_seed(0)
    image = torch.randn(2, 3, 4, 4) + 5
    removed = torch.zeros(2, 4, 4, dtype=torch.bool)
    removed[0] = True
    removed[1, 1, 1] = True
    filled = metrics.road_impute(image, removed, noise_std=0.0)
    assert torch.equal(filled[0], torch.zeros(3, 4, 4))
    alone = metrics.road_impute(image[1:], removed[1:], noise_std=0.0)
    torch.testing.assert_close(filled[1:], alone)


@given(st.integers(0, 2 ** 16), st.integers(2, 6), st.integers(2, 6), st.floats(0.1, 0.9))
def test_imputation_stays_within_kept_range(seed, height, width, fraction):
    # Each imputed value is a weighted mean of its neighbours, so (discrete
    # maximum principle) the image's imputed values lie within its kept values' range.
    g = torch.Generator().manual_seed(seed)
    image = torch.randn((2, 2, height, width), generator=g, dtype=torch.float64)
    removed = torch.rand((2, height, width), generator=g) < fraction
    removed[:, 0, 0] = False
    filled = metrics.road_impute(image, removed, noise_std=0.0)
    for b in range(2):
        kept = image[b][:, ~removed[b]]
        low, high = kept.amin(1, keepdim=True), kept.amax(1, keepdim=True)
        imputed = filled[b][:, removed[b]]
        assert bool(((imputed >= low - 1e-9) & (imputed <= high + 1e-9)).all())
        assert torch.equal(filled[b][:, ~removed[b]], kept)


# ----------------------------------------------------------------------------
# Behaviour


def test_road_removes_the_pixels_pytorch_grad_cam_would():
    maps = torch.arange(20, dtype=torch.float32).reshape(1, 4, 5) / 19
    # 80th percentile of 0..19 (linear) is 15.2: values 16..19 are removed first
    morf = metrics._road.removed_at(maps, [80], "morf")[0, 0]
    assert morf.flatten().nonzero().squeeze(1).tolist() == [16, 17, 18, 19]
    lerf = metrics._road.removed_at(maps, [80], "lerf")[0, 0]
    assert lerf.flatten().nonzero().squeeze(1).tolist() == [0, 1, 2, 3]


def test_road_is_pure_and_batch_size_free(setting):
    model, x, cams, _ = setting
    before = snapshot(model)
    x_before, cams_before = x.clone(), cams.clone()
    g = torch.Generator().manual_seed(0)
    one = metrics.road(model, x, cams, CLASSES, batch_size=4, generator=g)
    g = torch.Generator().manual_seed(0)
    many = metrics.road(model, x, cams, CLASSES, batch_size=64, generator=g)
    torch.testing.assert_close(one, many, atol=1e-5, rtol=0)
    assert_unchanged(before, model)
    assert torch.equal(x, x_before) and torch.equal(cams, cams_before)
    curve = metrics.road_curve(model, x, cams, CLASSES, percentiles=[10, 90], noise_std=0.0)
    torch.testing.assert_close(
        metrics.road(model, x, cams, CLASSES, percentiles=[10, 90], noise_std=0.0), curve.mean(1))


def test_road_accepts_a_split_and_a_class_tensor(setting):
    model, x, cams, _ = setting
    split = camfunc.split(model, "4")
    by_split = metrics.road(split, x, cams, torch.tensor(CLASSES), noise_std=0.0)
    by_model = metrics.road(model, x, cams, CLASSES, noise_std=0.0)
    torch.testing.assert_close(by_split, by_model, atol=1e-6, rtol=0)


def test_default_class_is_each_images_top_class(setting):
    model, x, cams, _ = setting
    top = model(x).argmax(1)
    torch.testing.assert_close(metrics.road(model, x, cams, noise_std=0.0),
                               metrics.road(model, x, cams, top, noise_std=0.0))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"order": "best"}, ValueError, "order must be"),
    ({"percentiles": [120]}, ValueError, "percentiles"),
    ({"percentiles": []}, ValueError, "percentiles"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"noise_std": -0.1}, ValueError, "noise_std"),
    ({"noise": torch.zeros(2, 3, 3, 10, 12)}, ValueError, "noise must be"),
])
def test_road_errors(setting, kwargs, error, match):
    model, x, cams, _ = setting
    with pytest.raises(error, match=match):
        metrics.road(model, x, cams, CLASSES, **kwargs)


def test_road_input_errors(setting):
    model, x, cams, _ = setting
    with pytest.raises(ValueError, match="give one map per image"):
        metrics.road(model, x, cams[:2], CLASSES)
    with pytest.raises(ValueError, match="one target per sample"):
        metrics.road(model, x, cams, torch.tensor([[0, 1]] * 3))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        metrics.road(model, x[:, :, 0], cams[:, 0], CLASSES)
    with pytest.raises(ValueError, match="NaN or infinite"):
        metrics.road(model, x, cams * float("nan"), CLASSES)
    with pytest.raises(TypeError, match="callable"):
        metrics.road("model", x, cams, CLASSES)
    trained = copy.deepcopy(model).train()
    with pytest.raises(ValueError, match="training mode"):
        metrics.road(trained, x, cams, CLASSES)
    with pytest.raises(ValueError, match="bool tensor"):
        metrics.road_impute(x, torch.zeros(3, 10, 12))


def test_arcc_errors(setting):
    model, x, cams, _ = setting
    split = camfunc.split(model, "4")
    two_layers = camfunc.split(model, ["1", "4"])
    with pytest.raises(TypeError, match="fuse"):
        metrics.arcc(camfunc.gradcam, two_layers, x, CLASSES)
    with pytest.raises(ValueError, match=r"maps must be \(B, \*spatial\)"):
        metrics.arcc(camfunc.gradcam, split, x, CLASSES, maps=cams[0])
