"""The property matrix: every property on every method, holds or fails with its shrunk
counterexample."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hypothesis import HealthCheck, given, seed, settings
from hypothesis.errors import UnsatisfiedAssumption

from camfunc import METHODS
from camfunc.testing._cases import Case, cases
from camfunc.testing._properties import CASES_FOR, PROPERTIES


@dataclasses.dataclass(frozen=True)
class Cell:
    """One method under one property: ``"holds"`` (no counterexample in the examples
    tried), ``"fails"`` (``detail`` is the shrunk counterexample's message) or ``"error"``
    (the method refused every case: ``detail`` is its error). A "holds" whose method
    refused some cases says so in ``detail``.

    Example:
        >>> camfunc.testing.Cell("fails", "sample 1 alone vs in its batch ...").verdict
        'fails'
    """

    verdict: str
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class Matrix:
    """``cells[method][property]``, and how it was searched (``examples`` per cell, ``seed``).

    Example:
        >>> matrix = camfunc.testing.property_matrix(["gradcam"], ["unit_range"], examples=3)
        >>> matrix.cells["gradcam"]["unit_range"].verdict
        'holds'
    """

    cells: dict[str, dict[str, Cell]]
    examples: int
    seed: int

    def to_markdown(self) -> str:
        """The table (a column per property), then each failure's counterexample."""
        names = list(next(iter(self.cells.values()), {}))
        lines = ["| method | " + " | ".join(f"`{n}`" for n in names) + " |",
                 "|---|" + "---|" * len(names)]
        notes = []
        for method, row in self.cells.items():
            marks = []
            for name in names:
                cell = row[name]
                mark = cell.verdict if cell.verdict == "holds" else f"**{cell.verdict}**"
                if cell.detail:
                    notes.append(f"- **{method}, `{name}`** ({cell.verdict}): {cell.detail}")
                    mark += f" [{len(notes)}]"
                marks.append(mark)
            lines.append(f"| {method} | " + " | ".join(marks) + " |")
        if notes:
            lines += ["", "Counterexamples (shrunk by hypothesis) and errors:", ""]
            lines += [note.replace("- **", f"{i}. **", 1) for i, note in enumerate(notes, 1)]
        return "\n".join(lines) + "\n"


def _first_lines(error: BaseException, limit: int = 2) -> str:
    """The error's message, without the measured differences, which vary with the machine's
    rounding (the case itself is drawn from the seed, so it does not)."""
    text = " ".join(line.strip() for line in str(error).strip().splitlines()[:limit])
    return re.sub(r" by up to \S+ \(tolerance [^)]*\)", " beyond tolerance", text)


def check_cell(method: Callable[..., Any], check: Callable[..., None], *, examples: int,
               seed_value: int, case_strategy: Any = None) -> Cell:
    """Searches ``examples`` cases for a counterexample to ``check(method, case)``."""
    errors: list[BaseException] = []

    @seed(seed_value)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(case=case_strategy if case_strategy is not None else cases())
    def search(case: Case) -> None:
        try:
            check(method, case)
        except (AssertionError, UnsatisfiedAssumption):
            raise  # a verdict, or hypothesis' own "draw another case"
        except Exception as error:  # the method refuses this case: not a property's verdict
            errors.append(error)

    try:
        search()
    except AssertionError as failure:
        return Cell("fails", _first_lines(failure))
    if not errors:
        return Cell("holds")
    refusal = f"{type(errors[0]).__name__}: {_first_lines(errors[0], 1)}"
    if len(errors) >= examples:
        return Cell("error", refusal)
    return Cell("holds", f"on the cases it took; it refused {len(errors)} of {examples} ({refusal})")


#: Cases a method needs, as :func:`cases` keyword arguments: CAM reads its weights off a
#: pooled linear tail right after the cut.
METHOD_CASES: dict[str, dict[str, Any]] = {"cam": {"pooled_linear_tail": True}}


def property_matrix(methods: Sequence[str] | Mapping[str, Callable[..., Any]] | None = None,
                    properties: Sequence[str] | None = None, *, examples: int = 20,
                    seed: int = 0, method_cases: Mapping[str, Mapping[str, Any]] | None = None) -> Matrix:
    """Runs every property on every method and tabulates which hold.

    ``methods`` are names in ``camfunc.METHODS`` or a mapping of name to method (default:
    every registered method); ``properties`` are names in :data:`PROPERTIES` (default: all).
    Each cell draws ``cases(**method_cases[method], **CASES_FOR[property])``
    (``method_cases`` defaults to ``METHOD_CASES``: CAM gets pooled linear tails).
    Each cell searches ``examples`` drawn cases from ``seed``, so the matrix is reproducible;
    a failure keeps hypothesis' shrunk counterexample. "holds" means no counterexample was
    found in that search, not a proof.

    Example:
        >>> matrix = camfunc.testing.property_matrix(["gradcam", "gradcampp"],
        ...                                          ["batch_independent"], examples=3)
        >>> sorted(matrix.cells)
        ['gradcam', 'gradcampp']
    """
    if methods is None:
        chosen: Mapping[str, Callable[..., Any]] = METHODS
    elif isinstance(methods, Mapping):
        chosen = methods
    else:
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
        chosen = {m: METHODS[m] for m in methods}
    names = list(PROPERTIES) if properties is None else list(properties)
    unknown = [p for p in names if p not in PROPERTIES]
    if unknown:
        raise ValueError(f"unknown properties {unknown}; choose from {list(PROPERTIES)}")
    needs = METHOD_CASES if method_cases is None else method_cases
    cells = {method_name: {name: check_cell(method, PROPERTIES[name], examples=examples, seed_value=seed,
                                            case_strategy=cases(**{**needs.get(method_name, {}),
                                                                   **CASES_FOR.get(name, {})}))
                           for name in names}
             for method_name, method in chosen.items()}
    return Matrix(cells, examples, seed)
