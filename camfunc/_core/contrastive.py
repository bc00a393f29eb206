"""Targets that are functions of the scores: Finer-CAM's contrast and Shapley-CAM's ReST.

Each is a small callable value that any method accepts as ``cls``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import Self

from camfunc._core.targets import (
    Target,
    TopK,
    check_form,
    class_indices,
    class_scores,
    is_objective,
)


@dataclasses.dataclass  # not frozen: torch 2.4 cannot compile a frozen one built inside
class _PerSampleClasses:
    """A target whose classes belong to samples, re-indexable for rows of other batches.

    Methods that run the model on many inputs per sample (Score-CAM's masked
    inputs) call ``for_rows(scores, rows)`` to get the same target for a batch
    whose row r belongs to sample ``rows[r]``. Subclasses are dataclasses; ``cls``
    is their first field.
    """

    cls: Target

    def for_rows(self, scores: Tensor, rows: Tensor) -> Self:
        index, keep_k = class_indices(self.cls, scores)
        return dataclasses.replace(self, cls=index[rows] if keep_k else index[rows, 0])

    def check_form(self, batch: int) -> None:
        """``cls`` checked as a method checks class indices (length, types, sign)."""
        check_form(self.cls, batch)

__all__ = ["Finer", "ReST", "finer", "rest"]


@dataclasses.dataclass  # not frozen: torch 2.4 cannot compile a frozen one built inside
class Finer(_PerSampleClasses):
    """Finer-CAM's contrastive target; build it with :func:`finer`."""

    cls: Target
    gamma: float = 0.6
    num_references: int = 3
    references: Tensor | Sequence[int] | None = None

    def for_rows(self, scores: Tensor, rows: Tensor) -> Self:
        picked = super().for_rows(scores, rows)
        if isinstance(self.references, Tensor) and self.references.ndim == 2:
            picked = dataclasses.replace(picked, references=self.references[rows])
        return picked

    def check_form(self, batch: int) -> None:
        super().check_form(batch)
        if isinstance(self.references, Tensor) and self.references.ndim == 2 \
                and self.references.shape[0] != batch:
            raise ValueError(f"references has {self.references.shape[0]} rows but the batch has "
                             f"{batch} samples; give one row of reference classes per sample")

    def __call__(self, scores: Tensor) -> Tensor:
        scores = class_scores(scores)
        index, keep_k = class_indices(self.cls, scores)  # (B, K)
        target = scores.gather(1, index)
        if self.references is not None:
            ref = torch.as_tensor(self.references, device=scores.device)
            ref = ref.expand(scores.shape[0], -1) if ref.ndim == 1 else ref
            _check_references(ref, index, scores.shape[1])
            reference = scores.gather(1, ref).mean(1, keepdim=True)
        else:
            # The classes whose logits are nearest the target's: the ones it is confused with.
            count = min(self.num_references, scores.shape[1] - 1)
            held = scores.detach()
            gap = (held.unsqueeze(1) - held.gather(1, index).unsqueeze(2)).abs()  # (B, K, C)
            gap = gap.scatter(2, index.unsqueeze(2), float("inf"))
            nearest = gap.topk(count, dim=2, largest=False).indices  # (B, K, T)
            picked = scores.unsqueeze(1).expand(-1, index.shape[1], -1).gather(2, nearest)
            reference = picked.mean(2)
        value = target - self.gamma * reference
        return value if keep_k else value[:, 0]


def _check_references(ref: Tensor, index: Tensor, num_classes: int) -> None:
    """Reference classes in range and never the target itself (eagerly: they read values)."""
    if torch.compiler.is_dynamo_compiling():
        return
    low, high = int(ref.min()), int(ref.max())
    if low < 0 or high >= num_classes:
        raise IndexError(f"reference class {low if low < 0 else high} is out of range: the model has "
                         f"{num_classes} classes, so valid indices are 0 to {num_classes - 1}")
    same = (ref.unsqueeze(1) == index.unsqueeze(2)).any(2)  # (B, K)
    if bool(same.any()):
        sample, k = (int(i) for i in same.nonzero()[0])
        raise ValueError(f"reference classes of sample {sample} include its target class "
                         f"{int(index[sample, k])}; a class cannot be contrasted with itself")


def _references(references: Any) -> Tensor | None:
    """References as a (T,) or (B, T) long tensor of distinct classes, with clear errors."""
    if references is None:
        return None
    if isinstance(references, Tensor):
        if references.is_floating_point() or references.is_complex() or references.dtype == torch.bool:
            raise TypeError(f"references must hold integer class indices, got dtype {references.dtype}")
        ref = references.long()
    else:
        if isinstance(references, (str, bytes)) or not isinstance(references, Sequence):
            raise TypeError(f"references must be a list of class indices, a (B, T) tensor or a "
                            f"count (int), got {type(references).__name__}")
        flat = [c for row in references for c in (row if isinstance(row, Sequence) else [row])]
        if any(isinstance(c, bool) or not isinstance(c, numbers.Integral) for c in flat):
            raise TypeError(f"references must be ints (class indices), got {references!r}")
        rows = [isinstance(row, Sequence) for row in references]
        if any(rows) and (not all(rows) or len({len(row) for row in references}) != 1):
            raise ValueError(f"nested references must be one list of equal length per sample, "
                             f"got {references!r}")
        ref = torch.tensor([list(map(int, r)) for r in references] if any(rows)
                           else [int(c) for c in references], dtype=torch.long)
    if ref.ndim not in (1, 2) or ref.shape[-1] == 0:
        raise ValueError(f"references must be a non-empty list of classes (T,) or a (B, T) tensor, "
                         f"got shape {tuple(ref.shape)}")
    if not torch.compiler.is_dynamo_compiling():
        ordered = ref.sort(-1).values
        if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
            raise ValueError(f"references repeat a class: {ref.tolist()}; give each reference once")
    return ref


def finer(cls: Target, *, gamma: float = 0.6, num_references: int = 3,
          references: Tensor | Sequence[int] | int | None = None) -> Finer:
    r"""Finer-CAM's target: the class score minus its nearest rivals', for any method.

    .. math:: S = y_c - \gamma \frac{1}{T} \sum_{t=1}^{T} y_{d_t}

    with :math:`d_1..d_T` the ``num_references`` classes whose logits are
    closest to :math:`y_c` (chosen on detached scores, so only the contrast is
    differentiated), or the given ``references`` (a list for all samples or a
    ``(B, T)`` tensor of distinct classes other than the target; an int is a
    count, as ``num_references``). Defaults are torchcam 0.5.0's (gamma 0.6, 3
    references). Invalid arguments are errors: a non-finite gamma, booleans,
    repeated or empty references, a reference equal to the target (when
    called), and, when called, out-of-range classes (``IndexError``).
    Pass the result as ``cls`` to any method, or use :func:`finercam`.

    Zhang et al., "Finer-CAM: Spotting the Difference Reveals Finer Details
    for Visual Explanation", CVPR 2025 (arXiv:2501.11309).

    Example:
        >>> target = camfunc.finer(3, gamma=0.6)           # class 3 against its 3 nearest rivals
        >>> camfunc.layercam(s, x, target).shape
        torch.Size([2, 4, 4])
        >>> camfunc.gradcam(s, x, camfunc.finer(camfunc.topk(2))).shape
        torch.Size([2, 2, 4, 4])
    """
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not math.isfinite(gamma) \
            or gamma < 0:
        raise ValueError(f"gamma must be a finite non-negative number, got {gamma!r}")
    if isinstance(references, numbers.Integral) and not isinstance(references, bool):
        num_references, references = int(references), None  # a count, as pytorch-grad-cam takes it
    if isinstance(num_references, bool) or not isinstance(num_references, int) or num_references < 1:
        raise ValueError(f"num_references must be a positive int, got {num_references!r}")
    if is_objective(cls):
        raise TypeError("finer's cls must be class indices or camfunc.topk(k), not a callable: "
                        "the contrast needs the target's class")
    if not isinstance(cls, TopK):
        check_form(cls, len(cls) if isinstance(cls, Sequence) and not isinstance(cls, str)
                   else (cls.shape[0] if isinstance(cls, Tensor) and cls.ndim else 1))
    return Finer(cls, float(gamma), num_references, _references(references))


@dataclasses.dataclass  # not frozen: torch 2.4 cannot compile a frozen one built inside
class ReST(_PerSampleClasses):
    """Shapley-CAM's ReST target; build it with :func:`rest`."""

    cls: Target

    def __call__(self, scores: Tensor) -> Tensor:
        scores = class_scores(scores)
        index, keep_k = class_indices(self.cls, scores)
        # logit minus cross-entropy: y_c + log softmax(y)_c
        value = scores.gather(1, index) + F.log_softmax(scores, dim=1).gather(1, index)
        return value if keep_k else value[:, 0]


def rest(cls: Target) -> ReST:
    r"""The ReST target: the logit minus the cross-entropy loss of the class.

    .. math:: S = y_c - \mathrm{CE}(y, c) = y_c + \log \mathrm{softmax}(y)_c

    Its Hessian is not zero on piecewise-linear tails, unlike a logit's, which
    is what Shapley-CAM's second-order term needs.

    Cai et al., "CAMs as Shapley Value-based Explainers", 2025 (arXiv:2501.06261).

    Example:
        >>> camfunc.rest(camfunc.topk(3))
        ReST(cls=TopK(k=3))
        >>> camfunc.gradcam(s, x, camfunc.rest(3)).shape    # shapleycam uses it by itself
        torch.Size([2, 4, 4])
    """
    return ReST(cls)
