"""Model-randomisation sanity check, Spearman (against scipy) and SSIM (against the formula)."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import camfunc
from camfunc import metrics
from camfunc.metrics._sanity import reinitialise
from helpers import ResNetish, assert_unchanged, small_cnn, snapshot

X = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def run(model, **kwargs):
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return metrics.model_randomisation(model, "4", "gradcam", X, **kwargs)


def test_cascade_from_the_output_down_and_the_model_is_unchanged():
    model = small_cnn(classes=5)
    before = snapshot(model)
    x_before = X.clone()
    table = run(model)
    assert_unchanged(before, model)
    assert torch.equal(X, x_before)
    # small_cnn: conv "0", batch norm "1", conv "3", linear "7".
    assert table.reinitialised == ((), ("7",), ("7", "3"), ("7", "3", "1"), ("7", "3", "1", "0"))
    assert table.spearman.shape == table.spearman_abs.shape == table.ssim.shape == (5, 3)
    assert table.maps.shape == (5, 3, 16, 16)
    assert torch.equal(table.classes, model(X).argmax(1))
    # Step 0 is the user's model: the maps are the method's, and identical maps
    # have rank correlation and SSIM exactly 1 by their formulas.
    torch.testing.assert_close(table.maps[0], camfunc.gradcam(camfunc.split(model, "4"), X, table.classes))
    assert table.spearman[0].tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    assert table.spearman_abs[0].tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    assert table.ssim[0].tolist() == pytest.approx([1.0] * 3, abs=1e-6)


def test_similarity_drops_once_everything_is_reinitialised():
    table = run(small_cnn(classes=5))
    assert (table.spearman[-1] < 0.8).all()
    assert (table.ssim[-1] < 0.8).all()
    assert not torch.equal(table.maps[-1], table.maps[0])


def test_the_generator_makes_it_reproducible_and_leaves_the_global_rng_alone():
    model = small_cnn(classes=5)
    state = torch.get_rng_state()
    first, second = run(model, steps=2), run(model, steps=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first.maps, second.maps)
    other = run(model, steps=2, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(first.maps[-1], other.maps[-1])


def test_steps_and_modules_choose_the_cascade():
    model = ResNetish().eval()
    before = snapshot(model)
    table = metrics.model_randomisation(model, "block2", camfunc.gradcam, X, 2, steps=2)
    assert table.reinitialised == ((), ("fc",), ("fc", "block2.conv2"))
    assert table.classes.tolist() == [2, 2, 2]
    table = metrics.model_randomisation(model, model.block2, "scorecam", X, [0, 1, 2],
                                        modules=["stem.0", ""])
    assert table.reinitialised == ((), ("stem.0",), ("stem.0", ""))
    assert (table.spearman[1] < 0.99).all()  # the stem feeds everything
    assert_unchanged(before, model)


def test_a_method_with_options_through_partial():
    method = functools.partial(camfunc.gradcampp, normalize=False)
    table = metrics.model_randomisation(small_cnn(), "4", method, X, 0, steps=1)
    torch.testing.assert_close(table.maps[0], camfunc.gradcampp(camfunc.split(small_cnn(), "4"), X, 0,
                                                                normalize=False))


def test_reinitialise_draws_from_the_default_bounds():
    model = small_cnn(channels=6, classes=5)
    g = torch.Generator().manual_seed(0)
    linear, norm = model[7], model[1]
    reinitialise(linear, g)
    reinitialise(norm, g)
    bound = 1 / math.sqrt(6)  # fan-in of Linear(6, 5)
    assert linear.weight.abs().max() <= bound and linear.bias.abs().max() <= bound
    assert linear.weight.abs().max() > 0.5 * bound
    assert norm.weight.abs().max() <= 1 and norm.weight.std() > 0.1


@st.composite
def paired_maps(draw):
    batch, n = draw(st.integers(1, 3)), draw(st.integers(2, 30))
    values = st.integers(-3, 3) | st.floats(-5, 5, allow_nan=False, width=32)
    a = draw(st.lists(st.lists(values, min_size=n, max_size=n), min_size=batch, max_size=batch))
    b = draw(st.lists(st.lists(values, min_size=n, max_size=n), min_size=batch, max_size=batch))
    return torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)


@given(paired_maps())
def test_spearman_equals_scipy(pair):
    a, b = pair
    assume(all(len(set(row.tolist())) > 1 for row in torch.cat([a, b])))  # scipy: constant -> nan
    ours = metrics.spearman(a, b)
    expected = [scipy.stats.spearmanr(ra.numpy(), rb.numpy()).statistic for ra, rb in zip(a, b)]
    assert ours.tolist() == pytest.approx(expected, abs=1e-6)
    # Maps of any shape are flattened.
    assert metrics.spearman(a.reshape(a.shape[0], 1, -1), b.reshape(b.shape[0], 1, -1)).tolist() == \
        pytest.approx(expected, abs=1e-6)


def test_spearman_of_a_constant_map_is_nan():
    rho = metrics.spearman(torch.ones(2, 5), torch.rand(2, 5))
    assert torch.isnan(rho).all()


def gaussian_window(size: int, sigma: float) -> np.ndarray:
    t = np.arange(size) - size // 2
    g = np.exp(-t ** 2 / (2 * sigma ** 2))
    window = np.outer(g, g)
    return window / window.sum()


def ssim_by_windows(a: np.ndarray, b: np.ndarray, size=11, sigma=1.5, data_range=1.0) -> float:
    """Wang et al.'s SSIM, window by window, Gaussian-weighted statistics."""
    w = gaussian_window(size, sigma)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for i in range(a.shape[0] - size + 1):
        for j in range(a.shape[1] - size + 1):
            pa, pb = a[i:i + size, j:j + size], b[i:i + size, j:j + size]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
            cov = (w * (pa - ma) * (pb - mb)).sum()
            values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


@pytest.mark.parametrize("shape, kwargs", [((13, 15), {}), ((12, 12), {"window_size": 7, "sigma": 1.0}),
                                           ((11, 11), {"data_range": 2.0})])
def test_ssim_equals_the_formula(shape, kwargs):
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, *shape, generator=g)
    b = (a + 0.3 * torch.rand(2, *shape, generator=g)).clamp(0, 1)
    ours = metrics.ssim(a, b, **kwargs)
    size, sigma = kwargs.get("window_size", 11), kwargs.get("sigma", 1.5)
    expected = [ssim_by_windows(a[i].double().numpy(), b[i].double().numpy(), size, sigma,
                                kwargs.get("data_range", 1.0)) for i in range(2)]
    assert ours.tolist() == pytest.approx(expected, abs=1e-6)


def test_ssim_of_identical_maps_is_one():
    a = torch.rand(3, 20, 17)
    assert metrics.ssim(a, a).tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    assert metrics.ssim(torch.zeros(1, 11, 11), torch.zeros(1, 11, 11)).item() == pytest.approx(1.0)
    assert metrics.ssim(a, 1 - a).max() < 0.5


@pytest.mark.parametrize("call, error, message", [
    (lambda m: metrics.model_randomisation(camfunc.split(m, "4"), "4", "gradcam", X), TypeError, r"nn\.Module"),
    (lambda m: metrics.model_randomisation(m, "9", "gradcam", X), ValueError, r"unknown layer '9'"),
    (lambda m: metrics.model_randomisation(m, "4", "gradcamm", X), ValueError, r"unknown method 'gradcamm'"),
    (lambda m: metrics.model_randomisation(m, "4", 3, X), TypeError, r"method must be"),
    (lambda m: metrics.model_randomisation(m, "4", "gradcam", X, steps=5), ValueError, r"steps must be an int from 0 to 4"),
    (lambda m: metrics.model_randomisation(m, "4", "gradcam", X, modules=["2"]), ValueError, r"own parameters"),
    (lambda m: metrics.model_randomisation(m, "4", "gradcam", X, modules=["7", "7"]), ValueError, r"twice"),
    (lambda m: metrics.model_randomisation(m, "4", "gradcam", X, modules="7"), TypeError, r"sequence of module names"),
    (lambda m: metrics.model_randomisation(m, "4", "gradcam", X, camfunc.topk(2)), TypeError, r"one target per image.*topk"),
    (lambda m: metrics.model_randomisation(m, "4", "gradcam", X, generator=0), TypeError, r"torch\.Generator"),
    (lambda m: metrics.model_randomisation(m, "4", "gradcam", X, torch.zeros(3, 2, dtype=torch.long)),
     ValueError, r"several classes"),
    (lambda m: metrics.model_randomisation(m, "4", lambda s, x, c: torch.zeros(3), X), ValueError,
     r"one map per image"),
    (lambda m: metrics.spearman(torch.rand(2, 4), torch.rand(2, 5)), ValueError, r"same shape"),
    (lambda m: metrics.ssim(torch.rand(2, 8, 8), torch.rand(2, 8, 8)), ValueError, r"window_size=11"),
    (lambda m: metrics.ssim(torch.rand(2, 12, 12), torch.rand(2, 12, 12), window_size=4), ValueError, r"odd"),
])
def test_bad_input(call, error, message):
    model = small_cnn()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        call(model)
    assert_unchanged(before, model)


def test_training_mode_is_refused():
    model = small_cnn().train()
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        metrics.model_randomisation(model, "4", "gradcam", X)
    assert all(m.training for m in model.modules())
