"""Targets that are functions of the scores: Finer-CAM's contrast and Shapley-CAM's ReST.

Each is a small callable value that any method accepts as ``cls``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._targets import Target, class_indices, class_scores


class _PerSampleClasses:
    """A target whose classes belong to samples, re-indexable for rows of other batches.

    Methods that run the model on many inputs per sample (Score-CAM's masked
    inputs) call ``for_rows(scores, rows)`` to get the same target for a batch
    whose row r belongs to sample ``rows[r]``. Subclasses are dataclasses with a
    ``cls`` field.
    """

    def for_rows(self, scores: Tensor, rows: Tensor):
        index, keep_k = class_indices(self.cls, scores)
        return dataclasses.replace(self, cls=index[rows] if keep_k else index[rows, 0])

__all__ = ["Finer", "finer", "ReST", "rest"]


@dataclasses.dataclass  # not frozen: torch 2.4 cannot compile a frozen one built inside
class Finer(_PerSampleClasses):
    """Finer-CAM's contrastive target; build it with :func:`finer`."""

    cls: Target
    gamma: float = 0.6
    num_references: int = 3
    references: Tensor | Sequence[int] | None = None

    def for_rows(self, scores: Tensor, rows: Tensor) -> Finer:
        picked = super().for_rows(scores, rows)
        if isinstance(self.references, Tensor) and self.references.ndim == 2:
            picked = dataclasses.replace(picked, references=self.references[rows])
        return picked

    def __call__(self, scores: Tensor) -> Tensor:
        scores = class_scores(scores)
        index, keep_k = class_indices(self.cls, scores)  # (B, K)
        target = scores.gather(1, index)
        if self.references is not None:
            ref = torch.as_tensor(self.references, device=scores.device).long()
            ref = ref.expand(scores.shape[0], -1) if ref.ndim == 1 else ref
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


def finer(cls: Target, *, gamma: float = 0.6, num_references: int = 3,
          references: Tensor | Sequence[int] | None = None) -> Finer:
    r"""Finer-CAM's target: the class score minus its nearest rivals', for any method.

    .. math:: S = y_c - \gamma \frac{1}{T} \sum_{t=1}^{T} y_{d_t}

    with :math:`d_1..d_T` the ``num_references`` classes whose logits are
    closest to :math:`y_c` (chosen on detached scores, so only the contrast is
    differentiated), or the given ``references`` (a list for all samples or a
    ``(B, T)`` tensor). Defaults are torchcam 0.5.0's (gamma 0.6, 3 references).
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
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma >= 0:
        raise ValueError(f"gamma must be a non-negative number, got {gamma!r}")
    if isinstance(num_references, bool) or not isinstance(num_references, int) or num_references < 1:
        raise ValueError(f"num_references must be a positive int, got {num_references!r}")
    return Finer(cls, float(gamma), num_references, references)


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
