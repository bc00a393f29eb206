"""Wrappers that smooth any method: test-time augmentation.

They sit on top of the methods: a wrapped method takes the same arguments and
returns maps of the same shape.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from camfunc._core import engine as _engine, targets as _targets, validate as _validate
from camfunc._core.split import Split


def aug_smooth(method: Callable[..., Any], *, flips: bool = True,
               factors: Sequence[float] = (0.9, 1.0, 1.1)) -> Callable[..., Any]:
    r"""A method averaged over horizontal flips and intensity scalings of the input.

    .. math:: L = \frac{1}{|T|}\sum_{t \in T} t^{-1}\big(L(t(x))\big), \quad
              T = \{\text{identity}, \text{flip}\} \times \{x \mapsto f x: f \in \text{factors}\}

    pytorch-grad-cam's ``aug_smooth`` (the same six variants by default), but
    one batched call of ``method`` on all variants instead of one per variant.
    Each variant's map is normalised by ``method`` (when ``normalize=True``)
    and flipped back; the result is their mean, not normalised again, as there.
    ``topk`` classes and ``finer``/``rest`` targets are fixed on the clean input;
    a callable ``cls`` sees one variant's batch at a time. Random methods must draw with a ``generator`` (explicit noise has
    the clean batch's shape).

    Example:
        >>> smooth_gradcam = camfunc.aug_smooth(camfunc.gradcam)    # 6 variants in one call
        >>> smooth_gradcam(s, x, 3).shape
        torch.Size([2, 4, 4])
        >>> camfunc.aug_smooth(camfunc.scorecam, factors=(1.0,))(s, x, 3).shape    # flips only
        torch.Size([2, 4, 4])
    """
    variants = list(itertools.product((False, True) if flips else (False,), tuple(factors)))
    if not variants:
        raise ValueError("aug_smooth needs at least one intensity factor")

    @functools.wraps(method)
    def smoothed(split: Split, x: Tensor, cls: _targets.Target, *, normalize: bool = True,
                 return_scores: bool = False, **kwargs: Any) -> Any:
        split = _validate.check_call(split, x)
        for key in ("noise", "weights"):
            if kwargs.get(key) is not None:
                raise ValueError(f"aug_smooth cannot split an explicit {key}= over its variants; "
                                 "pass generator= instead")
        batch = x.shape[0]
        stacked = torch.cat([(x.flip(-1) if flip else x) * factor for flip, factor in variants])
        target = _targets.tiled(cls, len(variants), lambda: _engine.forward(split, x)[1], batch)
        maps, scores = method(split, stacked, target, normalize=normalize, return_scores=True, **kwargs)
        layers = maps if isinstance(maps, list) else [maps]
        averaged = []
        for layer_map in layers:
            per_variant = layer_map.reshape(len(variants), batch, *layer_map.shape[1:])
            restored = [m.flip(-1) if flip else m for m, (flip, _) in zip(per_variant, variants, strict=True)]
            averaged.append(torch.stack(restored).mean(0))
        result = averaged if isinstance(maps, list) else averaged[0]
        if not return_scores:
            return result
        plain = variants.index((False, 1.0)) if (False, 1.0) in variants else None
        clean = (scores.reshape(len(variants), batch, *scores.shape[1:])[plain] if plain is not None
                 else _engine.forward(split, x)[1])
        return result, clean

    return smoothed
