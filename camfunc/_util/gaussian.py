"""Gaussian kernels and separable filtering over any number of spatial axes.

Used by SESS's blur, the insertion metric's blurred substrate (RISE's kernel)
and SSIM (Wang et al.'s window). Both kernels are separable, so an N-D filter is N
1-D convolutions, one along each spatial axis.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sampled_gaussian(size: int, sigma: float) -> Tensor:
    r"""A 1-D Gaussian sampled at integer offsets from the centre, summing to 1:
    :math:`k_t \propto \exp(-t^2 / 2\sigma^2)`, :math:`|t| \le \lfloor size/2 \rfloor`."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def folded_gaussian(size: int, sigma: float, truncate: float = 4.0) -> Tensor:
    """The 1-D factor of RISE's blur kernel: a unit impulse at the centre of ``size``
    samples, smoothed by a Gaussian of radius ``int(truncate * sigma + 0.5)`` with
    half-sample symmetric reflection at the edges (scipy.ndimage's ``reflect``).

    With ``sigma`` near ``size`` the Gaussian's tails reach past the window and
    fold back in, so the kernel is flatter than a sampled one; it still sums to 1.
    """
    radius = int(truncate * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1)
    weights = torch.exp(-0.5 * (taps.double() / sigma) ** 2)
    weights = weights / weights.sum()
    # Output i reads input i + t; reflect that index into [0, size).
    source = (torch.arange(size)[:, None] + taps[None, :]) % (2 * size)
    source = torch.where(source >= size, 2 * size - 1 - source, source)
    return (weights * (source == size // 2)).sum(1)


def separable_filter(t: Tensor, kernel: Tensor, *, padding: int) -> Tensor:
    """Correlates every channel of ``t`` (``(B, C, *spatial)``) with ``kernel`` along
    each spatial axis; ``padding`` zeros on both sides (0: only where the window fits).
    """
    weight = kernel.to(t).reshape(1, 1, -1)
    out = t
    for axis in range(2, t.ndim):
        moved = out.movedim(axis, -1)
        flat = moved.reshape(-1, 1, moved.shape[-1])
        filtered = F.conv1d(flat, weight, padding=padding)
        out = filtered.reshape(*moved.shape[:-1], filtered.shape[-1]).movedim(-1, axis)
    return out
