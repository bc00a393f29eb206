"""Models as the command line and dataset runs load them: a spec (``builtin``,
``torchvision:NAME``, ``timm:NAME``, ``hf:PATH``, ``package.module:factory``) becomes a
``LoadedModel`` with its input size, normalisation and class names.

Images are fed through the model's own transform where its library states one
(``ImageReader``); a ``Geometry`` (its resize and centre crop) says where the model's
pixels lie in the original image, and ``on_original`` puts a map back there.
"""

from __future__ import annotations

from camfunc.models._loading import (
    ImageReader,
    LoadedModel,
    UsageError,
    input_channels,
    load_model,
    make_split,
    resolve_methods,
    with_normalisation,
)
from camfunc.models._preprocess import Geometry, on_original

__all__ = ["Geometry", "ImageReader", "LoadedModel", "UsageError", "input_channels", "load",
           "make_split", "on_original", "resolve_methods", "with_normalisation"]


def load(spec: str, weights: str | None = None, size: int | None = None,
         pretrained_cfg: str | None = None) -> LoadedModel:
    """The model a spec names, in eval mode, with what it needs to be fed and explained.

    ``weights`` is a local checkpoint (not for ``hf:``, whose folder holds them); ``size`` the
    square input, which also replaces a timm, hf or torchvision model's own transform by
    camfunc's whole-image resize (default: the model's own transform and size, else 224);
    ``pretrained_cfg`` a local JSON overlay on a timm model's pretrained config
    (``num_classes``, ``mean``, ``label_names``...). ``loaded.read(path)`` gives an image as
    shown and as the model sees it, ``loaded.box(h, w)`` where the model's pixels lie in it.
    Every failure is a one-line ``UsageError``.

    >>> loaded = camfunc.models.load("builtin")
    >>> loaded.size, loaded.class_names[:2]
    ((64, 64), ('circle', 'square'))
    """
    return load_model(spec, weights, size, pretrained_cfg)
