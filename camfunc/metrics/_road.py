"""ROAD: remove the most (or least) relevant pixels, impute them without leaking, re-score.

Conventions are pytorch-grad-cam 1.5.7's (taken there from the ROAD authors' code):

- At percentile ``p`` the threshold is the map's ``p``-th percentile (linear
  interpolation). Pixels with ``value >= threshold`` are removed, where the
  value is the map for most-relevant-first (MoRF) and ``1 - map`` for
  least-relevant-first (LeRF). So MoRF at 80 removes the top 20% of pixels and
  LeRF at 20 removes the bottom 80%.
- A removed pixel is imputed as the weighted mean of its 8 neighbours
  (1/6 for the 4 sharing an edge, 1/12 for the 4 diagonal ones; neighbours
  outside the image drop out and the weights are renormalised), removed
  neighbours included: one sparse linear system, solved with scipy, for the
  whole batch at once. Then ``noise_std * z``, ``z ~ N(0, 1)``, is added to
  each removed pixel of each channel.
- The score is the target's value after imputation minus before (logits for
  class indices), per percentile; ROAD averages it over the percentiles, and the
  combined score is ``(LeRF - MoRF) / 2``.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from camfunc._core import targets as _targets
from camfunc._util import draws as _draws
from camfunc.metrics import _inputs, _model_calls

__all__ = ["road", "road_curve", "road_impute"]

#: Offsets ``(rows, cols)`` of the 8 neighbours and their weights (they sum to 1).
NEIGHBOUR_WEIGHTS = (
    ((-1, -1), 1 / 12), ((-1, 0), 1 / 6), ((-1, 1), 1 / 12),
    ((0, -1), 1 / 6), ((0, 1), 1 / 6),
    ((1, -1), 1 / 12), ((1, 0), 1 / 6), ((1, 1), 1 / 12),
)

DEFAULT_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)

Order = Literal["morf", "lerf", "combined"]


def check_images(x: Any) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"ROAD imputes images: x must be a floating tensor (B, C, H, W), got {shape}"
        )


def _check_removed(removed: Any, x: Tensor) -> None:
    expected = (x.shape[0], *x.shape[2:])
    if not isinstance(removed, Tensor) or removed.dtype != torch.bool or tuple(removed.shape) != expected:
        got = (f"{removed.dtype} {tuple(removed.shape)}" if isinstance(removed, Tensor)
               else type(removed).__name__)
        raise ValueError(
            f"removed must be a bool tensor (B, H, W) = {expected} marking the pixels to impute, "
            f"got {got}"
        )


def _linear_fill(x: Tensor, removed: Tensor) -> Tensor:
    """``x`` with each removed pixel the weighted mean of its neighbours: ``(B*H*W, C)`` float64.

    For every removed pixel ``u``: ``s_u x_u - sum_{v removed} w_uv x_v = sum_{k kept} w_uk x_k``,
    ``s_u`` the sum of the weights of ``u``'s neighbours inside the image. The
    matrix is symmetric and, wherever a removed region touches a kept pixel,
    positive definite. An image with every pixel removed has nothing to impute
    from (its system is singular): it is filled with zeros.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    channels, height, width = x.shape[1:]
    area = height * width
    values = x.detach().to("cpu", torch.float64).permute(0, 2, 3, 1).reshape(-1, channels).clone()
    gone = removed.detach().cpu().reshape(-1)
    everything = removed.detach().cpu().flatten(1).all(1)
    values[everything.repeat_interleave(area)] = 0.0
    unknown = (gone & ~everything.repeat_interleave(area)).nonzero().squeeze(1)
    count = unknown.numel()
    if count == 0:
        return values
    variable = torch.full((gone.numel(),), -1, dtype=torch.long)
    variable[unknown] = torch.arange(count)
    sample, pixel = unknown // area, unknown % area
    row, col = pixel // width, pixel % width
    diagonal = torch.zeros(count, dtype=torch.float64)
    rhs = torch.zeros(count, channels, dtype=torch.float64)
    eqs, links, weights = [], [], []
    for (d_row, d_col), weight in NEIGHBOUR_WEIGHTS:
        n_row, n_col = row + d_row, col + d_col
        inside = ((n_row >= 0) & (n_row < height) & (n_col >= 0) & (n_col < width)).nonzero().squeeze(1)
        neighbour = sample[inside] * area + n_row[inside] * width + n_col[inside]
        diagonal[inside] += weight
        also_gone = gone[neighbour]
        eqs.append(inside[also_gone])
        links.append(variable[neighbour[also_gone]])
        weights.append(torch.full((int(also_gone.sum()),), -weight, dtype=torch.float64))
        rhs.index_add_(0, inside[~also_gone], weight * values[neighbour[~also_gone]])
    every = torch.arange(count)
    entries = torch.cat([*weights, diagonal]).numpy()
    matrix = coo_matrix((entries, (torch.cat([*eqs, every]).numpy(), torch.cat([*links, every]).numpy())),
                        shape=(count, count)).tocsc()
    solution = spsolve(matrix, rhs.numpy())
    values[unknown] = torch.from_numpy(solution).reshape(count, channels)
    return values


def road_impute(x: Tensor, removed: Tensor, *, noise_std: float = 0.01, noise: Tensor | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    r"""ROAD's noisy linear imputation: removed pixels rebuilt from their neighbours.

    .. math:: \tilde x_u = \frac{\sum_{v \in N(u)} w_{uv} \tilde x_v}{\sum_{v \in N(u)} w_{uv}}
              + \sigma z_u, \qquad \tilde x_v = x_v \text{ for kept } v,
              \quad z_u \sim \mathcal N(0, 1)

    per channel, with :math:`N(u)` the 8 neighbours inside the image,
    :math:`w = 1/6` across an edge and :math:`1/12` across a corner: one sparse
    linear system for all removed pixels of the batch (scipy). Kept pixels are
    unchanged. ``noise`` (standard normal, ``x``'s shape; only removed pixels
    are read) or ``generator`` fixes ``z``. An image with every pixel removed
    is filled with zeros plus noise.

    Rong et al., "A Consistent and Efficient Evaluation Strategy for
    Attribution Methods", ICML 2022.

    Example:
        >>> removed = torch.zeros(2, 64, 64, dtype=torch.bool)
        >>> removed[:, 24:40, 24:40] = True                   # a square in the middle
        >>> filled = camfunc.metrics.road_impute(x, removed, noise_std=0.0)
        >>> torch.equal(filled[..., :24, :], x[..., :24, :])  # kept pixels are unchanged
        True
    """
    check_images(x)
    _check_removed(removed, x)
    _model_calls.check_non_negative(noise_std, "noise_std")
    if noise is not None and (not isinstance(noise, Tensor) or noise.shape != x.shape):
        got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
        raise ValueError(f"noise must be standard-normal draws of x's shape {tuple(x.shape)}, got {got}")
    batch, channels, height, width = x.shape
    with torch.no_grad():
        filled = _linear_fill(x, removed).reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        filled = filled.to(device=x.device, dtype=x.dtype)
        if noise_std > 0:
            if noise is None:
                noise = _draws.draw(torch.randn, tuple(x.shape), generator, x)
            mask = removed.to(x.device).unsqueeze(1)
            filled = torch.where(mask, filled + noise_std * noise.to(filled), filled)
    return filled


def _check_percentiles(percentiles: Any) -> tuple[float, ...]:
    if isinstance(percentiles, numbers.Real):
        percentiles = (percentiles,)
    if (not isinstance(percentiles, Sequence) or len(percentiles) == 0
            or not all(isinstance(p, numbers.Real) and not isinstance(p, bool)
                       and 0 <= float(p) <= 100 for p in percentiles)):
        raise ValueError(f"percentiles must be numbers in [0, 100], one or more; got {percentiles!r}")
    return tuple(float(p) for p in percentiles)


def removed_at(maps: Tensor, percentiles: Sequence[float], order: str) -> Tensor:
    """Pixels removed at each percentile: ``(P, B, H, W)`` bool, ``value >= p-th percentile``."""
    values = maps.flatten(1) if order == "morf" else 1 - maps.flatten(1)
    q = torch.tensor(percentiles, dtype=values.dtype, device=values.device) / 100
    thresholds = torch.quantile(values, q, dim=1, keepdim=True)  # (P, B, 1)
    return (values.unsqueeze(0) >= thresholds).reshape(len(percentiles), *maps.shape)


def road_curve(model: Any, x: Tensor, maps: Tensor, cls: _targets.Target | None = None, *,
               order: Order = "combined",
               percentiles: Sequence[float] = DEFAULT_PERCENTILES, noise_std: float = 0.01,
               noise: Tensor | None = None, generator: torch.Generator | None = None,
               batch_size: int = 32) -> Tensor:
    r"""ROAD's score change at each percentile: ``(B, P)``.

    .. math:: \Delta_p = y^c(\mathrm{impute}(x, R_p)) - y^c(x), \qquad
              R_p = \{u : m_u \ge Q_p(m)\}

    with :math:`m` the map upsampled to the input (``1 - map`` for LeRF),
    :math:`Q_p` its ``p``-th percentile and :math:`y^c` the target (the
    model's output at the class; a callable ``cls`` for probabilities or
    other scores; ``None``: each image's top class, fixed on the clean input).
    ``order="combined"`` gives :math:`(\Delta^{LeRF}_p -
    \Delta^{MoRF}_p) / 2`. Imputation as :func:`road_impute`; ``noise`` is
    ``(S, B, C, H, W)`` standard-normal draws, one per imputation, ``S = P``
    (or ``2P`` for combined: LeRF's percentiles first, then MoRF's, the order
    pytorch-grad-cam draws them), else drawn from ``generator``. The model
    sees ``batch_size`` imputed images at a time.

    Rong et al., "A Consistent and Efficient Evaluation Strategy for
    Attribution Methods", ICML 2022.

    Example:
        >>> cams = camfunc.gradcam(s, x, 3)
        >>> g = torch.Generator().manual_seed(0)
        >>> camfunc.metrics.road_curve(s, x, cams, 3, order="morf", generator=g).shape   # 9 percentiles
        torch.Size([2, 9])
    """
    if order not in ("morf", "lerf", "combined"):
        raise ValueError(f"order must be 'morf', 'lerf' or 'combined', got {order!r}")
    percentiles = _check_percentiles(percentiles)
    _model_calls.check_non_negative(noise_std, "noise_std")
    _model_calls.checked(model, x, batch_size)
    check_images(x)
    maps = _inputs.input_maps(maps, x)
    orders = ("lerf", "morf") if order == "combined" else (order,)
    removed = torch.cat([removed_at(maps, percentiles, o) for o in orders])  # (S, B, H, W)
    steps = removed.shape[0]
    draw = _model_calls.per_sample_draws(
        "noise", noise, steps, x, generator,
        lambda device: torch.randn(x.shape, generator=generator, device=device))
    target, clean = _model_calls.fix_target(model, x, cls)
    rows = torch.arange(x.shape[0], device=x.device)

    def imputed() -> Iterator[tuple[Tensor, Tensor]]:
        for step in range(steps):
            step_noise = draw(step) if noise_std > 0 else None
            yield road_impute(x, removed[step], noise_std=noise_std, noise=step_noise), rows

    after = _model_calls.stream_values(model, target, imputed(), batch_size).reshape(steps, -1)
    change = after - clean
    if order == "combined":
        change = (change[:len(percentiles)] - change[len(percentiles):]) / 2
    return change.t()


def road(model: Any, x: Tensor, maps: Tensor, cls: _targets.Target | None = None, *,
         order: Order = "combined",
         percentiles: Sequence[float] = DEFAULT_PERCENTILES, noise_std: float = 0.01,
         noise: Tensor | None = None, generator: torch.Generator | None = None,
         batch_size: int = 32) -> Tensor:
    r"""ROAD (RemOve And Debias): the score change averaged over percentiles, ``(B,)``.

    .. math:: \mathrm{ROAD} = \frac{1}{P}\sum_p \Delta_p, \qquad
              \mathrm{ROAD}_{comb} = \frac{1}{2}\Big(\frac{1}{P}\sum_p \Delta^{LeRF}_p
              - \frac{1}{P}\sum_p \Delta^{MoRF}_p\Big)

    with :math:`\Delta_p` as in :func:`road_curve` (target after imputation
    minus before). A faithful map makes MoRF drop the score fast (very
    negative) and LeRF keep it (near 0): higher combined is better.
    Matches pytorch-grad-cam 1.5.7's ``ROADMostRelevantFirstAverage``,
    ``ROADLeastRelevantFirstAverage`` and ``ROADCombined``.

    Rong et al., "A Consistent and Efficient Evaluation Strategy for
    Attribution Methods", ICML 2022.

    Example:
        >>> cams = camfunc.gradcam(s, x, 3)                   # any size; upsampled to x's
        >>> g = torch.Generator().manual_seed(0)
        >>> camfunc.metrics.road(s, x, cams, 3, percentiles=(20, 80), generator=g).shape
        torch.Size([2])
    """
    return road_curve(model, x, maps, cls, order=order, percentiles=percentiles, noise_std=noise_std,
                      noise=noise, generator=generator, batch_size=batch_size).mean(1)
