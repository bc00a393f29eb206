"""Models as the command line and dataset runs load them: a spec (``builtin``,
``torchvision:NAME``, ``timm:NAME``, ``hf:PATH``, ``package.module:factory``) becomes a
``LoadedModel`` with its input size, normalisation and class names.
"""

from __future__ import annotations

from camfunc.models._loading import (
    LoadedModel,
    UsageError,
    input_channels,
    load_model,
    make_split,
    resolve_methods,
    with_normalisation,
)

__all__ = ["LoadedModel", "UsageError", "input_channels", "load", "make_split", "resolve_methods",
           "with_normalisation"]


def load(spec: str, weights: str | None = None, size: int | None = None,
         pretrained_cfg: str | None = None) -> LoadedModel:
    """The model a spec names, in eval mode, with what it needs to be fed and explained.

    ``weights`` is a local checkpoint (not for ``hf:``, whose folder holds them); ``size`` the
    square input (default: a timm or hf model's configured size, else 224); ``pretrained_cfg`` a local JSON overlay on a
    timm model's pretrained config (``num_classes``, ``mean``, ``label_names``...). Every failure is a one-line ``UsageError``.

    >>> loaded = camfunc.models.load("builtin")
    >>> loaded.size, loaded.class_names[:2]
    ((64, 64), ('circle', 'square'))
    """
    return load_model(spec, weights, size, pretrained_cfg)
