"""Splits of torchvision's detectors, built from their own modules.

Neither ``torch.fx`` nor ``torch.export`` captures a detector whole (it iterates
over images, and its proposals and NMS have data-dependent shapes). Its structure
is regular, though: ``transform -> backbone.body -> backbone.fpn -> heads ->
postprocess``. The head here is the transform and the body up to the layer; the
tail is the rest of the body, the FPN, and the detector's own forward from its
features on, run on a shallow twin whose ``backbone`` returns the features the
tail computed. The user's model is never changed: the twin has its own module
table and shares every parameter.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, cast

from torch import Tensor, nn

from camfunc._core.split import Split

__all__ = ["detector_split", "is_detector"]

# The detectors whose forward is transform -> backbone(images.tensors) -> heads -> postprocess.
_DETECTORS = ("GeneralizedRCNN", "RetinaNet", "FCOS")


def is_detector(model: nn.Module) -> bool:
    """Whether ``model`` is one of torchvision's detectors (Faster/Mask/Keypoint R-CNN,
    RetinaNet, FCOS)."""
    return any(base.__name__ in _DETECTORS and base.__module__.startswith("torchvision.models.detection")
               for base in type(model).__mro__)


class _Given(nn.Module):
    """A backbone that returns the features it was given, whatever the images."""

    def __init__(self, features: Any):
        super().__init__()
        self.features = features

    def forward(self, images: Tensor) -> Any:
        return self.features


def _part(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _body_layer(model: nn.Module, layer: str) -> str:
    body, fpn = _part(model, "backbone.body"), _part(model, "backbone.fpn")
    children = list(body._modules) if body is not None else []
    name = layer.removeprefix("backbone.body.")
    if fpn is None or name == layer or name not in children:
        raise ValueError(
            f"a {type(model).__name__} is split at a layer of its backbone's body "
            f"(backbone.body.NAME, NAME one of {children}), got {layer!r}")
    return name


def _head(model: nn.Module, names: list[str], cut: int) -> Callable[[Tensor], tuple[Any, ...]]:
    body, transform = model.get_submodule("backbone.body"), model.get_submodule("transform")
    returned = cast(dict[str, str], body.return_layers)

    def head(x: Tensor) -> tuple[Any, ...]:
        images, _ = transform(list(x))
        h = images.tensors
        kept = []
        for name in names[:cut + 1]:
            h = body.get_submodule(name)(h)
            if name in returned and name != names[cut]:
                kept.append(h)  # an earlier level the FPN reads: context across the cut
        return (h, x, *kept)

    return head


def _tail(model: nn.Module, names: list[str], cut: int) -> Callable[..., Any]:
    body, fpn = model.get_submodule("backbone.body"), model.get_submodule("backbone.fpn")
    returned = cast(dict[str, str], body.return_layers)

    def tail(a: Tensor, x: Tensor, *kept: Tensor) -> Any:
        levels: OrderedDict[str, Tensor] = OrderedDict()
        earlier = iter(kept)
        for name in names[:cut]:
            if name in returned:
                levels[returned[name]] = next(earlier)
        h = a
        if names[cut] in returned:
            levels[returned[names[cut]]] = a
        for name in names[cut + 1:]:
            h = body.get_submodule(name)(h)
            if name in returned:
                levels[returned[name]] = h
        twin = copy.copy(model)  # shares parameters; its own module table, so model is untouched
        twin._modules = dict(model._modules)
        twin._modules["backbone"] = _Given(fpn(levels))
        return twin(list(x))

    return tail


def detector_split(model: nn.Module, layer: str) -> Split[Tensor]:
    """``model`` (a torchvision detector) cut at ``backbone.body.NAME``.

    The output is the detector's list of per-image dicts (``boxes``, ``labels``,
    ``scores``, and ``masks`` or ``keypoints`` where the model has them), for a
    callable target such as :func:`camfunc.targets.box_score`. Gradients flow
    through the kept detections' scores and boxes; which detections are kept
    (the proposals' top-k, NMS, score thresholds) is decided by the forward and
    not differentiated, as in the model's own backward.

    Example:
        >>> s = camfunc.split(fasterrcnn, "backbone.body.layer3")
        >>> found = s(x)                                   # the detections, as model(list(x))
        >>> camfunc.gradcam(s, x, camfunc.targets.box_score(...)).shape
    """
    name = _body_layer(model, layer)
    names = list(model.get_submodule("backbone.body")._modules)
    cut = names.index(name)
    return Split(_head(model, names, cut), _tail(model, names, cut), model=model,
                 layers=(layer,), input_ndim=4, functional=False)
