"""Reading images as they are: every Pillow mode, every bit depth, turned the way viewers show them.

8-bit modes (1, L, LA, P, PA, RGB, RGBA, CMYK, ...) are converted by Pillow
(alpha dropped, palettes looked up) and divided by 255. Deeper modes are
scaled by their real range, never clipped: ``I;16*`` by 65,535; ``I`` by
65,535 when its values fit 16 bits (Pillow opens some 16-bit files as ``I``),
else by its own minimum and maximum; ``F`` as it is when within [0, 1], else
by its own minimum and maximum. Grayscale goes to three channels only for a
model that wants three; colour goes to one (Pillow's ITU-R 601 luma) for one
that wants one. EXIF orientation is applied unless ``exif=False``. Each
failure is a one-line ``OSError`` or ``ValueError`` naming the file.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
SIXTEEN_BITS = 65535.0
CHANNELS = (1, 3)


def read_image(path: str | Path, size: tuple[int, int], *, channels: int = 3,
               exif: bool = True) -> tuple[Tensor, Tensor]:
    """An image file as float tensors in [0, 1]: as the user sees it (3, H, W), and as the
    model takes it, resized to ``size`` with ``channels`` channels.

    Raises ``OSError`` or ``ValueError`` with a one-line reason for a missing,
    unreadable or corrupt file.

    Example:
        >>> from PIL import Image; Image.new("RGB", (80, 60)).save("cat.png")
        >>> shown, x = camfunc.io.read_image("cat.png", (64, 64))
        >>> shown.shape, x.shape
        (torch.Size([3, 60, 80]), torch.Size([3, 64, 64]))
    """
    image = open_image(path, exif)
    return _float(unit_pixels(image, 3, path)), unit_float(read_opened(image, size, channels, path))


def read_resized(path: str | Path, size: tuple[int, int], *, channels: int = 3,
                 exif: bool = True) -> Tensor:
    """An image file as a float tensor (channels, H, W) in [0, 1], resized to ``size``;
    errors as :func:`read_image`'s.

    Example:
        >>> from PIL import Image; Image.new("RGB", (80, 60)).save("cat.png")
        >>> camfunc.io.read_resized("cat.png", (32, 32), channels=1).shape
        torch.Size([1, 32, 32])
    """
    return unit_float(read_resized_bytes(path, size, channels=channels, exif=exif))


def read_resized_bytes(path: str | Path, size: tuple[int, int], *, channels: int = 3,
                       exif: bool = True) -> Tensor:
    """As :func:`read_resized`, but an 8-bit image stays uint8 in [0, 255]: a quarter of the
    bytes to ship from a loader's workers and to the device, where :func:`unit_float`
    finishes it. Deeper images come as float32 in [0, 1].

    Example:
        >>> from PIL import Image; Image.new("RGB", (80, 60)).save("cat.png")
        >>> camfunc.io.read_resized_bytes("cat.png", (32, 32)).dtype
        torch.uint8
    """
    return read_opened(open_image(path, exif), size, channels, path)


def unit_float(images: Tensor) -> Tensor:
    """uint8 images to float32 in [0, 1] (the same values :func:`read_resized` gives); float
    images as they are.

    Example:
        >>> camfunc.io.unit_float(torch.tensor([0, 255], dtype=torch.uint8))
        tensor([0., 1.])
    """
    return images.float().div_(255) if images.dtype == torch.uint8 else images


def open_image(path: str | Path, exif: bool = True, data: bytes | None = None) -> Any:
    """The decoded Pillow image, turned by its EXIF orientation when ``exif``; from ``data``
    (the file's bytes, already read) when given.

    Example:
        >>> from PIL import Image; Image.new("RGB", (80, 60)).save("cat.png")
        >>> camfunc.io.open_image("cat.png").size
        (80, 60)
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if data is None and not path.is_file():
        raise OSError(f"no such file: {path}")
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as image:
            image.load()  # decode now, so a truncated file fails here
            return ImageOps.exif_transpose(image) if exif else image.copy()
    except UnidentifiedImageError:
        raise ValueError(f"not an image Pillow can read: {path}") from None
    except (OSError, SyntaxError) as error:
        raise ValueError(f"corrupt image {path}: {error}") from None


def failure_reason(error: BaseException) -> str:
    """Why a file could not be read, in one line: the message of camfunc's own
    ``OSError``/``ValueError``, else the exception's type and message (a decoder plugin, or
    a library that replaced ``Image.open``, can raise anything).

    Example:
        >>> camfunc.io.failure_reason(ValueError("corrupt image cat.png: truncated\\nmore"))
        'corrupt image cat.png: truncated'
        >>> camfunc.io.failure_reason(ModuleNotFoundError("No module named 'pi_heif'"))
        "ModuleNotFoundError: No module named 'pi_heif'"
    """
    text = str(error) if isinstance(error, (OSError, ValueError)) else \
        f"{type(error).__name__}: {error}"
    return text.splitlines()[0] if text else type(error).__name__


def is_deep(image: Any) -> bool:
    """More than 8 bits a sample: scaled by range, not converted by Pillow."""
    mode: str = image.mode
    return mode.startswith("I") or mode == "F"


def read_opened(image: Any, size: tuple[int, int], channels: int, path: str | Path) -> Tensor:
    """An opened image resized to ``size`` (H, W): uint8 (channels, H, W) for 8-bit
    images, float32 in [0, 1] for deeper ones.

    Example:
        >>> from PIL import Image; Image.new("RGB", (80, 60)).save("cat.png")
        >>> opened = camfunc.io.open_image("cat.png")
        >>> camfunc.io.read_opened(opened, (32, 32), 1, "cat.png").shape
        torch.Size([1, 32, 32])
    """
    from PIL import Image

    if channels not in CHANNELS:
        raise ValueError(f"models taking {channels} channels are not supported; images are "
                         f"read with 1 or 3")
    box = (size[1], size[0])
    if not is_deep(image):
        resized = _eight_bit(image, channels).resize(box, Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(resized, dtype=np.uint8).reshape(*size, channels)
                                .copy()).permute(2, 0, 1).contiguous()
    gray = Image.fromarray(_deep_unit(image, path), mode="F").resize(box, Image.Resampling.BILINEAR)
    plane = torch.from_numpy(np.asarray(gray, dtype=np.float32).copy())
    return plane.expand(channels, *size).contiguous()


def unit_pixels(image: Any, channels: int, path: str | Path) -> np.ndarray:
    """The image at its own size, (H, W, channels) float32 in [0, 1]."""
    if not is_deep(image):
        pixels = np.asarray(_eight_bit(image, channels), dtype=np.float32) / 255.0
        return pixels.reshape(image.height, image.width, channels)
    return np.repeat(_deep_unit(image, path)[:, :, None], channels, axis=2)


def _eight_bit(image: Any, channels: int) -> Any:
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")  # the palette's own transparency, without Pillow's warning
    return image.convert("L" if channels == 1 else "RGB")


def _deep_unit(image: Any, path: str | Path) -> np.ndarray:
    """A deep single-channel image (I;16*, I, F) as float32 in [0, 1], scaled by its range."""
    values = np.asarray(image).astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"image {path} ({image.mode}) holds NaN or infinite values")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and high <= SIXTEEN_BITS):
        unit = values / SIXTEEN_BITS
    elif image.mode == "F" and low >= 0 and high <= 1:
        unit = values
    else:  # its own range: I beyond 16 bits, F beyond [0, 1]
        unit = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return unit.astype(np.float32)


def _float(pixels: np.ndarray) -> Tensor:
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def expand_images(paths: list[str]) -> list[Path]:
    """Files as given, and folders expanded to their image files (recursively, sorted).

    Example:
        >>> from PIL import Image; Image.new("RGB", (80, 60)).save("cat.png")
        >>> camfunc.io.expand_images(["."])
        [PosixPath('cat.png')]
    """
    found: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            found.append(path)
    return found


def rgb_image(image: Any, path: str | Path) -> Any:
    """An opened image as 8-bit RGB Pillow, what a library's own transform takes: 8-bit modes
    converted by Pillow, deeper ones scaled by their range first (never clipped)."""
    from PIL import Image

    if not is_deep(image):
        return _eight_bit(image, 3)
    unit = _deep_unit(image, path)
    return Image.fromarray(np.round(unit * 255).astype(np.uint8), mode="L").convert("RGB")


def read_original(path: str | Path, *, exif: bool = True) -> tuple[Any, Tensor]:
    """The opened image and it as the user sees it, (3, H, W) float in [0, 1]."""
    image = open_image(path, exif)
    return image, _float(unit_pixels(image, 3, path))


def read_shown(path: str | Path, *, exif: bool = True) -> Tensor:
    """An image file as the user sees it, at its own size: (3, H, W) float in [0, 1], turned
    by its EXIF orientation unless ``exif`` is False (what an overlay is drawn on); errors as
    :func:`read_image`'s.

    Example:
        >>> from PIL import Image; Image.new("RGB", (80, 60)).save("cat.png")
        >>> camfunc.io.read_shown("cat.png").shape
        torch.Size([3, 60, 80])
    """
    return read_original(path, exif=exif)[1]
