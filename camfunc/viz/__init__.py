"""Overlays and figures. Needs the ``viz`` extra: ``pip install 'camfunc[viz]'``.

matplotlib and Pillow are imported when a function is called, not when
camfunc is imported.
"""

from camfunc.viz._figure import figure as figure, save_png as save_png
from camfunc.viz._overlay import overlay as overlay

__all__ = ["figure", "overlay", "save_png"]
