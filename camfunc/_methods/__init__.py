"""CAM methods: one small weights function per method, one shared combine step."""

from ._ablation import ablationcam
from ._activation import fem
from ._classifier import cam, randomcam
from ._eigen import eigencam, eigengradcam, kpcacam
from ._finer import finercam
from ._refine import refinecam
from ._gradient import (gradcam, gradcam_elementwise, gradcampp, hirescam, layercam,
                        smooth_gradcampp, xgradcam)
from ._score import iscam, scorecam, sscam
from ._shapley import shapleycam

#: Every method by name. Each takes ``(split, x, cls, *, normalize, return_scores)``;
#: gradient methods add ``chunk_size``, random ones their noise or weights.
METHODS = {
    "gradcam": gradcam,
    "gradcampp": gradcampp,
    "smooth_gradcampp": smooth_gradcampp,
    "xgradcam": xgradcam,
    "layercam": layercam,
    "hirescam": hirescam,
    "gradcam_elementwise": gradcam_elementwise,
    "eigengradcam": eigengradcam,
    "cam": cam,
    "eigencam": eigencam,
    "randomcam": randomcam,
    "scorecam": scorecam,
    "sscam": sscam,
    "iscam": iscam,
    "ablationcam": ablationcam,
    "shapleycam": shapleycam,
    "finercam": finercam,
    "kpcacam": kpcacam,
    "fem": fem,
    "refinecam": refinecam,
}

__all__ = ["METHODS", *METHODS]
