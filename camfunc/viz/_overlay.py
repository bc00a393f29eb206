"""Heat-map overlays: a CAM resized to the image, coloured by a matplotlib colormap, blended."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from camfunc._core import ops as _ops

if TYPE_CHECKING:  # optional dependencies, imported when used
    from matplotlib.cm import ColormapRegistry
    from matplotlib.colors import Colormap
    from PIL.Image import Image as PILImage


def _lazy_pil() -> ModuleType:
    try:
        from PIL import Image
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("camfunc.viz needs Pillow: pip install 'camfunc[viz]'") from error
    return Image


def _lazy_colormaps() -> ColormapRegistry:
    try:
        import matplotlib
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("camfunc.viz needs matplotlib: pip install 'camfunc[viz]'") from error
    return matplotlib.colormaps


def image_array(image: Any) -> np.ndarray:
    """Any supported image as a float array (H, W, 3) in [0, 1].

    Accepts a PIL image, a uint8 array (H, W) or (H, W, 3|4), or a float
    tensor/array (3|4, H, W), (1, H, W), (H, W) or (H, W, 3|4) with values in
    [0, 1]. An alpha channel is dropped only when the image is fully opaque:
    a translucent image has no one right background, so it is an error.
    """
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        if "A" in image.getbands() or "transparency" in getattr(image, "info", {}):
            image = image.convert("RGBA")
            _check_opaque(np.asarray(image)[..., 3].astype(np.float32) / 255.0)
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if isinstance(image, Tensor):
        array = image.detach().cpu().float().numpy()
        if array.ndim == 3 and array.shape[0] in (1, 3, 4):
            array = np.moveaxis(array, 0, -1)
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise TypeError(f"image must be a PIL image, a numpy array or a torch tensor, "
                        f"got {type(image).__name__}")
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"image arrays must be uint8 or float in [0, 1], got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image must be (H, W), (H, W, 3) or (3, H, W), got shape {tuple(array.shape)}")
    if array.shape[-1] == 4:
        _check_opaque(array[..., 3])
    array = array[..., :3]
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.size and (array.min() < 0 or array.max() > 1):
        raise ValueError(f"float images must lie in [0, 1], got values in "
                         f"[{array.min():.3g}, {array.max():.3g}]; undo the input normalisation first")
    return array.astype(np.float32)


def _check_opaque(alpha: np.ndarray) -> None:
    if alpha.size and float(alpha.min()) < 1.0:
        raise ValueError(
            "the image has a translucent alpha channel; composite it onto the background you "
            "want first, e.g. Image.alpha_composite(Image.new('RGBA', img.size, 'white'), img)"
            ".convert('RGB')"
        )


def resized_map(cam: Any, height: int, width: int) -> np.ndarray:
    """A 2-D map at ``(height, width)``, bilinear, min-max scaled to [0, 1] (flat maps become 0)."""
    tensor = torch.as_tensor(np.asarray(cam) if not isinstance(cam, Tensor) else cam.detach())
    tensor = tensor.cpu().float()
    while tensor.ndim > 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 2:
        raise ValueError(f"cam must be one 2-D map (h, w), got shape {tuple(tensor.shape)}; "
                         f"pick one class and one image first, e.g. cams[0]")
    up = _ops.upsample(tensor[None], (height, width))[0]
    return _ops.normalize(up[None], spatial_dims=2)[0].numpy()


def colormap_of(colormap: Any) -> Colormap:
    """A matplotlib ``Colormap`` from a name or a ``Colormap``."""
    colormaps = _lazy_colormaps()
    from matplotlib.colors import Colormap

    if isinstance(colormap, Colormap):
        return colormap
    if not isinstance(colormap, str) or colormap not in colormaps:
        raise ValueError(f"unknown colormap {colormap!r}; use a matplotlib name such as 'jet', "
                         "'viridis', or a matplotlib.colors.Colormap")
    return colormaps[colormap]


def overlay(image: Any, cam: Any, *, colormap: Any = "jet", alpha: float = 0.5) -> PILImage:
    r"""Blend a CAM, coloured by a matplotlib colormap, over an image: an RGB PIL image.

    .. math:: O = (1 - \alpha)\, I + \alpha\, \mathrm{cmap}(\hat M), \quad
              \hat M = \mathrm{minmax}(\mathrm{bilinear}(M, H \times W))

    ``image``: PIL image, uint8 array or float tensor in [0, 1] ((3, H, W) or
    (H, W, 3); an opaque alpha channel is dropped); ``cam``: one map (h, w) at
    any resolution; ``colormap``: a matplotlib name or ``Colormap``. Needs the
    ``viz`` extra (matplotlib, Pillow).

    Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
    Gradient-based Localization", ICCV 2017 (the overlay of their figures).

    Example:
        >>> cams = camfunc.gradcam(s, x, 3)                   # (B, 4, 4)
        >>> picture = camfunc.viz.overlay(image, cams[0])         # a PIL image, the image's size
        >>> picture.mode, picture.size
        ('RGB', (64, 64))
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    cmap = colormap_of(colormap)
    base = image_array(image)
    heat = cmap(resized_map(cam, *base.shape[:2]))[..., :3]
    blended = (1.0 - alpha) * base + alpha * heat
    blended_image: PILImage = _lazy_pil().fromarray(np.round(blended * 255).astype(np.uint8))
    return blended_image
