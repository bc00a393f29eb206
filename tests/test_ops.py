"""normalize, upsample, fuse: hand-computed cases and invariants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import camfunc

pytestmark = pytest.mark.core


def test_normalize_hand_computed():
    cams = torch.tensor([[[1.0, 3.0], [5.0, 2.0]]])
    expected = torch.tensor([[[0.0, 0.5], [1.0, 0.25]]])
    torch.testing.assert_close(camfunc.normalize(cams), expected)


def test_normalize_constant_and_zero_maps_give_zeros():
    cams = torch.stack([torch.full((3, 3), 7.0), torch.zeros(3, 3)])
    out = camfunc.normalize(cams)
    assert torch.equal(out, torch.zeros_like(out))


def test_normalize_per_map_with_class_axis():
    cams = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)  # (B, K, W)
    out = camfunc.normalize(cams, spatial_dims=1)
    torch.testing.assert_close(out, torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]).expand(2, 3, 4))


@given(scale=st.floats(1e-12, 1e12), seed=st.integers(0, 1000))
def test_normalize_does_not_depend_on_scale(scale, seed):
    cams = torch.rand((2, 5, 5), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(camfunc.normalize(cams * scale), camfunc.normalize(cams),
                               atol=1e-6, rtol=1e-5)


@given(seed=st.integers(0, 1000), shift=st.floats(-10, 10))
def test_normalize_range_and_extremes(seed, shift):
    cams = torch.randn((3, 4, 6), generator=torch.Generator().manual_seed(seed)) + shift
    out = camfunc.normalize(cams)
    assert torch.allclose(out.flatten(1).amin(1), torch.zeros(3))
    assert torch.allclose(out.flatten(1).amax(1), torch.ones(3))


def test_upsample_matches_interpolate_and_keeps_leading_axes():
    cams = torch.rand(2, 3, 4, 5)
    out = camfunc.upsample(cams, (8, 10))
    want = F.interpolate(cams, size=(8, 10), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, want)
    assert camfunc.upsample(torch.rand(2, 4), 8).shape == (2, 8)
    assert camfunc.upsample(torch.rand(2, 2, 2, 2), (4, 4, 4)).shape == (2, 4, 4, 4)


def test_upsample_of_a_constant_is_that_constant():
    out = camfunc.upsample(torch.full((1, 3, 3), 0.25), (7, 9))
    torch.testing.assert_close(out, torch.full((1, 7, 9), 0.25))


def test_upsample_rejects_bad_sizes():
    with pytest.raises(ValueError, match="1 to 3 spatial sizes"):
        camfunc.upsample(torch.rand(2, 3), (4, 4, 4, 4))


def test_fuse_max_and_mean_at_the_finest_resolution():
    coarse = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # (1, 2, 2)
    fine = torch.full((1, 4, 4), 0.5)
    up = F.interpolate(coarse[None], size=(4, 4), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(camfunc.fuse([coarse, fine], "max"), torch.maximum(up, fine))
    torch.testing.assert_close(camfunc.fuse([coarse, fine], "mean"), (up + fine) / 2)


def test_fuse_tanh_scaling_as_in_layercam():
    cam = torch.tensor([[[0.0, 1.0], [2.0, 4.0]]])
    want = torch.tanh(2.0 * cam / 4.0)
    torch.testing.assert_close(camfunc.fuse([cam], tanh_gamma=2.0), want)
    zeros = camfunc.fuse([torch.zeros(1, 2, 2)], tanh_gamma=2.0)
    assert torch.equal(zeros, torch.zeros(1, 2, 2))


def test_fuse_errors():
    with pytest.raises(ValueError, match="at least one"):
        camfunc.fuse([])
    with pytest.raises(ValueError, match="'max', 'mean' or 'product'"):
        camfunc.fuse([torch.rand(1, 2, 2)], "median")
