"""Finer-CAM and Shapley-CAM: targets built from the scores."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given
from hypothesis import strategies as st
from pytorch_grad_cam import ShapleyCAM as PgcShapleyCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputReST
from torch import nn
from torchcam.methods import FinerCAM as TcFinerCAM
from torchcam.methods import GradCAM as TcGradCAM
from torchcam.methods import LayerCAM as TcLayerCAM

import camfunc
from helpers import small_cnn


def image(batch: int = 2, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn((batch, 3, size, size), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method, base", [("gradcam", TcGradCAM), ("layercam", TcLayerCAM)])
@pytest.mark.parametrize("comparison", [None, [0, 2]])
def test_finercam_matches_torchcam(method, base, comparison):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = image(size=64)
    with torch.no_grad():
        classes = model(x).argmax(1).tolist()
    ref_model = copy.deepcopy(model)
    extractor = TcFinerCAM(ref_model, "layer4", input_shape=(3, 64, 64), base_method=base)
    scores = ref_model(x)
    (want,) = extractor(classes, scores, comparison_idx=comparison, normalized=False)
    extractor.remove_hooks()
    got = camfunc.finercam(camfunc.split(model, "layer4"), x, classes,
                           method=camfunc.METHODS[method], references=comparison, normalize=False)
    assert want.flatten(1).amax(1).min() > 0
    torch.testing.assert_close(camfunc.normalize(got), camfunc.normalize(want), atol=1e-5, rtol=0)


def test_finer_target_formula():
    scores = torch.tensor([[5.0, 4.0, 1.0, 4.5, -2.0], [0.0, 3.0, 2.9, 3.2, 1.0]], requires_grad=True)
    value = camfunc.finer([0, 1], gamma=0.5, num_references=2)(scores)
    # Sample 0: target 5, nearest 4.5 and 4.0. Sample 1: target 3, nearest 2.9 and 3.2.
    torch.testing.assert_close(value, torch.tensor([5 - 0.5 * 4.25, 3 - 0.5 * 3.05]))
    (grad,) = torch.autograd.grad(value.sum(), scores)
    want = torch.tensor([[1.0, -0.25, 0.0, -0.25, 0.0], [0.0, 1.0, -0.25, -0.25, 0.0]])
    torch.testing.assert_close(grad, want)


def test_finercam_with_a_perturbation_method_is_that_method_on_the_finer_score_written_out():
    model = small_cnn()
    s = camfunc.split(model, "4")
    x = image()
    classes = [1, 2]

    def finer_by_hand(out):  # y_c - 0.6 * mean of the 3 logits nearest y_c (chosen on the clean output)
        rows = []
        for b, c in enumerate(classes):
            gaps = (out[b] - out[b, c]).abs().detach()
            gaps[c] = float("inf")
            nearest = gaps.topk(3, largest=False).indices
            rows.append(out[b, c] - 0.6 * out[b, nearest].mean())
        return torch.stack(rows)

    got = camfunc.finercam(s, x, classes, method=camfunc.scorecam, normalize=False)
    want = camfunc.scorecam(s, x, finer_by_hand, normalize=False)
    assert want.amax() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad, message", [({"gamma": -1.0}, "gamma"), ({"num_references": 0}, "num_references")])
def test_finer_rejects_bad_options(bad, message):
    with pytest.raises(ValueError, match=message):
        camfunc.finer(0, **bad)


def test_shapleycam_matches_pytorch_grad_cam():
    # A model that keeps 8x8 all the way to the cut, so pytorch-grad-cam's resize to the
    # input size is the identity and its normalised output can be compared directly.
    model = small_cnn()
    x = image()
    classes = [1, 3]
    ref_model = copy.deepcopy(model)
    extractor = PgcShapleyCAM(model=ref_model, target_layers=[ref_model[4]])
    want = extractor(input_tensor=x, targets=[ClassifierOutputReST(c) for c in classes])
    extractor.activations_and_grads.release()
    got = camfunc.shapleycam(camfunc.split(model, "4"), x, classes)
    assert np.asarray(want).max() > 0
    # pytorch-grad-cam divides by max + 1e-7, so allow that much.
    torch.testing.assert_close(got, torch.from_numpy(np.asarray(want)).float(), atol=1e-5, rtol=0)


def test_shapleycam_formula_with_double_backward():
    model = small_cnn()
    x = image()
    classes = torch.tensor([0, 4])
    a = model[:5](x).detach().requires_grad_()
    out = model[5:](a)
    target = out.gather(1, classes[:, None]).squeeze(1) - nn.functional.cross_entropy(
        out, classes, reduction="none")
    (g,) = torch.autograd.grad(target.sum(), a, create_graph=True)
    (hvp,) = torch.autograd.grad(g, a, grad_outputs=a.detach())
    w = (g - 0.5 * hvp).mean((2, 3)).detach()
    want = torch.einsum("bc,bchw->bhw", w, a.detach()).clamp_min(0)
    got = camfunc.shapleycam(camfunc.split(model, "4"), x, classes, normalize=False)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert (hvp.abs() > 0).any()  # the second-order term is really there


@given(seed=st.integers(0, 10_000), k=st.integers(1, 3))
def test_shapleycam_with_a_logit_target_on_a_relu_tail_is_gradcam(seed, k):
    model = small_cnn(seed=seed % 50)
    x = image(batch=2, seed=seed)
    classes = torch.randint(0, 5, (2, k), generator=torch.Generator().manual_seed(seed))
    s = camfunc.split(model, "3")  # ReLU, pool, linear after it: piecewise linear
    torch.testing.assert_close(camfunc.shapleycam(s, x, classes, target="logit"),
                               camfunc.gradcam(s, x, classes), atol=1e-6, rtol=1e-5)


def test_shapleycam_rejects_unknown_target():
    with pytest.raises(ValueError, match="'rest' or 'logit'"):
        camfunc.shapleycam(camfunc.split(small_cnn(), "4"), image(), 0, target="prob")
