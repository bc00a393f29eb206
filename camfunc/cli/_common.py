"""Pieces the subcommands share: method lookup, splitting, progress, JSON output."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from .. import _split
from .._atomic import write_text_atomic
from .._methods import METHODS
from ._models import CliError, LoadedModel


def resolve_methods(names: list[str]) -> dict[str, Callable]:
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise CliError(f"unknown method {unknown[0]!r}; choose from: {', '.join(METHODS)}")
    return {n: METHODS[n] for n in names}


def make_split(loaded: LoadedModel, layer: str | None) -> _split.Split:
    """Split at ``layer``, the model's default layer, or the one camfunc chooses."""
    layer = layer or loaded.layer
    try:
        if layer is None:
            import warnings

            example = torch.zeros(1, 3, *loaded.size)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", _split.LayerChoiceWarning)
                return _split.split(loaded.model, example_input=example)
        return _split.split(loaded.model, layer)
    except (ValueError, TypeError) as error:
        raise CliError(str(error).splitlines()[0]) from None


def progress(items: Iterable, total: int, description: str, unit: str = "img") -> Iterable:
    """A tqdm bar on a terminal (tqdm hides itself elsewhere); plain iteration without tqdm."""
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
    ``unit``/s; a silent stand-in when ``enabled`` is False or tqdm is missing."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _SilentBar()
    if not enabled:
        return _SilentBar()
    return tqdm(total=total, desc=description, unit=unit, disable=None, file=sys.stderr)


def safe_name(text: str) -> str:
    """A file-name-safe version of ``text``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "item"


def write_json(path: Path, payload: Any) -> Path:
    return write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def error_line(message: str) -> None:
    print(f"camfunc: error: {message}", file=sys.stderr)


def call_handler(args: Any) -> int:
    """Run a parsed command's ``args.handler(args)``: a ``CliError`` is one line on stderr and
    status 2, Ctrl-C status 130."""
    try:
        return args.handler(args)
    except CliError as error:
        error_line(str(error))
        return 2
    except KeyboardInterrupt:
        error_line("interrupted")
        return 130


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain-text table with aligned columns."""
    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    cells = [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c)
              for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)
