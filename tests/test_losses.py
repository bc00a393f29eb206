"""camfunc.losses against their papers' formulas written out here, by hand and with numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

import camfunc
from camfunc import losses

pytestmark = pytest.mark.core


def test_hand_computed_values():
    maps = torch.tensor([[[1.0, 3.0], [0.0, 4.0]]])
    mask = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert losses.energy_outside(maps, mask).item() == pytest.approx(3 / 8)
    assert losses.right_reasons(maps, 1 - mask).item() == pytest.approx(9.0)
    inside = (math.exp(1 / 0.5) + math.exp(4 / 0.5)) / sum(math.exp(v / 0.5) for v in (1, 3, 0, 4))
    assert losses.soft_pointing(maps, mask, temperature=0.5).item() == pytest.approx(-math.log(inside))


maps_and_masks = st.integers(1, 3).flatmap(lambda b: st.tuples(
    hnp.arrays(np.float64, (b, 3, 4), elements=st.floats(0, 5)),
    hnp.arrays(np.float64, (b, 3, 4), elements=st.sampled_from([0.0, 1.0]))))


@given(maps_and_masks)
def test_energy_outside_and_right_reasons_follow_their_formulas(pair):
    maps, masks = pair
    outside = (maps * (1 - masks)).sum((1, 2)) / (maps.sum((1, 2)) + 1e-12)
    got = losses.energy_outside(torch.from_numpy(maps), torch.from_numpy(masks))
    assert got.item() == pytest.approx(outside.mean(), abs=1e-12)
    assert 0 <= got.item() <= 1
    penalty = ((maps * masks) ** 2).sum((1, 2)).mean()
    assert losses.right_reasons(torch.from_numpy(maps), torch.from_numpy(masks)).item() == pytest.approx(penalty)


@given(maps_and_masks, st.floats(0.01, 2.0))
def test_soft_pointing_is_minus_the_log_softmax_mass_inside(pair, temperature):
    maps, masks = pair
    flat, inside = maps.reshape(len(maps), -1), masks.reshape(len(masks), -1)
    weights = np.exp(flat / temperature - (flat / temperature).max(1, keepdims=True))
    weights /= weights.sum(1, keepdims=True)
    want = -np.log((weights * inside).sum(1) + 1e-12).mean()
    got = losses.soft_pointing(torch.from_numpy(maps), torch.from_numpy(masks), temperature=temperature)
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_maps_are_resized_to_the_masks_grid_and_class_axes_broadcast():
    maps = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])  # evidence in the top-right quarter
    mask = torch.zeros(1, 8, 8)
    mask[:, :4, 4:] = 1
    upsampled = camfunc.upsample(maps, (8, 8))
    want = (upsampled * (1 - mask)).sum() / upsampled.sum()
    assert losses.energy_outside(maps, mask).item() == pytest.approx(want.item())
    two = torch.stack([maps[0], maps[0]], 0).unsqueeze(0)  # (1, K=2, 2, 2)
    assert losses.energy_outside(two, mask).item() == pytest.approx(want.item())
    with pytest.raises(ValueError, match="masks"):
        losses.energy_outside(maps, torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="temperature"):
        losses.soft_pointing(maps, mask, temperature=0.0)


def test_attention_mining_is_the_class_probability_with_the_attended_region_erased():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.randn(2, 3, 6, 6)
    maps = torch.rand(2, 3, 3)
    attended = torch.sigmoid(10.0 * (nn.functional.interpolate(maps[:, None], size=(6, 6), mode="bilinear",
                                                               align_corners=False)[:, 0] - 0.5))
    erased = x - attended[:, None] * x  # Li et al. 2018, Eq. 3
    want = torch.softmax(model(erased), 1)[:, 2].mean()
    got = losses.attention_mining(model, x, maps, 2)
    torch.testing.assert_close(got, want)
    s = camfunc.split(model, "1")
    torch.testing.assert_close(losses.attention_mining(s, x, maps, torch.tensor([2, 2])), want)


def test_losses_train_through_differentiable_maps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    s = camfunc.split(model, "2")
    x = torch.randn(2, 3, 8, 8)
    mask = torch.zeros(2, 8, 8)
    mask[:, 2:6, 2:6] = 1
    maps = camfunc.gradcam(s, x, 1, differentiable=True)
    total = (losses.energy_outside(maps, mask) + losses.right_reasons(maps, 1 - mask)
             + losses.soft_pointing(maps, mask) + losses.attention_mining(s, x, maps, 1))
    total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model[0].weight.grad.abs().sum() > 0
