"""Operations on finished maps: normalise, upsample, fuse.

Maps are ``(B, *spatial)`` or ``(B, K, *spatial)``. Where the number of
spatial axes cannot be read off the arguments, ``spatial_dims`` gives it; by
default every axis after the first is spatial.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["fuse", "normalize", "upsample"]

#: A map whose range is below this fraction of its largest magnitude is flat:
#: summing C float32 products leaves differences of a few ulps (~1e-7 each).
FLAT_TOLERANCE = 1e-5


def _num_spatial(cams: Tensor, spatial_dims: int | None) -> int:
    n = cams.ndim - 1 if spatial_dims is None else spatial_dims
    if not 1 <= n <= cams.ndim - 1:
        raise ValueError(
            f"spatial_dims={spatial_dims} does not fit maps of shape {tuple(cams.shape)}; "
            "maps are (B, *spatial) or (B, K, *spatial)"
        )
    return n


def normalize(cams: Tensor, spatial_dims: int | None = None) -> Tensor:
    r"""Per-map min-max scaling to [0, 1].

    .. math:: \hat M = \frac{M - \min M}{\max M - \min M}, \qquad
              \hat M = 0 \text{ where } \max M - \min M \le \epsilon \max |M|

    with :math:`\epsilon = 10^{-5}` (``FLAT_TOLERANCE``). The eps is relative to
    the map's own magnitude, so the result does not depend on the map's scale
    (late-layer gradients are often tiny), and the maximum is exactly 1. A
    constant map, or one flat up to float32 rounding, becomes zeros, never NaN.

    Args:
        cams: ``(B, *spatial)`` maps, or ``(B, K, *spatial)`` with ``spatial_dims``.
        spatial_dims: how many trailing axes make one map (default: all but the first).

    Example:
        >>> camfunc.normalize(torch.tensor([[[1.0, 3.0], [2.0, 5.0]]]))
        tensor([[[0.0000, 0.5000],
                 [0.2500, 1.0000]]])
        >>> camfunc.normalize(torch.full((1, 2, 2), 0.5))      # a flat map becomes zeros, not NaN
        tensor([[[0., 0.],
                 [0., 0.]]])
    """
    n = _num_spatial(cams, spatial_dims)
    flat = cams.flatten(-n)
    low = flat.amin(-1, keepdim=True)
    span = flat.amax(-1, keepdim=True) - low
    varies = span > FLAT_TOLERANCE * flat.abs().amax(-1, keepdim=True)
    safe_span = torch.where(varies, span, torch.ones_like(span))
    scaled = torch.where(varies, (flat - low) / safe_span, torch.zeros_like(flat))
    # A map holding NaN stays NaN: zeros would read as "no evidence".
    scaled = torch.where(span.isnan(), torch.full_like(flat, float("nan")), scaled)
    return scaled.reshape(cams.shape)


_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def upsample(cams: Tensor, size: int | Sequence[int], mode: str | None = None) -> Tensor:
    """Resizes maps to ``size`` (the input's spatial size, say) by interpolation.

    Linear, bilinear or trilinear by the number of spatial axes, with
    ``align_corners=False`` (pixel centres, as image libraries resize). The
    trailing ``len(size)`` axes are spatial; leading axes are kept.

    Example:
        >>> cams = camfunc.gradcam(s, x, 3)                   # (B, 4, 4)
        >>> camfunc.upsample(cams, x.shape[-2:]).shape
        torch.Size([2, 64, 64])
    """
    size = (size,) if isinstance(size, int) else tuple(int(v) for v in size)
    n = len(size)
    if n not in _MODES or cams.ndim < n + 1:
        raise ValueError(
            f"cannot resize maps of shape {tuple(cams.shape)} to {size}: "
            "give 1 to 3 spatial sizes, fewer than the maps' axes"
        )
    lead = cams.shape[:-n]
    flat = cams.reshape(-1, 1, *cams.shape[-n:])
    if not flat.is_floating_point():
        flat = flat.float()
    mode = mode or _MODES[n]
    kwargs = {"align_corners": False} if mode in ("linear", "bilinear", "bicubic", "trilinear") else {}
    out = F.interpolate(flat, size=size, mode=mode, **kwargs)
    return out.reshape(*lead, *size)


def _tanh_scale(cams: Tensor, n: int, gamma: float) -> Tensor:
    flat = cams.flatten(-n)
    peak = flat.amax(-1, keepdim=True)
    safe = torch.where(peak > 0, peak, torch.ones_like(peak))
    return torch.tanh(gamma * flat / safe).reshape(cams.shape)


def fuse(cams: Sequence[Tensor], how: Literal["max", "mean", "product"] = "max", *,
         size: Sequence[int] | None = None, tanh_gamma: float | None = None,
         spatial_dims: int | None = None) -> Tensor:
    """Fuses maps from several layers into one, at the finest resolution.

    Each map is upsampled to ``size`` (default: the largest one), optionally
    scaled as in Layer-CAM, :math:`\\tanh(\\gamma M / \\max M)`, then reduced by
    element-wise max (torchcam's choice), mean (pytorch-grad-cam's) or product
    (Refine-CAM's: a region must light up in every map; give normalised maps).

    Layer-CAM: Jiang et al., "LayerCAM: Exploring Hierarchical Class
    Activation Maps for Localization", IEEE TIP 2021 (Eq. 5 uses gamma = 2).

    Example:
        >>> maps = camfunc.layercam(camfunc.split(model, ["layer3", "layer4"]), x, 3)
        >>> camfunc.fuse(maps, "max", tanh_gamma=2.0).shape    # at the finer layer's size
        torch.Size([2, 8, 8])
    """
    if isinstance(cams, Tensor) or not isinstance(cams, Sequence):
        raise TypeError(
            f"fuse takes a list of maps, one per layer, got {type(cams).__name__}; a single tensor "
            "would be read as a list of its samples (pass [maps] for one layer)"
        )
    cams = list(cams)
    if not cams:
        raise ValueError("fuse needs at least one map")
    if not all(isinstance(c, Tensor) for c in cams):
        raise TypeError("fuse takes a list of tensors, one per layer")
    if how not in ("max", "mean", "product"):
        raise ValueError(f"how must be 'max', 'mean' or 'product', got {how!r}")
    n = _num_spatial(cams[0], spatial_dims)
    if size is None:
        size = max((tuple(c.shape[-n:]) for c in cams), key=lambda s: torch.Size(s).numel())
    resized = [upsample(c, size) if tuple(c.shape[-n:]) != tuple(size) else c for c in cams]
    if tanh_gamma is not None:
        resized = [_tanh_scale(c, n, tanh_gamma) for c in resized]
    stacked = torch.stack(resized)
    if how == "product":
        return stacked.prod(0)
    return stacked.amax(0) if how == "max" else stacked.mean(0)
