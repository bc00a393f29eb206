"""Shapley-CAM: Grad-CAM corrected by the second-order term of a Shapley expansion."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from torch import Tensor

from camfunc._core import engine as _engine, targets as _targets, validate as _validate
from camfunc._core.contrastive import rest
from camfunc._core.split import Split
from camfunc._methods._combine import (
    Computed,
    check_activations,
    finish,
    spatial_axes,
    weighted_sum,
    widened,
)
from camfunc._methods._method import cam_method


def shapley_weights(a: Tensor, g: Tensor, hvp: Tensor) -> Tensor:
    r""":math:`w_k = \frac{1}{Z}\sum_{ij} \big(g - \tfrac12 H A\big)_k(i,j)`."""
    return (g - 0.5 * hvp).mean(spatial_axes(g))


@cam_method()
def shapleycam(split: Split, x: Tensor, cls: _targets.Target, *,
               target: Literal["rest", "logit"] = "rest", normalize: bool = True, chunk_size: int | None = None,
               eigen_smooth: bool = False, differentiable: bool = False) -> Computed:
    r"""Shapley-CAM: channel weights from the gradient and the Hessian-vector product.

    .. math:: w_k = \frac{1}{Z}\sum_{i,j}\Big(\frac{\partial S}{\partial A}
              - \frac12 \frac{\partial^2 S}{\partial A^2} A\Big)_k(i,j), \quad
              L = \mathrm{ReLU}\Big(\sum_k w_k A_k\Big)

    ``S`` is the ReST target, the logit minus the cross-entropy
    (:func:`camfunc.rest`), as in the paper and pytorch-grad-cam: a logit's
    Hessian is exactly zero on a piecewise-linear tail, where Shapley-CAM would
    collapse to Grad-CAM (``target="logit"`` shows it). ``differentiable`` as
    :func:`camfunc.gradcam`; the tail runs more than once, so it refuses a model in
    training mode. A callable ``cls`` is
    used as the target as it is. The Hessian-vector product is forward-over-
    reverse: ``jvp`` of the ``vjp``, per class under ``vmap``. At a token layer,
    ``A`` in the product is the layer's whole output: the class and register
    tokens set aside from the grid move with it (as in pytorch-grad-cam, whose
    hooks see every token), while the weights and the map use the grid.

    Cai et al., "CAMs as Shapley Value-based Explainers", The Visual
    Computer, 2025 (arXiv:2501.06261).

    Example:
        >>> s = camfunc.split(model, "layer4")
        >>> camfunc.shapleycam(s, x, 3).shape
        torch.Size([2, 4, 4])
        >>> camfunc.shapleycam(s, x, camfunc.topk(3)).shape
        torch.Size([2, 3, 4, 4])
    """
    if target not in ("rest", "logit"):
        raise ValueError(f"target must be 'rest' or 'logit', got {target!r}")
    if differentiable:
        _validate.check_one_forward(split, "shapleycam")

    def objective_for(scores: Tensor) -> Callable[[Any], Tensor]:
        if _targets.is_objective(cls):
            return cls
        index, keep_k = _targets.class_indices(cls, scores)  # fixed on the clean scores
        if target == "rest":
            return rest(index if keep_k else index[:, 0])

        def logit(out: Tensor) -> Tensor:
            picked = out.gather(1, index)
            return picked if keep_k else picked[:, 0]
        return logit

    def per_class(a: Tensor, g: Tensor, hvp: Tensor) -> Tensor:
        check_activations(a)
        a, g, hvp = widened(a), widened(g), widened(hvp)
        return finish(weighted_sum(a, shapley_weights(a, g, hvp), eigen_smooth), relu=True,
                      normalize=normalize)

    return _engine.curvature_maps(split, x, objective_for, per_class, chunk_size=chunk_size,
                                  differentiable=differentiable)
