"""Refine-CAM: the product of one method's maps across layers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from camfunc._core import ops as _ops, targets as _targets
from camfunc._core.split import Split
from camfunc._methods._combine import Computed, in_user_order
from camfunc._methods._gradient import gradcampp
from camfunc._methods._method import cam_method, composed


@cam_method(resolution="input")
def refinecam(split: Split, x: Tensor, cls: _targets.Target, *,
              method: Callable[..., Any] = gradcampp, size: Sequence[int] | None = None,
              normalize: bool = True, **method_kwargs: Any) -> Computed:
    r"""Refine-CAM: multiply one method's normalised maps over several layers.

    .. math:: L = \prod_{l} \mathrm{up}\big(\hat L^{(l)}\big)

    with :math:`\hat L^{(l)}` the min-max normalised map at layer l, upsampled
    to ``size`` (default: the input's spatial size, as pytorch-grad-cam's
    ``RefineCAM``, whose default method, Grad-CAM++, is kept). A region must
    light up at every layer to survive, which denoises early layers' maps.
    Split at several layers: ``camfunc.split(model, ["layer2", "layer3", "layer4"])``;
    on a one-layer split the product has one factor, so the result is ``method``'s
    normalised map at ``size`` (pytorch-grad-cam's gives the same).

    pytorch-grad-cam 1.5.7 ``RefineCAM`` (arXiv:2605.14641).

    Example:
        >>> s = camfunc.split(model, ["layer3", "layer4"])
        >>> camfunc.refinecam(s, x, 3).shape                                  # the input's size
        torch.Size([2, 64, 64])
        >>> camfunc.refinecam(s, x, 3, method=camfunc.layercam, size=(16, 16)).shape
        torch.Size([2, 16, 16])
    """
    chained, scores = composed(method, split, x, cls, normalize=True, **method_kwargs)
    maps = in_user_order(split, chained)  # the product's rounding follows the user's order
    size = tuple(x.shape[2:]) if size is None else tuple(size)
    product = _ops.fuse(maps, "product", size=size, spatial_dims=len(size))
    if normalize:
        product = _ops.normalize(product, spatial_dims=len(size))
    return (product,), scores
