"""What the subcommands share that is about the command line itself: names, errors, tables."""

from __future__ import annotations

import re
import sys
from typing import Any

from .._loading import UsageError


def safe_name(text: str) -> str:
    """A file-name-safe version of ``text``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "item"


def error_line(message: str) -> None:
    print(f"camfunc: error: {message}", file=sys.stderr)


def call_handler(args: Any) -> int:
    """Run a parsed command's ``args.handler(args)``: a ``UsageError`` is one line on stderr and
    status 2, Ctrl-C status 130."""
    try:
        return args.handler(args)
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
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)
