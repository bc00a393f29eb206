"""CAM methods: one small weights function per method, one shared combine step."""

from ._gradient import gradcam, gradcampp, layercam, smooth_gradcampp, xgradcam

#: Every method by name; each takes ``(split, x, cls, *, normalize, return_scores, chunk_size)``.
METHODS = {
    "gradcam": gradcam,
    "gradcampp": gradcampp,
    "smooth_gradcampp": smooth_gradcampp,
    "xgradcam": xgradcam,
    "layercam": layercam,
}

__all__ = ["METHODS", "gradcam", "gradcampp", "layercam", "smooth_gradcampp", "xgradcam"]
