"""The README's offline quick start runs as written, with only torch and camfunc."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

pytestmark = pytest.mark.core

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_the_offline_quick_start_runs_as_written():
    text = README.read_text()
    start = text.index("## Quick start")
    code = re.search(r"```python\n(.*?)```", text[start:], flags=re.DOTALL).group(1)
    assert "torchvision" not in code  # the first example needs no download
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    cams = namespace["cams"]
    assert cams.shape == (4, 16, 16)
    assert float(cams.amin()) >= 0 and torch.isclose(cams.flatten(1).amax(1), torch.ones(4)).all()
