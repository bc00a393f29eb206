"""Leaving out images whose maps are not finite (``skip_nonfinite=True``) instead of refusing them.

A NaN map (camfunc gives one to an image whose input or activations are not
finite) has no saliency order, no top point, no energy. The metric is then
computed on the other images, exactly as for a batch without them, and the
left-out images get NaN in every per-image result (False, or -1 for a class).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor

from camfunc._core import targets as _targets

R = TypeVar("R", bound=NamedTuple)


def finite_rows(maps: Any, skip: bool) -> Tensor | None:
    """The images whose maps are finite, when ``skip`` and some are not; else None."""
    if not skip or not isinstance(maps, Tensor) or maps.ndim == 0:
        return None
    finite = torch.isfinite(maps.float()).flatten(1).all(1)
    if bool(finite.all()):
        return None
    if not bool(finite.any()):
        raise ValueError("every map holds NaN or Inf: there is no image left to score")
    return finite.nonzero().flatten()


def rows_of(value: Any, keep: Tensor) -> Any:
    """A per-image argument (tensor, list of per-image items) for the kept images only."""
    if isinstance(value, Tensor) and value.ndim:
        return value[keep.to(value.device)]
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [value[int(i)] for i in keep]
    return value


def target_rows(cls: Any, keep: Tensor, model: Callable[[Tensor], Any], x: Tensor) -> Any:
    """``cls`` for the kept images: indices subset; a callable reads them in their own batch."""
    if cls is None or (not _targets.is_objective(cls) and not isinstance(cls, (Tensor, Sequence))):
        return cls
    if _targets.is_objective(cls):
        with torch.no_grad():
            clean = model(x)
        return _targets.for_rows(cls, clean, keep.to(x.device), x.shape[0])
    return rows_of(cls, keep)


def scattered(result: R, keep: Tensor, batch: int, per_image: tuple[str, ...]) -> R:
    """``result`` of the kept images with its per-image fields back at full batch size."""
    fields = {}
    for name in result._fields:
        value = getattr(result, name)
        if name in per_image and isinstance(value, Tensor):
            fill = float("nan") if value.is_floating_point() else (False if value.dtype == torch.bool else -1)
            full = value.new_full((batch, *value.shape[1:]), fill)
            full[keep.to(value.device)] = value
            value = full
        fields[name] = value
    return result._replace(**fields)
