"""Gradient CAMs: each is a ``weights(A, G)`` function and a call to the shared combine.

Notation: ``A`` is the layer's activations ``(B, C, *spatial)``, ``G`` the
gradient of the target score ``S`` with respect to ``A``, ``(i, j)`` a spatial
position, ``k`` a channel. Every method returns
``ReLU(sum_k w_k A_k)`` (or its pixel-weighted form), min-max normalised per map
when ``normalize=True``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from camfunc._core import engine as _engine, targets as _targets, validate as _validate
from camfunc._core.split import Split
from camfunc._methods._combine import (
    Computed,
    check_activations,
    finish,
    gradient_cam,
    rectified_terms,
    safe_divide,
    safe_reciprocal,
    spatial_axes,
    weighted_sum,
    widened,
)
from camfunc._methods._method import Draws, cam_method
from camfunc._util import draws as _draws

# ----------------------------------------------------------------------------
# Weights: the paper-specific part of each method


def gradcam_weights(a: Tensor, g: Tensor) -> Tensor:
    """Grad-CAM: :math:`w_k = \\frac{1}{Z}\\sum_{ij} G_k(i,j)`."""
    return g.mean(spatial_axes(g))


def gradcampp_weights(a: Tensor, g: Tensor) -> Tensor:
    """Grad-CAM++ (Eq. 19): :math:`w_k = \\sum_{ij} \\alpha_k(i,j)\\,\\mathrm{ReLU}(G_k(i,j))`.

    With :math:`\\alpha = G^2 / (2G^2 + (\\sum_{ab} A_k(a,b)) G^3)`, which for
    :math:`G > 0` is exactly :math:`1 / (2 + (\\sum_{ab} A_k(a,b)) G)`. That form
    needs no eps, so tiny late-layer gradients are not swamped by one.
    :math:`\\alpha = 0` where :math:`G \\le 0` (ReLU drops them anyway) or where
    the denominator is not positive, which needs negative activations.
    """
    total = a.sum(spatial_axes(a), keepdim=True)
    den = 2.0 + total * g
    alpha = safe_reciprocal(den, (g > 0) & (den > 0))
    return (alpha * g.clamp_min(0)).sum(spatial_axes(g))


def xgradcam_weights(a: Tensor, g: Tensor) -> Tensor:
    """XGrad-CAM: :math:`w_k = \\sum_{ij} \\frac{A_k(i,j)}{\\sum_{ab} A_k(a,b)} G_k(i,j)`.

    A channel whose activations sum to exactly 0 gets weight 0.
    """
    axes = spatial_axes(a)
    total = a.sum(axes, keepdim=True)
    return (safe_divide(a, total, total != 0) * g).sum(axes)


def layercam_weights(a: Tensor, g: Tensor) -> Tensor:
    """Layer-CAM: pixel weights :math:`w_k(i,j) = \\mathrm{ReLU}(G_k(i,j))`."""
    return g.clamp_min(0)


def gradient_weights(a: Tensor, g: Tensor) -> Tensor:
    """HiResCAM and its element-wise variant: pixel weights :math:`w_k(i,j) = G_k(i,j)`."""
    return g


def smooth_gradcampp_weights(a: Tensor, g: Tensor) -> Tensor:
    """Smooth Grad-CAM++ from per-sample gradients ``g: (S, B, C, *spatial)``.

    With :math:`D_n = \\frac{1}{S}\\sum_s G_s^n` the averaged n-th derivative
    estimates (exponential score, so :math:`\\partial^n = G^n`):
    :math:`\\alpha = D_2 / (2 D_2 + (\\sum_{ab} A_k(a,b)) D_3)`, 0 where
    :math:`D_2 = 0` or the denominator is not positive, and
    :math:`w_k = \\sum_{ij} \\alpha_k(i,j)\\,\\mathrm{ReLU}(D_1)`. ``A`` is the
    clean input's. Computed as :math:`1 / (2 + \\sum A \\cdot D_3 / D_2)` on
    gradients rescaled per channel, so cubes of small gradients cannot underflow.
    """
    axes = spatial_axes(a)
    peak = g.abs().amax(dim=(0, *(ax + 1 for ax in axes)), keepdim=True)
    unit = safe_divide(g, peak, peak > 0)
    d1 = g.mean(0)
    d2 = unit.square().mean(0)
    d3 = unit.pow(3).mean(0)
    ratio = peak[0] * d3 * safe_reciprocal(d2, d2 > 0)  # = D3 / D2, at the gradients' scale
    den = 2.0 + a.sum(axes, keepdim=True) * ratio
    alpha = safe_reciprocal(den, (d2 > 0) & (den > 0))
    return (alpha * d1.clamp_min(0)).sum(axes)


# ----------------------------------------------------------------------------
# Public methods


@cam_method()
def gradcam(split: Split, x: Tensor, cls: _targets.Target, *, normalize: bool = True,
            chunk_size: int | None = None,
            eigen_smooth: bool = False, differentiable: bool = False) -> Computed:
    """Grad-CAM: channels weighted by their average gradient.

    .. math:: L = \\mathrm{ReLU}\\Big(\\sum_k w_k A_k\\Big), \\quad
              w_k = \\frac{1}{Z}\\sum_{i,j} \\frac{\\partial S}{\\partial A_k(i,j)}

    Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
    Gradient-based Localization", ICCV 2017.

    Args:
        split: the model cut at the target layer(s), from :func:`camfunc.split`.
        x: input batch ``(B, ...)``.
        cls: an int, one class per sample (sequence or 1-D tensor), a ``(B, K)``
            tensor, :func:`camfunc.topk`, or a callable ``scores -> (B,)``.
        normalize: min-max scale each map to [0, 1] (:func:`camfunc.normalize`).
        return_scores: also return the model's output from the same forward pass.
        chunk_size: classes per vmap chunk when K is large (bounds memory).
        eigen_smooth: collapse the channels' terms :math:`w_k A_k` by their first
            principal component instead of their sum (pytorch-grad-cam's option).
        differentiable: return maps (and scores) that carry an autograd graph to the
            model's parameters and to ``x``, to train with (``camfunc.losses``). The
            model may then be in training mode: batch norm updates its statistics
            once, as in one forward, and dropout's masks are the forward's. A split
            records the mode it was traced in; split again after switching modes.

    Returns:
        ``(B, *spatial)`` maps at the layer's resolution, ``(B, K, *spatial)`` for
        K classes, a list of those for several layers; with the scores if asked.

    Example:
        >>> s = camfunc.split(model, "layer4")
        >>> camfunc.gradcam(s, x, 3).shape                                  # class 3 for every image
        torch.Size([2, 4, 4])
        >>> camfunc.gradcam(s, x, torch.tensor([[1, 2], [3, 4]])).shape     # (B, K) classes
        torch.Size([2, 2, 4, 4])
        >>> camfunc.gradcam(s, x, 3, differentiable=True).requires_grad     # a map to train with
        True
    """
    return gradient_cam(split, x, cls, gradcam_weights, normalize=normalize,
                        chunk_size=chunk_size,
                        eigen_smooth=eigen_smooth, differentiable=differentiable)


@cam_method()
def gradcampp(split: Split, x: Tensor, cls: _targets.Target, *, normalize: bool = True,
              chunk_size: int | None = None,
              eigen_smooth: bool = False, differentiable: bool = False) -> Computed:
    """Grad-CAM++: positive gradients weighted by higher-order terms (Eq. 19).

    .. math:: w_k = \\sum_{i,j} \\alpha_k(i,j)\\,\\mathrm{ReLU}(g_k(i,j)), \\quad
              \\alpha_k(i,j) = \\frac{g_k(i,j)^2}
              {2 g_k(i,j)^2 + \\sum_{a,b} A_k(a,b)\\, g_k(i,j)^3}

    with :math:`g = \\partial S / \\partial A` (the exponential-score form), and
    :math:`\\alpha = 0` where :math:`g = 0` or where the denominator is not
    positive (possible only for negative activations, outside the paper's
    assumption). Computed eps-free as :math:`1/(2 + \\sum A \\cdot g)` for
    :math:`g > 0`. This follows the paper and pytorch-grad-cam, not torchcam
    0.5.0, whose alpha reduces to :math:`g^2` (see the migration notes).

    Chattopadhyay et al., "Grad-CAM++: Generalized Gradient-based Visual
    Explanations for Deep Convolutional Networks", WACV 2018.

    Args and returns as :func:`gradcam`.

    Example:
        >>> s = camfunc.split(model, "layer4")
        >>> cams = camfunc.gradcampp(s, x, 3)
        >>> cams.shape, cams.amax(dim=(1, 2))            # each map scaled to [0, 1]
        (torch.Size([2, 4, 4]), tensor([1., 1.]))
    """
    return gradient_cam(split, x, cls, gradcampp_weights, normalize=normalize,
                        chunk_size=chunk_size,
                        eigen_smooth=eigen_smooth, differentiable=differentiable)


@cam_method()
def xgradcam(split: Split, x: Tensor, cls: _targets.Target, *, normalize: bool = True,
             chunk_size: int | None = None,
             eigen_smooth: bool = False, differentiable: bool = False) -> Computed:
    """XGrad-CAM: gradients weighted by normalised activations.

    .. math:: w_k = \\sum_{i,j} \\frac{A_k(i,j)}{\\sum_{a,b} A_k(a,b)}
              \\frac{\\partial S}{\\partial A_k(i,j)}

    (0 for a channel whose activations sum to 0).

    Fu et al., "Axiom-based Grad-CAM: Towards Accurate Visualization and
    Explanation of CNNs", BMVC 2020.

    Args and returns as :func:`gradcam`.

    Example:
        >>> s = camfunc.split(model, "layer4")
        >>> camfunc.xgradcam(s, x, [3, 7]).shape         # one class per image
        torch.Size([2, 4, 4])
    """
    return gradient_cam(split, x, cls, xgradcam_weights, normalize=normalize,
                        chunk_size=chunk_size,
                        eigen_smooth=eigen_smooth, differentiable=differentiable)


@cam_method()
def layercam(split: Split, x: Tensor, cls: _targets.Target, *, normalize: bool = True,
             chunk_size: int | None = None,
             eigen_smooth: bool = False, differentiable: bool = False) -> Computed:
    """Layer-CAM: each position weighted by its own positive gradient.

    .. math:: L = \\mathrm{ReLU}\\Big(\\sum_k \\mathrm{ReLU}(g_k(i,j))\\, A_k(i,j)\\Big)

    Meant for several layers: split at a list of layers and fuse the maps
    with :func:`camfunc.fuse` (``tanh_gamma=2`` gives the paper's scaling).

    Jiang et al., "LayerCAM: Exploring Hierarchical Class Activation Maps for
    Localization", IEEE TIP 2021.

    Args and returns as :func:`gradcam`.

    Example:
        >>> maps = camfunc.layercam(camfunc.split(model, ["layer3", "layer4"]), x, 3, normalize=False)
        >>> [m.shape for m in maps]
        [torch.Size([2, 8, 8]), torch.Size([2, 4, 4])]
        >>> camfunc.normalize(camfunc.fuse(maps, tanh_gamma=2.0)).shape
        torch.Size([2, 8, 8])
    """
    return gradient_cam(split, x, cls, layercam_weights, normalize=normalize,
                        chunk_size=chunk_size,
                        eigen_smooth=eigen_smooth, differentiable=differentiable)


@cam_method()
def hirescam(split: Split, x: Tensor, cls: _targets.Target, *, normalize: bool = True,
             chunk_size: int | None = None,
             eigen_smooth: bool = False, differentiable: bool = False) -> Computed:
    r"""HiResCAM: activations times their own gradient, summed over channels.

    .. math:: L = \mathrm{ReLU}\Big(\sum_k g_k(i,j)\, A_k(i,j)\Big)

    Grad-CAM without the spatial average of the gradient, so the map is the
    exact first-order contribution of each position (for a pooled-linear tail
    it equals Grad-CAM).

    Draelos & Carin, "Use HiResCAM instead of Grad-CAM for faithful
    explanations of convolutional neural networks", arXiv:2011.08891, 2020.

    Args and returns as :func:`gradcam`.

    Example:
        >>> s = camfunc.split(model, "layer4")
        >>> camfunc.hirescam(s, x, camfunc.topk(2)).shape    # each image's 2 best classes
        torch.Size([2, 2, 4, 4])
    """
    return gradient_cam(split, x, cls, gradient_weights, normalize=normalize,
                        chunk_size=chunk_size,
                        eigen_smooth=eigen_smooth, differentiable=differentiable)


@cam_method()
def gradcam_elementwise(split: Split, x: Tensor, cls: _targets.Target, *, normalize: bool = True,
                        chunk_size: int | None = None,
                        eigen_smooth: bool = False, differentiable: bool = False) -> Computed:
    r"""Element-wise Grad-CAM: HiResCAM with each channel's contribution rectified first.

    .. math:: L = \sum_k \mathrm{ReLU}\big(g_k(i,j)\, A_k(i,j)\big)

    As pytorch-grad-cam's ``GradCAMElementWise`` (a variant of HiResCAM, no
    separate paper): negative evidence in one channel cannot cancel positive
    evidence in another.

    Args and returns as :func:`gradcam`.

    Example:
        >>> s = camfunc.split(model, "layer4")
        >>> cams = camfunc.gradcam_elementwise(s, x, 3)
        >>> cams.shape, bool((cams >= 0).all())
        (torch.Size([2, 4, 4]), True)
    """
    return gradient_cam(split, x, cls, gradient_weights, normalize=normalize,
                        chunk_size=chunk_size, combine=rectified_terms,
                        eigen_smooth=eigen_smooth, differentiable=differentiable)


def _draw_noise(x: Tensor, num_samples: int, noise: Tensor | None,
                generator: torch.Generator | None) -> Tensor:
    if noise is not None:
        if not isinstance(noise, Tensor) or tuple(noise.shape) != (num_samples, *x.shape):
            shape = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
            raise ValueError(
                f"noise must be a (num_samples, *x.shape) = {(num_samples, *x.shape)} tensor, "
                f"got {shape}; pass num_samples=noise.shape[0] if you meant another count"
            )
        return noise.to(device=x.device, dtype=x.dtype)
    _validate.check_count(num_samples, "num_samples")
    _draws.refuse_while_compiling("smooth_gradcampp", "noise")
    return _draws.draw(torch.randn, (num_samples, *x.shape), generator, x, x.dtype).to(x.device)


@cam_method(draws=Draws("noise", "input"))
def smooth_gradcampp(split: Split, x: Tensor, cls: _targets.Target, *, num_samples: int = 4,
                     std: float = 0.3, noise: Tensor | None = None,
                     generator: torch.Generator | None = None, normalize: bool = True,
                     chunk_size: int | None = None, eigen_smooth: bool = False,
                     differentiable: bool = False) -> Computed:
    """Smooth Grad-CAM++: Grad-CAM++ with derivatives averaged over noisy inputs.

    For samples :math:`x_s = x + \\sigma\\,\\epsilon_s`, with
    :math:`D_n = \\frac{1}{S}\\sum_s g(x_s)^n` (exponential score):

    .. math:: \\alpha_k(i,j) = \\frac{D_2}{2 D_2 + \\sum_{a,b} A_k(a,b)\\, D_3}, \\quad
              w_k = \\sum_{i,j} \\alpha_k(i,j)\\,\\mathrm{ReLU}(D_1)

    :math:`A` is the clean input's activations and the map is built on them;
    alpha's numerator is the averaged second derivative (torchcam's correction
    of the paper's typo); :math:`\\alpha = 0` where the denominator is not
    positive. So ``std=0`` gives exactly :func:`gradcampp`. torchcam 0.5.0
    instead keeps only the last noisy sample's gradient and activations.

    Omeiza et al., "Smooth Grad-CAM++: An Enhanced Inference Level
    Visualization Technique for Deep Convolutional Neural Network Models",
    arXiv:1908.01224, 2019.

    Args:
        num_samples: number of noisy copies S, all run in one batch of S*B.
        std: noise standard deviation, absolute on the preprocessed input.
        noise: standard-normal draws ``(num_samples, *x.shape)``, scaled by ``std``.
            Required under ``torch.compile``.
        generator: draws ``noise`` when it is None (eagerly, outside vmap);
            a fixed seed gives a fixed map.
        differentiable: as :func:`gradcam`; it runs the model twice (clean and
            noisy), so it refuses a model in training mode.
        Others as :func:`gradcam`.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> camfunc.smooth_gradcampp(s, x, 3, num_samples=4, generator=g).shape
        torch.Size([2, 4, 4])
        >>> torch.allclose(camfunc.smooth_gradcampp(s, x, 3, std=0.0), camfunc.gradcampp(s, x, 3))
        True
    """
    if differentiable:
        _validate.check_one_forward(split, "smooth_gradcampp")
    noise = _draw_noise(x, num_samples, noise, generator)
    samples = noise.shape[0]
    noisy = (x.unsqueeze(0) + std * noise).reshape(samples * x.shape[0], *x.shape[1:])
    clean_acts, scores = _engine.forward(split, x, differentiable=differentiable)

    def per_class(grads: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        maps = []
        for a, g in zip(clean_acts, grads, strict=True):
            check_activations(a)
            a = widened(a)
            g = widened(g).reshape(samples, *a.shape)
            maps.append(finish(weighted_sum(a, smooth_gradcampp_weights(a, g), eigen_smooth),
                               relu=True, normalize=normalize))
        return tuple(maps)

    # The classes are fixed on the clean scores, then asked of every noisy copy.
    maps = _engine.smoothed_class_maps(split, noisy, samples, x.shape[0], cls, scores, per_class,
                                       chunk_size=chunk_size, differentiable=differentiable)
    return maps, scores
