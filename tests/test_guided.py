"""Guided backpropagation and Guided Grad-CAM."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from pytorch_grad_cam import GuidedBackpropReLUModel
from torch import nn

import camfunc
from helpers import assert_unchanged, snapshot


def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


def image(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn((batch, 3, size, size), generator=torch.Generator().manual_seed(seed))


def test_guided_backprop_matches_pytorch_grad_cam_one_image_at_a_time():
    model = resnet18()
    x = image()
    classes = [3, 5]
    got = camfunc.guided_backprop(model, x, classes)
    for i, c in enumerate(classes):
        reference = GuidedBackpropReLUModel(copy.deepcopy(model), device="cpu")
        want = torch.from_numpy(reference(x[i:i + 1].clone(), target_category=c)).permute(2, 0, 1)
        assert want.abs().max() > 0
        torch.testing.assert_close(got[i], want, atol=1e-7, rtol=1e-5)


class FunctionalReLUs(nn.Module):
    """ReLUs as a function, a tensor method and an in-place module."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.c(self.act(self.b(F.relu(self.a(x))).relu()))


def test_every_relu_form_is_guided_and_matches_the_rule_by_hand():
    model = FunctionalReLUs().eval()
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    got = camfunc.guided_backprop(model, x, [0, 2])
    # By hand: backward through each ReLU keeps relu(grad) where its input was positive.
    with torch.no_grad():
        h1 = model.a(x)
        h2 = model.b(h1.clamp_min(0))
        h3 = h2.clamp_min(0)  # .relu(); the in-place module then sees h3
    r = model.c.weight[[0, 2]]  # dS/dh4
    r = r.clamp_min(0) * (h3 > 0)  # module ReLU, input h3
    r = r.clamp_min(0) * (h2 > 0)  # .relu(), input h2
    r = (r @ model.b.weight).clamp_min(0) * (h1 > 0)  # F.relu, input h1
    want = r @ model.a.weight
    torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=1e-5)


def test_model_is_untouched_and_classes_batch():
    model = resnet18()
    before = snapshot(model)
    relus = [id(m) for m in model.modules() if isinstance(m, nn.ReLU)]
    x = image()
    many = camfunc.guided_backprop(model, x, torch.tensor([[3, 5], [1, 2]]))
    assert many.shape == (2, 2, 3, 32, 32)
    torch.testing.assert_close(many[:, 1], camfunc.guided_backprop(model, x, [5, 2]))
    assert_unchanged(before, model)
    assert relus == [id(m) for m in model.modules() if isinstance(m, nn.ReLU)]


def test_guided_gradcam_is_the_product():
    model = resnet18()
    x = image(size=64)
    s = camfunc.split(model, "layer4")
    got = camfunc.guided_gradcam(s, x, [3, 5])
    heat = camfunc.upsample(camfunc.gradcam(s, x, [3, 5]), (64, 64))
    torch.testing.assert_close(got, camfunc.guided_backprop(model, x, [3, 5]) * heat[:, None])


def test_guided_gradcam_needs_the_model():
    model = resnet18()
    s = camfunc.Split(lambda v: v, model)
    with pytest.raises(ValueError, match=r"split\.model"):
        camfunc.guided_gradcam(s, image(), 1)
