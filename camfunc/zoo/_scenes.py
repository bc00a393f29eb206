"""Procedural scenes: one coloured shape on a cluttered background, with its mask.

Everything is drawn in torch from one seeded generator, so a seed names a
scene set exactly. Each scene holds one object of a class in ``CLASSES`` and
some distractors (line segments and small dots, never one of the classes) on
a smooth, noisy background. The object's pixel mask is the ground truth for
localisation metrics.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from camfunc._core.validate import check_count

CLASSES = ("circle", "square", "triangle", "cross", "ring")
IMAGE_SIZE = 64


class Scenes(NamedTuple):
    """A batch of scenes: ``images`` (N, 3, S, S) in [0, 1], ``labels`` (N,), ``masks`` (N, S, S) bool."""

    images: Tensor
    labels: Tensor
    masks: Tensor


#: The farthest any shape reaches from its centre, in radii: the square's corner.
SHAPE_REACH = 0.8 * math.sqrt(2)


def _uniform(generator: torch.Generator, *shape: int, low: float = 0.0, high: float = 1.0) -> Tensor:
    return low + (high - low) * torch.rand(*shape, generator=generator)


def _grid(size: int) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates ``(ys, xs)``, each (S, S)."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    return ys, xs


def _object_frame(centres: Tensor, angles: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Each pixel in its object's rotated frame: ``(u, v)``, each (N, S, S)."""
    ys, xs = _grid(size)
    dy = ys - centres[:, 0, None, None]
    dx = xs - centres[:, 1, None, None]
    cos, sin = torch.cos(angles)[:, None, None], torch.sin(angles)[:, None, None]
    return cos * dx + sin * dy, -sin * dx + cos * dy


def shape_masks(u: Tensor, v: Tensor, radius: Tensor) -> Tensor:
    """Masks of every class at once: (N, len(CLASSES), S, S), each shape about ``radius`` across half."""
    r = radius[:, None, None]
    distance = torch.sqrt(u * u + v * v)
    circle = distance < r
    square = (u.abs() < 0.8 * r) & (v.abs() < 0.8 * r)
    # Equilateral triangle: inside three half-planes at distance r/2 from the centre.
    edges = [(math.cos(t), math.sin(t)) for t in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3,
                                                  math.pi / 2 + 4 * math.pi / 3)]
    triangle = torch.stack([u * cu + v * cv < 0.5 * r for cu, cv in edges]).all(0)
    arm = 0.3 * r
    cross = ((u.abs() < arm) & (v.abs() < r)) | ((v.abs() < arm) & (u.abs() < r))
    ring = (distance < r) & (distance > 0.55 * r)
    return torch.stack([circle, square, triangle, cross, ring], dim=1)


def _background(generator: torch.Generator, n: int, size: int) -> Tensor:
    """Muted smooth colour fields plus fine noise: (N, 3, S, S)."""
    coarse = _uniform(generator, n, 3, 4, 4, low=0.15, high=0.6)
    field = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic",
                                            align_corners=False)
    grain = 0.06 * torch.randn(n, 3, size, size, generator=generator)
    return field + grain


def _segments(generator: torch.Generator, n: int, count: int, size: int) -> Tensor:
    """Masks of ``count`` thin line segments per scene: (N, count, S, S)."""
    ys, xs = _grid(size)
    start = _uniform(generator, n, count, 2, high=size)
    end = start + _uniform(generator, n, count, 2, low=-size / 3, high=size / 3)
    direction = end - start
    length2 = (direction * direction).sum(-1).clamp_min(1e-6)
    py = ys - start[..., 0, None, None]
    px = xs - start[..., 1, None, None]
    t = ((py * direction[..., 0, None, None] + px * direction[..., 1, None, None])
         / length2[..., None, None]).clamp(0, 1)
    gap_y = py - t * direction[..., 0, None, None]
    gap_x = px - t * direction[..., 1, None, None]
    return gap_y * gap_y + gap_x * gap_x < 1.0


def _dots(generator: torch.Generator, n: int, count: int, size: int) -> Tensor:
    """Masks of ``count`` small dots per scene: (N, count, S, S)."""
    ys, xs = _grid(size)
    centre = _uniform(generator, n, count, 2, high=size)
    radius = _uniform(generator, n, count, low=1.5, high=2.5)
    dy = ys - centre[..., 0, None, None]
    dx = xs - centre[..., 1, None, None]
    return dy * dy + dx * dx < (radius * radius)[..., None, None]


def _paint(images: Tensor, masks: Tensor, colours: Tensor) -> Tensor:
    """Paint each of K masks (N, K, S, S) with its colour (N, K, 3), in order."""
    for k in range(masks.shape[1]):
        images = torch.where(masks[:, k, None], colours[:, k, :, None, None], images)
    return images


#: The decoy patch's colour for each class (red, green, blue, yellow, magenta).
DECOY_COLOURS = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0],
                              [1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])


def _corner_patches(corners: Tensor, size: int) -> Tensor:
    """A square patch, a tenth of the image wide, two pixels in from corner 0-3: (N, S, S)."""
    side, gap = max(2, size // 10), 2
    ys, xs = _grid(size)
    low, high = gap, size - gap - side
    top = torch.where(corners < 2, low, high)[:, None, None]
    left = torch.where(corners % 2 == 0, low, high)[:, None, None]
    return (ys >= top) & (ys < top + side) & (xs >= left) & (xs < left + side)


def scenes(n: int, *, seed: int = 0, size: int = IMAGE_SIZE, distractors: int = 3,
           decoy: str | None = None) -> Scenes:
    """Draw ``n`` scenes from the seed: a ``Scenes(images, labels, masks)`` tuple.

    Classes are balanced in expectation (drawn uniformly). The object's radius
    is 15-25% of the image, it lies inside the image without touching its border, and it is drawn
    over the distractors, so its mask is exactly its visible pixels. No paper: the set is
    camfunc's own, in the spirit of synthetic localisation benchmarks with exact ground truth.

    ``decoy`` adds a small square patch in a random corner, under the object, in one of
    ``DECOY_COLOURS``: ``"class"`` ties its colour to the label (a shortcut a model can learn
    instead of the shape), ``"random"`` draws it independently of the label (a test set on
    which the shortcut fails). As the "decoy MNIST" of Ross et al., "Right for the Right
    Reasons", IJCAI 2017. The other draws do not change, so a seed gives the same scenes
    with and without a decoy, but for the patch.

    Example:
        >>> data = camfunc.zoo.scenes(8, seed=1)
        >>> data.images.shape, data.labels.shape, data.masks.shape
        (torch.Size([8, 3, 64, 64]), torch.Size([8]), torch.Size([8, 64, 64]))
    """
    check_count(n, "n")
    if not isinstance(size, int) or size < 16:
        raise ValueError(f"size must be an int of at least 16 pixels, got {size!r}")
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(CLASSES), (n,), generator=generator)
    radius = _uniform(generator, n, low=0.15 * size, high=0.25 * size)
    # A one-pixel margin beyond the farthest point of any shape (a rotated square's corner,
    # 0.8 * sqrt(2) * radius): the object never touches the border, so it is never clipped.
    reach = SHAPE_REACH * radius[:, None]
    centres = reach + 1 + _uniform(generator, n, 2) * (size - 2 * reach - 2)
    angles = _uniform(generator, n, high=2 * math.pi)
    object_colour = _uniform(generator, n, 1, 3, low=0.0, high=1.0)
    # Saturate: push the strongest channel up and the weakest down, so objects stand out.
    object_colour = (object_colour - object_colour.mean(-1, keepdim=True)) * 1.8 + 0.5
    object_colour = object_colour.clamp(0, 1)

    images = _background(generator, n, size)
    clutter = torch.cat([_segments(generator, n, distractors, size),
                         _dots(generator, n, distractors, size)], dim=1)
    clutter_colour = _uniform(generator, n, clutter.shape[1], 3)
    images = _paint(images, clutter, clutter_colour)
    if decoy is not None:
        if decoy not in ("class", "random"):
            raise ValueError(f"decoy must be None, 'class' or 'random', got {decoy!r}")
        shade = labels if decoy == "class" else torch.randint(len(CLASSES), (n,), generator=generator)
        corners = torch.randint(4, (n,), generator=generator)
        images = _paint(images, _corner_patches(corners, size)[:, None], DECOY_COLOURS[shade][:, None])

    u, v = _object_frame(centres, angles, size)
    every_class = shape_masks(u, v, radius)
    masks = every_class[torch.arange(n), labels]
    images = _paint(images, masks[:, None], object_colour)
    return Scenes(images.clamp(0, 1), labels, masks)
