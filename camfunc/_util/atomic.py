"""Atomic file writes: a temporary file in the same folder, then a rename."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

_FILE_MODE = 0o644


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it to ``path``.

    A crash leaves either the old file or the new one, never half of one.

    Example:
        >>> camfunc.io.write_atomic("out/raw.bin", lambda file: file.write(b"camfunc"))
        PosixPath('out/raw.bin')
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, _FILE_MODE)  # mkstemp's 0600 would hide results from others on a shared folder
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically.

    Example:
        >>> camfunc.io.write_text_atomic("out/note.txt", "done").read_text()
        'done'
    """
    return write_atomic(path, lambda file: file.write(text.encode("utf-8")))


def write_json(path: str | Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON to ``path`` atomically.

    Example:
        >>> camfunc.io.write_json("out/run.json", {"images": 8})
        PosixPath('out/run.json')
    """
    return write_text_atomic(path, json.dumps(payload, indent=2) + "\n")
