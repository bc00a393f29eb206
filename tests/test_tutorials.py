"""The tutorials run as written: each page's ```python blocks, in order, in one namespace.

The tutorials are Markdown pages of the docs site (docs/tutorials/*.md). Their code
needs no download: random weights (timm and Hugging Face models built from configs) and
the embedded model and scenes. Each runs in a temporary working directory, so a
tutorial that writes files writes them there. The site itself: tests/test_docs_site.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "docs" / "tutorials").glob("*.md"))
NAV = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.DOTALL | re.MULTILINE)


def code_of(page: Path) -> str:
    blocks = BLOCK.findall(page.read_text(encoding="utf-8"))
    assert blocks, f"{page.name} has no python code block"
    return "\n".join(blocks)


def test_every_tutorial_is_in_the_nav():
    missing = [p.name for p in TUTORIALS if f"tutorials/{p.name}" not in NAV]
    assert TUTORIALS and not missing, f"tutorials missing from mkdocs.yml's nav: {missing}"


@pytest.mark.parametrize("page", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # A tutorial that imports Ultralytics has PIL.Image.open replaced process-wide; it is
    # put back after the page, so later tests read images as without it.
    monkeypatch.setattr(Image, "open", Image.open)
    torch.manual_seed(0)
    namespace: dict = {"__name__": f"tutorial_{page.stem.replace('-', '_')}"}
    exec(compile(code_of(page), str(page), "exec"), namespace)
