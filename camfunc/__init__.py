"""camfunc: class activation maps as pure functions of a split model.

A model is cut at a layer into ``head: x -> A`` and ``tail: A -> scores``.
Each method runs the head without an autograd graph, differentiates only the
tail with ``torch.func.vjp`` with respect to ``A``, and answers many classes in
one pass with ``torch.func.vmap``. Nothing is registered on the model.

The package is layered; each layer imports only from those above it here:
``_util`` (files, images, progress), ``_core`` (the split, targets, the
gradients engine), ``_methods`` (one module per CAM method), ``_tools``
(whole-model methods and wrappers), ``metrics`` and ``viz``, ``runs``
(dataset-scale runs), ``cli``.
"""
# ruff: noqa: F403, F405 (the methods come from their registry, camfunc._methods)

# Splitting a model
# Subpackages: metrics, figures, dataset-scale runs, the embedded model
from camfunc import (
    losses as losses,
    metrics as metrics,
    runs as runs,
    targets as targets,
    viz as viz,
    zoo as zoo,
)

# Targets: which class, or which function of the scores, a map explains
from camfunc._core.contrastive import Finer as Finer, ReST as ReST, finer as finer, rest as rest
from camfunc._core.layout import Layout as Layout, with_layout as with_layout

# Operations on maps
from camfunc._core.ops import fuse as fuse, normalize as normalize, upsample as upsample
from camfunc._core.split import Split as Split
from camfunc._core.splitter import (
    LayerChoiceWarning as LayerChoiceWarning,
    RepeatedLayerWarning as RepeatedLayerWarning,
    check as check,
    split as split,
)
from camfunc._core.targets import TopK as TopK, topk as topk
from camfunc._core.validate import NonFiniteWarning as NonFiniteWarning

# Methods on a split: every registered one (METHODS), sess, and cam_method to add one
from camfunc._methods import *

# Whole-model methods and wrappers
from camfunc._tools.factorization import Factorization as Factorization, dff as dff
from camfunc._tools.fullgrad import (
    FullGradModel as FullGradModel,
    fullgrad as fullgrad,
    fullgrad_model as fullgrad_model,
)
from camfunc._tools.guided import (
    guided_backprop as guided_backprop,
    guided_gradcam as guided_gradcam,
    guided_model as guided_model,
)
from camfunc._tools.legrad import legrad as legrad
from camfunc._tools.smoothing import aug_smooth as aug_smooth
from camfunc._version import __version__ as __version__

__all__ = sorted([
    "Split", "split", "check", "Layout", "with_layout", "LayerChoiceWarning", "RepeatedLayerWarning",
    "TopK", "topk", "Finer", "finer", "ReST", "rest",
    "METHODS", "CamMethod", "Draws", "cam_method", "sess", *METHODS,
    "Factorization", "dff", "FullGradModel", "fullgrad", "fullgrad_model", "guided_backprop",
    "guided_gradcam", "guided_model", "legrad", "aug_smooth",
    "fuse", "normalize", "upsample", "NonFiniteWarning",
    "losses", "metrics", "runs", "targets", "viz", "zoo",
], key=str.lower)
