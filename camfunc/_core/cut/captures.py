"""A split's captures, kept valid for the input and for the model as it is now.

A captured graph holds for the model as it was captured: the modules in it,
its parameters and buffers (export reads them as tensors), the forward hooks
that ran. An exported graph also holds only for the inputs torch's guards admit
(sizes, dtype, device). :class:`Captures` keeps every capture of one split;
``bound(split, x)`` hands back one valid for ``x``, capturing again when none is:

- for another input size, a capture for that size; from the third other size
  on, once with dynamic spatial sizes (torch.export's ``Dim.AUTO``), which then
  serves every size its guards admit (a dynamic export costs about what a fixed
  one does on ViTs and CNNs, and ten times that where shapes need many guards:
  24 s against 2 s on timm's MobileViT);
- after a module, parameter, buffer or forward hook of the model was replaced,
  added or removed (:class:`Snapshot`), from scratch.

Values changed in place (``load_state_dict``, an optimiser step) need nothing:
every graph reads the model's own tensors.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

from camfunc._core.cut.capture import CaptureError
from camfunc._core.validate import refuse_while_compiling

if TYPE_CHECKING:
    from camfunc._core.split import Split

__all__ = ["FIXED_SIZES_FIRST", "MAX_CAPTURES", "Capture", "Captures", "Snapshot"]

#: Captures kept per split; the least recently used goes first.
MAX_CAPTURES = 8
#: Other input sizes captured each for itself before one capture with dynamic sizes.
FIXED_SIZES_FIRST = 2


class Snapshot:
    """The model's structure when it was captured, cheap to compare with the model now.

    Every module's children, parameters, buffers, forward hooks and forward
    pre-hooks, by identity: a replaced, added or removed one shows. About 20 µs
    on a ResNet-18 (``benchmarks/bench_staleness.py``).

    Example:
        >>> snapshot = Snapshot(model)
        >>> model.fc = nn.Linear(512, 10)
        >>> snapshot.unchanged()
        False
    """

    def __init__(self, model: nn.Module):
        tables: list[dict[Any, Any]] = [table for m in model.modules() for table in (
            m._modules, m._parameters, m._buffers, m._forward_hooks, m._forward_pre_hooks)]
        self._sizes = [(table, len(table)) for table in tables]
        self._items = [(table, key, value) for table in tables for key, value in table.items()]

    def unchanged(self) -> bool:
        return all(len(table) == size for table, size in self._sizes) and all(
            table.get(key) is value for table, key, value in self._items)


class Capture(NamedTuple):
    """One capture: its split, which inputs it holds for (None: every input), and the
    input shape torch.export was shown (None: fx, which needs none)."""

    split: Split
    admits: Callable[[Tensor], bool] | None
    shape: tuple[int, ...] | None

    def holds_for(self, x: Tensor) -> bool:
        return self.admits is None or self.admits(x)


class _Guarded:
    """An exported head that refuses inputs its graph does not hold for, when called
    directly (methods, ``split(x)`` and ``split.bound(x)`` pick or make a capture that does)."""

    def __init__(self, head: Callable[..., Any], admits: Callable[[Tensor], bool], model: str):
        self.head, self.admits, self.model = head, admits, model

    def __call__(self, x: Any, *rest: Any) -> Any:
        if not torch.compiler.is_dynamo_compiling() and isinstance(x, Tensor) and not self.admits(x):
            raise ValueError(
                f"this capture of {self.model} does not hold for inputs of shape {tuple(x.shape)} "
                f"({x.dtype}, {x.device}): torch.export fixed sizes it depends on. Call split(x) or "
                "a camfunc method, which capture the model again for it, or use split.bound(x).head"
            )
        return self.head(x, *rest)

    def __repr__(self) -> str:
        return f"_Guarded({self.head!r})"


class _Origin:
    """What a split :class:`Captures` made points back to (``Split.source``): the captures,
    and which capture of which generation (captures since the model last changed) it is."""

    def __init__(self, captures: Captures, admits: Callable[[Tensor], bool] | None, generation: int):
        self.captures, self.admits, self.generation = captures, admits, generation
        self.split: Split | None = None  # the capture's own split, set once it is made

    def holds_for(self, x: Tensor) -> bool:
        return self.admits is None or self.admits(x)

    def bound(self, split: Split, x: Tensor, *, check_model: bool = True) -> Split:
        return self.captures.bound(self, split, x, check_model=check_model)


class Captures:
    """Every capture of one split, most recently used first, and how to make another:
    ``build(example, spatial)`` captures the model for ``example`` (None: the first
    example), with dynamic spatial sizes when ``spatial``. :func:`camfunc.split` makes
    one and returns its first split; ``Split.bound`` calls :meth:`bound`.

    A split made from one of these by replacing its fields (``camfunc.with_layout``,
    ``dataclasses.replace``) keeps its own stages: it is bound to itself while its
    capture holds, and refused, not swapped for another capture, when it does not.
    """

    def __init__(self, model: nn.Module, build: Callable[[Tensor | None, bool], Capture]):
        self._model, self._build = model, build
        self._lock = threading.Lock()
        self._snapshot = Snapshot(model)
        self._generation = 0
        self._added = 0  # captures made for other sizes, dynamic ones included
        self._captures = [self._owned(build(None, False))]

    @property
    def first(self) -> Split:
        return self._captures[0].split

    def _owned(self, capture: Capture) -> Capture:
        """The capture with its split pointing here, and its head guarded when it is exported."""
        head = capture.split.head
        if capture.admits is not None:
            head = _Guarded(head, capture.admits, type(self._model).__name__)
        origin = _Origin(self, capture.admits, self._generation)
        origin.split = dataclasses.replace(capture.split, head=head, source=origin)
        return capture._replace(split=origin.split)

    def bound(self, origin: _Origin, split: Split, x: Tensor, *, check_model: bool = True) -> Split:
        """A split valid for ``x`` and the model as it is now: ``split`` itself when it is."""
        if torch.compiler.is_dynamo_compiling():
            return self._compiled_choice(origin, split, x)
        changed = check_model and not self._snapshot.unchanged()
        stale = changed or origin.generation != self._generation
        if split is not origin.split:  # made from a capture: only its own stages will do
            if not stale and origin.holds_for(x):
                return split
            why = "the model has changed since" if stale else (
                f"not for inputs of shape {tuple(x.shape)} ({x.dtype}, {x.device})")
            raise ValueError(
                "this split was made from camfunc.split's by replacing its stages, and the "
                f"capture it was made from no longer holds ({why}); make it again from "
                "split.bound(x)")
        if changed:
            return self._renew(x)
        if not stale and origin.holds_for(x):
            return split
        return self._search(x)

    def _search(self, x: Tensor) -> Split:
        for capture in self._captures:
            if capture.holds_for(x):
                self._touch(capture)
                return capture.split
        return self._add(x)

    def _compiled_choice(self, origin: _Origin, split: Split, x: Tensor) -> Split:
        # No capture while compiling: an eager call at this size (or the split's own) serves.
        if origin.holds_for(x):
            return split
        if split is origin.split:
            for capture in self._captures:
                if capture.holds_for(x):
                    return capture.split
        refuse_while_compiling(
            f"camfunc's captures of {type(self._model).__name__} do not hold for inputs of shape "
            f"{tuple(x.shape)}; call the method once without torch.compile at this size, so that "
            "it captures the model for it")
        return split

    def _touch(self, capture: Capture) -> None:
        with self._lock:
            if any(c is capture for c in self._captures):
                self._captures = [capture] + [c for c in self._captures if c is not capture]

    def _add(self, x: Tensor) -> Split:
        spatial = self._added == FIXED_SIZES_FIRST  # sizes keep changing: try dynamic ones, once
        self._added += 1
        known = sorted({c.shape for c in self._captures if c.shape is not None})
        try:  # outside the lock: tracing takes the trace lock, which waits for running stages
            capture = self._owned(self._build(x, spatial))
        except CaptureError as err:
            raise CaptureError(
                f"the capture of {type(self._model).__name__} made for inputs of shape "
                f"{', '.join(map(str, known)) or 'another shape'} does not hold for "
                f"{tuple(x.shape)} ({x.dtype}, {x.device}), and capturing it again for them "
                f"failed: {err}") from err
        with self._lock:
            self._captures = [capture, *self._captures][:MAX_CAPTURES]
        return capture.split

    def _renew(self, x: Tensor) -> Split:
        snapshot = Snapshot(self._model)  # before capturing: a change while it runs shows later
        with self._lock:
            self._generation += 1
        capture = self._owned(self._build(x, False))
        with self._lock:
            self._captures, self._snapshot, self._added = [capture], snapshot, 0
        return capture.split

    def __repr__(self) -> str:
        return f"Captures({len(self._captures)} of {type(self._model).__name__})"
