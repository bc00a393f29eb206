"""camfunc: class activation maps as pure functions of a split model.

A model is cut at a layer into ``head: x -> A`` and ``tail: A -> scores``.
Each method runs the head without an autograd graph, differentiates only the
tail with ``torch.func.vjp`` with respect to ``A``, and answers many classes in
one pass with ``torch.func.vmap``. Nothing is registered on the model.
"""

from ._factorization import Factorization as Factorization
from ._factorization import dff as dff
from ._fullgrad import FullGradModel as FullGradModel
from ._fullgrad import fullgrad as fullgrad
from ._fullgrad import fullgrad_model as fullgrad_model
from ._guided import guided_backprop as guided_backprop
from ._guided import guided_gradcam as guided_gradcam
from ._guided import guided_model as guided_model
from ._layout import Layout as Layout
from ._legrad import legrad as legrad
from ._layout import with_layout as with_layout
from ._methods import METHODS as METHODS
from ._methods import cam as cam
from ._methods import refinecam as refinecam
from ._methods import sess as sess
from ._methods import fem as fem
from ._methods import kpcacam as kpcacam
from ._methods import finercam as finercam
from ._methods import shapleycam as shapleycam
from ._methods import ablationcam as ablationcam
from ._methods import iscam as iscam
from ._methods import sscam as sscam
from ._methods import scorecam as scorecam
from ._methods import eigencam as eigencam
from ._methods import eigengradcam as eigengradcam
from ._methods import segeigencam as segeigencam
from ._methods import randomcam as randomcam
from ._methods import gradcam as gradcam
from ._methods import gradcam_elementwise as gradcam_elementwise
from ._methods import gradcampp as gradcampp
from ._methods import hirescam as hirescam
from ._methods import layercam as layercam
from ._methods import smooth_gradcampp as smooth_gradcampp
from ._methods import xgradcam as xgradcam
from ._ops import fuse as fuse
from ._run import RunResult as RunResult
from ._run import read_maps as read_maps
from ._run import read_shard as read_shard
from ._run import run as run
from .viz._overlay import overlay as overlay
from . import metrics as metrics
from . import viz as viz
from . import zoo as zoo
from ._smoothing import aug_smooth as aug_smooth
from ._ops import normalize as normalize
from ._ops import upsample as upsample
from ._split import Split as Split
from ._validate import NonFiniteWarning as NonFiniteWarning
from ._splitter import LayerChoiceWarning as LayerChoiceWarning
from ._splitter import RepeatedLayerWarning as RepeatedLayerWarning
from ._splitter import check as check
from ._splitter import split as split
from ._targets import TopK as TopK
from ._targets_contrastive import Finer as Finer
from ._targets_contrastive import ReST as ReST
from ._targets_contrastive import finer as finer
from ._targets_contrastive import rest as rest
from ._targets import topk as topk

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "cam",
    "dff",
    "Factorization",
    "fullgrad",
    "fullgrad_model",
    "FullGradModel",
    "guided_backprop",
    "guided_gradcam",
    "guided_model",
    "refinecam",
    "sess",
    "aug_smooth",
    "fem",
    "kpcacam",
    "finercam",
    "shapleycam",
    "Finer",
    "Layout",
    "legrad",
    "with_layout",
    "finer",
    "ReST",
    "rest",
    "ablationcam",
    "iscam",
    "sscam",
    "scorecam",
    "check",
    "eigencam",
    "eigengradcam",
    "segeigencam",
    "fuse",
    "gradcam",
    "gradcam_elementwise",
    "gradcampp",
    "hirescam",
    "layercam",
    "LayerChoiceWarning",
    "NonFiniteWarning",
    "normalize",
    "overlay",
    "metrics",
    "viz",
    "zoo",
    "randomcam",
    "read_maps",
    "read_shard",
    "run",
    "RunResult",
    "RepeatedLayerWarning",
    "smooth_gradcampp",
    "Split",
    "split",
    "TopK",
    "topk",
    "upsample",
    "xgradcam",
]
