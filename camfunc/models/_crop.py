"""Where a resize-then-centre-crop's output lies in the original image: the box a map drawn
on the model's pixels maps back onto (outside it, the model saw nothing)."""

from __future__ import annotations

import math


def crop_box(height: int, width: int, resize: int | None,
             crop: tuple[int, int], *, floor: bool = False) -> tuple[float, float, float, float]:
    """``(top, left, bottom, right)`` in original pixels of what the model sees when an image
    ``height`` x ``width`` has its shorter side resized to ``resize`` (None: resized whole to
    ``crop``, the box is the whole image) and is then centre-cropped to ``crop`` (H, W).

    The crop's offset, ``round((resized - crop) / 2)`` as torchvision's ``CenterCrop`` (which
    timm uses) rounds it, half to even, is scaled
    back by the resize factor; a crop larger than the resized image is clipped to it.
    ``floor``: the offset is ``(resized - crop) // 2``, as Hugging Face's image processors
    crop.
    """
    offset = (lambda v: math.floor(v)) if floor else round
    if resize is None:
        return 0.0, 0.0, float(height), float(width)
    scale = resize / min(height, width)
    resized_h, resized_w = _resized(height, scale, resize, height <= width), \
        _resized(width, scale, resize, width < height)
    top, left = max(0, offset((resized_h - crop[0]) / 2)), max(0, offset((resized_w - crop[1]) / 2))
    bottom, right = min(resized_h, top + crop[0]), min(resized_w, left + crop[1])
    return top / scale, left / scale, bottom / scale, right / scale


def _resized(side: int, scale: float, resize: int, shorter: bool) -> int:
    """A side's length after the resize: the shorter side is ``resize`` exactly, the other
    truncated as torchvision's ``Resize(int)`` does."""
    return resize if shorter else int(side * scale)
