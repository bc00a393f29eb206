"""Average drop and increase in confidence: the model's score on the input masked by its map.

Chattopadhay et al., "Grad-CAM++: Generalized Gradient-based Visual
Explanations for Deep Convolutional Networks", WACV 2018, Section 6.1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from camfunc.metrics import _inputs, _model_calls, _skipping
from camfunc.metrics._inputs import Classes, Model


class ConfidenceChange(NamedTuple):
    """Per-image scores and their averages (fractions; the paper reports percentages)."""

    #: ``(B,)`` relative drop :math:`\max(0, Y - O) / Y`.
    drop: Tensor
    #: ``(B,)`` bool, :math:`O > Y`.
    increase: Tensor
    #: 0-d, mean of ``drop``.
    average_drop: Tensor
    #: 0-d, fraction of images with :math:`O > Y`.
    increase_in_confidence: Tensor
    #: ``(B,)`` :math:`Y`, the score on the input.
    score: Tensor
    #: ``(B,)`` :math:`O`, the score on the masked input.
    masked_score: Tensor
    #: ``(B,)`` the class scored for each image (None for a callable ``cls``).
    classes: Tensor | None


def relative_drop(score: Tensor, masked_score: Tensor) -> Tensor:
    r""":math:`\max(0, Y - O) / Y`, and exactly 0 where nothing dropped (even if :math:`Y = 0`)."""
    dropped = score > masked_score
    safe = dropped & (score != 0)
    ratio = (score - masked_score) / score.where(safe, score.new_ones(()))
    return ratio.where(safe, score.new_tensor(float("inf"))).where(dropped, score.new_zeros(()))


def confidence_change(model: Model, x: Tensor, maps: Tensor, cls: Classes = None, *,
                      probabilities: bool | None = None,
                      skip_nonfinite: bool = False) -> ConfidenceChange:
    r"""Average drop and increase in confidence of each image's class when the image
    is masked by its map.

    .. math:: Y_i = f_c(x_i), \quad O_i = f_c(x_i \odot M_i), \quad
              \mathrm{drop}_i = \frac{\max(0, Y_i - O_i)}{Y_i}, \quad
              \mathrm{increase}_i = [O_i > Y_i]

    averaged over the batch. :math:`M_i`, in [0, 1], is the map resized to the
    input (bilinear) and shared by the channels; :math:`f_c` is the softmax
    probability of class c, or the raw logit with ``probabilities=False``
    (torchcam 0.5.0's ``ClassificationMetric`` default: with logits, a
    non-positive :math:`Y` makes the ratio meaningless; torchcam also adds 1e-7
    to the denominator). Where nothing dropped the drop is 0; a drop from
    :math:`Y = 0` is infinite. One forward of the masked batch.

    Chattopadhay et al., "Grad-CAM++: Generalized Gradient-based Visual
    Explanations for Deep Convolutional Networks", WACV 2018.

    Args:
        model: a callable ``x -> (B, num_classes)`` scores (an ``nn.Module`` in eval
            mode or a ``camfunc.Split``).
        x: the input batch ``(B, C, *spatial)``.
        maps: ``(B, *map_spatial)`` or ``(B, 1, *map_spatial)``, in [0, 1], any resolution.
        cls: one class per image (int, length-B sequence, ``(B,)`` tensor), None
            for each image's top class, or a callable ``output -> (B,)`` scores
            written for the image batch (its value is then the score).
        probabilities: softmax the class scores (default for class indices), or
            read logits (False); not for a callable ``cls``.
        skip_nonfinite: leave out images whose map holds NaN or Inf (their
            results are NaN, or False, and the averages cover the rest) instead
            of refusing them.

    Example:
        >>> cams = camfunc.gradcam(s, x, 3)                   # in [0, 1], any size
        >>> result = camfunc.metrics.confidence_change(s, x, cams, 3)
        >>> result.drop.shape, result.average_drop.shape      # per image, and the batch's mean
        (torch.Size([2]), torch.Size([]))
    """
    keep = _skipping.finite_rows(maps, skip_nonfinite)
    if keep is not None:
        kept = confidence_change(model, _skipping.rows_of(x, keep), _skipping.rows_of(maps, keep),
                                 _skipping.target_rows(cls, keep, model, x), probabilities=probabilities)
        per_image = ("drop", "increase", "score", "masked_score", "classes")
        return _skipping.scattered(kept, keep, x.shape[0], per_image)
    masks = _inputs.checked_maps(model, x, maps, cls, probabilities)
    _inputs.check_unit_interval(masks)
    scored = _inputs.scoring_model(model, cls, probabilities)
    target, score = _model_calls.fix_target(scored, x, cls)
    masked_input = x * masks.unsqueeze(1).to(x.dtype)
    with torch.no_grad():
        masked_score = target.values(scored(masked_input), torch.arange(x.shape[0], device=x.device))
    drop = relative_drop(score, masked_score)
    increase = masked_score > score
    return ConfidenceChange(drop, increase, drop.mean(), increase.float().mean(), score,
                            masked_score, target.index)


def average_drop(model: Model, x: Tensor, maps: Tensor, cls: Classes = None, *,
                 probabilities: bool | None = None, skip_nonfinite: bool = False) -> Tensor:
    r"""Average drop: :math:`\frac{1}{B}\sum_i \max(0, Y_i - O_i) / Y_i`, lower is better.

    :math:`Y_i` is the class score on the image and :math:`O_i` on the image
    masked by its map; see :func:`confidence_change` for the details and the
    per-image values. Chattopadhay et al., Grad-CAM++, WACV 2018.

    Example:
        >>> cams = camfunc.gradcampp(s, x, 3)
        >>> drop = camfunc.metrics.average_drop(s, x, cams, 3)
        >>> drop.shape, bool(0 <= drop <= 1)
        (torch.Size([]), True)
    """
    return confidence_change(model, x, maps, cls, probabilities=probabilities,
                             skip_nonfinite=skip_nonfinite).average_drop


def increase_in_confidence(model: Model, x: Tensor, maps: Tensor, cls: Classes = None, *,
                           probabilities: bool | None = None, skip_nonfinite: bool = False) -> Tensor:
    r"""Increase in confidence: :math:`\frac{1}{B}\sum_i [O_i > Y_i]`, higher is better.

    :math:`Y_i` is the class score on the image and :math:`O_i` on the image
    masked by its map; see :func:`confidence_change`. Chattopadhay et al.,
    Grad-CAM++, WACV 2018.

    Example:
        >>> cams = camfunc.gradcampp(s, x, 3)
        >>> increase = camfunc.metrics.increase_in_confidence(model, x, cams)   # each image's top class
        >>> increase.shape, bool(0 <= increase <= 1)
        (torch.Size([]), True)
    """
    return confidence_change(model, x, maps, cls, probabilities=probabilities,
                             skip_nonfinite=skip_nonfinite).increase_in_confidence
