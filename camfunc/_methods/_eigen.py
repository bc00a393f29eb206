"""Principal-component maps: Eigen-CAM and Eigen-Grad-CAM.

The map is the projection of each position's (centred) feature vector on the
first principal direction of the layer's features, found with torch's SVD.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import _targets
from .._split import Split
from ._combine import activation_cam, gradient_cam
from ._gradient import gradient_weights


def first_component(features: Tensor) -> Tensor:
    r"""Projection on the first principal direction, with a fixed sign: ``(B, C, *sp) -> (B, *sp)``.

    With :math:`X` the ``(N, C)`` matrix of positions by channels, centred over
    positions, and :math:`X = U \Sigma V^T`, the map is :math:`X v_1`.

    An SVD's signs are arbitrary, so the sign is fixed by a rule: the map's
    largest magnitude is positive (Seg-Eigen-CAM, Chung & Ying, Appl. Sci.
    2025, Eq. 13); on a tie, :math:`v_1`'s loadings sum to a positive number.
    """
    centred = features.flatten(2).transpose(1, 2)  # (B, N, C)
    centred = centred - centred.mean(1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    direction = vh[:, 0, :]  # (B, C)
    projection = (centred @ direction.unsqueeze(-1)).squeeze(-1)  # (B, N)
    lean = projection.amax(1) + projection.amin(1)  # > 0 when the positive side is larger
    key = torch.where(lean != 0, lean, direction.sum(1))
    sign = torch.where(key < 0, -1.0, 1.0).to(projection.dtype)
    return (projection * sign.unsqueeze(1)).reshape(features.shape[0], *features.shape[2:])


def eigencam(split: Split, x: Tensor, cls: _targets.Target = 0, *, normalize: bool = True,
             return_scores: bool = False) -> Any:
    r"""Eigen-CAM: the activations' first principal component, class-agnostic.

    .. math:: L = \mathrm{ReLU}(X v_1), \quad X = A^T - \bar A, \ X = U\Sigma V^T

    with :math:`A` reshaped to positions by channels and centred over positions
    (as pytorch-grad-cam does). The sign is fixed as in :func:`first_component`,
    so a map never flips at random. The map does not depend on ``cls``; it is
    repeated along the class axis that ``cls`` asks for.

    Muhammad & Yeasin, "Eigen-CAM: Class Activation Map using Principal
    Components", IJCNN 2020.

    Example:
        >>> s = camfunc.split(model, "layer4")
        >>> camfunc.eigencam(s, x).shape                      # [B, 7, 7]
        >>> camfunc.eigencam(s, x, camfunc.topk(2)).shape     # [B, 2, 7, 7], equal slices
    """
    return activation_cam(split, x, cls, first_component, normalize=normalize,
                          return_scores=return_scores)


def _projected_product(a: Tensor, g: Tensor) -> Tensor:
    return first_component(a * g)


def eigengradcam(split: Split, x: Tensor, cls: _targets.Target, *, normalize: bool = True,
                 return_scores: bool = False, chunk_size: int | None = None) -> Any:
    r"""Eigen-Grad-CAM: the first principal component of activations times gradients.

    .. math:: L = \mathrm{ReLU}(X v_1), \quad X = (A \odot G)^T - \overline{A \odot G}

    Class-discriminative, unlike :func:`eigencam`. Same sign rule. As
    pytorch-grad-cam's ``EigenGradCAM`` (its extension of Eigen-CAM).

    Example:
        >>> s = camfunc.split(model, "layer4")
        >>> camfunc.eigengradcam(s, x, 281).shape                # [B, 7, 7]
        >>> camfunc.eigengradcam(s, x, camfunc.topk(3)).shape    # [B, 3, 7, 7]
    """
    return gradient_cam(split, x, cls, gradient_weights, normalize=normalize,
                        return_scores=return_scores, chunk_size=chunk_size,
                        combine=_projected_product)
