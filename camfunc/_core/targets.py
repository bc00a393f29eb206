"""What to explain: the ``cls`` argument, turned into cotangents for the vjp.

Every form of ``cls`` ends as one of two things:

- class indices ``(B, K)`` into 2-D scores, whose cotangents are one-hot rows;
- a callable ``objective(scores) -> (B,) or (B, K)``, differentiated as part of
  the tail, whose cotangents pick one column at a time.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from typing_extensions import TypeIs

from camfunc._util.host import reads_are_free

__all__ = ["Target", "TopK", "class_scores", "topk"]


@dataclasses.dataclass(frozen=True)
class TopK:
    """Each sample's ``k`` highest-scoring classes, in descending order."""

    k: int

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"topk needs a positive int k, got {self.k!r}")


def topk(k: int) -> TopK:
    """Targets each sample's ``k`` highest-scoring classes, in descending order.

    The output gets a class axis: ``(B, k, *spatial)``. Pass
    ``return_scores=True`` to see which classes they were.

    Example:
        >>> maps, scores = camfunc.gradcam(s, x, camfunc.topk(3), return_scores=True)
        >>> maps.shape, scores.shape          # each image's 3 best classes, best first
        (torch.Size([2, 3, 4, 4]), torch.Size([2, 10]))
    """
    return TopK(k)


Objective = Callable[[Any], Tensor]
Target = int | Sequence[int] | Tensor | np.ndarray | TopK | Objective


def is_objective(cls: Target) -> TypeIs[Objective]:
    """Whether ``cls`` is a callable of the scores rather than classes."""
    return callable(cls) and not isinstance(cls, (Tensor, TopK))


class RowTarget(Protocol):
    """A callable target that fixes its choice on the clean scores: ``for_rows(scores, rows)``
    gives the plain callable for a batch whose row r belongs to sample ``rows[r]``."""

    def __call__(self, out: Any) -> Tensor: ...

    def for_rows(self, scores: Any, rows: Tensor) -> Objective: ...


def is_row_target(cls: Objective) -> TypeIs[RowTarget]:
    """Whether a callable target fixes its choice on the clean scores (``for_rows``)."""
    return hasattr(cls, "for_rows")


class Picker(Protocol):
    """``pick(out, rows, copies=None)``: the target value of each row's own sample."""

    def __call__(self, out: Any, rows: Tensor, copies: int | None = None) -> Tensor: ...


def class_scores(output: Any) -> Tensor:
    """The class scores in a model's output: the tensor itself, or the ``logits`` of a
    dict or a ``ModelOutput`` (Hugging Face)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        logits: Tensor = output["logits"]
        return logits
    if not isinstance(output, Mapping) and isinstance(getattr(output, "logits", None), Tensor):
        attribute: Tensor = output.logits
        return attribute
    kind = type(output).__name__
    if isinstance(output, Mapping):
        found, pick = f" with keys {list(output)}", f"output={next(iter(output), 'key')!r}"
    elif isinstance(output, (tuple, list)):
        found, pick = f" of {len(output)} values", "output=0"
    else:
        found, pick = "", "output=..."
    raise ValueError(
        f"the model returns a {kind}{found}, and class indices are read from a tensor or from a "
        f"'logits' field. Pick the scores when splitting, camfunc.split(model, layer, {pick}), "
        "or pass a callable cls that maps the output to (B,) scores"
    )


def any_scores(output: Any) -> Tensor:
    """The class scores, else the first tensor in the output (for choosing a layer)."""
    try:
        return class_scores(output)
    except ValueError:
        leaves = [v for v in torch.utils._pytree.tree_leaves(output) if isinstance(v, Tensor)]
        if not leaves:
            raise
        return leaves[0]


def _as_tensor(cls: Any) -> Any:
    """numpy integer arrays become tensors; everything else is left as it is."""
    if isinstance(cls, np.ndarray):
        if not np.issubdtype(cls.dtype, np.integer):
            raise TypeError(f"a cls array must hold integer class indices, got dtype {cls.dtype}")
        return torch.from_numpy(np.ascontiguousarray(cls)).long()
    return cls


def check_form(cls: Target, batch: int) -> None:
    """Eager checks of ``cls`` that need no scores: type, shape, sign."""
    cls = _as_tensor(cls)
    if is_objective(cls) and hasattr(cls, "check_form"):  # a target holding classes of its own
        cls.check_form(batch)
        return
    if isinstance(cls, (TopK,)) or is_objective(cls):
        return
    if isinstance(cls, (bool, str, bytes)) or not isinstance(cls, (numbers.Integral, Tensor, Sequence)):
        raise TypeError(
            f"cls must be an int, a length-B sequence or 1-D tensor, a (B, K) tensor, "
            f"camfunc.topk(k) or a callable scores -> (B,); got {type(cls).__name__}"
        )
    if isinstance(cls, numbers.Integral):
        return
    if isinstance(cls, Tensor):
        if cls.is_floating_point() or cls.is_complex() or cls.dtype == torch.bool:
            raise TypeError(f"cls tensor must hold integer class indices, got dtype {cls.dtype}")
        if cls.ndim not in (0, 1, 2):
            raise ValueError(f"cls tensor must be 0-D, (B,) or (B, K), got shape {tuple(cls.shape)}")
        if cls.ndim >= 1 and cls.shape[0] != batch:
            raise ValueError(
                f"cls has {cls.shape[0]} rows but the batch has {batch} samples; "
                "give one class per sample, or an int for all"
            )
        if cls.ndim == 2 and cls.shape[1] == 0:
            raise ValueError("cls of shape (B, 0) asks for no class; give at least one per sample")
        return
    if len(cls) != batch:
        raise ValueError(
            f"cls has {len(cls)} entries but the batch has {batch} samples; "
            "give one class per sample, or an int for all"
        )
    if not all(isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in cls):
        raise TypeError("a cls sequence must hold Python ints; use a tensor for (B, K) classes")


def class_indices(cls: Target, scores: Tensor) -> tuple[Tensor, bool]:
    """Class indices ``(B, K)`` for 2-D ``scores``, and whether K is the caller's axis.

    Returns ``keep_k=False`` when ``cls`` named one class per sample, so the
    maps drop the class axis.
    """
    scores = class_scores(scores)
    cls = _as_tensor(cls)
    if scores.ndim != 2:
        raise ValueError(
            f"class indices need (B, num_classes) scores, but the model outputs shape "
            f"{tuple(scores.shape)}; pass a callable cls that maps the output to (B,) scores"
        )
    batch = scores.shape[0]
    if isinstance(cls, TopK):
        if cls.k > scores.shape[1]:
            raise ValueError(f"topk({cls.k}) asks for more classes than the model's {scores.shape[1]}")
        return scores.detach().topk(cls.k, dim=1).indices, True
    if isinstance(cls, (int, numbers.Integral)):
        _check_ints([int(cls)], scores.shape[1])  # on the host: no device read, no overflow
        index = torch.full((batch, 1), int(cls), dtype=torch.long, device=scores.device)
        return index, False
    if isinstance(cls, Tensor):
        check_range(cls, scores.shape[1])  # where cls lives, before it moves to the scores
        index = cls.to(device=scores.device, dtype=torch.long)
        keep_k = index.ndim == 2
        index = index.reshape(batch, -1) if index.ndim else index.expand(batch).reshape(batch, 1)
        return index, keep_k
    if is_objective(cls):
        raise TypeError("a callable cls names no class indices; give classes, or use the callable "
                        "as the target itself")
    _check_ints([int(c) for c in cls], scores.shape[1])
    index = torch.tensor([int(c) for c in cls], dtype=torch.long, device=scores.device).reshape(batch, 1)
    return index, False


def _out_of_range(bad: int, num_classes: int) -> IndexError:
    return IndexError(
        f"class index {bad} is out of range: the model has {num_classes} classes, "
        f"so valid indices are 0 to {num_classes - 1}"
    )


def _check_ints(values: Sequence[int], num_classes: int) -> None:
    for value in values:
        if not 0 <= value < num_classes:
            raise _out_of_range(value, num_classes)


def check_range(index: Tensor, num_classes: int) -> None:
    """Class range check, without a host-device sync.

    Host memory is read on the host, for free: an IndexError before any work. A tensor on
    an accelerator is checked there, asynchronously (``torch._assert_async``): reading it
    would stall the host until the head has run, and the tail's launches would no longer
    hide behind the device's work. When compiling, nothing is read.
    """
    if torch.compiler.is_dynamo_compiling() or index.numel() == 0:
        return
    if reads_are_free(index):
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= num_classes:
            raise _out_of_range(low if low < 0 else high, num_classes)
        return
    if index.device.type != "meta":
        inside = ((index >= 0) & (index < num_classes)).all()
        torch._assert_async(inside, f"class index out of range: the model has {num_classes} "
                                    f"classes, so valid indices are 0 to {num_classes - 1}")


def one_hot_rows(index: Tensor, like: Tensor) -> Tensor:
    """Cotangents ``(K, B, C)``: row ``[k, b]`` is one-hot at ``index[b, k]``."""
    k = index.shape[1]
    basis = like.new_zeros((k, *like.shape))
    return basis.scatter(2, index.t().unsqueeze(-1), 1.0)


def objective_rows(values: Tensor, batch: int | None = None) -> tuple[Tensor, bool]:
    """Cotangents for a callable objective's ``(B,)`` or ``(B, K)`` output."""
    if not isinstance(values, Tensor):
        raise TypeError(
            f"a callable cls must return a tensor of (B,) or (B, K) scores, got {type(values).__name__}"
        )
    if batch is not None and values.ndim in (1, 2) and values.shape[0] != batch:
        raise ValueError(
            f"the callable cls returned {values.shape[0]} scores for a batch of {batch}; "
            "it must return one score (or K) per sample, (B,) or (B, K)"
        )
    if values.ndim == 1:
        return torch.ones_like(values).unsqueeze(0), False
    if values.ndim == 2:
        k = values.shape[1]
        eye = torch.eye(k, dtype=values.dtype, device=values.device)
        return eye.unsqueeze(1).expand(k, values.shape[0], k), True
    raise ValueError(
        f"a callable cls must return (B,) or (B, K) scores, got shape {tuple(values.shape)}"
    )


def cotangents_for(cls: Target, out: Tensor, scores: Any, batch: int) -> tuple[Tensor, bool]:
    """The cotangents ``(K, B, ...)`` that pull back ``cls``'s classes through ``out``.

    ``out`` is the differentiated value: a callable ``cls``'s own ``(B,)`` or
    ``(B, K)`` output, or the ``(B, classes)`` class scores, in which case the
    classes are chosen on ``scores`` (topk, say). Also whether K is the caller's axis.
    """
    if is_objective(cls):
        return objective_rows(out, batch)
    index, keep_k = class_indices(cls, scores)
    return one_hot_rows(index, out), keep_k


def class_count(cls: Target, scores: Any) -> tuple[int, bool]:
    """How many classes ``cls`` asks for per sample, and whether maps keep a class axis.

    For methods whose maps do not depend on the class: they still check ``cls``
    and answer in the same shape as the gradient methods.
    """
    if is_objective(cls):
        rows, keep_k = objective_rows(cls(scores))
        return rows.shape[0], keep_k
    index, keep_k = class_indices(cls, scores)
    return index.shape[1], keep_k


def picker(cls: Target, scores: Any, batch: int) -> tuple[Picker, bool]:
    """Selects, from a batch of outputs, the target value of each row's own sample.

    For methods that run the model on many inputs per sample: ``pick(out, rows)``
    reads row r's target for sample ``rows[r]`` (classes fixed on ``scores``).
    Targets with per-sample classes are re-indexed. A plain callable was written
    for the image batch: each row's output is placed, at its sample's position,
    into a copy of the clean output, and the callable reads that copy. A caller
    whose rows are ``copies`` whole image batches passes ``copies=`` to skip that
    (``pick.whole_batches`` says the target would rather have them). ``batch`` is
    the input's batch size: outputs of any structure (a tensor, a dict or
    ``ModelOutput``, a tuple, a list of per-sample dicts) are read by it, never
    guessed from them.
    """
    if is_objective(cls):
        keep_k = objective_rows(cls(scores))[1]

        def pick(out: Any, rows: Tensor, copies: int | None = None) -> Tensor:
            if is_row_target(cls):
                values = cls.for_rows(scores, rows)(out)
            elif copies is not None:
                values = _PerCopy(cls, copies, batch)(out)
            else:
                values = _each_row_in_its_batch(cls, scores, out, rows, batch)
            return values.unsqueeze(1) if values.ndim == 1 else values
        setattr(pick, "whole_batches", not is_row_target(cls))
        return pick, keep_k
    index, keep_k = class_indices(cls, scores)

    def pick_index(out: Any, rows: Tensor, copies: int | None = None) -> Tensor:
        return class_scores(out).gather(1, index[rows])
    return pick_index, keep_k


def _per_sample_list(value: Any, total: int) -> bool:
    """A list (or plain tuple) of one item per sample, as detectors return (dicts, boxes):
    ``total`` items that are not themselves batched tensors."""
    return isinstance(value, (list, tuple)) and not hasattr(value, "_fields") and \
        len(value) == total and not all(
            isinstance(item, Tensor) and item.ndim and item.shape[0] == total for item in value)


def _batched(value: Any, total: int) -> bool:
    """A part of an output with one row per sample: a tensor, or a per-sample list."""
    return (isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == total) or \
        _per_sample_list(value, total)


def _parts(out: Any, total: int) -> tuple[list[Any], Any]:
    """The output's leaves, with per-sample lists kept whole, and its structure."""
    return torch.utils._pytree.tree_flatten(out, is_leaf=lambda v: _per_sample_list(v, total))


def _rows_taken(out: Any, total: int, start: int, stop: int) -> Any:
    """``out`` with its per-sample parts cut to rows ``[start, stop)``."""
    parts, spec = _parts(out, total)
    cut = [part[start:stop] if _batched(part, total) else part for part in parts]
    return torch.utils._pytree.tree_unflatten(
        [list(c) if isinstance(c, tuple) and not isinstance(p, Tensor) else c
         for c, p in zip(cut, parts, strict=True)], spec)


def _each_row_in_its_batch(cls: Objective, clean: Any, out: Any, rows: Tensor,
                           batch: int) -> Tensor:
    """A plain callable's value for each row: the row's output put into a copy of the clean
    batch's output at its sample's position, read there."""
    count = rows.shape[0]
    positions = torch.arange(count, device=rows.device)
    # (count, batch): row r's copy takes its own output at its sample's position. Selected
    # out of place, so it also runs under vmap (Ablation-CAM's channels).
    own = rows[:, None] == torch.arange(batch, device=rows.device)[None, :]
    clean_parts, _ = _parts(clean, batch)
    out_parts, spec = _parts(out, count)
    if len(clean_parts) != len(out_parts):
        raise ValueError("the model's output has another structure for the re-run rows than "
                         "for the image batch; a callable cls needs the same structure")

    def embed(clean_part: Any, out_part: Any) -> Any:
        if isinstance(out_part, Tensor) and isinstance(clean_part, Tensor) and \
                _batched(out_part, count) and _batched(clean_part, batch):
            chosen = own.reshape(count, batch, *(1,) * (clean_part.ndim - 1))
            copies = clean_part.unsqueeze(0).expand(count, *clean_part.shape)
            return torch.where(chosen, out_part.unsqueeze(1).to(copies.dtype), copies).flatten(0, 1)
        if _per_sample_list(out_part, count) and _per_sample_list(clean_part, batch):
            at = rows.tolist()  # host objects: the list is on the host already
            return [out_part[r] if j == at[r] else clean_part[j]
                    for r in range(count) for j in range(batch)]
        return out_part
    stacked = torch.utils._pytree.tree_unflatten(
        [embed(c, o) for c, o in zip(clean_parts, out_parts, strict=True)], spec)
    values = _PerCopy(cls, count, batch)(stacked)  # (count * batch, ...)
    return values.reshape(count, batch, *values.shape[1:])[positions, rows]


@dataclasses.dataclass
class _PerCopy:
    """A callable target applied to each image-batch-sized block of a stacked output."""

    cls: Objective
    copies: int
    batch: int

    def __call__(self, out: Any) -> Tensor:
        total = self.copies * self.batch
        return torch.cat([self.cls(_rows_taken(out, total, i * self.batch, (i + 1) * self.batch))
                          for i in range(self.copies)])


def tiled(cls: Target, copies: int, clean_scores: Callable[[], Any], batch: int) -> Target:
    """``cls`` for a batch of ``copies`` stacked copies of the image batch (copy-major).

    Class indices repeat; ``topk`` and re-indexable targets (``finer``, ``rest``)
    are fixed on the clean scores, ``clean_scores()``, called only then; a plain
    callable reads each copy's block as the image batch (of ``batch`` images) it
    was written for.
    """
    cls = _as_tensor(cls)
    if isinstance(cls, numbers.Integral) or (isinstance(cls, Tensor) and cls.ndim == 0):
        return cls
    if is_objective(cls):
        return tiled_objective(cls, copies, clean_scores, batch)
    if isinstance(cls, TopK):
        cls = class_indices(cls, clean_scores())[0]
    index = cls if isinstance(cls, Tensor) else torch.as_tensor(cls)
    return torch.cat([index] * copies)


def tiled_objective(cls: Objective, copies: int, clean_scores: Callable[[], Any],
                    batch: int) -> Objective:
    """A callable ``cls`` for ``copies`` stacked copies of the image batch: see :func:`tiled`."""
    if is_row_target(cls):
        scores = clean_scores()
        device = next((t.device for t in torch.utils._pytree.tree_leaves(scores)
                       if isinstance(t, Tensor)), None)
        rows = torch.arange(batch, device=device).repeat(copies)
        return cls.for_rows(scores, rows)
    return _PerCopy(cls, copies, batch)


@dataclasses.dataclass
class _InTheirBatches:
    """A plain callable target for a batch whose row r belongs to sample ``rows[r]``."""

    cls: Objective
    clean: Any
    rows: Tensor
    batch: int

    def __call__(self, out: Any) -> Tensor:
        return _each_row_in_its_batch(self.cls, self.clean, out, self.rows, self.batch)


def for_rows(cls: Target, scores: Any, rows: Tensor, batch: int) -> Target:
    """``cls`` for a batch whose row r belongs to sample ``rows[r]`` (classes fixed on
    ``scores``, the output for the ``batch`` images)."""
    cls = _as_tensor(cls)
    if is_objective(cls):
        if is_row_target(cls):
            return cls.for_rows(scores, rows)
        return _InTheirBatches(cls, scores, rows, batch)
    index, keep_k = class_indices(cls, scores)
    return index[rows] if keep_k else index[rows, 0]
