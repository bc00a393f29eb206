"""The tutorials run as written: each page's ```python blocks, in order, in one namespace.

The tutorials are Markdown pages of the docs site (docs/tutorials/*.md). Their code
needs no download: random weights (timm and Hugging Face models built from configs) and
the embedded model and scenes. Each runs in a temporary working directory, so a
tutorial that writes files writes them there. The site's API pages are checked too:
every public module has one.
"""

from __future__ import annotations

import importlib
import re
import types
from pathlib import Path

import pytest
import torch

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
    torch.manual_seed(0)
    namespace: dict = {"__name__": f"tutorial_{page.stem.replace('-', '_')}"}
    exec(compile(code_of(page), str(page), "exec"), namespace)


def public_modules() -> list[str]:
    """camfunc and every public module it or its public modules export."""
    found = ["camfunc", "camfunc.models", "camfunc.testing"]
    camfunc = importlib.import_module("camfunc")
    found += [f"camfunc.{name}" for name in camfunc.__all__
              if isinstance(getattr(camfunc, name), types.ModuleType)]
    return sorted(set(found))


@pytest.mark.parametrize("module", public_modules())
def test_every_public_module_has_an_api_page(module):
    pages = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "docs" / "api").glob("*.md"))
    assert re.search(rf"^::: {re.escape(module)}\s*$", pages, flags=re.MULTILINE), (
        f"{module} has no API page: add docs/api/<name>.md holding '::: {module}' "
        "and list it in mkdocs.yml's nav")


def test_the_site_builds_strictly_with_every_public_name(tmp_path):
    """``mkdocs build --strict`` (as .ci/run runs it) passes, and every public name of every
    public module has its entry on the API pages."""
    pytest.importorskip("mkdocs")
    import subprocess
    import sys

    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    anchors = set()
    for page in (site / "api").glob("*/index.html"):
        anchors |= set(re.findall(r'id="(camfunc[\w.]*)"', page.read_text(encoding="utf-8")))
    missing = []
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        missing += [f"{module_name}.{name}" for name in module.__all__
                    if not isinstance(getattr(module, name), types.ModuleType)
                    and f"{module_name}.{name}" not in anchors]
    assert not missing, f"public names with no entry on the API pages: {missing}"
