"""camfunc: class activation maps as pure functions of a split model.

A model is cut at a layer into ``head: x -> A`` and ``tail: A -> scores``.
Each method runs the head without an autograd graph, differentiates only the
tail with ``torch.func.vjp`` with respect to ``A``, and answers many classes in
one pass with ``torch.func.vmap``. Nothing is registered on the model.

The package is layered; each layer imports only from those above it here:
``_util`` (files, images, progress), ``_core`` (the split, targets, the
gradients engine), ``_methods`` (one module per CAM method), ``_tools``
(whole-model methods and wrappers), ``metrics``, ``viz``, ``models`` and ``evidence``, this
namespace, then the applications: ``testing``, ``runs`` (dataset-scale runs) and
``cli``, which use only public names. ``runs`` is loaded on first use of
``camfunc.runs``, so that it can build on this namespace.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

# Splitting a model
from camfunc._core.layout import Layout, with_layout
from camfunc._core.split import Split
from camfunc._core.splitter import LayerChoiceWarning, RepeatedLayerWarning, check, split

# isort: split
# Targets: which class, or which function of the scores, a map explains
from camfunc._core.contrastive import Finer, ReST, finer, rest
from camfunc._core.targets import Target, TopK, topk

# isort: split
# Methods on a split: the registry, sess, and cam_method to add one
from camfunc._methods import (
    METHODS,
    CamMethod,
    Draws,
    ablationcam,
    cam,
    cam_method,
    eigencam,
    eigengradcam,
    fem,
    finercam,
    gradcam,
    gradcam_elementwise,
    gradcampp,
    hirescam,
    iscam,
    kpcacam,
    layercam,
    randomcam,
    refinecam,
    scorecam,
    segeigencam,
    sess,
    shapleycam,
    smooth_gradcampp,
    sscam,
    xgradcam,
)

# isort: split
# Whole-model methods and wrappers
from camfunc._tools.factorization import Factorization, dff
from camfunc._tools.fullgrad import FullGradModel, fullgrad, fullgrad_model
from camfunc._tools.guided import guided_backprop, guided_gradcam, guided_model
from camfunc._tools.legrad import legrad
from camfunc._tools.smoothing import aug_smooth

# isort: split
# Operations on maps, and the warnings
from camfunc._core.ops import fuse, normalize, upsample
from camfunc._core.validate import NonFiniteWarning
from camfunc._version import __version__

# isort: split
# Predicted against expected, with an evidence bundle
from camfunc.evidence import Evidence, explain

# isort: split
# Subpackages: files, metrics, losses, figures, target callables, the embedded model
from camfunc import io, losses, metrics, targets, viz, zoo

if TYPE_CHECKING:
    from camfunc import runs

__all__ = [  # noqa: RUF022 (grouped as the imports above, not sorted)
    # Splitting a model
    "Split", "split", "check", "Layout", "with_layout", "LayerChoiceWarning", "RepeatedLayerWarning",
    # Targets
    "Target", "TopK", "topk", "Finer", "finer", "ReST", "rest",
    # Methods on a split
    "METHODS", "CamMethod", "Draws", "cam_method", "sess",
    "gradcam", "gradcam_elementwise", "gradcampp", "hirescam", "layercam", "smooth_gradcampp",
    "xgradcam", "eigencam", "eigengradcam", "kpcacam", "segeigencam", "cam", "randomcam",
    "iscam", "scorecam", "sscam", "ablationcam", "shapleycam", "finercam", "fem", "refinecam",
    # Whole-model methods and wrappers
    "Factorization", "dff", "FullGradModel", "fullgrad", "fullgrad_model", "guided_backprop",
    "guided_gradcam", "guided_model", "legrad", "aug_smooth",
    # Operations on maps, and the warnings
    "fuse", "normalize", "upsample", "NonFiniteWarning", "__version__",
    # Predicted against expected
    "explain", "Evidence",
    # Subpackages
    "io", "losses", "metrics", "runs", "targets", "viz", "zoo",
]


def __getattr__(name: str) -> Any:
    # runs builds on this namespace, so it is imported on first use, not while this loads.
    if name == "runs":
        import camfunc.runs

        return camfunc.runs
    raise AttributeError(f"module 'camfunc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
