"""Loading what a job names: model specs (``builtin``, ``torchvision:NAME``, ``timm:NAME``,
``hf:PATH``, ``package.module:factory``), methods by name, and the split. Shared by the
command line and dataset runs; every failure is a one-line ``UsageError``.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import types
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, SupportsFloat

import torch
from torch import Tensor, nn

from camfunc._core import split as _split, splitter as _splitter
from camfunc._methods import METHODS
from camfunc._util import images as _images
from camfunc.models import _preprocess

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class UsageError(ValueError):
    """A bad argument, in one line: the command line prints it and exits with status 2."""


@dataclasses.dataclass(frozen=True)
class ImageReader:
    """Image files as a model takes them, unnormalised: (channels, *size) float in [0, 1],
    through the library's own transform (``transform``: timm's, an image processor's,
    torchvision weights', without their normalisation) when there is one, else resized whole
    by camfunc. ``reader(path, exif=True)`` reads one; errors are one-line ``OSError`` or
    ``ValueError``s naming the file. It holds no model and pickles, so DataLoader workers can
    run it; ``LoadedModel.reader()`` makes the one a model is fed with.

    Example:
        >>> from PIL import Image; Image.new("RGB", (80, 60)).save("cat.png")
        >>> camfunc.models.load("builtin").reader()("cat.png").shape
        torch.Size([3, 64, 64])
    """

    size: tuple[int, int]
    channels: int = 3
    transform: Callable[[Any], Tensor] | None = None   # 8-bit RGB Pillow -> (C, H, W) in [0, 1]

    def __call__(self, path: str | Path, exif: bool = True) -> Tensor:
        if self.transform is None:
            return _images.read_resized(path, self.size, channels=self.channels, exif=exif)
        return self.opened(_images.open_image(path, exif), path)

    def opened(self, image: Any, path: str | Path) -> Tensor:
        """An image opened already (``camfunc.io.open_image``) through the transform."""
        if self.transform is None:
            return _images.unit_float(_images.read_opened(image, self.size, self.channels, path))
        seen = self.transform(_images.rgb_image(image, path))
        if tuple(seen.shape) != (self.channels, *self.size):
            raise ValueError(f"{path}: the model's transform gave {tuple(seen.shape)}, expected "
                             f"{(self.channels, *self.size)}")
        return seen


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode, with what the command line needs to feed and explain it."""

    model: nn.Module
    layer: str | None            # None: let camfunc.split choose from an example input
    size: tuple[int, int]        # (H, W) images are resized to
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    class_names: tuple[str, ...] | None = None
    channels: int = 3            # image channels the model takes (1 or 3)
    source: str = "camfunc"      # whose config gave size, mean and std: camfunc, timm or hf
    # The library's own transform as its config states it (resize, crop, interpolation).
    configured: tuple[tuple[str, Any], ...] = ()
    # The library's own transform (unnormalised) and its geometry; None: camfunc resizes the
    # whole image to ``size`` (builtin and factory models, or ``--size`` given).
    pipeline: _preprocess.Pipeline | None = None

    def preprocessing(self) -> dict:
        """How images are fed, for the outputs: whose transform, its resize and crop, size,
        mean and std."""
        if self.pipeline is None:
            how: dict[str, Any] = {"transform": "camfunc", "resize": "bilinear, whole image (no crop)"}
        else:
            how = {"transform": self.source, **self.pipeline[1].record()}
        return {"source": self.source, **how, "input_size": [self.channels, *self.size],
                "mean": None if self.mean is None else list(self.mean),
                "std": None if self.std is None else list(self.std),
                **({"configured": dict(self.configured)} if self.configured else {})}

    def read(self, path: str | Path, exif: bool = True) -> tuple[Tensor, Tensor]:
        """An image file as the user sees it (3, H, W) and as the model sees it, unnormalised
        ((channels, *size), in [0, 1]): through the library's own transform when it has one.
        Errors are one-line ``OSError``/``ValueError``s naming the file."""
        if self.pipeline is None:
            return _images.read_image(path, self.size, channels=self.channels, exif=exif)
        image, original = _images.read_original(path, exif=exif)
        return original, self.reader().opened(image, path)

    def reader(self) -> ImageReader:
        """What :meth:`read` gives as the model sees it, alone, as a picklable callable
        (without the model), for a dataset's loader workers."""
        return ImageReader(self.size, self.channels,
                           None if self.pipeline is None else self.pipeline[0])

    def box(self, height: int, width: int) -> tuple[float, float, float, float]:
        """``(top, left, bottom, right)`` in a ``height`` x ``width`` image's pixels of what the
        model sees: the crop's box, or the whole image."""
        if self.pipeline is None:
            return 0.0, 0.0, float(height), float(width)
        return self.pipeline[1].box(height, width)

    def on_original(self, cam: Tensor, height: int, width: int) -> Tensor:
        """A map on the model's pixels put back on the original image (zero where the model
        saw nothing), so overlays line up."""
        return _preprocess.on_original(cam, height, width, self.box(height, width))

    def normalise(self, images: Tensor) -> Tensor:
        """Images in [0, 1] (B, 3, H, W) as the model expects them."""
        if self.mean is None or self.std is None:
            return images
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        return (images - mean) / std

    def class_name(self, index: int) -> str:
        if self.class_names is not None and 0 <= index < len(self.class_names):
            return self.class_names[index]
        return str(index)


def _load_weights(model: nn.Module, weights: str | Path) -> None:
    path = Path(weights)
    if not path.is_file():
        raise UsageError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for a bad file
        raise UsageError(f"cannot load weights {path}: {type(error).__name__}: "
                       f"{str(error).splitlines()[0] if str(error) else ''}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UsageError(f"weights {path} must hold a state dict, got {type(state).__name__}")
    mismatch = _key_mismatch(model, state)
    if mismatch:
        raise UsageError(f"weights {path} do not fit the model: {mismatch}")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:  # same keys, other shapes: torch names each on its own line
        details = "; ".join(line.strip() for line in str(error).splitlines()[1:4] if line.strip())
        raise UsageError(f"weights {path} do not fit the model: {details or error}") from None


def _key_mismatch(model: nn.Module, state: dict) -> str:
    """The keys missing from ``state`` and the unexpected ones, a few of each, or ''."""
    expected, given = set(model.state_dict()), set(state)
    parts = []
    for label, keys in (("missing", sorted(expected - given)), ("unexpected", sorted(given - expected))):
        if keys:
            shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
            parts.append(f"{len(keys)} {label} key(s) ({shown})")
    if not parts:
        return ""
    return "; ".join(parts) + " (is it a checkpoint of this architecture? a 'module.' prefix " \
        "from DataParallel must be stripped)"


def _builtin(weights: str | None) -> LoadedModel:
    from camfunc import zoo

    model = zoo.shapesnet(pretrained=weights is None)
    if weights is not None:
        _load_weights(model, weights)
    return LoadedModel(model.eval(), zoo.LAYER, (zoo.IMAGE_SIZE, zoo.IMAGE_SIZE), None, None,
                       zoo.CLASSES)


def _torchvision(name: str, weights: str | None, size: int | None) -> LoadedModel:
    """A torchvision model, randomly initialised (``weights`` a local checkpoint), fed as its
    weights enum's transforms say (crop size, mean, std) and named by its categories; neither
    needs a download."""
    try:
        import torchvision
    except ImportError:
        raise UsageError("torchvision models need torchvision: pip install torchvision") from None
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise UsageError(f"unknown torchvision model {name!r}; e.g. resnet50, vit_b_16, swin_t "
                       f"({len(available)} available)")
    model = torchvision.models.get_model(name, weights=None)
    if weights is not None:
        _load_weights(model, weights)
    loaded = _imagenet_style(model.eval(), 224 if size is None else size)
    default = torchvision.models.get_model_weights(name).DEFAULT
    transform, names = default.transforms(), tuple(default.meta.get("categories") or ())
    if loaded.channels != 3:
        return loaded
    side = int(transform.crop_size[0]) if size is None else size
    return dataclasses.replace(
        loaded, size=(side, side), mean=_floats(transform.mean), std=_floats(transform.std),
        class_names=names if names and _outputs(model, len(names)) else None, source="torchvision",
        configured=(("resize_size", list(transform.resize_size)),
                    ("crop_size", list(transform.crop_size)),
                    ("interpolation", str(transform.interpolation.value))),
        pipeline=_preprocess.torchvision_pipeline(transform) if size is None else None)


def _outputs(model: nn.Module, count: int) -> bool:
    """Whether ``model``'s last linear layer gives ``count`` outputs (so the weights'
    categories name them)."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return bool(last) and last[-1].out_features == count


def input_channels(model: nn.Module) -> int:
    """The image channels ``model`` takes: a Hugging Face config's ``num_channels``, else the
    first convolution's input channels, else 3.

    Example:
        >>> camfunc.models.input_channels(nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU()))
        1
    """
    configured = getattr(getattr(model, "config", None), "num_channels", None)
    if isinstance(configured, int):
        return configured
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    return int(first.in_channels) if first is not None else 3


def _imagenet_style(model: nn.Module, size: int) -> LoadedModel:
    """ImageNet's normalisation for a three-channel model; none for a grayscale one."""
    channels = input_channels(model)
    if channels not in (1, 3):
        raise UsageError(f"the model takes {channels}-channel images; camfunc reads images as "
                         "1 (grayscale) or 3 (RGB) channels: explain it from Python with your "
                         "own tensors")
    if channels == 3:
        return LoadedModel(model, None, (size, size), IMAGENET_MEAN, IMAGENET_STD, None, 3)
    return LoadedModel(model, None, (size, size), None, None, None, channels)


def _factory(spec: str, weights: str | None, size: int) -> LoadedModel:
    module_name, _, attribute = spec.partition(":")
    try:
        module = _import_from_here(module_name)
    except ImportError as error:
        raise UsageError(f"cannot import {module_name!r} for model {spec!r}: {error} (searched "
                         "the working directory and sys.path)") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise UsageError(f"model {spec!r}: {module_name} has no callable {attribute!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise UsageError(f"model {spec!r}: the factory returned {type(model).__name__}, not an nn.Module")
    if weights is not None:
        _load_weights(model, weights)
    return _imagenet_style(model.eval(), size)


def _import_from_here(name: str) -> types.ModuleType:
    """Import ``name``, looking in the working directory too, as ``python -m`` would: a
    ``mymodels.py`` beside the user works without ``PYTHONPATH=.``."""
    here = os.getcwd()
    if here in sys.path or "" in sys.path:
        return importlib.import_module(name)
    sys.path.insert(0, here)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(here)


def _timm(name: str, weights: str | None, pretrained_cfg: str | None, own: bool) -> LoadedModel:
    """A timm model, randomly initialised (``weights`` a local checkpoint), fed as its
    data config says (size, mean, std), with a local JSON overlay on its pretrained config."""
    try:
        import timm
        from timm.data.config import resolve_model_data_config
        from timm.data.imagenet_info import ImageNetInfo
    except ImportError:
        raise UsageError("timm models need timm: pip install timm") from None
    if not timm.is_model(name):
        raise UsageError(f"unknown timm model {name!r}; e.g. resnet18, vit_tiny_patch16_224 "
                         "(timm.list_models() lists them)")
    overlay = _read_json(pretrained_cfg) if pretrained_cfg is not None else {}
    options = {k: overlay[k] for k in ("num_classes", "in_chans") if k in overlay}
    try:
        model = timm.create_model(name, pretrained=False, pretrained_cfg_overlay=overlay, **options)
    except Exception as error:  # timm raises many kinds for a bad config
        raise UsageError(f"cannot create timm model {name!r} with {pretrained_cfg}: "
                         f"{type(error).__name__}: {_first_line(error)}") from None
    if weights is not None:
        _load_weights(model, weights)
    config = resolve_model_data_config(model)
    size = tuple(int(v) for v in config["input_size"][1:])
    names = overlay.get("label_names")
    if names is None and getattr(model, "num_classes", None) == 1000:
        names = ImageNetInfo().label_descriptions()
    return LoadedModel(model.eval(), None, (size[0], size[1]), tuple(config["mean"]),
                       tuple(config["std"]), tuple(str(n) for n in names) if names else None,
                       int(config["input_size"][0]), "timm",
                       (("crop_pct", config.get("crop_pct")), ("crop_mode", config.get("crop_mode")),
                        ("interpolation", config.get("interpolation"))),
                       _pipeline(lambda: _preprocess.timm_pipeline(config), f"timm:{name}",
                                 int(config["input_size"][0]) if own else 0))


def _hf(path: str, own: bool) -> LoadedModel:
    """A Hugging Face image classifier saved with ``save_pretrained``, fed as its image
    processor says (size, mean, std), with ``config.id2label`` as class names."""
    folder = Path(path)
    if not folder.is_dir():
        raise UsageError(f"hf model folder not found: {folder} (give a folder written by "
                         "save_pretrained)")
    try:
        from transformers import AutoImageProcessor, AutoModelForImageClassification
    except ImportError:
        raise UsageError("hf models need transformers: pip install transformers") from None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per failure, and no bars, on stderr
    try:
        model = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True)
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as error:  # transformers raises many kinds for a bad folder
        raise UsageError(f"cannot load the hf model in {folder}: {type(error).__name__}: "
                         f"{_first_line(error)}") from None
    labels = model.config.id2label or {}
    names = tuple(str(labels[i]) for i in range(len(labels))) if labels else None
    return LoadedModel(_LogitsOf(model).eval(), None, hf_size(processor),
                       _floats(getattr(processor, "image_mean", None)),
                       _floats(getattr(processor, "image_std", None)), names,
                       int(getattr(model.config, "num_channels", 3)), "hf",
                       (("processor", type(processor).__name__),
                        ("size", _plain(getattr(processor, "size", None))),
                        ("do_center_crop", getattr(processor, "do_center_crop", None)),
                        ("crop_size", _plain(getattr(processor, "crop_size", None))),
                        ("resample", str(getattr(processor, "resample", None)))),
                       _pipeline(lambda: _preprocess.hf_pipeline(processor), f"hf:{path}",
                                 int(getattr(model.config, "num_channels", 3)) if own else 0))


def _pipeline(make: Callable[[], _preprocess.Pipeline], spec: str,
              channels: int) -> _preprocess.Pipeline | None:
    """The library's own transform; None (camfunc's resize) for a model not taking RGB, or
    ``channels`` 0 (``--size`` given)."""
    if channels != 3:
        return None
    try:
        return make()
    except _preprocess.UnsupportedTransform as error:
        raise UsageError(f"model {spec}: {error}; give --size to have camfunc resize the whole "
                         "image instead") from None


class _LogitsOf(nn.Module):
    """A Hugging Face classifier's logits: the tensor camfunc's targets read."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = getattr(model, "config", None)

    def forward(self, pixel_values: Tensor) -> Tensor:
        logits: Tensor = self.model(pixel_values=pixel_values).logits
        return logits


def hf_size(processor: object) -> tuple[int, int]:
    """(H, W) an image processor feeds: its ``crop_size`` when it crops, else its ``size``
    (height and width, or shortest_edge); 224 when it names none."""
    crops = getattr(processor, "do_center_crop", False)
    for value in (getattr(processor, "crop_size", None) if crops else None,
                  getattr(processor, "size", None)):
        if isinstance(value, int):
            return value, value
        sides = _side(value, "height"), _side(value, "width")
        if sides[0] and sides[1]:
            return int(sides[0]), int(sides[1])
        edge = _side(value, "shortest_edge")
        if edge:
            return int(edge), int(edge)
    return 224, 224


def _side(value: object, key: str) -> Any:
    """``value[key]`` or ``value.key`` (a dict or transformers' SizeDict), else None."""
    if isinstance(value, dict):
        return value.get(key)
    return getattr(value, key, None)


def _plain(value: object) -> Any:
    """An image processor's size (a dict or SizeDict) as JSON: its set entries."""
    if value is None or isinstance(value, int):
        return value
    items = value.items() if isinstance(value, dict) else vars(value).items()
    return {k: v for k, v in items if v is not None}


def _floats(values: Iterable[SupportsFloat] | None) -> tuple[float, ...] | None:
    return tuple(float(v) for v in values) if values is not None else None


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else ""


def _read_json(path: str) -> dict:
    import json

    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read pretrained config {path}: {type(error).__name__}: "
                         f"{_first_line(error)} (give a JSON object file)") from None
    if not isinstance(value, dict):
        raise UsageError(f"pretrained config {path} must hold a JSON object, got {type(value).__name__}")
    return value


def load_model(spec: str, weights: str | None = None, size: int | None = None,
               pretrained_cfg: str | None = None) -> LoadedModel:
    """Resolve a model spec; raise ``UsageError`` with one line when it cannot be done.
    ``size`` (default 224) overrides a timm or hf model's configured input size."""
    if pretrained_cfg is not None and not spec.startswith("timm:"):
        raise UsageError(f"--pretrained-cfg is for timm: models, given model {spec!r}")
    if spec.startswith(("timm:", "hf:")):
        loaded = _configured(spec, weights, pretrained_cfg, size is None)
        return loaded if size is None else dataclasses.replace(loaded, size=(size, size),
                                                              pipeline=None)
    if spec.startswith("torchvision:"):
        return _torchvision(spec.partition(":")[2], weights, size)
    return _spec(spec, weights, 224 if size is None else size)


def _configured(spec: str, weights: str | None, pretrained_cfg: str | None,
                own: bool) -> LoadedModel:
    """A timm or hf model; ``own``: fed through its library's transform."""
    if spec.startswith("timm:"):
        return _timm(spec.partition(":")[2], weights, pretrained_cfg, own)
    if weights is not None:
        raise UsageError("an hf: model takes its weights from its folder; drop --weights")
    return _hf(spec.partition(":")[2], own)


def _spec(spec: str, weights: str | None, size: int) -> LoadedModel:
    if spec == "builtin":
        return _builtin(weights)
    if ":" in spec and not spec.startswith(":"):
        return _factory(spec, weights, size)
    raise UsageError(f"unknown model {spec!r}: use 'builtin', 'torchvision:NAME', 'timm:NAME', "
                     "'hf:PATH' or 'package.module:factory'")


def with_normalisation(loaded: LoadedModel, mean: Sequence[float] | None,
                       std: Sequence[float] | None) -> LoadedModel:
    """``loaded`` with ``mean``/``std`` overriding its own, both or neither, one per channel:
    its images are fed as ``(x - mean) / std``.

    Example:
        >>> loaded = camfunc.models.load("builtin")
        >>> loaded = camfunc.models.with_normalisation(loaded, [0.5] * 3, [0.25] * 3)
        >>> loaded.mean, loaded.std
        ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    """
    if mean is None and std is None:
        return loaded
    if mean is None or std is None:
        raise ValueError("give mean and std together (one value per image channel), or neither")
    if len(mean) != loaded.channels or len(std) != loaded.channels or min(std) <= 0:
        raise ValueError(f"mean and std must have {loaded.channels} values each (std > 0), "
                         f"given mean={list(mean)} std={list(std)}")
    return dataclasses.replace(loaded, mean=tuple(float(v) for v in mean),
                               std=tuple(float(v) for v in std))


def resolve_methods(names: list[str]) -> dict[str, Callable]:
    """Methods by their ``camfunc.METHODS`` names; an unknown name is a ``UsageError``.

    Example:
        >>> list(camfunc.models.resolve_methods(["gradcam", "layercam"]))
        ['gradcam', 'layercam']
    """
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise UsageError(f"unknown method {unknown[0]!r}; choose from: {', '.join(METHODS)}")
    return {n: METHODS[n] for n in names}


def make_split(loaded: LoadedModel, layer: str | None) -> _split.Split:
    """Split at ``layer``, the model's default layer, or the one camfunc chooses.

    Example:
        >>> camfunc.models.make_split(camfunc.models.load("builtin"), None).layers
        ('block3',)
    """
    layer = layer or loaded.layer
    parameter = next(loaded.model.parameters(), None)
    device = parameter.device if parameter is not None else None
    # The example also lets torch.export capture a model torch.fx cannot (an hf ResNet).
    example = torch.zeros(1, loaded.channels, *loaded.size, device=device)
    try:
        if layer is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", _splitter.LayerChoiceWarning)
                return _splitter.split(loaded.model, example_input=example)
        return _splitter.split(loaded.model, layer, example_input=example)
    except (ValueError, TypeError) as error:
        raise UsageError(str(error).splitlines()[0]) from None
