"""Finer-CAM: any method, explaining the class against its nearest rivals."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from camfunc._core import targets as _targets
from camfunc._core.contrastive import finer
from camfunc._core.split import Split
from camfunc._methods._combine import Computed
from camfunc._methods._gradient import gradcam
from camfunc._methods._method import cam_method, composed


@cam_method()
def finercam(split: Split, x: Tensor, cls: _targets.Target, *,
             method: Callable[..., Any] = gradcam, gamma: float = 0.6, num_references: int = 3,
             references: Tensor | Sequence[int] | None = None, **method_kwargs: Any) -> Computed:
    r"""Finer-CAM: ``method`` run on the contrastive target :func:`camfunc.finer`.

    .. math:: S = y_c - \gamma \frac{1}{T} \sum_{t=1}^{T} y_{d_t}

    with the ``num_references`` classes whose logits are nearest :math:`y_c`
    (or ``references``). Defaults are torchcam 0.5.0's: Grad-CAM, gamma 0.6,
    3 references. Any method works, since the target is just a ``cls``.

    Zhang et al., "Finer-CAM: Spotting the Difference Reveals Finer Details
    for Visual Explanation", CVPR 2025 (arXiv:2501.11309).

    Example:
        >>> s = camfunc.split(model, "layer4")
        >>> camfunc.finercam(s, x, 3).shape               # class 3 against its 3 nearest rivals
        torch.Size([2, 4, 4])
        >>> camfunc.finercam(s, x, 3, method=camfunc.layercam, gamma=1.0).shape
        torch.Size([2, 4, 4])
    """
    target = finer(cls, gamma=gamma, num_references=num_references, references=references)
    return composed(method, split, x, target, **method_kwargs)
