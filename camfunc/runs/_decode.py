"""JPEG files decoded on the run's device, in one batched call; anything else by Pillow.

With ``decode="device"`` the loader's workers only read a JPEG file's bytes.
Here they are decoded by ``torchvision.io.decode_jpeg`` on the device (nvJPEG
on CUDA), turned by their EXIF orientation, resized there (bilinear,
antialiased, as Pillow resizes) and rounded to uint8, as the Pillow path
gives them. A file the device cannot decode (CMYK, damaged, a decoder
limit) falls back to Pillow, alone; an unreadable one is recorded as failed.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from camfunc.io import failure_reason, open_image, read_opened, unit_float
from camfunc.runs._dataset import Batch


def decoded_batch(batch: Batch, names: Sequence[str], size: tuple[int, int], channels: int,
                  exif: bool, device: torch.device) -> Batch:
    """``batch`` with its JPEG rows decoded (on ``device``) into its images, on ``device``."""
    if batch.encoded is None:
        return batch
    files = {row: data for row, data in enumerate(batch.encoded) if data is not None}
    rows = list(files)
    decoded = _on_device(list(files.values()), channels, exif, device)
    images = batch.images.to(device)
    errors = list(batch.errors)
    for row, image in zip(rows, decoded, strict=True):
        if image is None:  # the device declined it: Pillow, from the bytes already read
            try:
                image = read_opened(open_image(names[row], exif, files[row].numpy().tobytes()),
                                    size, channels, names[row]).to(device)
            except Exception as error:  # any unreadable file is recorded, never fatal
                errors[row] = failure_reason(error)
                continue
        else:
            image = resized(image, size)
        if images.dtype != image.dtype:
            images, image = unit_float(images), unit_float(image)
        images[row] = image
    return batch._replace(images=images, errors=errors, encoded=None)


def _on_device(files: list[Tensor], channels: int, exif: bool,
               device: torch.device) -> list[Tensor | None]:
    """Each file decoded to uint8 (channels, h, w) on ``device``, or None where it cannot be."""
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    with warnings.catch_warnings():
        # torchvision 0.29 points to TorchCodec for decoding; its decode_jpeg still works.
        warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
        try:  # one batched call (nvJPEG's batched decoder on CUDA)
            return list(decode_jpeg(files, mode=mode, device=device, apply_exif_orientation=exif))
        except (RuntimeError, TypeError, ValueError):
            pass  # one file spoils the batch (or torchvision < 0.20 takes one at a time)
        out: list[Tensor | None] = []
        for data in files:
            try:
                out.append(decode_jpeg(data, mode=mode, device=device, apply_exif_orientation=exif))
            except (RuntimeError, ValueError):
                out.append(None)
    return out


def resized(image: Tensor, size: tuple[int, int]) -> Tensor:
    """uint8 (C, h, w) to uint8 (C, H, W): bilinear with antialiasing, rounded, as Pillow's."""
    if tuple(image.shape[1:]) == tuple(size):
        return image
    scaled = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False,
                           antialias=True)[0]
    return scaled.round_().clamp_(0, 255).to(torch.uint8)
