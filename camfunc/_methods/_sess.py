"""SESS: any method run on sliding-window patches of the input at several scales.

The input is resized so its shorter side takes each of several scales; a
square window slides over every resized image; the wrapped method explains
every patch; each patch map is weighted by its patch's class score, pasted
back at the input's resolution, and the pasted maps are fused (a thresholded
mean or a max) and blurred. Follows pytorch-grad-cam 1.5.7's ``SESS``.

The maps come out at the **input's** resolution ``(B, H, W)``, not the
layer's: patches from different scales only meet in image coordinates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from camfunc._core import engine as _engine, ops as _ops, targets as _targets, validate as _validate
from camfunc._core.split import Split
from camfunc._methods._combine import Computed
from camfunc._methods._gradient import gradcam
from camfunc._methods._method import cam_method
from camfunc._util.gaussian import sampled_gaussian

BLUR_SIZE = 11
BLUR_SIGMA = 5.0


class Patch(NamedTuple):
    """Where a patch was cut: which scaled image, and its top-left corner there."""

    scale: int
    top: int
    left: int


# ---------------------------------------------------------------- geometry


def default_scales(window: int, num_scales: int, step_ratio: float) -> list[int]:
    """``window + i * round(step_ratio * window)`` for ``i < num_scales`` (224, 288, ... at 224)."""
    step = round(window * step_ratio)
    return [window + step * i for i in range(num_scales)]


def scaled_size(height: int, width: int, short: int) -> tuple[int, int]:
    """The size with the shorter side set to ``short`` and the aspect ratio kept
    (the longer side truncated, as torchvision's ``resize(img, int)``)."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def window_starts(length: int, step: int, window: int) -> list[int]:
    """Window starts every ``step``; the first to reach the far border is shifted back inside."""
    starts = []
    for start in range(0, length, step):
        starts.append(min(start, length - window))
        if start + window >= length:
            break
    return starts


def patch_grid(sizes: Sequence[tuple[int, int]], window: int, step: int) -> list[Patch]:
    """Every window of every scaled image, rows outer, columns inner."""
    return [Patch(scale, top, left)
            for scale, (height, width) in enumerate(sizes)
            for top in window_starts(height, step, window)
            for left in window_starts(width, step, window)]


# ---------------------------------------------------------------- resizing


def rescale(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear, antialiased resize of images (torchvision's tensor ``resize``);
    half precision is resized in float32."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    out = F.interpolate(work, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out.to(x.dtype)


def resize_matrix(source: int, target: int, device: torch.device) -> Tensor:
    """``(target, source)``: linear interpolation (pixel centres, no antialias) as a matrix.

    Target pixel i samples source position ``(i + 0.5) source / target - 0.5``
    (clamped at 0), computed exactly in integers: a pixel that lands on a
    source pixel gets weight exactly 0 from its neighbour. Torch's float32
    coordinates leave ~1e-7 there, OpenCV's double ones ~2e-15 at some sizes
    (18 -> 14: 10.5 * 18 / 14 - 0.5 = 13.000000000000002); the mean's
    ``> theta`` count would see either. Resizing a 2-D map is
    ``R_h @ M @ R_w.T``, and a patch pasted into zeros only meets its own
    rows and columns.
    """
    numerator = ((2 * torch.arange(target) + 1) * source - target).clamp_min(0)
    denominator = 2 * target
    left = numerator // denominator
    right = (left + 1).clamp_max(source - 1)
    frac = (numerator - left * denominator).double() / denominator
    rows = torch.arange(target)
    matrix = torch.zeros(target, source, dtype=torch.float64)
    matrix.index_put_((rows, left), 1 - frac, accumulate=True)
    matrix.index_put_((rows, right), frac, accumulate=True)
    return matrix.float().to(device)


def resize_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of ``(..., h, w)`` maps by :func:`resize_matrix` on each axis."""
    rows = resize_matrix(maps.shape[-2], size[0], maps.device)
    cols = resize_matrix(maps.shape[-1], size[1], maps.device)
    return rows @ maps @ cols.t()


# ---------------------------------------------------------------- blur


def reflect_101(length: int, pad: int) -> list[int]:
    """Indices that pad ``range(length)`` by ``pad`` on each side, mirrored about the
    edge pixels (OpenCV's default border), folding again when ``pad >= length``."""
    def fold(p: int) -> int:
        if length == 1:
            return 0
        while not 0 <= p < length:
            p = -p if p < 0 else 2 * (length - 1) - p
        return p
    return [fold(p) for p in range(-pad, length + pad)]


def gaussian_blur(maps: Tensor, size: int = BLUR_SIZE, sigma: float = BLUR_SIGMA) -> Tensor:
    """Separable Gaussian blur of ``(..., H, W)`` maps, mirrored borders (rows, then columns)."""
    pad = size // 2
    height, width = maps.shape[-2:]
    rows = torch.tensor(reflect_101(height, pad), device=maps.device)
    cols = torch.tensor(reflect_101(width, pad), device=maps.device)
    padded = maps.reshape(-1, 1, height, width).index_select(2, rows).index_select(3, cols)
    kernel = sampled_gaussian(size, sigma).float().to(maps.device)
    blurred = F.conv2d(padded, kernel.reshape(1, 1, 1, size))
    blurred = F.conv2d(blurred, kernel.reshape(1, 1, size, 1))
    return blurred.reshape(maps.shape)


# ---------------------------------------------------------------- patches


def crop(scaled: Sequence[Tensor], patches: Sequence[Patch], samples: Sequence[int],
         indices: Sequence[int], window: int) -> Tensor:
    """The patches ``patches[i]`` of samples ``samples[j]``, stacked: ``(n, C, window, window)``."""
    return torch.stack([
        scaled[patches[p].scale][b, :, patches[p].top:patches[p].top + window,
                                 patches[p].left:patches[p].left + window]
        for b, p in zip(samples, indices, strict=True)])


def jobs(positions: Sequence[int], num_patches: int,
         batch_size: int) -> list[tuple[list[int], list[int]]]:
    """Flat (sample * patch) positions in chunks of ``batch_size``: (samples, patch indices)."""
    positions = list(positions)
    return [([j // num_patches for j in chunk], [j % num_patches for j in chunk])
            for chunk in (positions[s:s + batch_size] for s in range(0, len(positions), batch_size))]


def patch_scores(split: Split, scaled: Sequence[Tensor], patches: Sequence[Patch],
                 classes: Tensor, window: int, batch_size: int, softmax: bool) -> Tensor:
    r"""Each patch's score for each class, :math:`\max(0, \mathrm{softmax}(f(p))_c)`:
    ``(B, P, K)``. ``batch_size`` patches per forward pass, no graph."""
    batch, num_patches = classes.shape[0], len(patches)
    parts = []
    for samples, indices in jobs(range(batch * num_patches), num_patches, batch_size):
        out = _engine.forward(split, crop(scaled, patches, samples, indices, window))[1]
        out = out.float()
        if softmax:
            out = out.softmax(-1)
        parts.append(out.gather(1, classes[samples]))
    return torch.cat(parts).clamp_min(0).reshape(batch, num_patches, -1)


def kept_patches(scores: Tensor, pre_filter_ratio: float) -> Tensor:
    """``(B, P, K)`` mask of the best ``P - floor(P * ratio)`` patches per sample and class
    (ties kept in patch order)."""
    num_patches = scores.shape[1]
    keep = num_patches - int(num_patches * pre_filter_ratio)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    best = order[:, :keep]
    return torch.zeros_like(scores, dtype=torch.bool).scatter(1, best, True)


def score_weights(scores: Tensor) -> Tensor:
    """Scores over each sample's and class's best score: in [0, 1]; all 1 if none is positive."""
    best = scores.amax(1, keepdim=True)
    positive = best > 0
    return torch.where(positive, scores / torch.where(positive, best, torch.ones_like(best)),
                       torch.ones_like(scores))


def patch_maps(method: Callable[..., Any], split: Split, patches: Tensor, classes: Tensor,
               window: int, method_kwargs: dict) -> Tensor:
    """``method``'s normalised maps of patches for ``(n, K)`` classes, at the window's size:
    ``(n, K, window, window)``. Several layers are averaged, then normalised again."""
    maps = method(split, patches, classes, normalize=True, **method_kwargs)
    layers = maps if isinstance(maps, (list, tuple)) else [maps]
    expected = (*classes.shape, "h", "w")
    for layer_map in layers:
        if not isinstance(layer_map, Tensor) or layer_map.ndim != 4 or \
                tuple(layer_map.shape[:2]) != tuple(classes.shape):
            shape = tuple(layer_map.shape) if isinstance(layer_map, Tensor) else type(layer_map).__name__
            raise ValueError(
                f"sess needs method(split, patches, (n, K) classes) to return 2-D maps of shape "
                f"{expected}, got {shape}; wrap a CAM method of 2-D activations")
    resized = torch.stack([resize_maps(m.float(), (window, window)) for m in layers]).mean(0)
    return _ops.normalize(resized, spatial_dims=2)


# ---------------------------------------------------------------- fusion


def paste(maps: Tensor, patches: Sequence[Patch], indices: Sequence[int], window: int,
          row_matrices: Sequence[Tensor], col_matrices: Sequence[Tensor]) -> Tensor:
    """Each ``(n, K, w, w)`` patch map put in zeros the size of its scaled image, and that
    resized (bilinear) to the input's size: ``(n, K, H, W)``."""
    rows = torch.stack([row_matrices[patches[p].scale][:, patches[p].top:patches[p].top + window]
                        for p in indices])
    cols = torch.stack([col_matrices[patches[p].scale][:, patches[p].left:patches[p].left + window]
                        for p in indices])
    return rows.unsqueeze(1) @ maps @ cols.transpose(1, 2).unsqueeze(1)


def fuse_into(total: Tensor, count: Tensor, pasted: Tensor, kept: Tensor, samples: Tensor,
              pool: str, theta: float) -> None:
    """Adds one chunk of pasted maps to their samples' running max, or sum and count."""
    kept = kept.unsqueeze(-1).unsqueeze(-1)
    if pool == "max":
        index = samples.reshape(-1, 1, 1, 1).expand_as(pasted)
        total.scatter_reduce_(0, index, torch.where(kept, pasted, torch.zeros_like(pasted)), "amax")
        return
    counted = kept & (pasted > theta)
    total.index_add_(0, samples, torch.where(counted, pasted, torch.zeros_like(pasted)))
    count.index_add_(0, samples, counted.float())


def fused(total: Tensor, count: Tensor, pool: str) -> Tensor:
    """Max as it is; mean over the patches counted at each pixel (0 where none)."""
    if pool == "max":
        return total
    counted = count > 0
    return torch.where(counted, total / torch.where(counted, count, torch.ones_like(count)),
                       torch.zeros_like(total))


# ---------------------------------------------------------------- checks


def _check_options(x: Tensor, method: Any, cls: Any, scales: Any, num_scales: Any,
                   window_size: Any, step_size: Any, pre_filter_ratio: Any, theta: Any,
                   pool: Any) -> None:
    if x.ndim != 4:
        raise ValueError(f"sess slides square windows over images: x must be (B, C, H, W), "
                         f"got shape {tuple(x.shape)}")
    if not callable(method):
        raise TypeError(f"method must be a camfunc method such as camfunc.gradcam, "
                        f"got {type(method).__name__}")
    if _targets.is_objective(cls):
        raise TypeError("sess needs class indices (an int, one per sample, a (B, K) tensor or "
                        "camfunc.topk(k)): a callable target cannot be read on the patches' "
                        "softmax scores; pass the class indices it targets")
    _validate.check_count(num_scales, "num_scales")
    for name, value in (("window_size", window_size), ("step_size", step_size)):
        if value is not None:
            _validate.check_count(value, name)
    window = min(x.shape[-2:]) if window_size is None else window_size
    if scales is not None:
        if isinstance(scales, (int, str)) or not isinstance(scales, Sequence) or not scales:
            raise ValueError(f"scales must be a non-empty sequence of ints, got {scales!r}")
        small = [s for s in scales if not isinstance(s, int) or isinstance(s, bool) or s < window]
        if small:
            raise ValueError(f"every scale must be an int >= the window size {window}, got "
                             f"{small[0]!r}; give larger scales or a smaller window_size")
    if not (isinstance(pre_filter_ratio, (int, float)) and 0.0 <= pre_filter_ratio < 1.0):
        raise ValueError(f"pre_filter_ratio must be in [0, 1), got {pre_filter_ratio!r}")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise TypeError(f"theta must be a number (a threshold on pasted maps), got {theta!r}")
    if pool not in ("mean", "max"):
        raise ValueError(f"pool must be 'mean' or 'max', got {pool!r}")


# ---------------------------------------------------------------- the method


@cam_method(resolution="input", register=False)
def sess(split: Split, x: Tensor, cls: _targets.Target, *,
         method: Callable[..., Any] = gradcam, scales: Sequence[int] | None = None,
         num_scales: int = 12, scale_step_ratio: float = 2.0 / 7.0,
         window_size: int | None = None, step_size: int | None = None,
         pre_filter_ratio: float = 0.0, theta: float = 0.0, pool: str = "mean",
         smooth: bool = True, use_softmax_scores: bool = True, batch_size: int = 32,
         normalize: bool = True, **method_kwargs: Any) -> Computed:
    r"""SESS: ``method`` on sliding windows at several scales, fused by patch score.

    For each scale :math:`s` the input is resized (bilinear, antialiased) so its
    shorter side is :math:`s`; a :math:`w \times w` window slides over it with
    stride ``step_size`` (the last window of a row or column is shifted back
    inside). For class :math:`c` and each kept patch :math:`p`:

    .. math::
        \sigma_p = \max\big(0, \mathrm{softmax}(f(p))_c\big), \qquad
        \tilde M_p = R_p\Big(\frac{\sigma_p}{\max_q \sigma_q}\,
                     \mathrm{norm}\big(\mathrm{up}_w(L_c(p))\big)\Big)

        L = G_{11, 5} * \frac{\sum_p [\tilde M_p > \theta]\, \tilde M_p}
                             {\sum_p [\tilde M_p > \theta]}
        \quad \text{(pool="mean"; 0 where no patch counts)}, \qquad
        L = G_{11, 5} * \max_p \tilde M_p \quad \text{(pool="max")}

    with :math:`L_c(p)` ``method``'s normalised map of the patch (several
    layers: their upsampled mean), :math:`\mathrm{up}_w` bilinear to the
    window, :math:`R_p` pasting into zeros the size of the scaled image and
    resizing that to the input (bilinear), :math:`G_{11,5}` an 11x11 Gaussian
    blur with sigma 5 and mirrored borders (``smooth=True``). Only the best
    ``P - floor(P * pre_filter_ratio)`` patches (by :math:`\sigma_p`) are kept
    and explained. ``use_softmax_scores=False`` uses the logit instead of the
    softmax. If no patch scores above 0, every weight is 1. Defaults:
    ``window_size`` the input's shorter side, ``step_size`` the window,
    scales ``w + i * round(scale_step_ratio * w)`` for ``i < num_scales``.

    **Output at the input's resolution**, ``(B, H, W)`` or ``(B, K, H, W)``
    (the patch maps only meet in image coordinates), so ``sess`` is not in
    ``METHODS``, whose maps are at the layer's. Patches are scored, then
    explained, ``batch_size`` at a time (each with its K classes), and fused
    chunk by chunk; the whole model (head included) runs on every patch, by
    nature. ``cls``: an int, one per sample, a ``(B, K)`` tensor or
    ``camfunc.topk(k)`` (classes fixed on the full input); callables are
    refused. ``return_scores`` gives the model's output on ``x``. Options not
    listed go to ``method``. Input must be images ``(B, C, H, W)``.

    Matches pytorch-grad-cam's ``SESS`` to 1e-5 except at pixels that sample
    a scaled image's pixel exactly: there OpenCV's rounding lends ~2e-15 of
    the neighbour, which pytorch-grad-cam's mean then counts (see
    :func:`resize_matrix`); here the weight is exactly 0. Pre-filter ties are
    broken by patch order (pytorch-grad-cam's unstable argsort: arbitrarily).

    Compiles with ``torch.compile(fullgraph=True)``: the number of patches
    and which run are fixed by shapes. Eagerly, ``pre_filter_ratio`` skips the
    filtered patches (their indices are read back, a value-dependent step);
    when compiling, every patch runs and the filtered ones are masked out, so
    the result is the same. The graph grows with the number of patches.

    Tursun et al., "SESS: Saliency Enhancing with Scaling and Sliding",
    ECCV 2022 (arXiv:2207.01769); pytorch-grad-cam 1.5.7's ``SESS``.

    Example:
        >>> s = camfunc.split(model, "layer4")
        >>> camfunc.sess(s, x, 3, num_scales=2).shape                    # at the input's size
        torch.Size([2, 64, 64])
        >>> camfunc.sess(s, x, camfunc.topk(2), method=camfunc.layercam, num_scales=2).shape
        torch.Size([2, 2, 64, 64])
    """
    _validate.check_count(batch_size, "batch_size")
    _check_options(x, method, cls, scales, num_scales, window_size, step_size,
                   pre_filter_ratio, theta, pool)
    height, width = (int(v) for v in x.shape[-2:])
    window = min(height, width) if window_size is None else window_size
    step = window if step_size is None else step_size

    scores = _engine.forward(split, x)[1]
    classes, keep_k = _targets.class_indices(cls, scores)
    chosen = list(scales) if scales is not None else default_scales(window, num_scales,
                                                                     scale_step_ratio)
    sizes = [scaled_size(height, width, s) for s in chosen]
    scaled = [rescale(x, size) for size in sizes]
    patches = patch_grid(sizes, window, step)
    batch, num_patches, k = x.shape[0], len(patches), classes.shape[1]

    score = patch_scores(split, scaled, patches, classes, window, batch_size, use_softmax_scores)
    kept = kept_patches(score, pre_filter_ratio)
    weights = score_weights(score)
    positions: Sequence[int] = range(batch * num_patches)
    if pre_filter_ratio > 0 and not torch.compiler.is_dynamo_compiling():
        # Skip the patches no class keeps: which ones depends on values, so not when compiling.
        positions = kept.flatten(0, 1).any(-1).nonzero().flatten().tolist()

    device = x.device
    row_matrices = [resize_matrix(h, height, device) for h, _ in sizes]
    col_matrices = [resize_matrix(w, width, device) for _, w in sizes]
    total = torch.zeros(batch, k, height, width, device=device)
    count = torch.zeros_like(total)
    for samples, indices in jobs(positions, num_patches, batch_size):
        rows = torch.tensor(samples, device=device)
        cols = torch.tensor(indices, device=device)
        maps = patch_maps(method, split, crop(scaled, patches, samples, indices, window),
                          classes[rows], window, method_kwargs)
        maps = maps * weights[rows, cols].unsqueeze(-1).unsqueeze(-1)
        pasted = paste(maps, patches, indices, window, row_matrices, col_matrices)
        fuse_into(total, count, pasted, kept[rows, cols], rows, pool, theta)

    cams = fused(total, count, pool)
    if smooth:
        cams = gaussian_blur(cams)
    if normalize:
        cams = _ops.normalize(cams, spatial_dims=2)
    if not keep_k:
        cams = cams[:, 0]
    cams = _validate.nonfinite_maps(cams, x)  # NaN patches fail the score filter and vanish
    return (cams,), scores
