"""Training losses on CAM maps: pure functions of maps, masks and (for GAIN) the model,
to use with maps made by a gradient method with ``differentiable=True``.

Maps are ``(B, *spatial)`` or ``(B, K, *spatial)`` at the layer's resolution; masks are
``(B, *spatial)`` (or ``(B, K, *spatial)``) at any resolution, 1 where the evidence
belongs. Maps are resized to the masks' size by :func:`camfunc.upsample` (differentiable).
Each loss returns a scalar: the mean over maps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from camfunc._core import ops as _ops
from camfunc._core.split import Split
from camfunc._core.targets import class_scores

__all__ = ["attention_mining", "energy_outside", "right_reasons", "soft_pointing"]


def _aligned(maps: Tensor, masks: Tensor) -> tuple[Tensor, Tensor, int]:
    """Maps resized to the masks' grid, masks broadcast to the maps' leading axes, and the
    number of spatial axes."""
    if not isinstance(maps, Tensor) or not isinstance(masks, Tensor):
        raise TypeError(f"maps and masks must be tensors, got {type(maps).__name__} and "
                        f"{type(masks).__name__}")
    spatial = masks.ndim - 1
    if spatial < 1 or maps.ndim not in (spatial + 1, spatial + 2) or maps.shape[0] != masks.shape[0]:
        raise ValueError(f"masks (B, *spatial) must match maps (B, *spatial) or (B, K, *spatial) "
                         f"in batch and rank; got maps {tuple(maps.shape)} and masks {tuple(masks.shape)}")
    if maps.shape[-spatial:] != masks.shape[-spatial:]:
        maps = _ops.upsample(maps, masks.shape[-spatial:])
    masks = masks.to(maps.dtype)
    if maps.ndim == masks.ndim + 1:
        masks = masks.unsqueeze(1)
    return maps, masks.expand_as(maps), spatial


def energy_outside(maps: Tensor, masks: Tensor, *, eps: float = 1e-12) -> Tensor:
    r"""The share of each map's energy that falls outside its mask, averaged.

    .. math:: \mathcal{L} = \frac{\sum_{p} L(p)\,(1 - M(p))}{\sum_p L(p) + \epsilon}

    for non-negative maps :math:`L` (ReLU'd CAMs). Its complement is the
    energy-based pointing game of Wang et al., "Score-CAM: Score-Weighted Visual
    Explanations for Convolutional Neural Networks", CVPR-W 2020; as a loss it
    penalises attention outside the object.

    Example:
        >>> maps = camfunc.gradcam(s, x, 3, differentiable=True)       # (2, 4, 4)
        >>> masks = torch.zeros(2, 64, 64); masks[:, 16:48, 16:48] = 1
        >>> camfunc.losses.energy_outside(maps, masks).requires_grad          # trains the model
        True
    """
    maps, masks, spatial = _aligned(maps, masks)
    axes = tuple(range(-spatial, 0))
    outside = (maps * (1 - masks)).sum(axes)
    return (outside / (maps.sum(axes) + eps)).mean()


def right_reasons(maps: Tensor, irrelevant: Tensor) -> Tensor:
    r"""The squared map inside regions annotated as irrelevant, summed per map, averaged.

    .. math:: \mathcal{L} = \sum_p \big(A(p)\, L(p)\big)^2

    with :math:`A = 1` where a human said the evidence must not be. Ross et al.,
    "Right for the Right Reasons: Training Differentiable Models by Constraining
    their Explanations", IJCAI 2017, put this penalty on input gradients of the
    log-probabilities; here it is on the CAM.

    Example:
        >>> maps = camfunc.gradcam(s, x, 3, differentiable=True)
        >>> corner = torch.zeros(2, 64, 64); corner[:, :8, :8] = 1        # a known decoy
        >>> camfunc.losses.right_reasons(maps, corner).requires_grad
        True
    """
    maps, irrelevant, spatial = _aligned(maps, irrelevant)
    return (maps * irrelevant).square().sum(tuple(range(-spatial, 0))).mean()


def soft_pointing(maps: Tensor, masks: Tensor, *, temperature: float = 0.1, eps: float = 1e-12) -> Tensor:
    r"""A differentiable pointing game: minus the log of the map's softmax mass inside the mask.

    .. math:: \mathcal{L} = -\log \sum_p M(p)\, \frac{e^{L(p)/\tau}}{\sum_q e^{L(q)/\tau}}

    As :math:`\tau \to 0` the softmax picks the map's maximum, and the mass inside
    is 1 for a hit of the pointing game (Zhang et al., "Top-down Neural Attention
    by Excitation Backprop", ECCV 2016) and 0 for a miss. Use normalised maps, so
    that :math:`\tau` has one meaning for all of them.

    Example:
        >>> maps = camfunc.gradcam(s, x, 3, differentiable=True)
        >>> masks = torch.zeros(2, 64, 64); masks[:, 16:48, 16:48] = 1
        >>> camfunc.losses.soft_pointing(maps, masks, temperature=0.05).requires_grad
        True
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    maps, masks, spatial = _aligned(maps, masks)
    weights = torch.softmax((maps / temperature).flatten(-spatial), -1)
    inside = (weights * masks.flatten(-spatial)).sum(-1)
    return -(inside + eps).log().mean()


def attention_mining(model: Split | Callable[[Tensor], Any], x: Tensor, maps: Tensor, cls: Any, *,
                     threshold: float = 0.5, sharpness: float = 10.0) -> Tensor:
    r"""GAIN's attention-mining loss: the class's probability once its attended region is erased.

    .. math:: T = \sigma\big(\omega (L - \sigma_0)\big), \quad
              x^* = x - T \odot x, \quad
              \mathcal{L} = \frac{1}{n} \sum_c p_c(x^*)

    with :math:`L` the normalised map upsampled to ``x``, ``threshold``
    :math:`\sigma_0` and ``sharpness`` :math:`\omega`. Minimising it asks the map to
    cover *all* the evidence for the class, so that none is left once it is
    erased. Li et al., "Tell Me Where to Look: Guided Attention Inference
    Network", CVPR 2018 (Eq. 3 and 4).

    Args:
        model: the model, or a split (``split(x)`` runs the whole model), giving logits.
        x: the input batch ``(B, C, *spatial)``.
        maps: ``(B, *spatial)`` maps in [0, 1] for class ``cls``.
        cls: one class per sample ``(B,)``, or an int.

    Example:
        >>> maps = camfunc.gradcam(s, x, 3, differentiable=True)
        >>> camfunc.losses.attention_mining(s, x, maps, 3).requires_grad
        True
    """
    spatial = x.ndim - 2
    if maps.ndim != spatial + 1 or maps.shape[0] != x.shape[0]:
        raise ValueError(f"attention_mining takes one map per sample, (B, *spatial); got maps "
                         f"{tuple(maps.shape)} for x {tuple(x.shape)}")
    attended = torch.sigmoid(sharpness * (_ops.upsample(maps, x.shape[2:]) - threshold))
    erased = x - attended.unsqueeze(1) * x
    probabilities = F.softmax(class_scores(model(erased)), dim=1)
    index = torch.as_tensor(cls, device=x.device).expand(x.shape[0]).long()
    return probabilities.gather(1, index[:, None]).mean()
