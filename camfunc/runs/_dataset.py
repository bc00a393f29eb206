"""What a run reads: an image folder in ImageFolder layout, or the embedded model's scenes.

Both are map-style torch datasets with a fixed order: dataset index ``i`` is
the same image on every rank and every restart. An image that cannot be read
does not stop the run: its item carries the reason and a blank image, and the
run records it as failed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from camfunc.io import IMAGE_SUFFIXES, failure_reason, read_resized_bytes, unit_float
from camfunc.models import ImageReader

SCENES_PREFIX = "scenes:"
DEFAULT_SCENES_SEED = 0


JPEG_MAGIC = b"\xff\xd8\xff"


class Item(NamedTuple):
    """One dataset entry; ``error`` is empty when the image was read."""

    dataset_index: int
    image: Tensor          # (C, H, W): uint8, or float in [0, 1]; zeros when the read failed
    label: int
    mask: Tensor | None    # (H, W) bool object mask (generated scenes only)
    error: str
    encoded: Tensor | None = None   # a JPEG file's bytes, to decode on the device (image unset)


class Batch(NamedTuple):
    """Items stacked by :func:`collate`."""

    indices: Tensor        # (B,) long
    images: Tensor         # (B, C, H, W): uint8, or float in [0, 1] if any image is deeper
    labels: Tensor         # (B,) long
    masks: Tensor | None   # (B, H, W) bool, or None
    errors: list[str]
    encoded: list[Tensor | None] | None = None   # JPEG bytes per row, to decode on the device


def collate(items: Sequence[Item]) -> Batch:
    images = [item.image for item in items]
    if len({image.dtype for image in images}) > 1:  # an 8-bit and a 16-bit file in one batch
        images = [unit_float(image) for image in images]
    encoded = [item.encoded for item in items]
    return Batch(torch.tensor([item.dataset_index for item in items], dtype=torch.long),
                 torch.stack(images),
                 torch.tensor([item.label for item in items], dtype=torch.long),
                 _stacked_masks(items), [item.error for item in items],
                 encoded if any(e is not None for e in encoded) else None)


def _stacked_masks(items: Sequence[Item]) -> Tensor | None:
    """The items' object masks, stacked; None for a dataset without them."""
    if items[0].mask is None:
        return None
    masks = [item.mask for item in items if item.mask is not None]
    if len(masks) != len(items):
        raise ValueError("some items of the batch have an object mask and some do not")
    return torch.stack(masks)


def list_image_folder(root: Path) -> tuple[list[str], list[Path], list[int]]:
    """``(classes, files, labels)`` of an ImageFolder tree, in dataset order.

    Classes are the sorted names of ``root``'s sub-folders (hidden ones
    skipped); each class's image files (by suffix, searched recursively) are
    sorted by their path. Files directly in ``root`` belong to no class and
    are ignored, as torchvision's ``ImageFolder`` does.
    """
    if not root.is_dir():
        raise ValueError(f"image folder not found: {root} (give a folder with one sub-folder per "
                         "class, or scenes:N for generated scenes)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders; the layout is ROOT/CLASS/IMAGE "
                         "(torchvision's ImageFolder)")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        files += found
        labels += [label] * len(found)
    if not files:
        raise ValueError(f"{root} has class folders {classes[:5]} but no image files "
                         f"({', '.join(IMAGE_SUFFIXES)})")
    return classes, files, labels


class ImageFolderData(torch.utils.data.Dataset):
    """An ImageFolder tree read with Pillow, each image resized to ``size`` (H, W) with
    ``channels`` channels, turned by its EXIF orientation when ``exif``. With
    ``jpeg_bytes``, JPEG files are only read, for the device to decode. With ``reader`` (a
    ``camfunc.models.ImageReader`` with the model's own transform), each image is read
    through it instead, as float32: the model's resize, crop and interpolation."""

    def __init__(self, root: str | Path, size: tuple[int, int], channels: int = 3,
                 exif: bool = True, jpeg_bytes: bool = False,
                 reader: ImageReader | None = None) -> None:
        if reader is not None and jpeg_bytes:
            raise ValueError("JPEG bytes are decoded on the device with camfunc's whole-image "
                             "resize; a model's own transform reads them with Pillow")
        self.root = Path(root).resolve()
        height, width = size
        self.size = (height, width)
        self.channels, self.exif, self.jpeg_bytes = channels, exif, jpeg_bytes
        self.reader = reader
        self.classes, self.files, self.labels = list_image_folder(self.root)

    def __len__(self) -> int:
        return len(self.files)

    def name(self, index: int) -> str:
        return self.files[index].relative_to(self.root).as_posix()

    def identity(self) -> dict:
        listing = "\n".join(f"{label}\t{self.name(i)}" for i, label in enumerate(self.labels))
        return {"kind": "image_folder", "root": str(self.root), "images": len(self),
                "classes": self.classes, "channels": self.channels, "exif": self.exif,
                "listing_sha256": hashlib.sha256(listing.encode()).hexdigest()}

    def __getitem__(self, index: int) -> Item:
        blank = torch.zeros(self.channels, *self.size, dtype=torch.uint8)
        try:
            if self.jpeg_bytes:
                data = self.files[index].read_bytes()
                if data.startswith(JPEG_MAGIC):
                    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                    return Item(index, blank, self.labels[index], None, "", encoded)
            if self.reader is not None:
                image = self.reader(self.files[index], exif=self.exif)
            else:  # uint8 for 8-bit files: workers ship a quarter of float32's bytes.
                image = read_resized_bytes(self.files[index], self.size, channels=self.channels,
                                           exif=self.exif)
            error = ""
        except Exception as failure:  # any unreadable file is recorded, never fatal
            image = blank
            error = failure_reason(failure)
        return Item(index, image, self.labels[index], None, error)


class ScenesData(torch.utils.data.Dataset):
    """``camfunc.zoo.scenes(n, seed=seed)``, resized to ``size`` when the model wants another."""

    def __init__(self, n: int, seed: int, size: tuple[int, int]) -> None:
        from camfunc import zoo

        self.n, self.seed, self.size = n, seed, tuple(size)
        self.classes = list(zoo.CLASSES)
        data = zoo.scenes(n, seed=seed)
        images, masks = data.images, data.masks
        if tuple(images.shape[-2:]) != self.size:
            images = torch.nn.functional.interpolate(images, size=self.size, mode="bilinear",
                                                     align_corners=False).clamp(0, 1)
            masks = torch.nn.functional.interpolate(masks[:, None].float(), size=self.size,
                                                    mode="nearest")[:, 0].bool()
        self.images, self.labels, self.masks = images, data.labels, masks

    def __len__(self) -> int:
        return self.n

    def name(self, index: int) -> str:
        return f"scene-{index:06d}"

    def identity(self) -> dict:
        return {"kind": "scenes", "images": self.n, "seed": self.seed, "classes": self.classes}

    def __getitem__(self, index: int) -> Item:
        return Item(index, self.images[index], int(self.labels[index]), self.masks[index], "")


def parse_scenes(spec: str) -> tuple[int, int] | None:
    """``scenes:N`` or ``scenes:N:SEED`` as ``(N, SEED)``; None for anything else."""
    if not spec.startswith(SCENES_PREFIX):
        return None
    parts = spec[len(SCENES_PREFIX):].split(":")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2) or numbers[0] < 1:
        raise ValueError(f"bad scenes spec {spec!r}: use scenes:N or scenes:N:SEED with N >= 1")
    return numbers[0], numbers[1] if len(numbers) == 2 else DEFAULT_SCENES_SEED


def open_data(data: str | Path, size: tuple[int, int], channels: int = 3, exif: bool = True,
              jpeg_bytes: bool = False,
              reader: ImageReader | None = None) -> ImageFolderData | ScenesData:
    """The dataset ``data`` names, as :func:`run` reads it: an image folder (one subfolder per
    class, images resized whole to ``size`` with ``channels`` channels, EXIF-turned unless
    ``exif`` is False; 8-bit images stay uint8 when ``jpeg_bytes``; with ``reader``, a model's
    ``LoadedModel.reader()``, read through the model's own transform instead), or
    ``scenes:N[:SEED]`` (N embedded shapes scenes, resized whole; ``reader`` is not for them).
    Indexing gives an ``Item`` (dataset_index, image, label, mask, error); ``classes`` names
    the labels.

    Example:
        >>> data = camfunc.runs.open_data("scenes:8", (64, 64))
        >>> len(data), data[0].image.shape, data.classes[:2]
        (8, torch.Size([3, 64, 64]), ['circle', 'square'])
    """
    scenes = parse_scenes(data) if isinstance(data, str) else None
    if scenes is not None:
        if channels != 3:
            raise ValueError(f"scenes are RGB, but the model takes {channels} channel(s); "
                             "use an image folder")
        if reader is not None and reader.transform is not None:
            raise ValueError("scenes are generated tensors, resized whole to the model's size; "
                             "a model's own transform is for image files")
        return ScenesData(*scenes, size)
    if not isinstance(data, (str, Path)):
        raise TypeError(f"data must be a folder path or 'scenes:N[:SEED]', got {type(data).__name__}")
    return ImageFolderData(data, size, channels, exif, jpeg_bytes,
                           reader if reader is not None and reader.transform is not None else None)
