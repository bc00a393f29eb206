"""FEM, KPCA-CAM, Refine-CAM and augmentation smoothing: references and formulas."""

from __future__ import annotations

import copy

import cv2
import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given
from hypothesis import strategies as st
from pytorch_grad_cam import FEM as PgcFEM
from pytorch_grad_cam import GradCAM as PgcGradCAM
from pytorch_grad_cam import GradCAMElementWise as PgcGradCAMElementWise
from pytorch_grad_cam import HiResCAM as PgcHiResCAM
from pytorch_grad_cam import LayerCAM as PgcLayerCAM
from pytorch_grad_cam import XGradCAM as PgcXGradCAM
from pytorch_grad_cam import KPCA_CAM as PgcKPCA
from pytorch_grad_cam import RefineCAM as PgcRefineCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_kernel

import camfunc
from helpers import pytorch_grad_cam_raw, small_cnn


def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


def image(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn((batch, 3, size, size), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name, reference", [("fem", PgcFEM), ("kpcacam", PgcKPCA)])
def test_activation_methods_match_pytorch_grad_cam(name, reference):
    model = resnet18()
    x = image()
    ref_model = copy.deepcopy(model)
    # layer3 is 4x4 here: with only 4 positions no value can be 2 std above the mean.
    extractor = reference(model=ref_model, target_layers=[ref_model.layer3])
    want = pytorch_grad_cam_raw(extractor, ref_model.layer3, x, [1, 2])
    got = camfunc.METHODS[name](camfunc.split(model, "layer3"), x, normalize=False)
    assert want.flatten(1).amax(1).min() > 0
    torch.testing.assert_close(camfunc.normalize(got), camfunc.normalize(want), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel", ["sigmoid", "rbf", "linear", "poly", "cosine"])
@given(seed=st.integers(0, 1000))
def test_kernel_pca_matches_scikit_learn_sign_included(kernel, seed):
    a = torch.rand((2, 5, 3, 4), generator=torch.Generator().manual_seed(seed))
    s = camfunc.Split(lambda v: v, lambda v: v.mean((2, 3)))
    got = camfunc.kpcacam(s, a, kernel=kernel, normalize=False)
    # pytorch-grad-cam's projection, fed float64 so that scikit-learn computes in float64.
    want = torch.from_numpy(get_2d_projection_kernel(a.double().numpy(), kernel=kernel)).float().clamp_min(0)
    # Kernel PCA runs in float64: float32 rounding of the result is all that is left (was 3e-5).
    torch.testing.assert_close(got, want, atol=1e-6 * float(want.abs().max()) + 1e-7, rtol=1e-6)


def test_kpcacam_rejects_unknown_kernels():
    with pytest.raises(ValueError, match="kernel must be"):
        camfunc.kpcacam(camfunc.split(small_cnn(), "4"), image(size=8), kernel="laplace")


def test_fem_formula_by_hand():
    a = torch.tensor([[[[0.0, 0.0, 0.0, 4.0]], [[1.0, 1.0, 1.0, 1.0]]]])  # (1, 2, 1, 4)
    # Channel 0: mean 1, std sqrt(3); 4 > 1 + 2 sqrt(3)? No (4.46): weight 0 with k=2,
    # weight 1/4 with k=1 (4 > 2.73). Channel 1 never exceeds its mean: weight 0.
    s = camfunc.Split(lambda v: v, lambda v: v.mean((2, 3)))
    assert torch.equal(camfunc.fem(s, a, k=2.0, normalize=False), torch.zeros(1, 1, 4))
    torch.testing.assert_close(camfunc.fem(s, a, k=1.0, normalize=False),
                               torch.tensor([[[0.0, 0.0, 0.0, 1.0]]]))


def test_refinecam_matches_pytorch_grad_cam():
    model = resnet18()
    x = image()
    classes = [1, 2]
    ref_model = copy.deepcopy(model)
    extractor = PgcRefineCAM(ref_model, [ref_model.layer3, ref_model.layer4], base_method=PgcGradCAM)
    want = extractor(x, [ClassifierOutputTarget(c) for c in classes])
    for base in extractor.base_cam_per_layer:
        base.activations_and_grads.release()
    got = camfunc.refinecam(camfunc.split(model, ["layer3", "layer4"]), x, classes,
                            method=camfunc.gradcam)
    # cv2's linear resize and torch's bilinear (align_corners=False) agree to float rounding.
    torch.testing.assert_close(got, torch.from_numpy(np.asarray(want)), atol=1e-4, rtol=0)


def test_aug_smooth_is_the_mean_over_flipped_and_scaled_inputs():
    model = small_cnn()
    s = camfunc.split(model, "4")
    x = image(size=8)
    got = camfunc.aug_smooth(camfunc.gradcam)(s, x, [1, 3])
    manual = []
    for flip in (False, True):
        for factor in (0.9, 1.0, 1.1):
            variant = (x.flip(-1) if flip else x) * factor
            m = camfunc.gradcam(s, variant, [1, 3])
            manual.append(m.flip(-1) if flip else m)
    torch.testing.assert_close(got, torch.stack(manual).mean(0), atol=1e-6, rtol=1e-5)


def test_aug_smooth_matches_pytorch_grad_cam_after_upsampling():
    model = resnet18()
    x = image()
    classes = [1, 2]
    ref_model = copy.deepcopy(model)
    extractor = PgcGradCAM(model=ref_model, target_layers=[ref_model.layer4])
    want = extractor(x, [ClassifierOutputTarget(c) for c in classes], aug_smooth=True)
    extractor.activations_and_grads.release()
    got = camfunc.aug_smooth(camfunc.gradcam)(camfunc.split(model, "layer4"), x, classes)
    # Averaging and bilinear resizing commute, so resize camfunc's layer-resolution result.
    resized = np.stack([cv2.resize(m, (64, 64)) for m in got.numpy()])
    np.testing.assert_allclose(resized, want, atol=1e-4)


def test_aug_smooth_keeps_topk_of_the_clean_input_and_its_scores():
    model = small_cnn()
    s = camfunc.split(model, "4")
    x = image(size=8)
    cams, scores = camfunc.aug_smooth(camfunc.gradcam)(s, x, camfunc.topk(2), return_scores=True)
    with torch.no_grad():
        torch.testing.assert_close(scores, model(x))
        classes = model(x).topk(2, dim=1).indices
    torch.testing.assert_close(cams, camfunc.aug_smooth(camfunc.gradcam)(s, x, classes))
    with pytest.raises(ValueError, match="generator="):
        camfunc.aug_smooth(camfunc.smooth_gradcampp)(s, x, 1, noise=torch.zeros(4, *x.shape))


@pytest.mark.parametrize("name, reference", [
    ("gradcam", PgcGradCAM), ("xgradcam", PgcXGradCAM), ("layercam", PgcLayerCAM),
    ("hirescam", PgcHiResCAM), ("gradcam_elementwise", PgcGradCAMElementWise)])
def test_eigen_smooth_matches_pytorch_grad_cam_up_to_its_sign(name, reference):
    model = resnet18()
    x = image()
    ref_model = copy.deepcopy(model)
    extractor = reference(model=ref_model, target_layers=[ref_model.layer3])
    projection = pytorch_grad_cam_raw(extractor, ref_model.layer3, x, [1, 2], eigen_smooth=True,
                                      relu=False)
    got = camfunc.METHODS[name](camfunc.split(model, "layer3"), x, [1, 2], eigen_smooth=True)
    for i in range(2):
        candidates = [camfunc.normalize((sign * projection[i:i + 1]).clamp_min(0)) for sign in (1, -1)]
        assert min(float((got[i:i + 1] - c).abs().max()) for c in candidates) < 1e-4


def test_eigen_smooth_is_the_projection_of_the_weighted_activations():
    model = small_cnn()
    s = camfunc.split(model, "4")
    x = image(size=8)
    with torch.no_grad():
        a = model[:5](x)
    weights = torch.rand((2, 6), generator=torch.Generator().manual_seed(0)) * 2 - 1
    got = camfunc.randomcam(s, x, weights=weights, eigen_smooth=True, normalize=False)
    terms = (weights[:, :, None, None] * a).flatten(2).transpose(1, 2)
    terms = terms - terms.mean(1, keepdim=True)
    _, _, vh = torch.linalg.svd(terms, full_matrices=False)
    p = (terms @ vh[:, 0, :, None]).squeeze(-1)
    p = torch.where((p.amax(1) + p.amin(1) < 0)[:, None], -p, p)
    torch.testing.assert_close(got, p.reshape(2, 8, 8).clamp_min(0), atol=1e-5, rtol=1e-4)
