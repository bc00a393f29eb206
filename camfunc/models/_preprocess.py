"""A model's own preprocessing, as its library states it: timm's ``create_transform`` from its
data config, a Hugging Face image processor, a torchvision weights' ``transforms()``. Each is
run without its normalisation, so the pixels the model saw ([0, 1], (C, H, W)) can be shown;
``LoadedModel.normalise`` then applies the mean and std (the model's, or ``--mean/--std``).

Where each pixel came from is a ``Geometry``: the resize (the shorter side to an int, or the
whole image to (H, W)) and the centre crop, so a map on the model's pixels can be put back on
the original image (``crop_box``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from camfunc.models._crop import crop_box


@dataclasses.dataclass(frozen=True)
class Geometry:
    """A resize then a centre crop. ``resize``: an int resizes the shorter side to it, a pair
    resizes the whole image to (H, W); ``crop`` (H, W) the centre crop of the result."""

    resize: int | tuple[int, int]
    crop: tuple[int, int]
    floor: bool = False  # the crop's offset floored (Hugging Face), not rounded (torchvision)

    def box(self, height: int, width: int) -> tuple[float, float, float, float]:
        """``(top, left, bottom, right)`` in original pixels of what the model saw."""
        if isinstance(self.resize, int):
            return crop_box(height, width, self.resize, self.crop, floor=self.floor)
        (resized_h, resized_w), (crop_h, crop_w) = self.resize, self.crop
        offset = (lambda v: int(v // 1)) if self.floor else round
        top, left = max(0, offset((resized_h - crop_h) / 2)), max(0, offset((resized_w - crop_w) / 2))
        bottom, right = min(resized_h, top + crop_h), min(resized_w, left + crop_w)
        scale_h, scale_w = height / resized_h, width / resized_w
        return top * scale_h, left * scale_w, bottom * scale_h, right * scale_w

    def record(self) -> dict[str, Any]:
        """The geometry as JSON, for the outputs; :meth:`from_record` reads it back."""
        return {"resize": self.resize if isinstance(self.resize, int) else list(self.resize),
                "resize_kind": "shorter side" if isinstance(self.resize, int) else "whole image",
                "center_crop": list(self.crop),
                "crop_offset": "floor" if self.floor else "round"}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Geometry:
        """The geometry a :meth:`record` (in a run's or an explain's outputs) describes.

        Example:
            >>> geometry = camfunc.models.Geometry(64, (48, 48))
            >>> camfunc.models.Geometry.from_record(geometry.record()) == geometry
            True
        """
        resize = record["resize"]
        return cls(int(resize) if isinstance(resize, int) else (int(resize[0]), int(resize[1])),
                   (int(record["center_crop"][0]), int(record["center_crop"][1])),
                   record.get("crop_offset") == "floor")


#: (the library's transform without normalisation: RGB Pillow image -> (C, H, W) in [0, 1], geometry)
Pipeline = tuple[Callable[[Any], Tensor], Geometry]


class UnsupportedTransform(ValueError):
    """A transform step whose geometry camfunc cannot follow back to the original image."""


def timm_pipeline(config: dict[str, Any]) -> Pipeline:
    """timm's own eval transform for ``config`` (``resolve_data_config``'s), unnormalised."""
    from timm.data.transforms_factory import create_transform

    channels = int(config["input_size"][0])
    unit = dict(config, mean=(0.0,) * channels, std=(1.0,) * channels)
    transform = create_transform(**unit, is_training=False)
    return _TensorOf(transform), geometry_of(list(getattr(transform, "transforms", [transform])))


def geometry_of(steps: list[Any]) -> Geometry:
    """The resize and centre crop of a torchvision-style ``Compose``'s steps."""
    from torchvision import transforms

    resize: int | tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    for step in steps:
        if isinstance(step, transforms.Resize) and resize is None and crop is None:
            size = step.size
            resize = (int(size[0]) if len(size) == 1 else (int(size[0]), int(size[1]))) \
                if isinstance(size, (list, tuple)) else int(size)
        elif isinstance(step, transforms.CenterCrop) and crop is None:
            crop = (int(step.size[0]), int(step.size[1]))
        elif type(step).__name__ not in ("MaybeToTensor", "ToTensor", "Normalize", "PILToTensor",
                                          "ConvertImageDtype", "MaybePILToTensor"):
            raise UnsupportedTransform(f"the model's transform has a {type(step).__name__} step, "
                                       "which camfunc cannot map back to the image")
    if resize is None or crop is None:
        raise UnsupportedTransform("the model's transform is not a resize then a centre crop")
    return Geometry(resize, crop)


def torchvision_pipeline(transform: Any) -> Pipeline:
    """A torchvision weights' ``transforms()`` (``ImageClassification``), unnormalised."""
    from torchvision.transforms._presets import ImageClassification

    channels = len(transform.mean)
    unit = ImageClassification(crop_size=int(transform.crop_size[0]),
                               resize_size=int(transform.resize_size[0]),
                               mean=(0.0,) * channels, std=(1.0,) * channels,
                               interpolation=transform.interpolation, antialias=transform.antialias)
    resize = [int(v) for v in transform.resize_size]
    side = int(transform.crop_size[0])
    return _TensorOf(unit), Geometry(resize[0] if len(resize) == 1 else (resize[0], resize[1]),
                                      (side, side))


def hf_pipeline(processor: Any) -> Pipeline:
    """A Hugging Face image processor, run with ``do_normalize=False``."""
    return _ProcessorPixels(processor), hf_geometry(processor)


@dataclasses.dataclass(frozen=True)
class _ProcessorPixels:
    """An image processor's pixel values without normalisation; a class, not a closure, so a
    dataset holding it can go to DataLoader workers that are spawned."""

    processor: Any

    def __call__(self, image: Any) -> Tensor:
        out = self.processor(images=image, do_normalize=False, return_tensors="pt")["pixel_values"]
        return torch.as_tensor(out[0], dtype=torch.float32)


def hf_geometry(processor: Any) -> Geometry:
    """Where an image processor's pixels come from: ConvNeXt-style ``crop_pct`` (below 384 px),
    ``shortest_edge`` with a centre crop, or ``height``/``width`` (the whole image)."""
    size, crop_size = _sides(getattr(processor, "size", None)), \
        _sides(getattr(processor, "crop_size", None))
    crops = bool(getattr(processor, "do_center_crop", False))
    edge = size.get("shortest_edge")
    crop_pct = getattr(processor, "crop_pct", None)
    if edge is not None and crop_pct is not None and not crops:
        if edge < 384:  # ConvNextImageProcessor: resize edge / crop_pct, then crop edge
            return Geometry(int(edge / crop_pct), (edge, edge), floor=True)
        return Geometry((edge, edge), (edge, edge))
    if edge is not None and crops and "height" in crop_size:
        return Geometry(edge, (crop_size["height"], crop_size["width"]), floor=True)
    if "height" in size and "width" in size:
        whole = (size["height"], size["width"])
        if crops and "height" in crop_size:
            return Geometry(whole, (crop_size["height"], crop_size["width"]), floor=True)
        return Geometry(whole, whole)
    raise UnsupportedTransform(f"the image processor {type(processor).__name__}'s size {size} "
                               "is not one camfunc can map back to the image")


def _sides(value: Any) -> dict[str, int]:
    if value is None:
        return {}
    if isinstance(value, int):
        return {"height": value, "width": value}
    items = value.items() if isinstance(value, dict) else vars(value).items()
    return {k: int(v) for k, v in items if v is not None and k in
            ("height", "width", "shortest_edge")}


@dataclasses.dataclass(frozen=True)
class _TensorOf:
    """A torchvision-style transform's output as float32 (picklable, as ``_ProcessorPixels``)."""

    transform: Callable[[Any], Any]

    def __call__(self, image: Any) -> Tensor:
        return torch.as_tensor(self.transform(image), dtype=torch.float32)


def on_original(cam: Tensor, height: int, width: int,
                box: tuple[float, float, float, float]) -> Tensor:
    """A map on the model's pixels, (h, w), put back on the original ``height`` x ``width``
    image: bilinearly resized into ``box`` (``(top, left, bottom, right)`` in the image's
    pixels, as ``Geometry.box`` or ``LoadedModel.box`` give it; rounded to whole pixels), zero
    outside it, so an overlay on the original image lines up.

    Example:
        >>> box = camfunc.models.Geometry(64, (48, 48)).box(60, 90)   # shorter side 64, crop 48
        >>> box
        (7.5, 22.5, 52.5, 67.5)
        >>> full = camfunc.models.on_original(torch.ones(2, 2), 60, 90, box)
        >>> full.shape, bool(full[8:52, 22:68].gt(0.99).all()), round(full.sum().item())  # 44 x 46
        (torch.Size([60, 90]), True, 2024)
    """
    top, left, bottom, right = (round(v) for v in box)
    top, left = max(0, top), max(0, left)
    bottom, right = min(height, max(bottom, top + 1)), min(width, max(right, left + 1))
    inside = torch.nn.functional.interpolate(cam.detach().float()[None, None],
                                             size=(bottom - top, right - left), mode="bilinear",
                                             align_corners=False)[0, 0]
    full = torch.zeros(height, width, dtype=inside.dtype)
    full[top:bottom, left:right] = inside.cpu()
    return full
