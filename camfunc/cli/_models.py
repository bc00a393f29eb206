"""Model specs for the command line: ``builtin``, ``torchvision:NAME``, ``package.module:factory``."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import torch
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CliError(Exception):
    """A one-line, user-facing error: the command prints it and exits with status 2."""


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode, with what the command line needs to feed and explain it."""

    model: nn.Module
    layer: str | None            # None: let camfunc.split choose from an example input
    size: tuple[int, int]        # (H, W) images are resized to
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    class_names: tuple[str, ...] | None = None

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
        raise CliError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for a bad file
        raise CliError(f"cannot load weights {path}: {type(error).__name__}: "
                       f"{str(error).splitlines()[0] if str(error) else ''}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CliError(f"weights {path} must hold a state dict, got {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CliError(f"weights {path} do not fit the model: {str(error).splitlines()[0]}") from None


def _builtin(weights: str | None) -> LoadedModel:
    from .. import zoo

    model = zoo.shapesnet(pretrained=weights is None)
    if weights is not None:
        _load_weights(model, weights)
    return LoadedModel(model.eval(), zoo.LAYER, (zoo.IMAGE_SIZE, zoo.IMAGE_SIZE), None, None,
                       zoo.CLASSES)


def _torchvision(name: str, weights: str | None, size: int) -> LoadedModel:
    try:
        import torchvision
    except ImportError:
        raise CliError("torchvision models need torchvision: pip install torchvision") from None
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise CliError(f"unknown torchvision model {name!r}; e.g. resnet50, vit_b_16, swin_t "
                       f"({len(available)} available)")
    model = torchvision.models.get_model(name, weights=None)
    if weights is not None:
        _load_weights(model, weights)
    return LoadedModel(model.eval(), None, (size, size), IMAGENET_MEAN, IMAGENET_STD)


def _factory(spec: str, weights: str | None, size: int) -> LoadedModel:
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise CliError(f"cannot import {module_name!r} for model {spec!r}: {error}") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise CliError(f"model {spec!r}: {module_name} has no callable {attribute!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise CliError(f"model {spec!r}: the factory returned {type(model).__name__}, not an nn.Module")
    if weights is not None:
        _load_weights(model, weights)
    return LoadedModel(model.eval(), None, (size, size), IMAGENET_MEAN, IMAGENET_STD)


def load_model(spec: str, weights: str | None = None, size: int = 224) -> LoadedModel:
    """Resolve a model spec; raise ``CliError`` with one line when it cannot be done."""
    if spec == "builtin":
        return _builtin(weights)
    if spec.startswith("torchvision:"):
        return _torchvision(spec.partition(":")[2], weights, size)
    if ":" in spec and not spec.startswith(":"):
        return _factory(spec, weights, size)
    raise CliError(f"unknown model {spec!r}: use 'builtin', 'torchvision:NAME' or 'package.module:factory'")
