"""camfunc against the pinned reference libraries and against the papers' formulas.

Every comparison is between *raw* maps at the layer's resolution (camfunc with
``normalize=False``; the references' maps before their own upsampling and
normalisation), with the same :func:`camfunc.normalize` applied to both sides.

- torchcam 0.5.0: Grad-CAM, XGrad-CAM, Layer-CAM. Its Grad-CAM++ and Smooth
  Grad-CAM++ are not followed (see ``test_torchcam_gradcampp_is_not_the_paper``).
- pytorch-grad-cam 1.5.7: Grad-CAM, Grad-CAM++, XGrad-CAM, Layer-CAM, read
  from its activations/gradients and ``get_cam_image`` before it upsamples.
- captum 0.9.0: ``LayerGradCam``.
- Grad-CAM++ (eps-free) and Smooth Grad-CAM++ written out in float64 here.

Models are torchvision's with seeded random weights. References register
hooks, so each gets a deep copy of the model and its hooks are removed after.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
import torchvision
from captum.attr import LayerGradCam
from pytorch_grad_cam import GradCAM as PgcGradCAM
from pytorch_grad_cam import GradCAMPlusPlus as PgcGradCAMPlusPlus
from pytorch_grad_cam import LayerCAM as PgcLayerCAM
from pytorch_grad_cam import XGradCAM as PgcXGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from torchcam.methods import GradCAM as TcGradCAM
from torchcam.methods import GradCAMpp as TcGradCAMpp
from torchcam.methods import LayerCAM as TcLayerCAM
from torchcam.methods import XGradCAM as TcXGradCAM

import camfunc

ATOL = 1e-5

# (model, layer, input size): every layer has a spatial output of at least 3x3.
CASES = [
    ("resnet18", "layer4", 96),                      # 3x3, end of a residual stage
    ("vgg11_bn", "features.27", 64),                 # 4x4, an in-place ReLU
    ("mobilenet_v3_small", "features.12", 96),       # 3x3, conv-bn-hardswish
    ("densenet121", "features.denseblock4", 96),     # 3x3, a concatenation; in-place ReLUs after
]
CASE_IDS = [f"{m}:{layer}" for m, layer, _ in CASES]
CLASSES = [3, 7]  # one class per sample of a batch of 2


@functools.lru_cache(maxsize=None)
def _model(name: str) -> nn.Module:
    """A torchvision model with seeded random weights, in eval mode. Never mutated.

    Batch-norm running statistics are re-estimated on random inputs, as training
    would: with the initial ones (mean 0, var 1) mobilenet_v3_small's
    activations shrink to ~1e-8 by its last block, where the references' eps
    (1e-8 / 1e-7 added to XGrad-CAM's activation sums) dominate.
    """
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the calibration batch
    model.train()
    with torch.no_grad():
        model(_input(96, batch=8, seed=100))
    for bn in norms:
        bn.momentum = 0.1
    return model.eval()


def _last_linear(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


@functools.lru_cache(maxsize=None)
def _scaled_model(name: str) -> nn.Module:
    """The same model with its last linear layer's weights multiplied by 1000.

    With random weights the gradients at a late layer are ~1e-3, so g**2 is
    ~1e-6, the size of pytorch-grad-cam's eps in Grad-CAM++'s alpha denominator.
    Scaling the last layer scales every gradient by 1000 and makes that eps
    irrelevant (camfunc is eps-free), so the two can be compared at 1e-5.
    """
    model = copy.deepcopy(_model(name))
    with torch.no_grad():
        _last_linear(model).weight.mul_(1000.0)
    return model


def _input(size: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, 3, size, size), generator=g)


def assert_same_maps(got: torch.Tensor, expected: torch.Tensor, atol: float = ATOL,
                     spatial_dims: int | None = None) -> None:
    """Equal after the same min-max normalisation; the reference must not be all zero."""
    expected = torch.as_tensor(expected).to(torch.float32)
    assert got.shape == expected.shape
    n = expected.ndim - 1 if spatial_dims is None else spatial_dims
    peaks = expected.flatten(-n).amax(-1)
    assert bool((peaks > 0).all()), "an all-zero reference map would make the comparison vacuous"
    torch.testing.assert_close(camfunc.normalize(got, spatial_dims),
                               camfunc.normalize(expected, spatial_dims), atol=atol, rtol=0)


def camfunc_raw(method, model, layers, x, cls, **kwargs):
    return method(camfunc.split(model, layers), x, cls, normalize=False, **kwargs)


# ----------------------------------------------------------------------------
# Reference runners: raw maps at the layer's resolution


def torchcam_raw(extractor, model, layers, x, class_idx) -> list[torch.Tensor]:
    ref = copy.deepcopy(model)
    ext = extractor(ref, target_layer=layers, input_shape=tuple(x.shape[1:]))
    try:
        scores = ref(x)
        maps = ext(class_idx=class_idx, scores=scores, normalized=False)
    finally:
        ext.remove_hooks()
    return [m.detach() for m in maps]


def pgc_raw(cam_class, model, layers, x, classes) -> list[torch.Tensor]:
    """pytorch-grad-cam's per-layer ``ReLU(get_cam_image(...))`` before ``scale_cam_image``.

    This replays ``BaseCAM.forward`` up to ``compute_cam_per_layer``, minus the
    cv2 resize to the input size and its min-max scaling. ``layers`` must be
    in forward order (the order its gradient list ends up in).
    """
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    target_layers = [modules[name] for name in layers]
    cam = cam_class(model=ref, target_layers=target_layers)
    try:
        outputs = cam.activations_and_grads(x)
        targets = [ClassifierOutputTarget(c) for c in classes]
        ref.zero_grad()
        loss = sum(t(o) for t, o in zip(targets, outputs))
        loss.backward()
        acts = [a.cpu().numpy() for a in cam.activations_and_grads.activations]
        grads = [g.cpu().numpy() for g in cam.activations_and_grads.gradients]
        assert len(acts) == len(grads) == len(layers)
        maps = [
            np.maximum(cam.get_cam_image(x, layer, targets, a, g, eigen_smooth=False), 0)
            for layer, a, g in zip(target_layers, acts, grads)
        ]
    finally:
        cam.activations_and_grads.release()
    return [torch.from_numpy(np.array(m)) for m in maps]


def captum_gradcam_raw(model, layer, x, classes) -> torch.Tensor:
    ref = copy.deepcopy(model)
    attr = LayerGradCam(ref, dict(ref.named_modules())[layer])
    maps = attr.attribute(x.clone().requires_grad_(), target=list(classes), relu_attributions=True)
    return maps.detach()[:, 0]


# ----------------------------------------------------------------------------
# torchcam


TORCHCAM = {"gradcam": (camfunc.gradcam, TcGradCAM),
            "xgradcam": (camfunc.xgradcam, TcXGradCAM),
            "layercam": (camfunc.layercam, TcLayerCAM)}


@pytest.mark.parametrize("method", sorted(TORCHCAM))
@pytest.mark.parametrize(("name", "layer", "size"), CASES, ids=CASE_IDS)
def test_torchcam_per_sample_classes(method, name, layer, size):
    ours, theirs = TORCHCAM[method]
    model, x = _model(name), _input(size)
    expected = torchcam_raw(theirs, model, layer, x, CLASSES)[0]
    assert_same_maps(camfunc_raw(ours, model, layer, x, CLASSES), expected)


@pytest.mark.parametrize("method", sorted(TORCHCAM))
def test_torchcam_one_class_for_all(method):
    ours, theirs = TORCHCAM[method]
    model, x = _model("resnet18"), _input(96, batch=3)
    expected = torchcam_raw(theirs, model, "layer4", x, 5)[0]
    assert_same_maps(camfunc_raw(ours, model, "layer4", x, 5), expected)


@pytest.mark.parametrize("layers", [["layer3", "layer4"], ["layer4", "layer3"]])
def test_torchcam_layercam_several_layers(layers):
    model, x = _model("resnet18"), _input(96)
    expected = torchcam_raw(TcLayerCAM, model, layers, x, CLASSES)
    got = camfunc_raw(camfunc.layercam, model, layers, x, CLASSES)
    assert isinstance(got, list) and len(got) == 2
    for g, e in zip(got, expected):
        assert_same_maps(g, e)


@pytest.mark.parametrize("method", sorted(TORCHCAM))
def test_torchcam_class_matrix(method):
    """A (B, K) class tensor equals K torchcam calls, column by column."""
    ours, theirs = TORCHCAM[method]
    model, x = _model("resnet18"), _input(96, batch=3)
    cls = torch.tensor([[1, 2], [7, 3], [0, 0]])
    got = camfunc_raw(ours, model, "layer4", x, cls)
    assert got.shape == (3, 2, 3, 3)
    for k in range(cls.shape[1]):
        expected = torchcam_raw(theirs, model, "layer4", x, cls[:, k].tolist())[0]
        assert_same_maps(got[:, k], expected)


def _resnet_pieces(model: nn.Module, layer: str) -> tuple[nn.Module, nn.Module]:
    """resnet's head (input -> ``layer``) and tail (-> scores), from its children."""
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    cut = names.index(layer) + 1
    head = nn.Sequential(*(getattr(model, n) for n in names[:cut]))
    tail = nn.Sequential(*(getattr(model, n) for n in names[cut:]), model.avgpool, nn.Flatten(), model.fc)
    return head, tail


def _activations_and_grads(head, tail, x, classes) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` and ``dS/dA`` for one class per sample, with plain autograd."""
    with torch.no_grad():
        a = head(x)
    a = a.detach().requires_grad_()
    scores = tail(a)
    picked = scores[torch.arange(x.shape[0]), torch.as_tensor(classes)].sum()
    (g,) = torch.autograd.grad(picked, a)
    return a.detach(), g


def test_torchcam_gradcampp_is_not_the_paper():
    """torchcam 0.5.0's Grad-CAM++ is not Eq. 19, so camfunc does not follow it.

    In ``GradCAMpp._get_weights``, ``alpha[idx][mask].div_(...)`` divides a copy
    made by boolean indexing, so alpha stays ``g**2`` and the weights become
    ``sum_ij relu(g)**3`` (its denominator, ``2 g**2 + sum_ab(A g**3)``, is never
    used). This test shows torchcam's map is exactly that formula, and that it is
    far from camfunc's (which matches the paper and pytorch-grad-cam below).
    Its Smooth Grad-CAM++ has the same denominator and, besides, builds the map
    from the last noisy sample's activations and gradient, so it is not compared.
    """
    model, x = _model("resnet18"), _input(96)
    ref = copy.deepcopy(model).double()
    a, g = _activations_and_grads(*_resnet_pieces(ref, "layer3"), x.double(), CLASSES)
    weights = g.clamp_min(0).pow(3).sum((2, 3))
    defective = (weights[:, :, None, None] * a).sum(1).clamp_min(0)

    torchcam_map = torchcam_raw(TcGradCAMpp, model, "layer3", x, CLASSES)[0]
    assert_same_maps(torchcam_map, defective)
    ours = camfunc.normalize(camfunc_raw(camfunc.gradcampp, model, "layer3", x, CLASSES))
    assert (ours - camfunc.normalize(torchcam_map)).abs().max() > 0.05


# ----------------------------------------------------------------------------
# pytorch-grad-cam


PGC = {"gradcam": (camfunc.gradcam, PgcGradCAM),
       "gradcampp": (camfunc.gradcampp, PgcGradCAMPlusPlus),
       "xgradcam": (camfunc.xgradcam, PgcXGradCAM),
       "layercam": (camfunc.layercam, PgcLayerCAM)}


@pytest.mark.parametrize("method", sorted(PGC))
@pytest.mark.parametrize(("name", "layer", "size"), CASES, ids=CASE_IDS)
def test_pytorch_grad_cam(method, name, layer, size):
    ours, theirs = PGC[method]
    # Grad-CAM++ on the scaled model, where pytorch-grad-cam's eps of 1e-6 in
    # alpha's denominator is negligible (see _scaled_model). Its XGrad-CAM eps
    # (1e-7 added to the activation sums) is negligible at these activations.
    model = _scaled_model(name) if method == "gradcampp" else _model(name)
    x = _input(size)
    expected = pgc_raw(theirs, model, [layer], x, CLASSES)[0]
    assert_same_maps(camfunc_raw(ours, model, layer, x, CLASSES), expected)


@pytest.mark.parametrize("method", ["gradcampp", "layercam"])
def test_pytorch_grad_cam_several_layers(method):
    ours, theirs = PGC[method]
    model, x = _scaled_model("resnet18"), _input(96)
    expected = pgc_raw(theirs, model, ["layer3", "layer4"], x, CLASSES)
    got = camfunc_raw(ours, model, ["layer3", "layer4"], x, CLASSES)
    for g, e in zip(got, expected, strict=True):
        assert_same_maps(g, e)


# ----------------------------------------------------------------------------
# captum


@pytest.mark.parametrize(("name", "layer", "size"), CASES, ids=CASE_IDS)
def test_captum_layer_gradcam(name, layer, size):
    model, x = _model(name), _input(size)
    expected = captum_gradcam_raw(model, layer, x, CLASSES)
    assert_same_maps(camfunc_raw(camfunc.gradcam, model, layer, x, CLASSES), expected)


# ----------------------------------------------------------------------------
# The formulas, written out in float64


def gradcampp_formula(a: torch.Tensor, g: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Eq. 19: alpha = g^2 / (2 g^2 + sum_ab(A) g^3), 0 where g == 0 or the denominator <= 0."""
    total = a.sum((2, 3), keepdim=True)
    den = 2 * g**2 + total * g**3 + eps
    valid = (g != 0) & (den > 0)
    alpha = torch.where(valid, g**2 / torch.where(valid, den, torch.ones_like(den)), torch.zeros_like(g))
    weights = (alpha * g.clamp_min(0)).sum((2, 3))
    return (weights[:, :, None, None] * a).sum(1).clamp_min(0)


@pytest.mark.parametrize("layer", ["layer3", "layer4"])
def test_gradcampp_formula_is_eps_free(layer):
    """On random weights (gradients ~1e-3), camfunc is Eq. 19 with no eps at all.

    The same formula with pytorch-grad-cam's eps of 1e-6 is visibly different
    here, so the match below could not come from an eps'd implementation.
    """
    model, x = _model("resnet18"), _input(96)
    ref = copy.deepcopy(model).double()
    a, g = _activations_and_grads(*_resnet_pieces(ref, layer), x.double(), CLASSES)
    ours = camfunc_raw(camfunc.gradcampp, model, layer, x, CLASSES)
    assert_same_maps(ours, gradcampp_formula(a, g))
    with_eps = camfunc.normalize(gradcampp_formula(a, g, eps=1e-6)).float()
    assert (camfunc.normalize(ours) - with_eps).abs().max() > 1e-3


def smooth_gradcampp_formula(head, tail, x, classes, noise, std) -> torch.Tensor:
    """Smooth Grad-CAM++ from S noisy gradients and the clean activations.

    D_n = mean_s g_s^n with g_s = dS/dA at x + std * noise[s];
    alpha = D2 / (2 D2 + sum_ab(A) D3), 0 where D2 == 0 or the denominator <= 0;
    w = sum_ij alpha * relu(D1); map = relu(sum_k w_k A_k) on the clean A.
    """
    grads = torch.stack([_activations_and_grads(head, tail, x + std * eps, classes)[1] for eps in noise])
    d1, d2, d3 = grads.mean(0), grads.pow(2).mean(0), grads.pow(3).mean(0)
    with torch.no_grad():
        a = head(x)
    den = 2 * d2 + a.sum((2, 3), keepdim=True) * d3
    valid = (d2 > 0) & (den > 0)
    alpha = torch.where(valid, d2 / torch.where(valid, den, torch.ones_like(den)), torch.zeros_like(d2))
    weights = (alpha * d1.clamp_min(0)).sum((2, 3))
    return (weights[:, :, None, None] * a).sum(1).clamp_min(0)


@pytest.mark.parametrize(("layer", "std"), [("layer3", 0.3), ("layer4", 0.3), ("layer3", 1.0)])
def test_smooth_gradcampp_formula(layer, std):
    # At layer4 the tail is pool + linear, so the gradients do not depend on the
    # noise; at layer3 they go through layer4 and do.
    model, x = _model("resnet18"), _input(96)
    samples = 3
    noise = torch.randn((samples, *x.shape), generator=torch.Generator().manual_seed(2))
    ref = copy.deepcopy(model).double()
    head, tail = _resnet_pieces(ref, layer)
    expected = smooth_gradcampp_formula(head, tail, x.double(), CLASSES, noise.double(), std)
    ours = camfunc_raw(camfunc.smooth_gradcampp, model, layer, x, CLASSES,
                       num_samples=samples, std=std, noise=noise)
    assert_same_maps(ours, expected)


def test_smooth_gradcampp_formula_class_matrix():
    model, x = _model("resnet18"), _input(96)
    samples, std = 2, 0.5
    noise = torch.randn((samples, *x.shape), generator=torch.Generator().manual_seed(3))
    cls = torch.tensor([[4, 9], [0, 3]])
    ref = copy.deepcopy(model).double()
    head, tail = _resnet_pieces(ref, "layer3")
    ours = camfunc_raw(camfunc.smooth_gradcampp, model, "layer3", x, cls,
                       num_samples=samples, std=std, noise=noise)
    assert ours.shape == (2, 2, 6, 6)
    for k in range(cls.shape[1]):
        expected = smooth_gradcampp_formula(head, tail, x.double(), cls[:, k].tolist(),
                                            noise.double(), std)
        assert_same_maps(ours[:, k], expected)


def test_smooth_gradcampp_noise_changes_the_map():
    """The layer3 formula test above is not Grad-CAM++ in disguise: noise matters there."""
    model, x = _model("resnet18"), _input(96)
    ref = copy.deepcopy(model).double()
    head, tail = _resnet_pieces(ref, "layer3")
    a, g = _activations_and_grads(head, tail, x.double(), CLASSES)
    noise = torch.randn((3, *x.shape), generator=torch.Generator().manual_seed(2))
    ours = camfunc_raw(camfunc.smooth_gradcampp, model, "layer3", x, CLASSES,
                       num_samples=3, std=1.0, noise=noise)
    plain = camfunc.normalize(gradcampp_formula(a, g)).float()
    assert (camfunc.normalize(ours) - plain).abs().max() > 1e-3


# ----------------------------------------------------------------------------
# A cut just before an in-place ReLU


def _densenet_pieces(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """densenet121's ``features`` and what its forward does after it (ReLU not in place)."""
    tail = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), model.classifier)
    return model.features, tail


@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "layercam"])
def test_densenet_features_before_inplace_relu(method):
    """densenet's forward applies ``F.relu(features, inplace=True)`` right after the cut.

    The map must use the layer's own output (negative values included) and the
    gradient with respect to it, as if the ReLU were not in place.
    """
    model, x = _model("densenet121"), _input(96)
    ref = copy.deepcopy(model).double()
    a, g = _activations_and_grads(*_densenet_pieces(ref), x.double(), CLASSES)
    assert (a < 0).any()  # the ReLU after the cut does change the activations
    if method == "gradcam":
        expected = (g.mean((2, 3))[:, :, None, None] * a).sum(1).clamp_min(0)
    elif method == "gradcampp":
        expected = gradcampp_formula(a, g)
    else:
        expected = (g.clamp_min(0) * a).sum(1).clamp_min(0)
    ours = camfunc_raw(getattr(camfunc, method), model, "features", x, CLASSES)
    assert_same_maps(ours, expected)
