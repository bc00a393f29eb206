"""Checks and conversions the metrics share: the model, the images, the maps, the class.

Every check runs before any forward pass, so bad input changes nothing and
costs nothing. Maps may come at any resolution, as ``(B, *spatial)`` or with a
singleton class axis ``(B, 1, *spatial)`` (torchcam's and captum's layout);
they are resized to the input's size by bilinear interpolation
(:func:`camfunc.upsample`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from camfunc._core import ops as _ops, targets as _targets, validate as _validate
from camfunc._core.split import Split

#: A model as the metrics see it: ``x -> scores (B, num_classes)``.
Model = Callable[[Tensor], Tensor]
#: One class per image: an int, a length-B sequence, a ``(B,)`` tensor, or None (the top class).
Classes = Any


def as_split(model: Any) -> Split:
    """The model seen as a Split, so camfunc's own checks apply to any callable."""
    if isinstance(model, Split):
        return model
    if not callable(model):
        raise TypeError(
            f"model must be a callable x -> scores (an nn.Module or a camfunc.Split), "
            f"got {type(model).__name__}"
        )
    return Split(head=model, tail=_unchanged, model=model if isinstance(model, nn.Module) else None)


def _unchanged(out: Any) -> Any:
    return out


def check_model_and_images(model: Any, x: Any) -> None:
    """An eval-mode model, and a float batch ``(B, C, *spatial)`` with 1 to 3 spatial axes."""
    split = as_split(model)
    _validate.check_input(split, x)
    _validate.check_eval_mode(split)
    if not 3 <= x.ndim <= 5:
        raise ValueError(
            f"x must be a batch (B, C, *spatial) with 1 to 3 spatial axes, got shape "
            f"{tuple(x.shape)}; add the batch axis with x.unsqueeze(0) if it is one image"
        )


def as_maps(maps: Any, batch: int, spatial_ndim: int) -> Tensor:
    """``(B, *spatial)`` float maps from ``(B, *spatial)`` or ``(B, 1, *spatial)``."""
    if not isinstance(maps, Tensor):
        raise TypeError(f"maps must be a torch.Tensor, got {type(maps).__name__}")
    if maps.is_complex() or maps.dtype == torch.bool:
        raise TypeError(f"maps must hold real numbers, got dtype {maps.dtype}")
    if maps.ndim == spatial_ndim + 2:
        if maps.shape[1] != 1:
            raise ValueError(
                f"maps of shape {tuple(maps.shape)} hold {maps.shape[1]} maps per image; "
                "the metric scores one map per image: pass maps[:, k] for the k-th class"
            )
        maps = maps[:, 0]
    if maps.ndim != spatial_ndim + 1:
        raise ValueError(
            f"maps must be (B, *spatial) or (B, 1, *spatial) with {spatial_ndim} spatial "
            f"axes, got shape {tuple(maps.shape)}"
        )
    if maps.shape[0] != batch:
        raise ValueError(
            f"maps hold {maps.shape[0]} maps but the batch has {batch} images; "
            "give one map per image"
        )
    if maps.shape[1:].numel() == 0:
        raise ValueError(f"maps of shape {tuple(maps.shape)} are empty")
    floats: Tensor = maps.float()
    if not bool(torch.isfinite(floats).all()):
        raise ValueError("maps contain NaN or infinite values; fix or drop those images first")
    return floats


def resized(maps: Tensor, size: tuple[int, ...]) -> Tensor:
    """Maps at ``size`` (bilinear, ``align_corners=False``); unchanged if already there."""
    return maps if tuple(maps.shape[1:]) == tuple(size) else _ops.upsample(maps, size)


def check_unit_interval(maps: Tensor) -> None:
    low, high = float(maps.min()), float(maps.max())
    if low < 0 or high > 1:
        raise ValueError(
            f"maps must lie in [0, 1] to mask the input, got values in [{low:.4g}, {high:.4g}]; "
            "scale them with camfunc.normalize(maps)"
        )


def check_classes(cls: Classes, batch: int) -> None:
    """One target per image, before any forward pass."""
    if cls is None:
        return
    if isinstance(cls, _targets.TopK):
        raise TypeError(
            "the metric needs one target per image: an int, a length-B sequence, a (B,) "
            "tensor, a callable output -> (B,) scores, or None for the top class; got topk"
        )
    _targets.check_form(cls, batch)
    if _targets.is_objective(cls):
        return
    if isinstance(cls, Tensor) and cls.ndim == 2:
        raise ValueError(
            f"cls of shape {tuple(cls.shape)} asks for several classes per image; "
            "the metric scores one map per image: pass a (B,) tensor"
        )


def model_scores(model: Model, x: Tensor, probabilities: bool) -> Tensor:
    """The model's ``(B, num_classes)`` scores on ``x``, softmaxed if asked, in float32."""
    with torch.no_grad():
        out = model(x)
    if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"the model must return (B, num_classes) scores for a batch of {x.shape[0]}, "
            f"got {shape}; wrap it so it returns class scores"
        )
    out = out.float()
    return out.softmax(1) if probabilities else out


def chosen_classes(cls: Classes, scores: Tensor) -> Tensor:
    """``(B,)`` class indices: ``cls``, or each image's top class when ``cls`` is None."""
    if cls is None:
        return scores.argmax(1)
    index, _ = _targets.class_indices(cls, scores)
    return index[:, 0]


def picked(scores: Tensor, classes: Tensor) -> Tensor:
    """``scores[b, classes[b]]`` for each row b."""
    return scores.gather(1, classes.unsqueeze(1)).squeeze(1)


def check_probabilities(probabilities: Any) -> None:
    if probabilities is not None and not isinstance(probabilities, bool):
        raise TypeError(f"probabilities must be True, False or None, got {probabilities!r}")


def scoring_model(model: Model, cls: Classes, probabilities: bool | None) -> Model:
    """The model as a metric reads it.

    For class indices (or None), ``(B, num_classes)`` scores, softmaxed unless
    ``probabilities`` is False. A callable ``cls`` reads the raw output, and its
    value is the score: softmaxing first is not defined, so ``probabilities=True``
    with it is an error.
    """
    if _targets.is_objective(cls):
        if probabilities:
            raise ValueError("a callable cls defines its own score from the model's output; "
                             "probabilities applies to class indices only (leave it unset)")
        return model
    softmax = True if probabilities is None else probabilities
    return lambda v: model_scores(model, v, softmax)


def checked_maps(model: Any, x: Any, maps: Any, cls: Classes, probabilities: Any) -> Tensor:
    """All checks of a model-based metric's arguments; the maps at the input's size."""
    check_model_and_images(model, x)
    check_probabilities(probabilities)
    check_classes(cls, x.shape[0])
    return input_maps(maps, x)


def input_maps(maps: Any, x: Tensor) -> Tensor:
    """Maps ``(B, *h)`` at any resolution, resized to the input's ``(B, *spatial)``, float32."""
    maps = as_maps(maps, x.shape[0], x.ndim - 2)
    return resized(maps.detach(), tuple(x.shape[2:])).to(x.device)
