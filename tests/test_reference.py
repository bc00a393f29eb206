"""camfunc against the pinned reference libraries and against the papers' formulas.

Every comparison is between *raw* maps at the layer's resolution (camfunc with
``normalize=False``; the references' maps before their own upsampling and
normalisation), with the same :func:`camfunc.normalize` applied to both sides,
at an absolute tolerance of 1e-5.

- torchcam 0.5.0: Grad-CAM, XGrad-CAM, Layer-CAM (one and several layers,
  per-sample classes, one class for all, (B, K) classes). Its Grad-CAM++ and
  Smooth Grad-CAM++ do not follow the papers and are not matched
  (``test_torchcam_gradcampp_is_not_the_paper`` shows what it computes).
- pytorch-grad-cam 1.5.7: Grad-CAM, Grad-CAM++, XGrad-CAM, Layer-CAM, from its
  own hooks and ``get_cam_image`` before it upsamples with cv2.
- captum 0.9.0: ``LayerGradCam``.
- Grad-CAM++ (eps-free) and Smooth Grad-CAM++ written out here in float64 on
  activations and gradients taken with plain autograd from the model's pieces.

Models are torchvision's with seeded random weights. The references register
hooks, so each call gets its own deep copy of the model, and its hooks are
removed afterwards.
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

# (model, layer, input size). Each layer's output is at least 3x3 at that size.
CASES = [
    ("resnet18", "layer4", 96),                      # 3x3, end of a residual stage
    ("vgg11_bn", "features.27", 64),                 # 4x4, an in-place ReLU
    ("mobilenet_v3_small", "features.12", 96),       # 3x3, conv-bn-hardswish (slightly signed)
    ("densenet121", "features.denseblock4", 96),     # 3x3, a concatenation (signed); in-place ReLU later
]
# Layers whose activations are >= 0, as Grad-CAM++ and XGrad-CAM assume. On
# signed activations pytorch-grad-cam's Grad-CAM++ keeps alpha where its
# denominator is negative (camfunc sets it to 0, see gradcampp_formula), and
# XGrad-CAM divides by activation sums that cancel to ~1e-4, where its eps of
# 1e-7 and float32 rounding of the sums move the map by ~1e-5.
NONNEGATIVE_CASES = [
    ("resnet18", "layer4", 96),
    ("vgg11_bn", "features.27", 64),
    ("mobilenet_v3_small", "features.3.block.1", 96),                # 12x12, conv-bn-ReLU
    ("densenet121", "features.denseblock4.denselayer16.relu2", 96),  # 3x3, 16 skip tensors cross the cut
]


def _ids(cases):
    return [f"{m}:{layer}" for m, layer, _ in cases]


def _input(size: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, 3, size, size), generator=g)


@functools.lru_cache(maxsize=None)
def _model(name: str) -> nn.Module:
    """A torchvision model with seeded random weights, in eval mode. Never mutated.

    Batch-norm running statistics are estimated on random inputs, as training
    would do: with the initial ones (mean 0, var 1) mobilenet_v3_small's
    activations shrink to ~1e-8 by its last block, where the references' eps
    (1e-8 and 1e-7 added to XGrad-CAM's activation sums) dominate.
    """
    with torch.random.fork_rng(devices=[]):  # leave the global RNG as it was
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)()
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # a plain average over the calibration batch
        model.train()
        with torch.no_grad():
            model(_input(96, batch=8, seed=100))
    for bn in norms:
        bn.momentum = 0.1
    return model.eval()


SCALE = 1e5


@functools.lru_cache(maxsize=None)
def _scaled_model(name: str) -> nn.Module:
    """The same model with its last linear layer's weights multiplied by 1e5.

    With random weights the gradients at a late layer are ~1e-3 or less, so
    g**2 is about pytorch-grad-cam's eps of 1e-6 in Grad-CAM++'s alpha
    denominator, which then changes the map by up to a few percent (camfunc has
    no eps; see test_gradcampp_formula_is_eps_free). Scaling the last layer
    scales every gradient by 1e5, which makes that eps negligible (1e3 and 1e4
    still left 1e-5-sized differences from channels with the smallest gradients).
    """
    model = copy.deepcopy(_model(name))
    with torch.no_grad():
        [m for m in model.modules() if isinstance(m, nn.Linear)][-1].weight.mul_(SCALE)
    return model


def _predicted(model: nn.Module, x: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Each sample's top-k classes ``(B, k)``: their Grad-CAMs are not all zero."""
    with torch.no_grad():
        return model(x).topk(k, dim=1).indices


def assert_same_maps(got: torch.Tensor, expected, atol: float = ATOL) -> None:
    """Equal after the same min-max normalisation; no reference map may be all zero."""
    expected = torch.as_tensor(expected).to(torch.float32)
    assert got.dtype == torch.float32
    assert got.shape == expected.shape
    peaks = expected.flatten(1).amax(1)
    assert bool((peaks > 0).all()), "an all-zero reference map would make the comparison vacuous"
    torch.testing.assert_close(camfunc.normalize(got), camfunc.normalize(expected), atol=atol, rtol=0)


def camfunc_raw(method, model, layers, x, cls, **kwargs):
    return method(camfunc.split(model, layers), x, cls, normalize=False, **kwargs)


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


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
    assert _hook_count(ref) == 0
    return [m.detach() for m in maps]


def pgc_raw(cam_class, model, layers, x, classes) -> list[torch.Tensor]:
    """pytorch-grad-cam's per-layer ``ReLU(get_cam_image(...))`` before ``scale_cam_image``.

    This replays ``BaseCAM.forward`` up to ``compute_cam_per_layer``, without
    the cv2 resize to the input size and the min-max scaling after it.
    ``layers`` must be in forward order, the order its gradient list ends up in.
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
        # Its formulas run in float64 on its own float32 activations and
        # gradients, so its float32 rounding does not add to camfunc's.
        acts = [a.numpy().astype(np.float64) for a in cam.activations_and_grads.activations]
        grads = [g.numpy().astype(np.float64) for g in cam.activations_and_grads.gradients]
        assert len(acts) == len(grads) == len(layers)
        maps = [
            np.maximum(cam.get_cam_image(x, layer, targets, a, g, eigen_smooth=False), 0)
            for layer, a, g in zip(target_layers, acts, grads)
        ]
    finally:
        cam.activations_and_grads.release()
    assert _hook_count(ref) == 0
    return [torch.from_numpy(m) for m in maps]


def captum_gradcam_raw(model, layer, x, classes) -> torch.Tensor:
    ref = copy.deepcopy(model)
    attr = LayerGradCam(ref, dict(ref.named_modules())[layer])
    maps = attr.attribute(x.clone().requires_grad_(), target=list(classes), relu_attributions=True)
    assert _hook_count(ref) == 0
    return maps.detach()[:, 0]


# ----------------------------------------------------------------------------
# torchcam


TORCHCAM = {"gradcam": (camfunc.gradcam, TcGradCAM),
            "xgradcam": (camfunc.xgradcam, TcXGradCAM),
            "layercam": (camfunc.layercam, TcLayerCAM)}


@pytest.mark.parametrize("method", sorted(TORCHCAM))
@pytest.mark.parametrize(("name", "layer", "size"), CASES, ids=_ids(CASES))
def test_torchcam_per_sample_classes(method, name, layer, size):
    ours, theirs = TORCHCAM[method]
    model, x = _model(name), _input(size)
    classes = _predicted(model, x)[:, 0].tolist()
    expected = torchcam_raw(theirs, model, layer, x, classes)[0]
    assert_same_maps(camfunc_raw(ours, model, layer, x, classes), expected)


@pytest.mark.parametrize("method", sorted(TORCHCAM))
def test_torchcam_one_class_for_all(method):
    ours, theirs = TORCHCAM[method]
    model, x = _model("resnet18"), _input(96, batch=3)
    expected = torchcam_raw(theirs, model, "layer4", x, 5)[0]
    assert_same_maps(camfunc_raw(ours, model, "layer4", x, 5), expected)


@pytest.mark.parametrize("layers", [["layer3", "layer4"], ["layer4", "layer3"]])
def test_torchcam_layercam_several_layers(layers):
    model, x = _model("resnet18"), _input(96)
    classes = _predicted(model, x)[:, 0].tolist()
    expected = torchcam_raw(TcLayerCAM, model, layers, x, classes)
    got = camfunc_raw(camfunc.layercam, model, layers, x, classes)
    assert isinstance(got, list) and len(got) == 2
    assert [g.shape[-1] for g in got] == [{"layer3": 6, "layer4": 3}[n] for n in layers]
    for g, e in zip(got, expected, strict=True):
        assert_same_maps(g, e)


@pytest.mark.parametrize("form", ["tensor", "topk"])
@pytest.mark.parametrize("method", sorted(TORCHCAM))
def test_torchcam_several_classes_per_sample(method, form):
    """A (B, K) class tensor, or topk(K), equals K torchcam calls, column by column."""
    ours, theirs = TORCHCAM[method]
    model, x = _model("resnet18"), _input(96, batch=3)
    top2 = _predicted(model, x, k=2)
    got = camfunc_raw(ours, model, "layer4", x, top2 if form == "tensor" else camfunc.topk(2))
    assert got.shape == (3, 2, 3, 3)
    for k in range(2):
        expected = torchcam_raw(theirs, model, "layer4", x, top2[:, k].tolist())[0]
        assert_same_maps(got[:, k], expected)


# ----------------------------------------------------------------------------
# Activations and gradients with plain autograd, for the formula tests


def _resnet_pieces(model: nn.Module, layer: str) -> tuple[nn.Module, nn.Module]:
    """resnet's head (input -> ``layer``) and tail (-> scores), from its children."""
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    cut = names.index(layer) + 1
    head = nn.Sequential(*(getattr(model, n) for n in names[:cut]))
    tail = nn.Sequential(*(getattr(model, n) for n in names[cut:]), model.avgpool, nn.Flatten(), model.fc)
    return head, tail


def _densenet_pieces(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """densenet's ``features`` and what its forward does after it, the ReLU not in place."""
    tail = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), model.classifier)
    return model.features, tail


def _activations_and_grads(head, tail, x, classes) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` and ``dS/dA`` (one class per sample) in float32, returned in float64.

    The model runs in float32 like camfunc's, so the comparison measures the
    CAM formulas, not float32-vs-float64 differences of the network itself
    (which reach 5e-3 on vgg11_bn); the formulas then run in float64.
    """
    with torch.no_grad():
        a = head(x)
    a = a.detach().requires_grad_()
    scores = tail(a)
    picked = scores[torch.arange(x.shape[0]), torch.as_tensor(classes)].sum()
    (g,) = torch.autograd.grad(picked, a)
    return a.detach().double(), g.double()


def gradcam_formula(a, g):
    return (g.mean((2, 3))[:, :, None, None] * a).sum(1).clamp_min(0)


def layercam_formula(a, g):
    return (g.clamp_min(0) * a).sum(1).clamp_min(0)


def gradcampp_formula(a, g, eps: float = 0.0):
    """Eq. 19: alpha = g^2 / (2 g^2 + sum_ab(A) g^3), 0 where g == 0 or the denominator <= 0.

    The denominator is negative only where activations are: outside the paper's
    assumption, and where camfunc sets alpha to 0 (pytorch-grad-cam does not).
    """
    total = a.sum((2, 3), keepdim=True)
    den = 2 * g**2 + total * g**3 + eps
    valid = (g != 0) & (den > 0)
    alpha = torch.where(valid, g**2 / torch.where(valid, den, torch.ones_like(den)), torch.zeros_like(g))
    weights = (alpha * g.clamp_min(0)).sum((2, 3))
    return (weights[:, :, None, None] * a).sum(1).clamp_min(0)


def test_torchcam_gradcampp_is_not_the_paper():
    """torchcam 0.5.0's Grad-CAM++ is not Eq. 19, so camfunc does not follow it.

    In ``GradCAMpp._get_weights``, ``alpha[idx][mask].div_(...)`` divides a copy
    made by boolean indexing, so alpha stays ``g**2`` and the weights come out as
    ``sum_ij relu(g)**3`` (its denominator, ``2 g**2 + sum_ab(A g**3)``, which
    also differs from Eq. 19's ``2 g**2 + sum_ab(A) g**3``, is never used). This
    shows torchcam's map is exactly that, and far from camfunc's, which is Eq. 19
    (test_gradcampp_formula_is_eps_free, and pytorch-grad-cam below).
    Its Smooth Grad-CAM++ has the same denominator and builds the map from the
    last noisy sample's activations and gradient, so it is not compared either.
    """
    model, x = _model("resnet18"), _input(96)
    classes = _predicted(model, x)[:, 0].tolist()
    a, g = _activations_and_grads(*_resnet_pieces(model, "layer3"), x, classes)
    weights = g.clamp_min(0).pow(3).sum((2, 3))
    defective = (weights[:, :, None, None] * a).sum(1).clamp_min(0)

    torchcam_map = torchcam_raw(TcGradCAMpp, model, "layer3", x, classes)[0]
    assert_same_maps(torchcam_map, defective)
    ours = camfunc.normalize(camfunc_raw(camfunc.gradcampp, model, "layer3", x, classes))
    assert (ours - camfunc.normalize(torchcam_map)).abs().max() > 0.05


# ----------------------------------------------------------------------------
# pytorch-grad-cam


PGC = {"gradcam": (camfunc.gradcam, PgcGradCAM),
       "gradcampp": (camfunc.gradcampp, PgcGradCAMPlusPlus),
       "xgradcam": (camfunc.xgradcam, PgcXGradCAM),
       "layercam": (camfunc.layercam, PgcLayerCAM)}


def _pgc_check(method, model, layer, x):
    ours, theirs = PGC[method]
    classes = _predicted(model, x)[:, 0].tolist()
    expected = pgc_raw(theirs, model, [layer], x, classes)[0]
    assert_same_maps(camfunc_raw(ours, model, layer, x, classes), expected)


@pytest.mark.parametrize("method", ["gradcam", "layercam"])
@pytest.mark.parametrize(("name", "layer", "size"), CASES, ids=_ids(CASES))
def test_pytorch_grad_cam(method, name, layer, size):
    _pgc_check(method, _model(name), layer, _input(size))


@pytest.mark.parametrize(("name", "layer", "size"), NONNEGATIVE_CASES, ids=_ids(NONNEGATIVE_CASES))
def test_pytorch_grad_cam_xgradcam(name, layer, size):
    # Its eps (1e-7 added to the activation sums) is negligible at these sums.
    _pgc_check("xgradcam", _model(name), layer, _input(size))


@pytest.mark.parametrize(("name", "layer", "size"), NONNEGATIVE_CASES, ids=_ids(NONNEGATIVE_CASES))
def test_pytorch_grad_cam_gradcampp(name, layer, size):
    # On the scaled model, where its eps of 1e-6 in alpha's denominator is negligible.
    _pgc_check("gradcampp", _scaled_model(name), layer, _input(size))


@pytest.mark.parametrize("method", ["gradcampp", "layercam"])
def test_pytorch_grad_cam_several_layers(method):
    ours, theirs = PGC[method]
    model, x = _scaled_model("resnet18"), _input(96)
    classes = _predicted(model, x)[:, 0].tolist()
    expected = pgc_raw(theirs, model, ["layer3", "layer4"], x, classes)
    got = camfunc_raw(ours, model, ["layer3", "layer4"], x, classes)
    assert isinstance(got, list)
    for g, e in zip(got, expected, strict=True):
        assert_same_maps(g, e)


# ----------------------------------------------------------------------------
# captum


@pytest.mark.parametrize(("name", "layer", "size"), CASES, ids=_ids(CASES))
def test_captum_layer_gradcam(name, layer, size):
    model, x = _model(name), _input(size)
    classes = _predicted(model, x)[:, 0].tolist()
    expected = captum_gradcam_raw(model, layer, x, classes)
    assert_same_maps(camfunc_raw(camfunc.gradcam, model, layer, x, classes), expected)


# ----------------------------------------------------------------------------
# The formulas, written out


@pytest.mark.parametrize("layer", ["layer3", "layer4"])
def test_gradcampp_formula_is_eps_free(layer):
    """On random weights (gradients ~1e-3), camfunc is Eq. 19 with no eps at all.

    The same formula with pytorch-grad-cam's eps of 1e-6 is visibly different
    here, so the match could not come from an implementation with an eps.
    """
    model, x = _model("resnet18"), _input(96)
    classes = _predicted(model, x)[:, 0].tolist()
    a, g = _activations_and_grads(*_resnet_pieces(model, layer), x, classes)
    assert g.abs().max() < 0.1  # the regime where an eps of 1e-6 matters
    ours = camfunc_raw(camfunc.gradcampp, model, layer, x, classes)
    assert_same_maps(ours, gradcampp_formula(a, g))
    with_eps = camfunc.normalize(gradcampp_formula(a, g, eps=1e-6)).float()
    assert (camfunc.normalize(ours) - with_eps).abs().max() > 1e-3


def smooth_gradcampp_formula(head, tail, x, classes, noise, std):
    """Smooth Grad-CAM++ from S noisy gradients and the clean activations.

    D_n = mean_s g_s^n with g_s = dS/dA at x + std * noise[s];
    alpha = D2 / (2 D2 + sum_ab(A) D3), 0 where D2 == 0 or the denominator <= 0;
    w = sum_ij alpha * relu(D1); map = relu(sum_k w_k A_k) on the clean A.
    """
    grads = torch.stack([_activations_and_grads(head, tail, x + std * eps, classes)[1]
                         for eps in noise])
    d1, d2, d3 = grads.mean(0), grads.pow(2).mean(0), grads.pow(3).mean(0)
    a, _ = _activations_and_grads(head, tail, x, classes)
    den = 2 * d2 + a.sum((2, 3), keepdim=True) * d3
    valid = (d2 > 0) & (den > 0)
    alpha = torch.where(valid, d2 / torch.where(valid, den, torch.ones_like(den)), torch.zeros_like(d2))
    weights = (alpha * d1.clamp_min(0)).sum((2, 3))
    return (weights[:, :, None, None] * a).sum(1).clamp_min(0)


def _noise(x: torch.Tensor, samples: int, seed: int) -> torch.Tensor:
    return torch.randn((samples, *x.shape), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("layer", "std"), [("layer3", 0.3), ("layer3", 1.0), ("layer4", 0.3)])
def test_smooth_gradcampp_formula(layer, std):
    # At layer3 the gradients go through layer4 and depend on the noise; at
    # layer4 the tail is pool + linear and they do not.
    model, x = _model("resnet18"), _input(96)
    classes = _predicted(model, x)[:, 0].tolist()
    noise = _noise(x, 3, seed=2)
    expected = smooth_gradcampp_formula(*_resnet_pieces(model, layer), x, classes, noise, std)
    ours = camfunc_raw(camfunc.smooth_gradcampp, model, layer, x, classes,
                       num_samples=3, std=std, noise=noise)
    assert_same_maps(ours, expected)


def test_smooth_gradcampp_formula_several_classes_per_sample():
    model, x = _model("resnet18"), _input(96)
    top2 = _predicted(model, x, k=2)
    noise = _noise(x, 2, seed=3)
    ours = camfunc_raw(camfunc.smooth_gradcampp, model, "layer3", x, top2,
                       num_samples=2, std=0.5, noise=noise)
    assert ours.shape == (2, 2, 6, 6)
    head, tail = _resnet_pieces(model, "layer3")
    for k in range(2):
        expected = smooth_gradcampp_formula(head, tail, x, top2[:, k].tolist(), noise, 0.5)
        assert_same_maps(ours[:, k], expected)


def test_smooth_gradcampp_at_layer3_is_not_gradcampp():
    """The layer3 formula tests are not Grad-CAM++ in disguise: the noise matters there."""
    model, x = _model("resnet18"), _input(96)
    classes = _predicted(model, x)[:, 0].tolist()
    a, g = _activations_and_grads(*_resnet_pieces(model, "layer3"), x, classes)
    ours = camfunc_raw(camfunc.smooth_gradcampp, model, "layer3", x, classes,
                       num_samples=3, std=1.0, noise=_noise(x, 3, seed=2))
    plain = camfunc.normalize(gradcampp_formula(a, g)).float()
    assert (camfunc.normalize(ours) - plain).abs().max() > 1e-2


FORMULAS = {"gradcam": gradcam_formula, "gradcampp": gradcampp_formula,
            "layercam": layercam_formula}


@pytest.mark.parametrize("method", sorted(FORMULAS))
def test_densenet_features_before_inplace_relu(method):
    """densenet's forward applies ``F.relu(features, inplace=True)`` right after the cut.

    The map must use the layer's own output (negative values included) and the
    gradient with respect to it, as if that ReLU were not in place. (Hook-based
    libraries are not usable here: torchcam's stored activations for
    ``features`` are the ones after the in-place ReLU, all >= 0.)
    """
    model, x = _model("densenet121"), _input(96)
    classes = _predicted(model, x)[:, 0].tolist()
    a, g = _activations_and_grads(*_densenet_pieces(model), x, classes)
    assert (a < 0).any()  # the ReLU after the cut does change the activations
    ours = camfunc_raw(getattr(camfunc, method), model, "features", x, classes)
    assert_same_maps(ours, FORMULAS[method](a, g))
