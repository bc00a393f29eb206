"""camfunc ships py.typed: mypy reads its annotations from an installed wheel (PEP 561)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A deliberate error: camfunc.normalize returns a Tensor, not a str.
USAGE = """\
import torch
import camfunc

name: str = camfunc.normalize(torch.rand(1, 4, 4))
"""


def _build_wheel(tmp: pathlib.Path) -> pathlib.Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp / "dist"), str(ROOT)], check=True, cwd=tmp)
    return next((tmp / "dist").glob("camfunc-*.whl"))


def test_the_wheel_ships_py_typed_and_mypy_reads_it(tmp_path):
    wheel = _build_wheel(tmp_path)
    assert "camfunc/py.typed" in zipfile.ZipFile(wheel).namelist()
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(wheel)], check=True)
    (tmp_path / "use.py").write_text(USAGE)
    # Only the target dir holds camfunc: the checkout and its editable install are off the path.
    env = {**os.environ, "MYPYPATH": "", "PYTHONPATH": str(target)}
    # PYTHONPATH comes before site-packages in the search dirs mypy asks the interpreter for.
    out = subprocess.run([sys.executable, "-m", "mypy", "-v", "--no-incremental",
                          "--follow-imports=silent", "--python-executable", sys.executable,
                          "--python-version", "3.10", "use.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "Incompatible types in assignment" in out.stdout, out.stdout + out.stderr
    assert 'variable has type "str"' in out.stdout and "Tensor" in out.stdout, out.stdout
    parsed = [line for line in out.stderr.splitlines() if "(camfunc)" in line and "Parsing" in line]
    assert parsed and str(target) in parsed[0], parsed  # camfunc came from the wheel's install
