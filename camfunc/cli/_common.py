"""What the subcommands share that is about the command line itself: names, errors, tables."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeAlias

from torch import Tensor

from camfunc.io import failure_reason
from camfunc.models import LoadedModel, UsageError

# What add_subparsers returns; argparse names no public type for it.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def safe_name(text: str) -> str:
    """A file-name-safe version of ``text``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "item"


def error_line(message: str) -> None:
    print(f"camfunc: error: {message}", file=sys.stderr)


def warning_line(message: str) -> None:
    print(f"camfunc: warning: {message}", file=sys.stderr)


#: Beyond this ratio between an image's aspect and the model's, resizing squashes it.
ASPECT_TOLERANCE = 1.5


def squash_warning(path: Path, stored: Tensor, size: tuple[int, int]) -> str | None:
    """A one-line warning when resizing ``stored`` (3, H, W) to ``size`` distorts its shape."""
    height, width = stored.shape[1:]
    ratio = (width / height) / (size[1] / size[0])
    if max(ratio, 1 / ratio) <= ASPECT_TOLERANCE:
        return None
    return (f"{path} is {width}x{height} and is squashed to the model's {size[1]}x{size[0]} "
            f"(aspect {width / height:.2f} vs {size[1] / size[0]:.2f}), so the model sees a "
            "distorted image; crop it to the model's aspect first")


def read_batches(paths: list[Path], loaded: LoadedModel, batch_size: int,
                 failed: list[dict[str, str]], *, exif: bool = True
                 ) -> Iterator[list[tuple[int, Tensor, Tensor]]]:
    """``(index, as shown, as the model takes it)`` of each readable image, ``batch_size``
    paths at a time.

    Read a batch at a time, so a folder of large photos never sits in memory at once; an
    unreadable file is reported on stderr and appended to ``failed``, and the rest go on; an
    image whose aspect differs from the model's by more than 1.5x is read, with a warning.
    """
    for start in range(0, len(paths), batch_size):
        batch = []
        for index in range(start, min(start + batch_size, len(paths))):
            try:
                stored, resized = loaded.read(paths[index], exif=exif)
            except Exception as error:  # any unreadable file is recorded; the rest go on
                reason = failure_reason(error)
                error_line(reason)
                failed.append({"path": str(paths[index]), "reason": reason})
                continue
            warning = None if loaded.pipeline is not None else \
                squash_warning(paths[index], stored, loaded.size)
            if warning is not None:
                warning_line(warning)
            batch.append((index, stored, resized))
        if batch:
            yield batch


def call_handler(args: Any) -> int:
    """Run a parsed command's ``args.handler(args)``: a ``UsageError`` is one line on stderr and
    status 2, Ctrl-C status 130."""
    try:
        status: int = args.handler(args)
        return status
    except UsageError as error:
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
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)
