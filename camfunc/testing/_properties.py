"""Explanation properties: each checks one method on one case and raises a readable
``AssertionError`` when the property fails.

A method is any callable ``method(split, x, cls, **options)`` returning maps
``(B, *spatial)`` or ``(B, K, *spatial)``, as camfunc's methods do.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from camfunc._core.targets import TopK
from camfunc.testing._cases import Case

Method = Callable[..., Any]
Property = Callable[..., None]

ATOL, RTOL = 1e-5, 1e-4  # float32 maps computed in two batch shapes or kernel orders


def _call(method: Method, case: Case, x: Tensor, cls: Any, **options: Any) -> Tensor:
    """The method's maps, with a fresh seeded generator for methods that draw one."""
    if "generator" in inspect.signature(method).parameters and "generator" not in options:
        options = {**options, "generator": torch.Generator().manual_seed(0)}
    maps = method(case.split, x, cls, **options)
    if not isinstance(maps, Tensor):
        raise AssertionError(f"{_name(method)} returned {type(maps).__name__}, not a tensor of maps")
    return maps


def _name(method: Method) -> str:
    return getattr(method, "__name__", repr(method))


def _close(got: Tensor, want: Tensor, what: str, method: Method, case: Case,
           atol: float = ATOL, rtol: float = RTOL) -> None:
    if got.shape != want.shape:
        raise AssertionError(f"{_name(method)}: {what}: shape {tuple(got.shape)}, expected "
                             f"{tuple(want.shape)}\n  on {case!r}")
    if not torch.allclose(got, want, atol=atol, rtol=rtol, equal_nan=True):
        worst = (got - want).abs().nan_to_num(float("inf")).max().item()
        raise AssertionError(f"{_name(method)}: {what}: maps differ by up to {worst:.3g} "
                             f"(tolerance {atol} + {rtol} x |value|)\n  on {case!r}")


def _sample_target(cls: Any, i: int) -> Any:
    return cls[i:i + 1] if isinstance(cls, Tensor) and cls.ndim >= 1 else cls


def batch_independent(method: Method, case: Case, **options: Any) -> None:
    """A sample's map does not depend on the rest of the batch: each sample alone gives
    the row it got in the batch.

    Example:
        >>> case = camfunc.testing.Case.of(model, "layer4", x, 3)
        >>> camfunc.testing.batch_independent(camfunc.gradcam, case)   # holds: returns None
    """
    together = _call(method, case, case.x, case.cls, **options)
    for i in range(case.x.shape[0]):
        alone = _call(method, case, case.x[i:i + 1], _sample_target(case.cls, i), **options)
        _close(together[i:i + 1], alone, f"sample {i} alone vs in its batch", method, case)


def class_axis_consistent(method: Method, case: Case, **options: Any) -> None:
    """``(B, K)`` classes give, at ``[:, j]``, the maps of a call for column ``j`` alone:
    the class axis follows the classes asked for, in their order.

    Example:
        >>> case = camfunc.testing.Case.of(model, "layer4", x, 3)
        >>> camfunc.testing.class_axis_consistent(camfunc.gradcam, case)
    """
    scores = case.split(case.x)
    classes = scores.shape[1]
    k = min(3, classes)
    # Each sample asks for k distinct classes, in an order that differs between samples.
    rows = [(torch.arange(k) + i) % classes for i in range(case.x.shape[0])]
    many = torch.stack([row.flip(0) if i % 2 else row for i, row in enumerate(rows)])
    together = _call(method, case, case.x, many, **options)
    if together.shape[:2] != many.shape:
        raise AssertionError(f"{_name(method)}: (B, K) classes {tuple(many.shape)} gave maps "
                             f"{tuple(together.shape)}, not (B, K, ...)\n  on {case!r}")
    for j in range(k):
        alone = _call(method, case, case.x, many[:, j], **options)
        _close(together[:, j], alone, f"class column {j} ({many[:, j].tolist()}) vs its own call",
               method, case)


def deterministic(method: Method, case: Case, **options: Any) -> None:
    """The same inputs (and a generator seeded alike) give the same maps, bit for bit.

    Example:
        >>> case = camfunc.testing.Case.of(model, "layer4", x, 3)
        >>> camfunc.testing.deterministic(camfunc.gradcam, case)
    """
    first = _call(method, case, case.x, case.cls, **options)
    again = _call(method, case, case.x, case.cls, **options)
    if not torch.equal(first.nan_to_num(-1.0), again.nan_to_num(-1.0)):
        raise AssertionError(f"{_name(method)}: two identical calls differ by up to "
                             f"{(first - again).abs().max().item():.3g}\n  on {case!r}")


def unit_range(method: Method, case: Case, **options: Any) -> None:
    """Normalised maps are finite and in [0, 1].

    Example:
        >>> case = camfunc.testing.Case.of(model, "layer4", x, 3)
        >>> camfunc.testing.unit_range(camfunc.gradcam, case)
    """
    maps = _call(method, case, case.x, case.cls, **options)
    if not torch.isfinite(maps).all():
        raise AssertionError(f"{_name(method)}: maps hold NaN or Inf for a finite input\n  on {case!r}")
    low, high = maps.min().item(), maps.max().item()
    if low < 0 or high > 1:
        raise AssertionError(f"{_name(method)}: normalised maps span [{low:.3g}, {high:.3g}], "
                             f"not [0, 1]\n  on {case!r}")


def logit_scale_invariant(method: Method, case: Case, *, scale: float = 3.0, **options: Any) -> None:
    """Multiplying the model's outputs by ``scale > 0`` leaves normalised maps unchanged
    (with the same classes: a ``topk`` target is fixed on the unscaled scores).

    Example:
        >>> case = camfunc.testing.Case.of(model, "layer4", x, 3)
        >>> camfunc.testing.logit_scale_invariant(camfunc.gradcam, case)
    """
    tail = case.split.tail

    def scaled_tail(*carry: Any) -> Any:
        return scale * tail(*carry)

    cls = case.cls
    if isinstance(cls, TopK):
        cls = case.split(case.x).topk(cls.k, dim=1).indices
    scaled = dataclasses.replace(case, split=dataclasses.replace(case.split, tail=scaled_tail))
    plain = _call(method, case, case.x, cls, **options)
    got = _call(method, scaled, case.x, cls, **options)
    _close(got, plain, f"outputs scaled by {scale}", method, case, atol=1e-4, rtol=1e-3)


def compile_equivalent(method: Method, case: Case, **options: Any) -> None:
    """``torch.compile(method, fullgraph=True)`` (backend ``aot_eager``) gives the eager maps.

    Example:
        >>> case = camfunc.testing.Case.of(model, "layer4", x, 3)
        >>> camfunc.testing.compile_equivalent(camfunc.gradcam, case)
    """
    compiled = torch.compile(method, backend="aot_eager", fullgraph=True)
    eager = _call(method, case, case.x, case.cls, **options)
    got = _call(compiled, case, case.x, case.cls, **options)
    _close(got, eager, "compiled vs eager", method, case)


#: Every property by name: ``PROPERTIES[name](method, case, **options)`` returns None when it
#: holds and raises ``AssertionError`` with the counterexample when it does not.
PROPERTIES: dict[str, Property] = {
    "batch_independent": batch_independent,
    "class_axis_consistent": class_axis_consistent,
    "deterministic": deterministic,
    "unit_range": unit_range,
    "logit_scale_invariant": logit_scale_invariant,
    "compile_equivalent": compile_equivalent,
}
