"""Deep feature factorisation: non-negative matrix factorisation of a layer's activations, in torch."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from camfunc._core import engine as _engine, ops as _ops, validate as _validate
from camfunc._core.split import Split
from camfunc._util import draws as _draws
from camfunc._util.host import syncs


class Factorization(NamedTuple):
    """``concepts`` (k, C), ``maps`` (B, k, *spatial), ``concept_scores`` (k, ...) or None."""

    concepts: Tensor
    maps: Tensor
    concept_scores: Tensor | None


def nmf(v: Tensor, w: Tensor, h: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
    r"""Lee & Seung's multiplicative updates for :math:`\min \|V - WH\|_F`, :math:`W, H \ge 0`.

    :math:`H \leftarrow H \odot \frac{W^T V}{W^T W H}`,
    :math:`W \leftarrow W \odot \frac{V H^T}{W H H^T}`; the error never increases.
    """
    tiny = torch.finfo(v.dtype).tiny
    for _ in range(iterations):
        h = h * (w.T @ v) / (w.T @ w @ h).clamp_min(tiny)
        w = w * (v @ h.T) / (w @ (h @ h.T)).clamp_min(tiny)
    return w, h


@syncs(None)
def dff(split: Split, x: Tensor, n_components: int = 5, *, iterations: int = 200,
        init: tuple[Tensor, Tensor] | None = None, generator: torch.Generator | None = None,
        normalize: bool = True) -> Factorization:
    r"""Deep Feature Factorization: the batch's activations as k non-negative concepts.

    .. math:: A' = A - \min_{\text{positions}} A \approx W H, \quad W \in \mathbb{R}_+^{C\times k},
              \ H \in \mathbb{R}_+^{k \times (B\,N)}

    over all positions of the whole batch, as pytorch-grad-cam's ``dff``:
    ``concepts`` are :math:`W` plus the per-channel offset, ``maps`` are the
    rows of :math:`H` per image (min-max normalised when asked), and
    ``concept_scores`` the model's output for a map that is each concept
    everywhere (for a pool + linear tail, the classifier applied to the
    concept; None when the tail needs context from the head). Randomly
    initialised, like scikit-learn's ``init="random"``, from ``generator`` or an
    explicit ``init=(W0, H0)``; plain multiplicative updates, ``iterations`` of them.

    Collins et al., "Deep Feature Factorization For Concept Discovery", ECCV 2018.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> concepts, maps, scores = camfunc.dff(s, x, 4, iterations=50, generator=g)
        >>> concepts.shape, maps.shape, scores.shape      # (k, C), (B, k, 4, 4), (k, classes)
        (torch.Size([4, 16]), torch.Size([2, 4, 4, 4]), torch.Size([4, 10]))
    """
    split = _validate.check_call(split, x)
    if not isinstance(n_components, int) or n_components < 1:
        raise ValueError(f"n_components must be a positive int, got {n_components!r}")
    with torch.no_grad():
        carry = _engine.head(split, x)
        a = carry[0].float()
        if a.ndim < 3:
            raise ValueError(f"dff needs (B, C, *spatial) activations, got {tuple(a.shape)}")
        channels = a.shape[1]
        # A sample with NaN or Inf takes no part: its columns are exact zeros in V and
        # in H, which multiplicative updates keep at zero, so the others' result is
        # the one without it; its maps become NaN.
        bad = ~torch.isfinite(a).flatten(1).all(1)
        positions = math.prod(a.shape[2:])
        bad_columns = bad.repeat_interleave(positions)  # (B*N,)
        v = a.transpose(0, 1).reshape(channels, -1)  # (C, B*N)
        offset = torch.where(bad_columns, torch.inf, v).amin(1, keepdim=True)
        v = torch.where(bad_columns, 0.0, v - offset)
        if init is None:
            _draws.refuse_while_compiling("dff", "init")
            scale = (v.mean() / n_components).sqrt()
            device = _draws.device_for(generator, v)
            w0 = torch.randn((channels, n_components), generator=generator, device=device).abs()
            h0 = torch.randn((n_components, v.shape[1]), generator=generator, device=device).abs()
            init = (scale * w0.to(v.device), scale * h0.to(v.device))
        h0 = torch.where(bad_columns, 0.0, init[1].float())
        w, h = nmf(v, init[0].float(), h0, iterations)
        concepts = (w + offset).T  # (k, C)
        maps = h.reshape(n_components, a.shape[0], *a.shape[2:]).transpose(0, 1)
        if normalize:
            maps = _ops.normalize(maps, spatial_dims=a.ndim - 2)
        maps = _validate.nonfinite_maps(maps, a)
        scores = None
        if len(carry) == 1 and not split.middle:
            constant = concepts.reshape(n_components, channels, *(1,) * (a.ndim - 2))
            constant = constant.expand(n_components, channels, *a.shape[2:]).to(carry[0].dtype)
            scores = _engine.run_from(split, 0, (constant.contiguous(),))
    return Factorization(concepts, maps, scores)
