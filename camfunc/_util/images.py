"""Reading images for the command line: each failure is one line naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


def read_image(path: str | Path, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """An image file as float tensors (3, H, W) in [0, 1]: as stored, and resized to ``size``.

    Raises ``OSError`` or ``ValueError`` with a one-line reason for a missing,
    unreadable or corrupt file.
    """
    rgb, resized = _decode(path, size)
    return _tensor(rgb), _tensor(resized)


def read_resized(path: str | Path, size: tuple[int, int]) -> Tensor:
    """An image file as a float tensor (3, H, W) in [0, 1], resized to ``size``; errors as
    :func:`read_image`'s."""
    return _tensor(_decode(path, size)[1])


def read_resized_bytes(path: str | Path, size: tuple[int, int]) -> Tensor:
    """As :func:`read_resized`, but uint8 in [0, 255]: a quarter of the bytes to ship from
    a loader's workers and to the device; :func:`unit_float` finishes it there."""
    resized = _decode(path, size)[1]
    return torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def unit_float(images: Tensor) -> Tensor:
    """uint8 images to float32 in [0, 1] (the same values :func:`read_resized` gives); float
    images as they are."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images


def _decode(path: str | Path, size: tuple[int, int]):
    """The image as stored (RGB) and resized, as Pillow images."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise OSError(f"no such file: {path}")
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so a truncated file fails here
            rgb = image.convert("RGB")
            resized = rgb.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    except UnidentifiedImageError:
        raise ValueError(f"not an image Pillow can read: {path}") from None
    except (OSError, SyntaxError) as error:
        raise ValueError(f"corrupt image {path}: {error}") from None
    return rgb, resized


def _tensor(image) -> Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def expand_images(paths: list[str]) -> list[Path]:
    """Files as given, and folders expanded to their image files (recursively, sorted)."""
    found: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            found.append(path)
    return found
