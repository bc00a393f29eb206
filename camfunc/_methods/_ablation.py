"""Ablation-CAM: each channel weighted by the score drop when it is removed."""

from __future__ import annotations

import torch
from torch import Tensor

from camfunc._core import engine as _engine, targets as _targets, validate as _validate
from camfunc._core.split import Split
from camfunc._methods._combine import (
    Computed,
    check_activations,
    maps_from_class_weights,
    safe_divide,
)
from camfunc._methods._method import cam_method


@cam_method(compiles_since=(2, 5))  # torch 2.4's dynamo cannot trace vmap over module calls
def ablationcam(split: Split, x: Tensor, cls: _targets.Target, *, batch_size: int = 32,
                ablation_value: float = 0.0, normalize: bool = True, eigen_smooth: bool = False) -> Computed:
    r"""Ablation-CAM: channels weighted by the relative score drop when each is ablated.

    .. math:: w_k = \frac{y^c - y^c_k}{y^c}, \quad L = \mathrm{ReLU}\Big(\sum_k w_k A_k\Big)

    with :math:`y^c_k` the class score when channel k of ``A`` is set to
    ``ablation_value`` (0, as in the paper). Only the tail is re-run, for the
    C ablated copies of ``A``, batched with ``torch.func.vmap`` about
    ``batch_size`` inputs at a time; the head runs once. A zero score gives
    zero weights.

    Desai & Ramaswamy, "Ablation-CAM: Visual Explanations for Deep
    Convolutional Network via Gradient-free Localization", WACV 2020.

    Example:
        >>> s = camfunc.split(model, "layer4")            # 16 channels: 16 tail re-runs per image
        >>> camfunc.ablationcam(s, x, 3, batch_size=8).shape
        torch.Size([2, 4, 4])
        >>> camfunc.ablationcam(s, x, camfunc.topk(2)).shape
        torch.Size([2, 2, 4, 4])
    """
    _validate.check_count(batch_size, "batch_size")
    found, scores = _engine.carries(split, x)
    pick, keep_k = _targets.picker(cls, scores, x.shape[0])
    rows = torch.arange(x.shape[0], device=x.device)
    base = pick(scores, rows).float()  # (B, K)
    maps = []
    for layer, carry in enumerate(found):
        a, context = carry[0], carry[1:]
        check_activations(a)
        channel_ids = torch.arange(a.shape[1], device=a.device)
        shape = (1, a.shape[1], *(1,) * (a.ndim - 2))

        def ablated(k: Tensor, a: Tensor = a, context: tuple = context, layer: int = layer,
                    channel_ids: Tensor = channel_ids, shape: tuple[int, ...] = shape) -> Tensor:
            # A (C,) comparison per copy, not a dense (C, C) mask: one select per ablated copy.
            keep = (channel_ids != k).reshape(shape)
            out = _engine.run_from(split, layer, (torch.where(keep, a, ablation_value), *context))
            return pick(out, rows).float()

        with torch.no_grad():
            dropped = torch.func.vmap(ablated, chunk_size=max(1, batch_size // x.shape[0]))(channel_ids)
        drop = base.unsqueeze(0) - dropped  # (C, B, K)
        weights = safe_divide(drop, base.unsqueeze(0), base.unsqueeze(0) != 0).permute(1, 0, 2)  # (B, C, K)
        maps.append(maps_from_class_weights(a, weights, keep_k, normalize=normalize,
                                            eigen_smooth=eigen_smooth))
    return tuple(maps), scores
