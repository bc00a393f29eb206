"""docs/properties.md is current: rows recomputed with the generator's settings read as the
doc does.

Not a core test: shrinking follows the floats of the torch that runs it, so a counterexample
shrunk on torch 2.4 may differ from the one the doc shows (generated on the newest torch).
"""

from __future__ import annotations

import importlib
import pathlib
import re
import sys

import pytest

import camfunc
import camfunc.testing as kit

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "properties.md"
sys.path.insert(0, str(DOC.parent))  # docs/gen_properties.py


def documented() -> tuple[dict[str, dict[str, str]], dict[tuple[str, str], str]]:
    """The doc's verdicts per method and property, and its notes per (method, property)."""
    text = DOC.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| method |"))
    names = [cell.strip().strip("`") for cell in header.strip("|").split("|")[1:]]
    verdicts = {}
    for line in text.splitlines():
        match = re.match(r"\| (\w+) \| (.*) \|$", line)
        if match and match.group(1) != "method":
            cells = [re.sub(r"[*\[\]\d ]", "", cell) for cell in match.group(2).split(" | ")]
            verdicts[match.group(1)] = dict(zip(names, cells))
    notes = {(m, p): d for m, p, d in re.findall(r"^\d+\. \*\*(\w+), `(\w+)`\*\* \(\w+\): (.*)$",
                                                 text, flags=re.M)}
    return verdicts, notes


def test_the_matrix_doc_was_generated_from_the_code_as_it_is():
    generator = importlib.import_module("gen_properties")
    recorded = re.search(r"from the code whose digest is\s+`(\w+)`", DOC.read_text())
    assert recorded, "docs/properties.md records no code digest"
    assert recorded.group(1) == generator.code_digest(), (
        "the methods, core, tools or kit changed since docs/properties.md was generated: "
        "run python docs/gen_properties.py")


def test_the_code_digest_sees_code_and_not_comments(tmp_path):
    generator = importlib.import_module("gen_properties")
    for source in generator.SOURCES:
        origin = generator.ROOT / source
        target = tmp_path / source
        if origin.is_dir():
            for file in origin.rglob("*.py"):
                (target / file.relative_to(origin)).parent.mkdir(parents=True, exist_ok=True)
                (target / file.relative_to(origin)).write_text(file.read_text())
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(origin.read_text())
    assert generator.code_digest(tmp_path) == generator.code_digest()
    gradient = tmp_path / "camfunc/_methods/_gradient.py"
    gradient.write_text("# a comment\n" + gradient.read_text().replace('"""', '"""Edited. ', 1))
    assert generator.code_digest(tmp_path) == generator.code_digest()
    gradient.write_text(gradient.read_text() + "\nEXTRA = 1\n")
    assert generator.code_digest(tmp_path) != generator.code_digest()


def test_the_matrix_doc_covers_every_method_and_property():
    verdicts, _ = documented()
    assert list(verdicts) == list(camfunc.METHODS)
    assert all(list(row) == list(kit.PROPERTIES) for row in verdicts.values())
    assert {v for row in verdicts.values() for v in row.values()} <= {"holds", "fails", "error"}


@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_the_matrix_doc_is_current(method):
    # Rows recomputed with the generator's own settings must read as the doc does.
    generator = importlib.import_module("gen_properties")
    matrix = generator.build(methods=[method])
    verdicts, notes = documented()
    for name, cell in matrix.cells[method].items():
        assert verdicts[method][name] == cell.verdict, (method, name, cell)
        # The failure's message must match; the shrunk case itself may not: in a long test
        # session, shrinking a borderline float case has taken another path than the
        # generator's fresh process (same verdict, another minimal case).
        documented_note = notes.get((method, name), "")
        assert documented_note.split(" on Case(")[0] == cell.detail.split(" on Case(")[0], (method, name)
        assert (" on Case(" in documented_note) == (" on Case(" in cell.detail), (method, name)


