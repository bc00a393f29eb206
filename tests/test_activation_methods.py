"""CAM, Eigen-CAM, Eigen-Grad-CAM, Random-CAM, HiResCAM: references and invariants."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import assume, given
from hypothesis import strategies as st
from pytorch_grad_cam import GradCAMElementWise as PgcGradCAMElementWise
from pytorch_grad_cam import HiResCAM as PgcHiResCAM
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection
from torch import nn
from torchcam.methods import CAM as TcCAM

import camfunc
from helpers import pytorch_grad_cam_raw, small_cnn

CLASSES = [3, 7]


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


def image(batch: int = 2, size: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randn((batch, 3, size, size), generator=torch.Generator().manual_seed(seed))


def layer4_and_grads(model: nn.Module, x: torch.Tensor, classes: list[int]):
    """Activations and gradients at layer4, computed with plain autograd on pieces of the resnet."""
    head = nn.Sequential(*list(model.children())[:-2])
    a = head(x).detach().requires_grad_()
    scores = model.fc(torch.flatten(model.avgpool(a), 1))
    (g,) = torch.autograd.grad(scores.gather(1, torch.tensor(classes)[:, None]).sum(), a)
    return a.detach(), g


def test_cam_matches_torchcam():
    model = resnet18()
    x = image()
    reference = copy.deepcopy(model)
    extractor = TcCAM(reference, target_layer="layer4", fc_layer="fc", input_shape=(3, 96, 96))
    with torch.no_grad():
        scores = reference(x)
    (want,) = extractor(class_idx=CLASSES, scores=scores, normalized=False)
    extractor.remove_hooks()
    got = camfunc.cam(camfunc.split(model, "layer4"), x, CLASSES, normalize=False)
    torch.testing.assert_close(camfunc.normalize(got), camfunc.normalize(want), atol=1e-5, rtol=0)


def test_cam_is_the_classifier_weights_formula_without_relu():
    model = resnet18()
    x = image()
    with torch.no_grad():
        a = nn.Sequential(*list(model.children())[:-2])(x)
        want = torch.einsum("bc,bchw->bhw", model.fc.weight[CLASSES], a)
    got = camfunc.cam(camfunc.split(model, "layer4"), x, CLASSES, normalize=False)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got < 0).any()  # no ReLU


def test_cam_refuses_a_tail_that_is_not_pool_and_linear():
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="global average pool and a linear layer"):
        camfunc.cam(camfunc.split(model, "3"), image(size=8), 0)  # a ReLU follows "3"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="global average pool"):
        camfunc.cam(camfunc.split(resnet18(), "layer3"), image(), 0)


@pytest.mark.parametrize("method, reference", [
    ("hirescam", PgcHiResCAM), ("gradcam_elementwise", PgcGradCAMElementWise)])
def test_hirescam_family_matches_pytorch_grad_cam(method, reference):
    model = resnet18()
    x = image()
    ref_model = copy.deepcopy(model)
    extractor = reference(model=ref_model, target_layers=[ref_model.layer4])
    want = pytorch_grad_cam_raw(extractor, ref_model.layer4, x, CLASSES)
    got = camfunc.METHODS[method](camfunc.split(model, "layer4"), x, CLASSES, normalize=False)
    torch.testing.assert_close(camfunc.normalize(got), camfunc.normalize(want), atol=1e-5, rtol=0)


def matches_up_to_sign(got: torch.Tensor, projection: np.ndarray) -> None:
    """``got`` is ReLU(p) or ReLU(-p) for the reference projection p, per sample, normalised."""
    p = torch.from_numpy(projection).float()
    for i in range(p.shape[0]):
        candidates = [camfunc.normalize(p[i:i + 1].clamp_min(0)),
                      camfunc.normalize((-p[i:i + 1]).clamp_min(0))]
        errors = [float((got[i:i + 1] - c).abs().max()) for c in candidates]
        assert min(errors) < 1e-4, errors


def test_eigencam_matches_pytorch_grad_cams_projection_up_to_its_sign():
    model = resnet18()
    x = image()
    a, _ = layer4_and_grads(model, x, CLASSES)
    got = camfunc.eigencam(camfunc.split(model, "layer4"), x)
    matches_up_to_sign(got, get_2d_projection(a.numpy()))


def test_eigengradcam_matches_pytorch_grad_cams_projection_up_to_its_sign():
    model = resnet18()
    x = image()
    a, g = layer4_and_grads(model, x, CLASSES)
    got = camfunc.eigengradcam(camfunc.split(model, "layer4"), x, CLASSES)
    matches_up_to_sign(got, get_2d_projection((a * g).numpy()))


@given(seed=st.integers(0, 10_000), channels=st.integers(2, 6), side=st.integers(2, 5))
def test_eigencam_sign_rule_holds_whatever_sign_the_solver_returns(seed, channels, side):
    # An independent solver (eigh of the channel covariance) returns its own sign;
    # after the documented rule (largest magnitude positive) both must agree.
    a = torch.randn((1, channels, side, side), generator=torch.Generator().manual_seed(seed)).double()
    got = camfunc.eigencam(camfunc.Split(lambda v: v, lambda v: v.mean((2, 3))), a.float(),
                           normalize=False)
    x = a.flatten(2).transpose(1, 2)[0]
    x = x - x.mean(0)
    values, vectors = torch.linalg.eigh(x.T @ x)
    # A repeated top eigenvalue has no unique direction; an exact tie falls to the loadings.
    assume(values[-1] - values[-2] >= 1e-6 * values[-1].abs().clamp_min(1e-12))
    p = x @ vectors[:, -1]
    assume(abs(float(p.max() + p.min())) > 1e-4 * float(p.abs().max()))
    p = p if p.max() + p.min() >= 0 else -p
    torch.testing.assert_close(got.flatten(), p.clamp_min(0).float(), atol=1e-4, rtol=1e-3)


def test_eigencam_ignores_the_class_but_answers_in_its_shape():
    model = resnet18()
    x = image()
    s = camfunc.split(model, "layer4")
    single = camfunc.eigencam(s, x, 3)
    many = camfunc.eigencam(s, x, camfunc.topk(3))
    assert many.shape == (2, 3, *single.shape[1:])
    for k in range(3):
        assert torch.equal(many[:, k], single)


def test_randomcam_is_reproducible_and_follows_its_weights():
    model = small_cnn()
    s = camfunc.split(model, "4")
    x = image(size=8)
    first = camfunc.randomcam(s, x, generator=torch.Generator().manual_seed(5))
    again = camfunc.randomcam(s, x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
    w = torch.rand((2, 6), generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        a = model[:5](x)
    want = camfunc.normalize(torch.einsum("bc,bchw->bhw", w, a).clamp_min(0))
    torch.testing.assert_close(camfunc.randomcam(s, x, weights=w), want)
    with pytest.raises(ValueError, match=r"weights must be \(B, C\)"):
        camfunc.randomcam(s, x, weights=torch.rand(2, 5))


def layer3_and_grads(model: nn.Module, x: torch.Tensor, classes: list[int]):
    """Activations and gradients at layer3, where the tail (layer4 on) makes gradients vary
    in sign over positions: there |G| * A and G * A have different principal components."""
    head = nn.Sequential(*list(model.children())[:-3])
    a = head(x).detach().requires_grad_()
    scores = model.fc(torch.flatten(model.avgpool(model.layer4(a)), 1))
    (g,) = torch.autograd.grad(scores.gather(1, torch.tensor(classes)[:, None]).sum(), a)
    return a.detach(), g


def test_segeigencam_matches_pytorch_grad_cam_raw():
    from pytorch_grad_cam import SegEigenCAM as PgcSegEigenCAM

    model = resnet18()
    x = image()
    ref_model = copy.deepcopy(model)
    extractor = PgcSegEigenCAM(model=ref_model, target_layers=[ref_model.layer3])
    want = pytorch_grad_cam_raw(extractor, ref_model.layer3, x, CLASSES)  # with its sign rule
    got = camfunc.segeigencam(camfunc.split(model, "layer3"), x, CLASSES, normalize=False)
    assert want.flatten(1).amax(1).min() > 0
    torch.testing.assert_close(got, want, atol=1e-4 * float(want.abs().max()), rtol=1e-4)


def test_segeigencam_is_the_signed_first_component_of_abs_gradients_times_activations():
    model = resnet18()
    x = image()
    a, g = layer3_and_grads(model, x, CLASSES)
    assert ((g > 0).flatten(2).any(2) & (g < 0).flatten(2).any(2)).any()  # signs vary per channel
    for i in range(2):  # Eq. 10 to 13, written out with numpy's SVD
        terms = (g[i].abs() * a[i]).double().flatten(1).T.numpy()  # (positions, channels)
        terms = terms - terms.mean(0)
        projection = terms @ np.linalg.svd(terms, full_matrices=False)[2][0]
        if abs(projection.min()) > abs(projection.max()):
            projection = -projection
        want = torch.from_numpy(np.maximum(projection, 0)).float().reshape(a.shape[2:])
        got = camfunc.segeigencam(camfunc.split(model, "layer3"), x[i:i + 1], CLASSES[i], normalize=False)
        torch.testing.assert_close(got[0], want, atol=1e-4 * float(want.max()), rtol=1e-4)


def test_cam_with_an_explicit_classifier():
    model = resnet18()
    x = image()
    s = camfunc.split(model, "layer4")
    inferred = camfunc.cam(s, x, CLASSES, normalize=False)
    for classifier in ("fc", model.fc, model.fc.weight):
        torch.testing.assert_close(camfunc.cam(s, x, CLASSES, classifier=classifier, normalize=False),
                                   inferred, atol=1e-4, rtol=1e-4)

    class Calibrated(nn.Module):  # a tail that is not pool + linear: the probe refuses it
        def __init__(self):
            super().__init__()
            self.net = resnet18()

        def forward(self, v):
            return torch.tanh(self.net(v) * 3.0)

    calibrated = Calibrated().eval()
    s = camfunc.split(calibrated, "net.layer4")
    with pytest.raises(ValueError, match="global average pool"):
        camfunc.cam(s, x, CLASSES)
    got = camfunc.cam(s, x, CLASSES, classifier="net.fc", normalize=False)
    with torch.no_grad():
        acts = nn.Sequential(*list(calibrated.net.children())[:-2])(x)
    want = torch.einsum("bc,bchw->bhw", calibrated.net.fc.weight[CLASSES], acts)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="takes 512 features but the layer has 256"):
        camfunc.cam(camfunc.split(model, "layer3"), x, 1, classifier="fc")
    with pytest.raises(ValueError, match="no module 'head'"):
        camfunc.cam(camfunc.split(model, "layer4"), x, 1, classifier="head")
