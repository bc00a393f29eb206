"""Progress bars: tqdm where installed and on a terminal, silence otherwise."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any


def progress(items: Iterable, total: int | None, description: str, unit: str = "img") -> Iterable:
    """A tqdm bar on a terminal (tqdm hides itself elsewhere); plain iteration without tqdm.

    Example:
        >>> list(camfunc.io.progress(range(3), 3, "counting"))
        [0, 1, 2]
    """
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, total=total, desc=description, unit=unit, disable=None, file=sys.stderr)


class _SilentBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, description: str, unit: str = "img", enabled: bool = True) -> Any:
    """A tqdm bar advanced by hand (``bar.update(n)``, ``bar.close()``), showing the rate in
    ``unit``/s; a silent stand-in when ``enabled`` is False or tqdm is missing.

    Example:
        >>> bar = camfunc.io.progress_bar(8, "images", enabled=False)
        >>> bar.update(8); bar.close()
    """
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _SilentBar()
    if not enabled:
        return _SilentBar()
    return tqdm(total=total, desc=description, unit=unit, disable=None, file=sys.stderr)
