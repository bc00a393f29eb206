"""Overlays and figures. Needs the ``viz`` extra: ``pip install 'camfunc[viz]'``.

matplotlib and Pillow are imported when a function is called, not when
camfunc is imported.
"""

from ._figure import figure as figure
from ._figure import save_png as save_png
from ._overlay import overlay as overlay

__all__ = ["figure", "overlay", "save_png"]
