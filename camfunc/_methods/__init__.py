"""CAM methods on a split: each is its paper's maths in one module, registered by :func:`cam_method`.

Adding a method is one new module here and one import line below. The registry
(``METHODS``), the API docs, dataset runs and the conformance suite read what is
imported here; ``__all__`` below and camfunc's namespace name each method once more,
so that a type checker sees them (tests/test_architecture.py checks that the three agree).
"""
# ruff: noqa: I001 (the lines below are the registration order)

from camfunc._methods._method import REGISTRY as _REGISTRY, CamMethod, Draws, cam_method

# One line per method module; METHODS keeps this order.
from camfunc._methods._gradient import (gradcam, gradcam_elementwise, gradcampp, hirescam,
                                        layercam, smooth_gradcampp, xgradcam)
from camfunc._methods._eigen import eigencam, eigengradcam, kpcacam, segeigencam
from camfunc._methods._classifier import cam, randomcam
from camfunc._methods._score import iscam, scorecam, sscam
from camfunc._methods._ablation import ablationcam
from camfunc._methods._shapley import shapleycam
from camfunc._methods._finer import finercam
from camfunc._methods._activation import fem
from camfunc._methods._refine import refinecam
from camfunc._methods._sess import sess  # not registered: maps at the input's size, 2-D only

#: Every registered method by name, in the order the lines above import them. Each takes
#: ``(split, x, cls, *, normalize, return_scores)``; gradient methods add ``chunk_size``,
#: random ones the argument their ``draws`` attribute names.
METHODS: dict[str, CamMethod] = dict(_REGISTRY)

__all__ = [  # noqa: RUF022 (the registration order, as above)
    "METHODS", "CamMethod", "Draws", "cam_method", "sess",
    "gradcam", "gradcam_elementwise", "gradcampp", "hirescam", "layercam", "smooth_gradcampp",
    "xgradcam", "eigencam", "eigengradcam", "kpcacam", "segeigencam", "cam", "randomcam",
    "iscam", "scorecam", "sscam", "ablationcam", "shapleycam", "finercam", "fem", "refinecam",
]
