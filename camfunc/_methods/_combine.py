"""The step every method shares: weights -> weighted sum -> ReLU -> normalise.

A method only supplies ``weights(A, G)``: channel weights ``(B, C)`` or pixel
weights ``(B, C, *spatial)``, and, rarely, other per-channel terms than
``w_c A_c``. The terms are summed over channels, or, with ``eigen_smooth``,
collapsed to their first principal component. The rest lives here, once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from camfunc._core import engine as _engine, ops as _ops, targets as _targets, validate as _validate
from camfunc._core.split import Split
from camfunc._methods._projection import first_component

Weights = Callable[[Tensor, Tensor], Tensor]
#: A compute step's result: one map tensor per cut (chain order), and the scores.
Computed = tuple[tuple[Tensor, ...], Any]
Combine = Callable[[Tensor, Tensor], Tensor]  # (A, weights) -> per-channel terms


def spatial_axes(a: Tensor) -> tuple[int, ...]:
    """The spatial axes of activations ``(B, C, *spatial)``."""
    return tuple(range(2, a.ndim))


def _broadcast(weights: Tensor, a: Tensor) -> Tensor:
    return weights.reshape(*weights.shape, *(1,) * (a.ndim - weights.ndim))


def channel_terms(a: Tensor, weights: Tensor) -> Tensor:
    """Each channel's contribution :math:`w_c A_c`, ``(B, C, *spatial)``."""
    return _broadcast(weights, a) * a


def rectified_terms(a: Tensor, weights: Tensor) -> Tensor:
    r""":math:`\mathrm{ReLU}(w_c A_c)`: each channel's contribution clipped first."""
    return (_broadcast(weights, a) * a).clamp_min(0)


def collapse(terms: Tensor, eigen_smooth: bool) -> Tensor:
    """Channel contributions to one map: their sum, or with ``eigen_smooth`` their
    first principal component (pytorch-grad-cam's ``eigen_smooth``)."""
    return first_component(terms) if eigen_smooth else terms.sum(1)


def weighted_sum(a: Tensor, weights: Tensor, eigen_smooth: bool = False) -> Tensor:
    r""":math:`\sum_c w_c A_c`, with channel or pixel weights (or its eigen-smoothed form)."""
    return collapse(channel_terms(a, weights), eigen_smooth)


def finish(cam: Tensor, *, relu: bool, normalize: bool) -> Tensor:
    if relu:
        cam = cam.clamp_min(0)
    if normalize:
        cam = _ops.normalize(cam)
    return cam


def widened(t: Tensor) -> Tensor:
    """Half types computed in float32 (``g**3`` underflows in half precision); float32 and
    float64 kept, so that float64 maps can be checked with ``torch.autograd.gradcheck``."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def check_activations(a: Tensor) -> None:
    if a.ndim < 3:
        raise ValueError(
            f"the layer's activations have shape {tuple(a.shape)}; CAM methods need "
            "(B, C, *spatial) with 1 to 3 spatial axes. Pick an earlier layer"
        )


def in_user_order(split: Split[Any], maps: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Maps in the split's chain order put in the order the user gave the layers (a
    single fused map stays as it is)."""
    return tuple(maps[i] for i in split.order) if len(split.order) == len(maps) else maps


def in_chain_order(split: Split[Any], maps: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The inverse of :func:`in_user_order`."""
    if len(split.order) != len(maps):
        return maps
    chained = dict(zip(split.order, maps, strict=True))
    return tuple(chained[i] for i in range(len(maps)))


def arrange(split: Split[Any], maps: tuple[Tensor, ...]) -> Tensor | list[Tensor]:
    """Back to the user's layer order; a single layer gives a tensor, several (or a split
    made from a list of layers) a list.

    A sample whose maps hold a NaN (non-finite input) gets NaN maps throughout.
    """
    maps = tuple(_validate.nonfinite_maps(m) for m in in_user_order(split, maps))
    return list(maps) if split.listed or len(maps) > 1 else maps[0]


def gradient_cam(split: Split, x: Tensor, cls: _targets.Target, weights: Weights, *,
                 normalize: bool, chunk_size: int | None, relu: bool = True,
                 combine: Combine = channel_terms, eigen_smooth: bool = False,
                 differentiable: bool = False) -> Computed:
    """A gradient method's maps from its ``weights(A, G)`` function, and the scores
    (with a graph to the model's parameters and ``x`` when ``differentiable``)."""

    def per_class(acts: tuple[Tensor, ...], grads: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        maps = []
        for a, g in zip(acts, grads, strict=True):
            check_activations(a)
            a, g = widened(a), widened(g)
            maps.append(finish(collapse(combine(a, weights(a, g)), eigen_smooth), relu=relu,
                               normalize=normalize))
        return tuple(maps)

    return _engine.class_maps(split, x, cls, per_class, chunk_size=chunk_size,
                              differentiable=differentiable)


def maps_from_class_weights(a: Tensor, weights: Tensor, keep_k: bool, *, normalize: bool,
                            eigen_smooth: bool) -> Tensor:
    """``(B, C, K)`` channel weights, one column per class, to ReLU'd maps ``(B, K, *sp)``
    (``(B, *sp)`` when the caller asked for one class per sample)."""
    a = a.float()
    per_class = [finish(weighted_sum(a, weights[..., k], eigen_smooth), relu=True,
                        normalize=normalize)
                 for k in range(weights.shape[-1])]
    return torch.stack(per_class, 1) if keep_k else per_class[0]


def activation_cam(split: Split, x: Tensor, cls: _targets.Target,
                   raw_map: Callable[[Tensor], Tensor], *, normalize: bool) -> Computed:
    """Maps that depend on the activations alone (one forward, no vjp), and the scores.

    The maps get the class axis ``cls`` asks for, so every method answers in the same shape.
    """
    acts, scores = _engine.forward(split, x)
    k, keep_k = _targets.class_count(cls, scores)
    maps = []
    for a in acts:
        check_activations(a)
        cam = finish(raw_map(a.float()), relu=True, normalize=normalize)
        maps.append(cam.unsqueeze(1).expand(cam.shape[0], k, *cam.shape[1:]) if keep_k else cam)
    return tuple(maps), scores


def safe_divide(num: Tensor, den: Tensor, valid: Tensor) -> Tensor:
    """``num / den`` where ``valid``, else 0; no inf or NaN even in gradients. Divides
    directly: ``1 / den`` overflows float32 for a subnormal ``den`` (below 2.9e-39), where
    the quotient of two tiny numbers is still finite."""
    return torch.where(valid, num / torch.where(valid, den, torch.ones_like(den)), torch.zeros_like(num))


def safe_reciprocal(den: Tensor, valid: Tensor) -> Tensor:
    """``1 / den`` where ``valid``, else 0; no inf or NaN even in gradients."""
    return torch.where(valid, 1.0 / torch.where(valid, den, torch.ones_like(den)), torch.zeros_like(den))
