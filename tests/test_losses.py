"""camfunc.losses against their papers' formulas written out here, by hand and with numpy."""

from __future__ import annotations

import copy
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


# ----------------------------------------------------------------------------
# Gradients, against finite differences (float64 gradcheck)


def smooth_maps(shape, seed):
    return torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) + 0.1


def a_mask(shape, seed):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.5).double()


@pytest.mark.parametrize("loss", ["energy_outside", "right_reasons", "soft_pointing"])
@pytest.mark.parametrize("maps_shape", [(2, 3, 4), (2, 2, 3, 4), (2, 3)])  # (B, sp), (B, K, sp), 1-D
def test_each_losss_gradient_with_respect_to_the_maps(loss, maps_shape):
    spatial = 1 if len(maps_shape) == 2 else 2
    masks = a_mask((2, *[2 * n for n in maps_shape[-spatial:]]), 1)  # another grid: resized first
    maps = smooth_maps(maps_shape, 0).requires_grad_()
    function = {"energy_outside": losses.energy_outside, "right_reasons": losses.right_reasons,
                "soft_pointing": lambda m, k: losses.soft_pointing(m, k, temperature=0.3)}[loss]
    assert torch.autograd.gradcheck(lambda m: function(m, masks), (maps,))
    (grad,) = torch.autograd.grad(function(maps, masks), maps)
    assert grad.abs().sum() > 0


def gain_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Softplus(), nn.Conv2d(4, 4, 3, padding=1),
                         nn.Softplus(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double().eval()


def test_attention_minings_gradient_with_respect_to_the_maps_and_the_input():
    model = gain_model()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    maps = smooth_maps((2, 3, 3), 2)
    inputs = (maps.requires_grad_(), x.requires_grad_())
    # sharpness 4: the sigmoid's slope stays where finite differences in float64 are exact.
    assert torch.autograd.gradcheck(
        lambda m, v: losses.attention_mining(model, v, m, torch.tensor([2, 0]), sharpness=4.0), inputs)
    grads = torch.autograd.grad(losses.attention_mining(model, x, maps, 2, sharpness=4.0), inputs)
    assert all(g.abs().sum() > 0 for g in grads)  # erasing depends on the map: its gradient is not zero


def test_attention_minings_gradient_through_the_model_and_its_differentiable_maps():
    # GAIN's full path: the loss on the erased input depends on the model's parameters
    # through the classifier on x* and through the Grad-CAM that chose what to erase.
    model = gain_model()
    s = camfunc.split(model, "2")
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    cls = torch.tensor([1, 2])

    class Gain(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            maps = camfunc.gradcam(s, x, cls, differentiable=True, normalize=False)
            return losses.attention_mining(s, x, maps / 0.05, cls, sharpness=4.0)

    gain = Gain()
    head_weight = model[0].weight.detach().clone().requires_grad_()
    tail_weight = model[6].weight.detach().clone().requires_grad_()

    def of(w0, w6, x):
        return torch.func.functional_call(gain, {"model.0.weight": w0, "model.6.weight": w6}, (x,))

    inputs = (head_weight, tail_weight, x.requires_grad_())
    assert torch.autograd.gradcheck(of, inputs)
    # The maps' path alone (the classifier on x* is a copy): it reaches the head's weights.
    maps = camfunc.gradcam(s, x.detach(), cls, differentiable=True, normalize=False)
    (through_maps,) = torch.autograd.grad(losses.attention_mining(copy.deepcopy(model), x.detach(), maps / 0.05,
                                                                  cls, sharpness=4.0), model[0].weight)
    assert through_maps.abs().sum() > 0
