"""Localisation against ground truth: the pointing game and its energy-based form.

Ground truth is boolean masks ``(B, H, W)``, one box per image ``(B, 4)``, or a
list of each image's boxes; boxes are ``(x1, y1, x2, y2)`` in pixels of an
image of size ``size = (H, W)``. A pixel ``(i, j)`` belongs to a box when its
centre ``(j + 0.5, i + 0.5)`` lies in it, edges included, so integer boxes
cover ``mask[y1:y2, x1:x2]``. Several boxes count as their union. Maps are
resized to the ground truth's resolution by bilinear interpolation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from camfunc.metrics import _inputs, _skipping

#: Boolean masks (B, H, W), boxes (B, 4), or per image a (n, 4) tensor or list of 4-number boxes.
GroundTruth = Tensor | Sequence[Any]


class PointingGame(NamedTuple):
    """Hits per image and the accuracy."""

    #: ``(B,)`` bool: the map's maximum lies within the tolerance of the ground truth.
    hits: Tensor
    #: 0-d, fraction of hits.
    accuracy: Tensor
    #: ``(B, 2)`` (row, column) of each map's maximum, at the ground truth's resolution.
    points: Tensor
    #: ``(B,)`` distance in pixels from the point to the nearest ground-truth pixel (0 inside).
    distances: Tensor


class EnergyPointingGame(NamedTuple):
    """Share of each map's energy inside the ground truth, and the mean."""

    #: ``(B,)`` in [0, 1].
    proportions: Tensor
    #: 0-d, mean of ``proportions``.
    mean: Tensor


def _image_boxes(item: Any, index: int) -> Tensor:
    boxes = item if isinstance(item, Tensor) else torch.as_tensor(item, dtype=torch.float64)
    if boxes.ndim == 1:
        boxes = boxes.unsqueeze(0)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.dtype == torch.bool:
        raise ValueError(
            f"image {index}'s boxes have shape {tuple(boxes.shape)}; give (x1, y1, x2, y2) "
            "boxes: a (n, 4) tensor or a list of 4-number boxes per image"
        )
    boxes = boxes.double()
    if not bool(torch.isfinite(boxes).all()):
        raise ValueError(f"image {index}'s boxes contain NaN or infinite coordinates")
    if bool((boxes[:, 2] < boxes[:, 0]).any() | (boxes[:, 3] < boxes[:, 1]).any()):
        raise ValueError(
            f"image {index} has a box with x2 < x1 or y2 < y1; boxes are (x1, y1, x2, y2)"
        )
    return boxes


def boxes_to_masks(boxes: Sequence[Tensor], size: tuple[int, int], device: torch.device) -> Tensor:
    """``(B, H, W)`` bool: pixels whose centres lie in any of each image's boxes."""
    rows = torch.arange(size[0], dtype=torch.float64, device=device) + 0.5
    columns = torch.arange(size[1], dtype=torch.float64, device=device) + 0.5
    masks = []
    for image_boxes in boxes:
        b = image_boxes.to(device)[:, :, None, None]  # (n, 4, 1, 1)
        inside_x = (columns >= b[:, 0]) & (columns <= b[:, 2])  # (n, 1, W)
        inside_y = (rows[:, None] >= b[:, 1]) & (rows[:, None] <= b[:, 3])  # (n, H, 1)
        masks.append((inside_x & inside_y).any(0))
    return torch.stack(masks)


def ground_truth_masks(target: GroundTruth, batch: int, size: Any, device: torch.device) -> Tensor:
    """Boolean ``(B, H, W)`` masks from masks or boxes, each with at least one pixel."""
    if isinstance(target, Tensor) and target.dtype == torch.bool:
        if target.ndim != 3 or target.shape[0] != batch:
            raise ValueError(
                f"masks must be (B, H, W) bool with B = {batch}, got shape {tuple(target.shape)}"
            )
        if size is not None and tuple(size) != tuple(target.shape[1:]):
            raise ValueError(
                f"size={tuple(size)} differs from the masks' {tuple(target.shape[1:])}; "
                "masks give their own size, leave size out"
            )
        masks = target.to(device)
    else:
        if isinstance(target, Tensor) and not (target.ndim == 2 and target.shape[1] == 4):
            raise ValueError(
                f"ground truth of shape {tuple(target.shape)} and dtype {target.dtype} is neither "
                "(B, H, W) bool masks nor (B, 4) boxes; convert masks with mask.bool()"
            )
        if isinstance(target, (str, bytes)) or not isinstance(target, (Tensor, Sequence)):
            raise TypeError(
                "ground truth must be (B, H, W) bool masks, a (B, 4) box tensor or a list of "
                f"each image's boxes, got {type(target).__name__}"
            )
        if len(target) != batch:
            raise ValueError(f"ground truth for {len(target)} images but the batch has {batch} maps")
        if size is None:
            raise ValueError(
                "boxes are in the image's pixels: give size=(H, W), the image size they refer to"
            )
        size = tuple(int(v) for v in size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"size must be (H, W) with positive sizes, got {size}")
        masks = boxes_to_masks([_image_boxes(item, i) for i, item in enumerate(target)], size, device)
    empty = (~masks.flatten(1).any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"images {empty} have no ground-truth pixel (empty mask, or boxes outside the "
            "image); drop them from the batch"
        )
    return masks


def _maps_and_masks(maps: Any, target: GroundTruth, size: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(maps, Tensor) or maps.ndim == 0:
        raise TypeError(f"maps must be a (B, h, w) torch.Tensor, got {type(maps).__name__}")
    checked = _inputs.as_maps(maps, maps.shape[0], 2)
    masks = ground_truth_masks(target, checked.shape[0], size, checked.device)
    return _inputs.resized(checked, tuple(masks.shape[1:])), masks


def pointing_game(maps: Tensor, target: GroundTruth, *, tolerance: float = 15.0,
                  size: Sequence[int] | None = None, skip_nonfinite: bool = False) -> PointingGame:
    r"""Pointing game: a hit when the map's maximum falls within ``tolerance`` pixels
    of the ground truth.

    .. math:: p = \arg\max_{(i,j)} M(i, j), \qquad
              \mathrm{hit} = \big[\min_{q \in G} \lVert p - q \rVert_2 < \tau\big],
              \qquad \mathrm{accuracy} = \frac{\#\mathrm{hits}}{B}

    with :math:`G` the ground-truth pixels and :math:`\tau = 15` px (the paper's
    tolerance; strict, as in TorchRay's benchmark, so a point inside :math:`G`
    always hits). The map is first resized to the ground truth's resolution
    (bilinear). Ties in the maximum: the first in row-major order (top row
    first, then leftmost), as ``argmax`` returns; a constant map points at (0, 0).

    Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016.

    Args:
        maps: ``(B, h, w)`` or ``(B, 1, h, w)``, any resolution.
        target: ``(B, H, W)`` bool masks, ``(B, 4)`` boxes, or a list of each image's
            boxes (``(n, 4)`` tensor or list of ``(x1, y1, x2, y2)``).
        tolerance: positive, in pixels of the ground truth.
        size: ``(H, W)`` of the image the boxes refer to (required with boxes).
        skip_nonfinite: leave out images whose map holds NaN or Inf (no hit, point
            (-1, -1), NaN distance; the accuracy over the rest) instead of refusing them.

    Example:
        >>> cams = camfunc.gradcam(s, x, 3)                            # (B, 4, 4)
        >>> boxes = torch.tensor([[0, 0, 32, 32], [16, 16, 48, 48]])   # (x1, y1, x2, y2) per image
        >>> result = camfunc.metrics.pointing_game(cams, boxes, size=x.shape[-2:])
        >>> result.hits.shape, result.accuracy.shape
        (torch.Size([2]), torch.Size([]))
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) \
            or not math.isfinite(tolerance) or tolerance <= 0:
        raise ValueError(f"tolerance must be a positive number of pixels, got {tolerance!r}")
    keep = _skipping.finite_rows(maps, skip_nonfinite)
    if keep is not None:
        kept = pointing_game(_skipping.rows_of(maps, keep), _skipping.rows_of(target, keep),
                             tolerance=tolerance, size=size)
        return _skipping.scattered(kept, keep, maps.shape[0], ("hits", "points", "distances"))
    maps, masks = _maps_and_masks(maps, target, size)
    height, width = masks.shape[1:]
    flat_index = maps.flatten(1).argmax(1)
    points = torch.stack([flat_index // width, flat_index % width], 1)
    rows = torch.arange(height, device=maps.device).view(1, height, 1)
    columns = torch.arange(width, device=maps.device).view(1, 1, width)
    squared = ((rows - points[:, :1, None]) ** 2 + (columns - points[:, 1:, None]) ** 2).double()
    nearest = squared.where(masks, torch.inf).flatten(1).amin(1)
    hits = nearest < float(tolerance) ** 2
    return PointingGame(hits, hits.float().mean(), points, nearest.sqrt().float())


def energy_pointing_game(maps: Tensor, target: GroundTruth, *, size: Sequence[int] | None = None,
                         skip_nonfinite: bool = False) -> EnergyPointingGame:
    r"""Energy-based pointing game: the share of each map's energy inside the ground truth.

    .. math:: \mathrm{Proportion} = \frac{\sum_{(i,j) \in G} M(i, j)}
              {\sum_{(i,j) \in G} M(i, j) + \sum_{(i,j) \notin G} M(i, j)}

    with :math:`M \ge 0` the map resized (bilinear) to the ground truth's
    resolution and :math:`G` its pixels (the union of the boxes, or the mask).
    The ratio does not depend on the map's scale; it does on an offset, so
    min-max normalise maps that have one (camfunc's maps are already in [0, 1]).
    A map that is zero everywhere has proportion 0.

    Wang et al., "Score-CAM: Score-Weighted Visual Explanations for
    Convolutional Neural Networks", CVPR Workshops 2020, Section 5.2.

    Example:
        >>> cams = camfunc.gradcam(s, x, 3)
        >>> masks = torch.zeros(2, 64, 64, dtype=torch.bool); masks[:, 16:48, 16:48] = True
        >>> result = camfunc.metrics.energy_pointing_game(cams, masks)
        >>> result.proportions.shape, result.mean.shape
        (torch.Size([2]), torch.Size([]))
    """
    keep = _skipping.finite_rows(maps, skip_nonfinite)
    if keep is not None:  # their proportion is NaN; the mean covers the rest
        kept = energy_pointing_game(_skipping.rows_of(maps, keep), _skipping.rows_of(target, keep),
                                    size=size)
        return _skipping.scattered(kept, keep, maps.shape[0], ("proportions",))
    maps, masks = _maps_and_masks(maps, target, size)
    if bool((maps < 0).any()):
        raise ValueError(
            "energy needs non-negative maps, got negative values; apply a ReLU or "
            "camfunc.normalize(maps) first"
        )
    total = maps.double().flatten(1).sum(1)
    inside = (maps.double() * masks).flatten(1).sum(1)
    proportions = (inside / total.where(total > 0, 1.0)).where(total > 0, 0.0).float()
    return EnergyPointingGame(proportions, proportions.mean())


def pointing_game_chance(target: GroundTruth, *, tolerance: float = 15.0,
                         size: Sequence[int] | None = None) -> Tensor:
    r"""The pointing game's chance rate: the hit probability of a uniformly random point, ``(B,)``.

    .. math:: \mathrm{chance} = \frac{1}{HW}\,\#\big\{p : \min_{q \in G} \lVert p - q \rVert_2 < \tau\big\}

    The ground truth dilated by a disc of radius :math:`\tau` (strict, as in
    :func:`pointing_game`), as a fraction of the image. A pointing-game accuracy
    means something only against this baseline: large objects and a large
    tolerance make hits cheap.

    Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016
    (the baseline their tables compare with is a centre point; this one is uniform).

    Example:
        >>> masks = torch.zeros(1, 8, 8, dtype=torch.bool); masks[0, 0, 0] = True
        >>> camfunc.metrics.pointing_game_chance(masks, tolerance=2)   # 4 of 64 pixels
        tensor([0.0625])
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) \
            or not math.isfinite(tolerance) or tolerance <= 0:
        raise ValueError(f"tolerance must be a positive number of pixels, got {tolerance!r}")
    batch = target.shape[0] if isinstance(target, Tensor) else len(target)
    device = target.device if isinstance(target, Tensor) else torch.device("cpu")
    masks = ground_truth_masks(target, batch, size, device)
    radius = math.ceil(tolerance)
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    disc = (offsets[:, None] ** 2 + offsets[None, :] ** 2 < float(tolerance) ** 2).float()
    reach = torch.nn.functional.conv2d(masks[:, None].float(), disc[None, None], padding=radius)
    return (reach[:, 0] > 0.5).flatten(1).float().mean(1)
