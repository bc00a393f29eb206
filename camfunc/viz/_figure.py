"""Side-by-side figures: the input, then each method's overlay, one row per class."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from camfunc._util.atomic import write_atomic
from camfunc.viz._overlay import colormap_of, image_array, overlay

if TYPE_CHECKING:  # an optional dependency, imported when used
    from matplotlib.figure import Figure


def _rows(cam: Any) -> list[Any]:
    """A method's maps as a list of 2-D maps, one per class: (h, w) or (K, h, w)."""
    tensor = torch.as_tensor(cam) if not isinstance(cam, torch.Tensor) else cam
    if tensor.ndim == 2:
        return [tensor]
    if tensor.ndim == 3:
        return list(tensor)
    raise ValueError(f"each method's maps must be (h, w) or (K, h, w) for one image, "
                     f"got shape {tuple(tensor.shape)}")


#: Width of the colour bar's column (bar, ticks and label), in inches.
COLORBAR_INCHES = 0.9


def display_image(image: Any, display_size: int | None) -> np.ndarray:
    """The image as (H, W, 3) floats in [0, 1], upsampled (bicubic, clamped) so that its longer
    side is at least ``display_size``: small inputs (a 64 px scene) then show smooth, not blocky."""
    base = image_array(image)
    longer = max(base.shape[:2])
    if display_size is None or longer >= display_size:
        return base
    scale = display_size / longer
    size = (round(base.shape[0] * scale), round(base.shape[1] * scale))
    tensor = torch.from_numpy(base).permute(2, 0, 1)[None]
    up = torch.nn.functional.interpolate(tensor, size=size, mode="bicubic", align_corners=False)
    return up[0].permute(1, 2, 0).clamp(0, 1).numpy()


def figure(image: Any, maps: Mapping[str, Any], *, classes: Sequence[str] | None = None,
           colormap: Any = "jet", alpha: float = 0.5, path: str | Path | None = None,
           panel_inches: float = 2.2, dpi: int = 100, display_size: int | None = 256,
           colorbar: bool = True) -> Figure:
    """The input and each method's overlay side by side; one row per class. A matplotlib Figure.

    ``maps`` maps a method's name to its maps for this image, (h, w) or
    (K, h, w) for K classes (every method the same K); ``classes`` names the
    rows. Inputs smaller than ``display_size`` pixels are shown upsampled
    (bicubic), and each map is resized to that size bilinearly, so panels are
    smooth rather than blocky (None shows the input's own pixels). A colour bar
    gives the colormap's scale: each panel's map is min-max scaled to [0, 1], as
    :func:`camfunc.viz.overlay` does. With ``path`` the figure is also written there
    as a PNG, atomically. Built on ``matplotlib.figure.Figure`` (no pyplot
    state), so it is safe in threads. No formula: each panel is
    :func:`camfunc.viz.overlay`; the layout follows the side-by-side comparisons
    of Selvaraju et al., ICCV 2017 (Grad-CAM), Fig. 1.

    Example:
        >>> maps = {"gradcam": camfunc.gradcam(s, x, camfunc.topk(2))[0],
        ...         "scorecam": camfunc.scorecam(s, x, camfunc.topk(2))[0]}
        >>> fig = camfunc.viz.figure(image, maps, classes=["best", "second"])   # path= writes a PNG
        >>> len(fig.axes)                  # 2 rows of 3 (the input, then each method), and the colour bar
        7
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    if not maps:
        raise ValueError("maps is empty: give at least one method's maps, e.g. {'gradcam': cam}")
    if display_size is not None and (isinstance(display_size, bool) or not isinstance(display_size, int)
                                     or display_size < 1):
        raise ValueError(f"display_size must be a positive int of pixels or None, got {display_size!r}")
    rows = {name: _rows(cam) for name, cam in maps.items()}
    counts = {len(r) for r in rows.values()}
    if len(counts) != 1:
        raise ValueError(f"every method must give the same number of classes, got "
                         f"{ {name: len(r) for name, r in rows.items()} }")
    num_rows = counts.pop()
    if classes is not None and len(classes) != num_rows:
        raise ValueError(f"classes names {len(classes)} rows but the maps have {num_rows}")
    cmap = colormap_of(colormap)
    base = display_image(image, display_size)
    width = panel_inches * (len(rows) + 1) + (COLORBAR_INCHES if colorbar else 0.0)
    fig = Figure(figsize=(width, panel_inches * num_rows), dpi=dpi, layout="constrained")
    axes = fig.subplots(num_rows, len(rows) + 1, squeeze=False)
    for r in range(num_rows):
        label = classes[r] if classes is not None else None
        axes[r, 0].imshow(base)
        axes[r, 0].set_title("input" if label is None else f"input: {label}", fontsize=9)
        for c, (name, cams) in enumerate(rows.items(), start=1):
            axes[r, c].imshow(overlay(base, cams[r], colormap=cmap, alpha=alpha))
            axes[r, c].set_title(name, fontsize=9)
    for axis in axes.flat:
        axis.set_axis_off()
    if colorbar:
        bar = fig.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap), ax=list(axes.flat),
                           shrink=0.9, pad=0.01, fraction=0.03, aspect=15)
        bar.set_label("relevance, each map\nscaled to [0, 1]", fontsize=8)
        bar.ax.tick_params(labelsize=8)
    if path is not None:
        save_png(fig, path)
    return fig


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write a matplotlib figure to ``path`` as PNG, atomically (a temporary file, then a rename).

    Example:
        >>> fig = camfunc.viz.figure(image, {"gradcam": camfunc.gradcam(s, x, 3)[0]})
        >>> camfunc.viz.save_png(fig, "cam.png").name
        'cam.png'
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return write_atomic(path, lambda file: file.write(buffer.getvalue()))
