"""Files in and out as camfunc's dataset runs and command line handle them.

Images are read as they are: every Pillow mode and bit depth, deep images scaled
by their real range, EXIF orientation applied, as float tensors in [0, 1]. Files
are written atomically: a temporary file beside the target, then a rename, so a
crash leaves the old file or the new one, never half of one. Progress bars are
tqdm's where it is installed and on a terminal, silence otherwise.

Example:
    >>> shown, x = camfunc.io.read_image("cat.png", (224, 224))   # (3, H, W), (3, 224, 224)
    >>> camfunc.io.write_json("out/run.json", {"images": 1})
    PosixPath('out/run.json')
"""

from __future__ import annotations

from camfunc._util.atomic import write_atomic, write_json, write_text_atomic
from camfunc._util.images import (
    IMAGE_SUFFIXES,
    expand_images,
    failure_reason,
    open_image,
    read_image,
    read_opened,
    read_resized,
    read_resized_bytes,
    read_shown,
    unit_float,
)
from camfunc._util.progress import progress, progress_bar

__all__ = ["IMAGE_SUFFIXES", "expand_images", "failure_reason", "open_image", "progress", "progress_bar",
           "read_image", "read_opened", "read_resized", "read_resized_bytes", "read_shown",
           "unit_float",
           "write_atomic", "write_json", "write_text_atomic"]
