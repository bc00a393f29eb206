"""The first principal component of per-position feature vectors, with a fixed sign."""

from __future__ import annotations

import torch
from torch import Tensor


def _per_sample(mask: Tensor, like: Tensor) -> Tensor:
    return mask.reshape(-1, *(1,) * (like.ndim - 1))


def set_aside_nonfinite(features: Tensor) -> tuple[Tensor, Tensor]:
    """Samples holding NaN or Inf, and the features with those samples zeroed.

    A decomposition of a batch fails on one non-finite sample; zeroing it keeps
    the others' results, and :func:`mark_nonfinite` then gives it a NaN map.
    """
    bad = ~torch.isfinite(features).flatten(1).all(1)
    return torch.where(_per_sample(bad, features), torch.zeros_like(features), features), bad


def mark_nonfinite(maps: Tensor, bad: Tensor) -> Tensor:
    return torch.where(_per_sample(bad, maps), torch.full_like(maps, float("nan")), maps)


def _first_direction(centred: Tensor) -> Tensor:
    r"""The first right singular vector :math:`v_1` of each ``(N, C)`` matrix, ``(B, C)``,
    with its exact first derivative wherever :math:`\sigma_1 > \sigma_2`.

    The SVD runs without a graph: torch's SVD backward divides by
    :math:`\sigma_i^2 - \sigma_j^2` for *every* pair, so two equal lower singular
    values (two dead channels, say) make the gradient NaN even though :math:`v_1`
    does not depend on them. Instead, with :math:`M = X^T X`, the derivative is
    perturbation theory's

    .. math:: dv_1 = \sum_{j>1} \frac{v_j v_j^T}{\sigma_1^2 - \sigma_j^2}\, dM\, v_1
              + \frac{I - V V^T}{\sigma_1^2}\, dM\, v_1, \quad
              dM\, v_1 = dX^T X v_1 + X^T dX\, v_1

    (the second term spans the directions :math:`X` has no extent in), added as a
    term whose value is zero (:math:`dX = X - X` with a graph). Only first
    derivatives are exact: a second derivative through :math:`v_1` is not.
    A degenerate top pair (:math:`\sigma_1 = \sigma_2`, where :math:`v_1` has no
    derivative) and an all-zero matrix get none.
    """
    fixed = centred.detach()
    svd = torch.linalg.svd(fixed, full_matrices=False)
    values: Tensor = svd.S
    vh: Tensor = svd.Vh
    direction = vh[:, 0, :]
    if not (torch.is_grad_enabled() and centred.requires_grad):
        return direction
    change = centred - fixed  # zero, with the graph
    along = (fixed @ direction.unsqueeze(-1)).squeeze(-1)  # X v_1, (B, N)
    moved = ((change.transpose(1, 2) @ along.unsqueeze(-1))
             + fixed.transpose(1, 2) @ (change @ direction.unsqueeze(-1))).squeeze(-1)  # dM v_1, (B, C)
    squares = values.square()
    top = squares[:, :1]
    gaps = top - squares  # (B, k): sigma_1^2 - sigma_j^2
    # v_1 has a derivative where sigma_1 is simple (and not zero, for one singular value).
    simple = gaps[:, 1:2] > 0 if gaps.shape[1] > 1 else top > 0
    coefficients = (vh @ moved.unsqueeze(-1)).squeeze(-1)  # v_j^T dM v_1, (B, k)
    inverse_gaps = torch.where((gaps > 0) & simple, 1 / torch.where(gaps > 0, gaps, 1), 0)
    inside = ((coefficients * inverse_gaps).unsqueeze(-1) * vh).sum(1)
    rest = moved - (coefficients.unsqueeze(-1) * vh).sum(1)  # the part outside V's span
    outside = rest * torch.where(simple, 1 / torch.where(top > 0, top, 1), 0)
    return direction + inside + outside


def first_component(features: Tensor) -> Tensor:
    r"""Projection on the first principal direction, with a fixed sign: ``(B, C, *sp) -> (B, *sp)``.

    With :math:`X` the ``(N, C)`` matrix of positions by channels, centred over
    positions, and :math:`X = U \Sigma V^T`, the map is :math:`X v_1`.

    An SVD's signs are arbitrary, so the sign is fixed by a rule: the map's
    largest magnitude is positive (Seg-Eigen-CAM, Chung & Ying, Appl. Sci.
    2025, Eq. 13); on a tie, :math:`v_1`'s loadings sum to a positive number.
    The two sides tie when they are equal up to rounding: the largest and the
    smallest projection cancel to within :math:`16\epsilon (\max|X v_1| +
    \sqrt{C} \max|A|)`, the rounding of the projection and of the centring. A sample whose positions are all equal up to rounding
    (within :math:`\sqrt{\epsilon}` of its largest feature) gets a zero map.
    A sample holding NaN or Inf gets a NaN map; the others are unaffected.
    """
    features, bad = set_aside_nonfinite(features)
    centred = features.flatten(2).transpose(1, 2)  # (B, N, C)
    centred = centred - centred.mean(1, keepdim=True)
    # Positions that differ only by rounding are flat: their principal direction would be
    # the rounding's, a map of pure noise at full contrast. They get a zero map. Rounding
    # reaches tens of ulps (a tail's backward takes vectorised and scalar paths for
    # different positions, then cancels), hence sqrt(eps), not a few ulps.
    rounding = torch.finfo(centred.dtype).eps ** 0.5
    flat = centred.abs().flatten(1).amax(1) <= rounding * features.abs().flatten(1).amax(1)
    centred = torch.where(_per_sample(flat, centred), torch.zeros_like(centred), centred)
    direction = _first_direction(centred)  # (B, C)
    projection = (centred @ direction.unsqueeze(-1)).squeeze(-1)  # (B, N)
    lean = projection.amax(1) + projection.amin(1)  # > 0 when the positive side is larger
    # Two sides equal up to rounding are a tie, which the loadings settle; the rounding
    # noise's sign would be arbitrary. Rounding moves the projection by ulps of its peak,
    # and the centring by ulps of the features themselves: a mean off by d shifts every
    # position's projection by d . v_1, up to sqrt(C) ulps of the largest feature. (A
    # two-position map of features near 13 differing by 0.04 leaned by an ulp of 13.)
    largest = features.abs().flatten(1).amax(1)
    tie = lean.abs() <= 16 * torch.finfo(projection.dtype).eps * (
        projection.abs().amax(1) + features.shape[1] ** 0.5 * largest)
    key = torch.where(tie, direction.sum(1), lean)
    sign = torch.where(key < 0, -1.0, 1.0).to(projection.dtype)
    maps = (projection * sign.unsqueeze(1)).reshape(features.shape[0], *features.shape[2:])
    return mark_nonfinite(maps, bad)
