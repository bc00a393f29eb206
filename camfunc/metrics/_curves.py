"""Deletion and insertion: the class score as pixels move, most salient first, between
the image and a substrate.

Petsiuk et al., "RISE: Randomized Input Sampling for Explanation of Black-box
Models", BMVC 2018, Section 4.1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from camfunc._core.validate import check_count
from camfunc._util.gaussian import folded_gaussian, separable_filter
from camfunc.metrics import _inputs, _model_calls, _skipping
from camfunc.metrics._inputs import Classes, Model

#: "zeros", "blur" (RISE's Gaussian blur), a tensor broadcastable to x, or a callable x -> tensor.
Substrate = str | Tensor | Callable[[Tensor], Tensor]

#: RISE's blur: an 11-tap kernel from a sigma-5 Gaussian (``gkern(11, 5)`` in its code).
BLUR_SIZE = 11
BLUR_SIGMA = 5.0


class CausalCurve(NamedTuple):
    """Scores along the deletion or insertion path, and their areas."""

    #: ``(B, n_steps + 1)`` class score after 0, step, 2 step, ... pixels moved.
    curves: Tensor
    #: ``(n_steps + 1,)`` fraction of the pixels moved at each point, 0 to 1.
    fractions: Tensor
    #: ``(B,)`` trapezoidal area under each curve over ``fractions``.
    auc: Tensor
    #: 0-d, mean of ``auc``.
    mean_auc: Tensor
    #: ``(B,)`` the class scored for each image (None for a callable ``cls``).
    classes: Tensor | None


def rise_blur(x: Tensor) -> Tensor:
    """RISE's blurred substrate: each channel convolved with an 11-wide Gaussian kernel
    (sigma 5, folded at the window's edges as scipy.ndimage does) along every spatial
    axis, zero-padded so the size is kept."""
    kernel = folded_gaussian(BLUR_SIZE, BLUR_SIGMA)
    return separable_filter(x, kernel, padding=BLUR_SIZE // 2)


def substrate_of(x: Tensor, substrate: Substrate) -> Tensor:
    if isinstance(substrate, str):
        if substrate == "zeros":
            return torch.zeros_like(x)
        if substrate == "blur":
            return rise_blur(x)
        raise ValueError(f"substrate must be 'zeros', 'blur', a tensor or a callable, got {substrate!r}")
    if callable(substrate) and not isinstance(substrate, Tensor):
        with torch.no_grad():
            substrate = substrate(x)
        if not isinstance(substrate, Tensor):
            raise TypeError(f"the substrate callable must return a tensor, got {type(substrate).__name__}")
    if not isinstance(substrate, Tensor):
        raise TypeError(f"substrate must be 'zeros', 'blur', a tensor or a callable, got {type(substrate).__name__}")
    try:
        return torch.broadcast_to(substrate.to(x), x.shape)
    except RuntimeError:
        raise ValueError(
            f"the substrate of shape {tuple(substrate.shape)} does not broadcast to the "
            f"input's shape {tuple(x.shape)}"
        ) from None


def saliency_ranks(maps: Tensor) -> Tensor:
    """``(B, N)``: each pixel's place in the order of decreasing saliency, 0 first.

    Ties keep the pixels' row-major order (a stable sort), so the order is deterministic.
    """
    order = maps.flatten(1).argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return ranks.scatter_(1, order, positions)


def moved_counts(num_pixels: int, step: int) -> list[int]:
    """Pixels moved at each point: 0, step, 2 step, ..., capped at the last at ``num_pixels``."""
    n_steps = -(-num_pixels // step)
    return [min(i * step, num_pixels) for i in range(n_steps + 1)]


def path_scores(model: Model, start: Tensor, finish: Tensor, ranks: Tensor, counts: list[int],
                target: _model_calls.FixedTarget, *, batch_size: int) -> Tensor:
    """``(B, len(counts))`` target scores of ``start`` with its ``counts[i]`` top-ranked pixels
    taken from ``finish``; at most ``batch_size`` perturbed inputs per forward."""
    batch, points = start.shape[0], len(counts)
    counts_t = torch.tensor(counts, device=start.device)
    parts = []
    for first in range(0, batch * points, batch_size):
        jobs = torch.arange(first, min(first + batch_size, batch * points), device=start.device)
        rows, columns = jobs // points, jobs % points
        moved = ranks[rows] < counts_t[columns, None]  # (jobs, N)
        moved = moved.reshape(len(jobs), 1, *start.shape[2:])
        inputs = torch.where(moved, finish[rows], start[rows])
        with torch.no_grad():
            parts.append(target.values(model(inputs), rows))
    return torch.cat(parts).reshape(batch, points)


def causal_curve(model: Model, x: Tensor, maps: Tensor, cls: Classes, *, deleting: bool,
                 step: int | None, substrate: Substrate, probabilities: bool | None,
                 batch_size: int, skip_nonfinite: bool = False) -> CausalCurve:
    keep = _skipping.finite_rows(maps, skip_nonfinite)
    if keep is not None:
        if isinstance(substrate, Tensor) and substrate.ndim == x.ndim and substrate.shape[0] == x.shape[0]:
            substrate = _skipping.rows_of(substrate, keep)
        kept = causal_curve(model, _skipping.rows_of(x, keep), _skipping.rows_of(maps, keep),
                            _skipping.target_rows(cls, keep, model, x), deleting=deleting, step=step,
                            substrate=substrate, probabilities=probabilities, batch_size=batch_size)
        return _skipping.scattered(kept, keep, x.shape[0], ("curves", "auc", "classes"))
    saliency = _inputs.checked_maps(model, x, maps, cls, probabilities)
    num_pixels = saliency[0].numel()
    step = x.shape[-1] if step is None else step
    check_count(step, "step")
    check_count(batch_size, "batch_size")
    other = substrate_of(x, substrate)
    scored = _inputs.scoring_model(model, cls, probabilities)
    target, _ = _model_calls.fix_target(scored, x, cls)
    start, finish = (x, other) if deleting else (other, x)
    counts = moved_counts(num_pixels, step)
    curves = path_scores(scored, start, finish, saliency_ranks(saliency), counts, target,
                         batch_size=batch_size)
    fractions = torch.tensor(counts, dtype=torch.float32, device=x.device) / num_pixels
    auc = torch.trapezoid(curves, fractions, dim=1)
    return CausalCurve(curves, fractions, auc, auc.mean(), target.index)


def deletion(model: Model, x: Tensor, maps: Tensor, cls: Classes = None, *, step: int | None = None,
             substrate: Substrate = "zeros", probabilities: bool | None = None,
             batch_size: int = 32, skip_nonfinite: bool = False) -> CausalCurve:
    r"""Deletion curve and AUC: the class score as the most salient pixels are removed
    first, ``step`` at a time; lower is better.

    .. math:: s_i = f_c\big(x \odot (1 - m_i) + b \odot m_i\big), \quad
              \mathrm{AUC} = \sum_{i=1}^{n} \tfrac{1}{2}(s_{i-1} + s_i)(t_i - t_{i-1})

    with :math:`m_i` the mask of the :math:`\min(i \cdot step, N)` most salient of
    the N pixels (all channels together), :math:`t_i` that count over N, and
    :math:`b` the substrate (RISE's deletion: zeros). ``n = ceil(N / step)``; the
    last step may move fewer pixels, and :math:`t` says so (RISE's code spaces the
    points evenly). :math:`f_c` is the softmax probability of class c, or the
    logit with ``probabilities=False``, or a callable ``cls``'s value on the output. The saliency order is that of the map
    resized to the input (bilinear); ties go in row-major order (stable sort).
    ``B (n + 1) + B`` forwards, ``batch_size`` perturbed inputs at a time.

    Petsiuk et al., "RISE: Randomized Input Sampling for Explanation of
    Black-box Models", BMVC 2018.

    Args:
        model: a callable ``x -> (B, num_classes)`` scores (eval-mode module or Split).
        x: the input batch ``(B, C, *spatial)``.
        maps: ``(B, *map_spatial)`` or ``(B, 1, *map_spatial)``, any resolution and scale.
        cls: one class per image, None for each image's top class, or a callable
            ``output -> (B,)`` scores written for the image batch.
        step: pixels per step (default: the input's last size, RISE's 224 for 224x224).
        substrate: ``"zeros"``, ``"blur"``, a tensor broadcastable to ``x`` or a callable ``x -> tensor``.
        skip_nonfinite: leave out images whose map holds NaN or Inf (NaN curves
            and AUC, the mean over the rest) instead of refusing them.

    Example:
        >>> cams = camfunc.gradcam(s, x, 3)
        >>> result = camfunc.metrics.deletion(s, x, cams, 3, step=64 * 8)    # 8 rows of pixels a step
        >>> result.curves.shape, result.auc.shape                          # 64 * 64 / 512 = 8 steps
        (torch.Size([2, 9]), torch.Size([2]))
    """
    return causal_curve(model, x, maps, cls, deleting=True, step=step, substrate=substrate,
                        probabilities=probabilities, batch_size=batch_size,
                        skip_nonfinite=skip_nonfinite)


def insertion(model: Model, x: Tensor, maps: Tensor, cls: Classes = None, *, step: int | None = None,
              substrate: Substrate = "blur", probabilities: bool | None = None,
              batch_size: int = 32, skip_nonfinite: bool = False) -> CausalCurve:
    r"""Insertion curve and AUC: the class score as the most salient pixels are put
    back first, ``step`` at a time, into a substrate; higher is better.

    .. math:: s_i = f_c\big(b \odot (1 - m_i) + x \odot m_i\big), \quad
              \mathrm{AUC} = \sum_{i=1}^{n} \tfrac{1}{2}(s_{i-1} + s_i)(t_i - t_{i-1})

    with :math:`m_i` the mask of the :math:`\min(i \cdot step, N)` most salient
    pixels and :math:`b` the substrate: RISE's insertion starts from a blurred
    copy (``"blur"``: 11-wide Gaussian, sigma 5, zero padding at the borders).
    Everything else as in :func:`deletion`.

    Petsiuk et al., "RISE: Randomized Input Sampling for Explanation of
    Black-box Models", BMVC 2018.

    Example:
        >>> cams = camfunc.gradcam(s, x, 3)
        >>> result = camfunc.metrics.insertion(s, x, cams, 3, step=64 * 8)
        >>> result.auc.shape, result.mean_auc.shape
        (torch.Size([2]), torch.Size([]))
    """
    return causal_curve(model, x, maps, cls, deleting=False, step=step, substrate=substrate,
                        probabilities=probabilities, batch_size=batch_size,
                        skip_nonfinite=skip_nonfinite)
