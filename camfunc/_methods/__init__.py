"""CAM methods: one small weights function per method, one shared combine step."""

from ._gradient import (gradcam, gradcam_elementwise, gradcampp, hirescam, layercam,
                        smooth_gradcampp, xgradcam)

#: Every method by name; each takes ``(split, x, cls, *, normalize, return_scores, chunk_size)``.
METHODS = {
    "gradcam": gradcam,
    "gradcampp": gradcampp,
    "smooth_gradcampp": smooth_gradcampp,
    "xgradcam": xgradcam,
    "layercam": layercam,
    "hirescam": hirescam,
    "gradcam_elementwise": gradcam_elementwise,
}

__all__ = ["METHODS", "gradcam", "gradcam_elementwise", "gradcampp", "hirescam", "layercam",
           "smooth_gradcampp", "xgradcam"]
