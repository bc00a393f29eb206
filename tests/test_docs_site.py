"""The docs site (mkdocs.yml) builds strictly, documents every public name, and its
docstring rewriting (docs/griffe_rst.py) turns a broken reference into a build failure."""

from __future__ import annotations

import importlib
import re
import runpy
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
    """``mkdocs build --strict`` (as .ci/run runs it; never with -q, which hides the
    warnings that --strict counts) passes, and every public name of every
    public module has its entry on the API pages."""
    pytest.importorskip("mkdocs")
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


def test_roles_become_links_and_a_broken_one_is_kept_for_the_build_to_refuse():
    griffe = pytest.importorskip("griffe")
    rst = runpy.run_path(str(ROOT / "docs" / "griffe_rst.py"))
    package = griffe.load("camfunc", search_paths=[str(ROOT)], extensions=None)
    rst["_exports"](package)
    rst["_index_public"](package)
    layercam = package["_methods._gradient.layercam"]
    text = rst["rewrite"](
        ":func:`camfunc.fuse`, :func:`gradcam`, :meth:`Split.bound`, :func:`torch.func.vjp`, "
        ":func:`camfunc.no_such_thing`, :meth:`Split.no_such_method`, :math:`w_k`, ``x``",
        layercam, package)
    assert "[`camfunc.fuse`][camfunc.fuse]" in text
    assert "[`gradcam`][camfunc.gradcam]" in text
    assert "[`Split.bound`][camfunc.Split.bound]" in text
    assert "`torch.func.vjp`" in text and "[camfunc.torch" not in text   # another library: code
    # Unknown camfunc names stay links, which autorefs cannot resolve: --strict fails on them.
    assert "[camfunc.no_such_thing]" in text and "[camfunc.Split.no_such_method]" in text
    assert "$w_k$" in text and "`x`" in text
