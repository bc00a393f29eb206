"""Deletion and insertion: hand-computed curves, torchcam's metric, RISE's blur, properties, errors."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from scipy.ndimage import gaussian_filter
from torch import nn
from torchcam.metrics import DeletionInsertionMetric

from camfunc import metrics
from helpers import assert_unchanged, small_cnn, snapshot
from test_metrics_confidence import torchcam_summary


class WeightedSum(nn.Module):
    """Class 0's logit is sum(w * x) over every pixel and channel; class 1's is 0."""

    def __init__(self, weights: torch.Tensor | None = None):
        super().__init__()
        self.weights = weights

    def forward(self, x):
        total = (x if self.weights is None else x * self.weights).sum((1, 2, 3))
        return torch.stack([total, torch.zeros_like(total)], 1)


SUM = WeightedSum().eval()
X = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])      # one 1x2x2 image, sum 10
MAP = torch.tensor([[[0.1, 0.4], [0.3, 0.2]]])      # order: 2, 3, 4, then 1


def logits(fn, *args, **kwargs):
    return fn(SUM, *args, 0, probabilities=False, substrate="zeros", **kwargs)


def test_hand_computed_deletion_and_insertion():
    deleted = logits(metrics.deletion, X, MAP, step=1)
    assert deleted.curves.tolist() == [[10.0, 8.0, 5.0, 1.0, 0.0]]
    assert deleted.fractions.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert deleted.auc.tolist() == [pytest.approx(0.25 * (10 / 2 + 8 + 5 + 1 + 0 / 2))]
    inserted = logits(metrics.insertion, X, MAP, step=1)
    assert inserted.curves.tolist() == [[0.0, 2.0, 5.0, 9.0, 10.0]]
    assert inserted.auc.tolist() == [pytest.approx(0.25 * (0 / 2 + 2 + 5 + 9 + 10 / 2))]


def test_a_short_last_step_is_spaced_by_its_real_fraction():
    # step 3 of 4 pixels: 0, 3, then 4 moved.
    deleted = logits(metrics.deletion, X, MAP, step=3)
    assert deleted.curves.tolist() == [[10.0, 1.0, 0.0]]
    assert deleted.fractions.tolist() == [0.0, 0.75, 1.0]
    assert deleted.auc.item() == pytest.approx(0.75 * (10 + 1) / 2 + 0.25 * (1 + 0) / 2)


def test_ties_go_in_row_major_order():
    flat = torch.full((1, 2, 2), 0.5)
    assert logits(metrics.deletion, X, flat, step=1).curves.tolist() == [[10.0, 9.0, 7.0, 4.0, 0.0]]
    # A 1x1 map is constant once upsampled: the same order.
    tiny = torch.full((1, 1, 1, 1), 0.3)
    assert logits(metrics.deletion, X, tiny, step=1).curves.tolist() == [[10.0, 9.0, 7.0, 4.0, 0.0]]
    # Two tied pixels after the top one keep row-major order too.
    partly = torch.tensor([[[0.2, 0.9], [0.2, 0.2]]])
    assert logits(metrics.deletion, X, partly, step=1).curves.tolist() == [[10.0, 8.0, 7.0, 4.0, 0.0]]


def test_low_resolution_maps_order_the_upsampled_pixels():
    # A 1x2 map [low, high] upsampled to 2x4: the right half first, rows in order.
    x = torch.arange(1.0, 9.0).reshape(1, 1, 2, 4)  # [[1, 2, 3, 4], [5, 6, 7, 8]]
    maps = torch.tensor([[[0.0, 1.0]]])
    deleted = logits(metrics.deletion, x, maps, step=2)
    # Bilinear: columns 0..3 get 0, 0.25, 0.75, 1; so 4 and 8 go, then 3 and 7, ...
    assert deleted.curves.tolist() == [[36.0, 24.0, 14.0, 6.0, 0.0]]


def test_substrates():
    inserted = metrics.insertion(SUM, X, MAP, 0, step=1, probabilities=False, substrate=torch.ones(1))
    assert inserted.curves.tolist() == [[4.0, 5.0, 7.0, 10.0, 10.0]]  # pixel 1 replaces a 1
    doubled = metrics.deletion(SUM, X, MAP, 0, step=2, probabilities=False, substrate=lambda x: 2 * x)
    assert doubled.curves.tolist() == [[10.0, 15.0, 20.0]]


def rise_kernel() -> torch.Tensor:
    """RISE's ``gkern(11, 5)``: scipy's Gaussian filter (sigma 5) of a centred impulse."""
    impulse = np.zeros((11, 11))
    impulse[5, 5] = 1
    return torch.from_numpy(gaussian_filter(impulse, 5)).float()


def test_insertion_starts_from_rise_blur():
    x = torch.randn(2, 3, 13, 15, generator=torch.Generator().manual_seed(0))
    kernel = rise_kernel().expand(3, 1, 11, 11)
    blurred = F.conv2d(x, kernel, padding=5, groups=3)  # RISE: per channel, zero padding
    inserted = metrics.insertion(SUM, x, torch.rand(2, 4, 4), 0, probabilities=False)
    assert inserted.curves.shape == (2, 13 + 1)  # default step: one row's worth of pixels
    torch.testing.assert_close(inserted.curves[:, 0], blurred.sum((1, 2, 3)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(inserted.curves[:, -1], x.sum((1, 2, 3)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("probabilities", [True, False])
@pytest.mark.parametrize("size, steps", [(8, 5), (10, 7)])
def test_matches_torchcam_with_a_zero_baseline(size, steps, probabilities):
    model = small_cnn(classes=7, seed=1)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(3))
    maps, summary = torchcam_summary(model, x, "4", probabilities, DeletionInsertionMetric,
                                    steps=steps, batch_size=5)
    step = -(-size * size // steps)  # torchcam's positions per interval
    kwargs = {"step": step, "probabilities": probabilities}
    deleted = metrics.deletion(model, x, maps, **kwargs)
    inserted = metrics.insertion(model, x, maps, substrate="zeros", **kwargs)
    assert deleted.curves.shape == (3, steps + 1)
    assert deleted.mean_auc.item() == pytest.approx(summary["deletion_auc"], rel=1e-5)
    assert inserted.mean_auc.item() == pytest.approx(summary["insertion_auc"], rel=1e-5)


@given(seed=st.integers(0, 2**16), batch_size=st.integers(1, 40), step=st.integers(5, 70))
def test_batch_size_does_not_change_the_result(seed, batch_size, step):
    g = torch.Generator().manual_seed(seed)
    model = small_cnn(classes=4, seed=0)
    x = torch.randn(2, 3, 8, 8, generator=g)
    maps = torch.rand(2, 3, 3, generator=g)
    for fn in (metrics.deletion, metrics.insertion):
        reference = fn(model, x, maps, step=step, batch_size=1000)
        result = fn(model, x, maps, step=step, batch_size=batch_size)
        torch.testing.assert_close(result.curves, reference.curves, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result.auc, reference.auc, rtol=1e-5, atol=1e-6)


@given(seed=st.integers(0, 2**16), step=st.integers(1, 12))
def test_additive_model_curves_are_monotonic_and_the_true_order_is_best(seed, step):
    # With score = sum(w x) and w x >= 0 per pixel, deleting only lowers the score,
    # and ordering by w x is the best possible order for both games.
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, 4, 5, generator=g)
    weights = torch.rand(1, 1, 4, 5, generator=g)
    model = WeightedSum(weights).eval()
    truth = (weights * x)[:, 0]
    other = torch.rand(1, 4, 5, generator=g)
    run = functools.partial(metrics.deletion, model, x, cls=0, step=step, probabilities=False)
    best, some = run(truth), run(other)
    assert (best.curves.diff(dim=1) <= 1e-6).all() and (some.curves.diff(dim=1) <= 1e-6).all()
    assert best.auc.item() <= some.auc.item() + 1e-6
    run = functools.partial(metrics.insertion, model, x, cls=0, step=step, probabilities=False,
                            substrate="zeros")
    best, some = run(truth), run(other)
    assert (best.curves.diff(dim=1) >= -1e-6).all()
    assert best.auc.item() >= some.auc.item() - 1e-6


def test_probabilities_by_default_and_nothing_changes():
    model = small_cnn(classes=4)
    x = torch.randn(2, 3, 8, 8)
    x_before = x.clone()
    before = snapshot(model)
    result = metrics.deletion(model, x, torch.rand(2, 8, 8), step=16)
    assert result.curves.shape == (2, 5)
    assert ((result.curves >= 0) & (result.curves <= 1)).all()
    torch.testing.assert_close(result.curves[:, 0], model(x).softmax(1).amax(1).detach())
    assert_unchanged(before, model)
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"step": 0}, ValueError, r"step must be a positive int"),
    ({"batch_size": 0}, ValueError, r"batch_size must be a positive int"),
    ({"substrate": "noise"}, ValueError, r"'zeros', 'blur'"),
    ({"substrate": torch.zeros(3, 3)}, ValueError, r"does not broadcast"),
    ({"substrate": lambda x: 0.0}, TypeError, r"must return a tensor"),
    ({"maps": torch.rand(3, 4, 4)}, ValueError, r"3 maps but the batch has 2"),
    ({"maps": torch.rand(2, 4, 4, 4)}, ValueError, r"4 maps per image"),
    ({"maps": torch.full((2, 4, 4), float("inf"))}, ValueError, r"NaN or infinite"),
])
def test_bad_input(kwargs, error, message):
    model = small_cnn()
    before = snapshot(model)
    args = {"maps": torch.rand(2, 4, 4), **kwargs}
    maps = args.pop("maps")
    for fn in (metrics.deletion, metrics.insertion):
        with pytest.raises(error, match=message):
            fn(model, torch.randn(2, 3, 8, 8), maps, **args)
    assert_unchanged(before, model)
