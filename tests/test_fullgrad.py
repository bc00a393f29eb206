"""FullGrad against pytorch-grad-cam, and its building blocks by hand."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision
from pytorch_grad_cam import FullGrad as PgcFullGrad
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

import camfunc
from helpers import assert_unchanged, small_cnn, snapshot


def test_fullgrad_matches_pytorch_grad_cam():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn((2, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    classes = [3, 5]
    before = snapshot(model)
    got = camfunc.fullgrad(model, x, classes)
    assert_unchanged(before, model)
    reference = PgcFullGrad(copy.deepcopy(model), [])
    want = reference(x, [ClassifierOutputTarget(c) for c in classes])
    reference.activations_and_grads.release()
    # cv2's linear resize and torch's bilinear agree to float rounding; pgc adds 1e-7 eps.
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)


def test_fullgrad_bias_term_by_hand_on_a_small_cnn():
    model = small_cnn()  # conv(bias) -> bn -> relu -> conv(bias) -> relu -> pool -> fc
    x = torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(1))
    xg = x.clone().requires_grad_()
    z1 = model[0](xg)
    z2 = model[1](z1)
    z3 = model[3](model[2](z2))
    score = model[5:](model[4](z3))[0, 2]
    gx, g1, g2, g3 = torch.autograd.grad(score, (xg, z1, z2, z3))
    bn = model[1]
    bn_bias = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)

    def per_channel(m):
        return camfunc.normalize(m.abs().detach(), spatial_dims=2).sum(1)

    want = (per_channel(x * gx) + per_channel(model[0].bias[None, :, None, None] * g1)
            + per_channel(bn_bias[None, :, None, None] * g2)
            + per_channel(model[3].bias[None, :, None, None] * g3))
    got = camfunc.fullgrad(model, x, 2, normalize=False)
    torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-5)


def test_fullgrad_takes_a_split_and_many_classes():
    model = small_cnn()
    x = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(2))
    both = camfunc.fullgrad(camfunc.split(model, "3"), x, torch.tensor([[0, 1], [2, 3]]))
    assert both.shape == (2, 2, 8, 8)
    torch.testing.assert_close(both[:, 1], camfunc.fullgrad(model, x, [1, 3]))
    with pytest.raises(ValueError, match="whole model"):
        camfunc.fullgrad(camfunc.Split(model[:4], model[4:]), x, 0)
    with pytest.raises(TypeError, match="takes the model"):
        camfunc.fullgrad(nn.functional.relu, x, 0)


def test_eigen_smoothed_fullgrad_matches_pytorch_grad_cam_up_to_its_sign():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn((2, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    classes = [3, 5]
    got = camfunc.fullgrad(model, x, classes, eigen_smooth=True)
    reference = PgcFullGrad(copy.deepcopy(model), [])
    want = reference(x, [ClassifierOutputTarget(c) for c in classes], eigen_smooth=True)
    reference.activations_and_grads.release()
    # pgc keeps the SVD's arbitrary sign, and min-max scaling a negated map gives 1 - map.
    for i in range(2):
        errors = [np.abs(got[i].numpy() - w).max() for w in (want[i], 1 - want[i])]
        assert min(errors) < 1e-4, errors
    assert not torch.allclose(got, camfunc.fullgrad(model, x, classes), atol=1e-2)
