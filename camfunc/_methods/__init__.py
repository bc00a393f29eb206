"""CAM methods: one small weights function per method, one shared combine step."""

from ._ablation import ablationcam
from ._activation import fem
from ._classifier import cam, randomcam
from ._eigen import eigencam, eigengradcam, kpcacam, segeigencam
from ._finer import finercam
from ._refine import refinecam
from ._gradient import (gradcam, gradcam_elementwise, gradcampp, hirescam, layercam,
                        smooth_gradcampp, xgradcam)
from ._score import iscam, scorecam, sscam
from ._sess import sess
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
    "segeigencam": segeigencam,
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

# sess is exported but not registered: its maps are at the input's resolution,
# not the layer's, and it takes 2-D images only (the conformance suite's
# contract is layer-resolution maps for 1-D, 2-D and 3-D activations).
__all__ = ["METHODS", "sess", *METHODS]
