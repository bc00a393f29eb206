"""ARCC: coherency, simplicity and ROAD in one number, pytorch-grad-cam 1.5.7's metric."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from camfunc._core import targets as _targets
from camfunc.metrics import _inputs, _model_calls, _road

__all__ = ["arcc"]

#: pytorch-grad-cam's guards, kept so scores agree with it: they only matter near 0.
_EPS = 1e-8


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample correlation of two batches of maps, ``cov / (std_a std_b + 1e-8)``."""
    a = a.flatten(1).double()
    b = b.flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    cov = (a * b).sum(1)
    return cov / ((a.square().sum(1) * b.square().sum(1)).sqrt() + _EPS * (a.shape[1] - 1))


def arcc(method: _model_calls.Method, split: Any, x: Tensor, cls: _targets.Target | None = None, *,
         maps: Tensor | None = None, percentiles: Sequence[float] = (20, 40, 60, 80),
         noise_std: float = 0.01, noise: Tensor | None = None,
         generator: torch.Generator | None = None, batch_size: int = 32,
         return_parts: bool = False) -> Any:
    r"""ARCC: harmonic mean of coherency, simplicity (1 - complexity) and ROAD, ``(B,)``.

    .. math:: \mathrm{ARCC} = 3\Big(\frac{1}{\mathrm{Coh}} + \frac{1}{1 - \mathrm{Com}}
              + \frac{1}{\mathrm{ROAD'}}\Big)^{-1}, \quad
              \mathrm{Coh} = \frac{\rho(M, M_{x \odot M}) + 1}{2}, \quad
              \mathrm{Com} = \frac{1}{HW}\sum_{ij} |M_{ij}|

    with :math:`M` the map at the input's size (``maps``, or ``method``'s
    maps upsampled), :math:`M_{x \odot M}` the same method's map for the input
    multiplied by :math:`M` (over all channels), :math:`\rho` Pearson's
    correlation, and :math:`\mathrm{ROAD'} = \mathrm{clip}(2\,\mathrm{ROAD}_{comb}, 0, 1)`
    (:func:`road` at ``percentiles``; ``noise`` is its ``(2P, B, C, H, W)``
    draws). Each term carries pytorch-grad-cam's ``+1e-8``. Higher is better;
    maps are expected in [0, 1] (``normalize=True``). ``return_parts=True``
    returns ``(arcc, {"coherency", "complexity", "road"})``, ``road`` unscaled.

    pytorch-grad-cam 1.5.7's ``ARCC`` (its docstring cites arXiv:2605.14641):
    Poppi et al.'s ADCC ("Revisiting the Evaluation of Class Activation
    Mapping for Explainability: A Novel Metric and Experimental Analysis",
    CVPR Workshops 2021) with the average drop replaced by ROAD (Rong et al.,
    ICML 2022).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> scores = camfunc.metrics.arcc(camfunc.gradcampp, s, x, 3, percentiles=(20, 80), generator=g)
        >>> scores.shape, bool(((scores >= 0) & (scores <= 1)).all())
        (torch.Size([2]), True)
    """
    _model_calls.checked(split, x, batch_size)
    _road.check_images(x)
    target, _ = _model_calls.fix_target(split, x, cls)
    cls_rows = target.for_rows(torch.arange(x.shape[0], device=x.device))
    if maps is None:
        maps = _model_calls.method_maps(method, split, x, cls_rows)
    else:
        maps = _inputs.input_maps(maps, x)
    road_value = _road.road(split, x, maps, cls, order="combined", percentiles=percentiles,
                            noise_std=noise_std, noise=noise, generator=generator,
                            batch_size=batch_size)
    complexity = maps.abs().flatten(1).mean(1)
    mixed = _model_calls.method_maps(method, split, x * maps.unsqueeze(1).to(x.dtype), cls_rows)
    coherency = ((_pearson(mixed, maps) + 1) / 2).float()
    scaled_road = (2 * road_value).clamp(0, 1)
    score = 3 / (1 / (coherency + _EPS) + 1 / (1 - complexity + _EPS) + 1 / (scaled_road + _EPS))
    if return_parts:
        return score, {"coherency": coherency, "complexity": complexity, "road": road_value}
    return score
