"""Principal-component maps: Eigen-CAM and Eigen-Grad-CAM.

The map is the projection of each position's (centred) feature vector on the
first principal direction of the layer's features, found with torch's SVD.
"""

from __future__ import annotations

import torch
from torch import Tensor

from camfunc._core import targets as _targets
from camfunc._core.split import Split
from camfunc._methods._combine import Computed, activation_cam, channel_terms, gradient_cam
from camfunc._methods._gradient import gradient_weights
from camfunc._methods._method import cam_method
from camfunc._methods._projection import first_component, mark_nonfinite, set_aside_nonfinite

# Why these methods wait for the device once a call (each method's ``syncs``).
_SVD_SYNCS = ("torch.linalg.svd reads its solver's convergence flag on the host (an error if the "
              "SVD did not converge)")
_EIGH_SYNCS = ("torch.linalg.eigh reads its solver's convergence flag on the host (an error if "
               "the eigendecomposition did not converge)")


def _kernel(x: Tensor, kind: str, gamma: float | None, degree: int, coef0: float) -> Tensor:
    """scikit-learn's kernels, for rows of ``x``: ``(B, N, C) -> (B, N, N)``."""
    gamma = 1.0 / x.shape[-1] if gamma is None else gamma
    inner = x @ x.transpose(1, 2)
    if kind == "linear":
        return inner
    if kind == "poly":
        return (gamma * inner + coef0) ** degree
    if kind == "sigmoid":
        return torch.tanh(gamma * inner + coef0)
    if kind == "rbf":
        sq = x.square().sum(-1)
        return torch.exp(-gamma * (sq.unsqueeze(2) + sq.unsqueeze(1) - 2 * inner).clamp_min(0))
    if kind == "cosine":
        unit: Tensor = x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        return unit @ unit.transpose(1, 2)
    raise ValueError(f"kernel must be 'linear', 'poly', 'rbf', 'sigmoid' or 'cosine', got {kind!r}")


def first_kernel_component(features: Tensor, kernel: str = "sigmoid", gamma: float | None = None,
                           degree: int = 3, coef0: float = 1.0) -> Tensor:
    r"""First kernel principal component of the positions' centred features: ``(B, C, *sp) -> (B, *sp)``.

    :math:`K_c = (I - \tfrac1N)K(I - \tfrac1N)`, top eigenpair :math:`(\lambda, \alpha)`,
    projection :math:`\sqrt{\lambda}\,\alpha` (what scikit-learn's
    ``KernelPCA.fit_transform`` returns), with its sign rule: the largest
    magnitude is positive. An eigenvalue below 1e-5 N max|K| is rounding noise
    (features that do not vary), and gives a zero map. A sample holding NaN or
    Inf gets a NaN map. Computed in float64 (then cast back): in float32 every
    step loses about the same, centring the features, forming the kernel (rbf's
    squared distances cancel), double-centring it and the eigensolver, to about
    3e-5 of the map's scale against scikit-learn's float64; in float64 it is 1e-14.
    """
    features, bad = set_aside_nonfinite(features)
    dtype = features.dtype
    x = features.double().flatten(2).transpose(1, 2)
    x = x - x.mean(1, keepdim=True)
    raw = _kernel(x, kernel, gamma, degree, coef0)
    k = raw - raw.mean(1, keepdim=True) - raw.mean(2, keepdim=True) + raw.mean((1, 2), keepdim=True)
    values, vectors = torch.linalg.eigh(k)
    # Features that do not vary leave only rounding in the centred kernel: no component.
    floor = 1e-5 * x.shape[1] * raw.abs().flatten(1).amax(1, keepdim=True)
    top_value = values[..., -1:]
    top = vectors[..., -1] * torch.where(top_value > floor, top_value, 0).sqrt()  # (B, N)
    peak = top.gather(1, top.abs().argmax(1, keepdim=True))
    top = torch.where(peak < 0, -top, top)
    return mark_nonfinite(top.reshape(features.shape[0], *features.shape[2:]).to(dtype), bad)


@cam_method(syncs=_EIGH_SYNCS)
def kpcacam(split: Split, x: Tensor, cls: _targets.Target = 0, *, kernel: str = "sigmoid",
            gamma: float | None = None, degree: int = 3, coef0: float = 1.0,
            normalize: bool = True) -> Computed:
    r"""KPCA-CAM: Eigen-CAM with kernel PCA, done in torch.

    .. math:: L = \mathrm{ReLU}\big(\sqrt{\lambda_1}\,\alpha_1\big), \quad
              K_c \alpha_1 = \lambda_1 \alpha_1

    on the centred kernel matrix of the positions' centred feature vectors.
    Kernels as scikit-learn's (``gamma`` defaults to 1 / channels); the default
    sigmoid kernel is pytorch-grad-cam's ``KPCA_CAM``'s. Class-agnostic.

    Karmani et al., "KPCA-CAM: Visual Explainability of Deep Computer Vision
    Models using Kernel PCA", MMSP 2024 (arXiv:2410.00267).

    Example:
        >>> s = camfunc.split(model, "layer4")
        >>> camfunc.kpcacam(s, x).shape
        torch.Size([2, 4, 4])
        >>> camfunc.kpcacam(s, x, kernel="rbf", gamma=0.01).shape
        torch.Size([2, 4, 4])
    """
    _kernel(torch.zeros(1, 1, 1), kernel, gamma, degree, coef0)  # unknown kernels fail first

    def raw_map(a: Tensor) -> Tensor:
        return first_kernel_component(a, kernel, gamma, degree, coef0)

    return activation_cam(split, x, cls, raw_map, normalize=normalize)


@cam_method(syncs=_SVD_SYNCS)
def eigencam(split: Split, x: Tensor, cls: _targets.Target = 0, *, normalize: bool = True) -> Computed:
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
        >>> maps = camfunc.eigencam(s, x, camfunc.topk(2))    # class-agnostic: one map per image
        >>> maps.shape, torch.equal(maps[:, 0], maps[:, 1])
        (torch.Size([2, 2, 4, 4]), True)
    """
    return activation_cam(split, x, cls, first_component, normalize=normalize)


@cam_method(syncs=_SVD_SYNCS)
def eigengradcam(split: Split, x: Tensor, cls: _targets.Target, *, normalize: bool = True, chunk_size: int | None = None,
                 differentiable: bool = False) -> Computed:
    r"""Eigen-Grad-CAM: the first principal component of activations times gradients.

    .. math:: L = \mathrm{ReLU}(X v_1), \quad X = (A \odot G)^T - \overline{A \odot G}

    Class-discriminative, unlike :func:`eigencam`. Same sign rule. As
    pytorch-grad-cam's ``EigenGradCAM`` (its extension of Eigen-CAM).

    Example:
        >>> s = camfunc.split(model, "layer4")
        >>> camfunc.eigengradcam(s, x, 3).shape
        torch.Size([2, 4, 4])
        >>> camfunc.eigengradcam(s, x, camfunc.topk(3)).shape
        torch.Size([2, 3, 4, 4])
    """
    # HiResCAM's terms g * A, collapsed by their first principal component.
    return gradient_cam(split, x, cls, gradient_weights, normalize=normalize, chunk_size=chunk_size,
                        combine=channel_terms, eigen_smooth=True, differentiable=differentiable)


def absolute_gradient_weights(a: Tensor, g: Tensor) -> Tensor:
    """Seg-Eigen-CAM's pixel weights :math:`|G_k(i,j)|` (Eq. 10)."""
    return g.abs()


@cam_method(syncs=_SVD_SYNCS)
def segeigencam(split: Split, x: Tensor, cls: _targets.Target, *, normalize: bool = True, chunk_size: int | None = None,
                 differentiable: bool = False) -> Computed:
    r"""Seg-Eigen-CAM: the first principal component of activations times absolute gradients.

    .. math:: L = \mathrm{ReLU}(X v_1), \quad X = (|G| \odot A)^T - \overline{|G| \odot A}

    with the projection's sign set so that its largest magnitude is positive
    (Eq. 13; on a tie, :math:`v_1`'s loadings sum to a positive number). Absolute
    gradients keep the positions whose evidence is negative, which matters for
    segmentation targets (a callable ``cls`` summing a class's pixel logits, say).
    As pytorch-grad-cam's ``SegEigenCAM``.

    Chung & Ying, "Seg-Eigen-CAM: Eigen-Value-Based Visual Explanations for
    Semantic Segmentation Models", Applied Sciences 15(13), 7562, 2025.

    Example:
        >>> s = camfunc.split(model, "layer4")
        >>> camfunc.segeigencam(s, x, 3).shape
        torch.Size([2, 4, 4])
        >>> camfunc.segeigencam(s, x, lambda out: out[:, 3]).shape    # any target, e.g. a mask's sum
        torch.Size([2, 4, 4])
    """
    return gradient_cam(split, x, cls, absolute_gradient_weights, normalize=normalize, chunk_size=chunk_size,
                        combine=channel_terms, eigen_smooth=True, differentiable=differentiable)
