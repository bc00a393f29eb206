"""What the faithfulness metrics share: checks, fixed targets, batched model calls.

A metric runs the model (or a CAM method) on many derived inputs per sample:
imputed images, perturbed images. They are produced in blocks whose row ``r``
belongs to sample ``rows[r]``, re-cut into batches of ``batch_size`` rows, and
scored against a target fixed once on the clean input's scores (so ``topk``
and contrastive targets do not drift with the perturbation).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from camfunc._core import targets as _targets
from camfunc._core.validate import check_count
from camfunc._util import draws as _draws
from camfunc.metrics import _inputs

Method = Callable[..., Any]


def checked(model: Any, x: Any, batch_size: Any) -> None:
    """The model (callable, eval mode), the batch ``(B, C, *spatial)`` and ``batch_size``."""
    _inputs.check_model_and_images(model, x)
    check_count(batch_size, "batch_size")


def check_non_negative(value: Any, name: str) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not float(value) >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")


@dataclasses.dataclass(frozen=True)
class FixedTarget:
    """One target per sample, fixed on the clean input's output ``scores``."""

    cls: _targets.Target
    scores: Any
    pick: Callable[[Any, Tensor], Tensor]
    index: Tensor | None  # (B,) class indices, or None for a callable target
    batch: int            # images in the clean batch

    def values(self, out: Any, rows: Tensor) -> Tensor:
        """``(R,)`` target values of a batch whose row ``r`` belongs to sample ``rows[r]``."""
        return self.pick(out, rows)[:, 0].float()

    def for_rows(self, rows: Tensor) -> _targets.Target:
        """The ``cls`` to give a CAM method for such a batch."""
        if self.index is not None:
            return self.index[rows]
        return _targets.for_rows(self.cls, self.scores, rows, self.batch)


def fix_target(model: Callable[[Tensor], Any], x: Tensor,
               cls: _targets.Target | None) -> tuple[FixedTarget, Tensor]:
    """The fixed target (``None``: each image's top class) and its clean values ``(B,)``.

    One model pass over ``x``.
    """
    if cls is not None:
        _targets.check_form(cls, x.shape[0])
    with torch.no_grad():
        scores = model(x)
    if cls is None:
        if not isinstance(scores, Tensor) or scores.ndim != 2:
            raise ValueError(
                "cls=None picks each image's top class, which needs (B, num_classes) scores; "
                "pass cls (a callable for other outputs)"
            )
        cls = scores.argmax(1)
    pick, _ = _targets.picker(cls, scores, x.shape[0])
    rows = torch.arange(x.shape[0], device=x.device)
    clean = pick(scores, rows)
    if clean.ndim != 2 or clean.shape[1] != 1:
        raise ValueError(
            f"metrics need one target per sample, but cls asks for {clean.shape[-1]} per sample; "
            "give an int, one class per sample, or a callable returning (B,)"
        )
    index = None if _targets.is_objective(cls) else _targets.class_indices(cls, scores)[0][:, 0]
    return FixedTarget(cls, scores, pick, index, x.shape[0]), clean[:, 0].float()


Block = tuple[Tensor, Tensor]  # inputs (R, ...) and the sample of each row (R,)


def rebatch(blocks: Iterable[Block], batch_size: int) -> Iterator[Block]:
    """Re-cuts a stream of blocks into batches of ``batch_size`` rows (the last may be short)."""
    held_x: list[Tensor] = []
    held_rows: list[Tensor] = []
    held = 0
    for xs, rows in blocks:
        start = 0
        while start < xs.shape[0]:
            take = min(batch_size - held, xs.shape[0] - start)
            held_x.append(xs[start:start + take])
            held_rows.append(rows[start:start + take])
            held += take
            start += take
            if held == batch_size:
                yield torch.cat(held_x), torch.cat(held_rows)
                held_x, held_rows, held = [], [], 0
    if held:
        yield torch.cat(held_x), torch.cat(held_rows)


def stream_values(model: Callable[[Tensor], Any], target: FixedTarget, blocks: Iterable[Block],
                  batch_size: int) -> Tensor:
    """Target values of every row of the stream, in order: ``(total rows,)``."""
    with torch.no_grad():
        parts = [target.values(model(xs), rows) for xs, rows in rebatch(blocks, batch_size)]
    return torch.cat(parts)


def method_maps(method: Method, split: Any, x: Tensor, cls: _targets.Target) -> Tensor:
    """A CAM method's maps for ``x``, upsampled to its size: ``(B, *spatial)``, float32."""
    if not callable(method):
        raise TypeError(
            f"method must be a CAM function (split, x, cls) -> maps such as camfunc.gradcam, "
            f"got {type(method).__name__}"
        )
    with torch.no_grad():
        maps = method(split, x, cls)
    if not isinstance(maps, Tensor):
        raise TypeError(
            f"method returned {type(maps).__name__}, not one tensor of maps; for several "
            "layers wrap it, e.g. lambda s, x, c: camfunc.fuse(camfunc.layercam(s, x, c))"
        )
    return _inputs.input_maps(maps, x)


def per_sample_draws(name: str, given: Tensor | None, count: int, x: Tensor,
                     generator: torch.Generator | None,
                     draw: Callable[[torch.device], Tensor]) -> Callable[[int], Tensor]:
    """``i -> (B, *x.shape[1:])``: the i-th given tensor, or ``draw(device)`` in call order.

    Draws happen on the generator's device (the input's without one).
    """
    if given is not None:
        expected = (count, *x.shape)
        if not isinstance(given, Tensor) or tuple(given.shape) != expected:
            shape = tuple(given.shape) if isinstance(given, Tensor) else type(given).__name__
            raise ValueError(f"{name} must be a tensor of shape {expected}, got {shape}")
        return lambda i: given[i].to(device=x.device, dtype=x.dtype)
    device = _draws.device_for(generator, x)
    return lambda i: draw(device).to(device=x.device, dtype=x.dtype)
