"""CAM methods: each is its paper's maths in one module, registered by :func:`cam_method`.

Adding a method is one new module here and one import line below: the
registry (``METHODS``), the package's namespace, the API docs, dataset runs and
the conformance suite all read what is imported here.
"""

from ._method import REGISTRY, CamMethod, Draws, cam_method
from ._gradient import (gradcam, gradcam_elementwise, gradcampp, hirescam, layercam,
                        smooth_gradcampp, xgradcam)
from ._eigen import eigencam, eigengradcam, kpcacam, segeigencam
from ._classifier import cam, randomcam
from ._score import iscam, scorecam, sscam
from ._ablation import ablationcam
from ._shapley import shapleycam
from ._finer import finercam
from ._activation import fem
from ._refine import refinecam
from ._sess import sess  # not registered: its maps are at the input's size, 2-D only

#: Every registered method by name, in the order the modules above define them. Each takes
#: ``(split, x, cls, *, normalize, return_scores)``; gradient methods add ``chunk_size``,
#: random ones the argument their ``draws`` attribute names.
METHODS: dict[str, CamMethod] = dict(REGISTRY)

__all__ = ["METHODS", "CamMethod", "Draws", "cam_method", "sess", *METHODS]
