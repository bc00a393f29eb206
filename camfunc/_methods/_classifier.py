"""Maps from the classifier's own weights: CAM, and the random-weights baseline."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from camfunc._core import engine as _engine, targets as _targets
from camfunc._core.split import Split
from camfunc._methods._combine import (
    Computed,
    activation_cam,
    check_activations,
    finish,
    gradient_cam,
    spatial_axes,
    weighted_sum,
)
from camfunc._methods._method import Draws, cam_method
from camfunc._util import draws as _draws

_PROBE_TOLERANCE = 1e-4


def _summed_gradient(a: Tensor, g: Tensor) -> Tensor:
    # For S_c = sum_k W_ck mean_ij A_k(i,j) + b_c, every g_k(i,j) = W_ck / Z, so the sum is W_ck.
    return g.sum(spatial_axes(g))


def _check_pooled_linear_tail(split: Split, x: Tensor) -> None:
    """Raises unless the tail is ``W . global_pool(A) + b`` around this input.

    A function that is affine in ``A`` and unchanged by reordering positions is
    exactly a linear map of the position sum. Probed with tail calls: second
    differences ``f(A + D) + f(A - D) - 2 f(A)`` along a fixed random ``D`` and
    ``f(A) + f(-A) - 2 f(0)`` (which catches positively homogeneous ReLU tails)
    vanish, and ``f(A reordered) = f(A)``. Reads values, so it is skipped
    under ``torch.compile``.
    """
    if len(split.middle) > 0:
        raise ValueError("camfunc.cam takes a split at one layer: the one before the pooling")
    carry = _engine.head(split, x)
    a, context = carry[0], carry[1:]
    if a.ndim < 3:
        return

    def tail(v: Tensor) -> Tensor:
        # Every floating tensor of the output, flat: a dict, tuple or list of per-sample
        # dicts is probed as the scores a tensor output would be.
        leaves = torch.utils._pytree.tree_leaves(_engine.run_from(split, 0, (v, *context)))
        return torch.cat([t.flatten() for t in leaves
                          if isinstance(t, Tensor) and t.is_floating_point()])

    g = torch.Generator(device=a.device).manual_seed(0)
    step = torch.randn(a.shape, generator=g, device=a.device, dtype=a.dtype) * a.float().std().to(a.dtype)
    reordered = a.flatten(2).flip(-1).roll(1, -1).reshape(a.shape)
    base = tail(a)
    curvature = torch.maximum(
        (tail(a + step) + tail(a - step) - 2 * base).abs().amax(),
        (base + tail(-a) - 2 * tail(torch.zeros_like(a))).abs().amax())
    moved = tail(reordered) - base
    # Rounding of the model's own dtype sets how close to linear "linear" can look.
    tolerance = max(_PROBE_TOLERANCE, 10 * torch.finfo(base.dtype).eps)
    scale = tolerance * (base.abs().amax() + tail(a + step).abs().amax()).float() + 1e-12
    if curvature > scale or moved.abs().amax() > scale:
        name = split.layers[0] if split.layers else "the cut"
        raise ValueError(
            f"camfunc.cam needs the model to end, after {name!r}, in a global average pool and "
            "a linear layer (or 1x1 conv), and this tail is not of that form. Split at the layer "
            "right before the pooling, or use a gradient method such as camfunc.gradcam"
        )


def _classifier_weight(classifier: Any, split: Split, channels: int) -> Tensor:
    """``(num_classes, C)`` from a linear layer, a 1x1 convolution, a module name or a tensor."""
    if isinstance(classifier, str):
        if split.model is None:
            raise ValueError("classifier given by name needs split.model; pass the module itself")
        try:
            classifier = split.model.get_submodule(classifier)
        except AttributeError:
            raise ValueError(f"no module {classifier!r} in {type(split.model).__name__}; "
                             "give a name from model.named_modules()") from None
    if isinstance(classifier, nn.Linear):
        weight = classifier.weight
    elif isinstance(classifier, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and all(k == 1 for k in classifier.kernel_size):
        weight = classifier.weight.flatten(1)
    elif isinstance(classifier, Tensor) and classifier.ndim == 2:
        weight = classifier
    else:
        raise TypeError(f"classifier must be an nn.Linear, a 1x1 convolution, its name, or a "
                        f"(num_classes, C) tensor, got {type(classifier).__name__}")
    if weight.shape[1] != channels:
        raise ValueError(f"the classifier takes {weight.shape[1]} features but the layer has "
                         f"{channels} channels; give the layer that reads the pooled activations")
    return weight.detach()


def _cam_from_classifier(split: Split, x: Tensor, cls: _targets.Target, classifier: Any, *,
                         normalize: bool, eigen_smooth: bool) -> Computed:
    if _targets.is_objective(cls):
        raise TypeError("cam with a classifier needs class indices (rows of its weight), not a callable")
    acts, scores = _engine.forward(split, x)
    (a,) = acts
    check_activations(a)
    weight = _classifier_weight(classifier, split, a.shape[1])
    # topk ranks the model's scores; other forms are rows of the weight, range-checked against it.
    ranked = scores if isinstance(cls, _targets.TopK) else torch.zeros(x.shape[0], weight.shape[0])
    index, keep_k = _targets.class_indices(cls, ranked)
    index = index.to(a.device)
    per_class = weight.to(device=a.device, dtype=torch.float32)[index]  # (B, K, C)
    a = a.float()
    maps = torch.stack([finish(weighted_sum(a, per_class[:, k], eigen_smooth), relu=False,
                               normalize=normalize) for k in range(index.shape[1])], 1)
    return (maps if keep_k else maps[:, 0],), scores


@cam_method(syncs="checks on the host that the tail is a pooled linear map, without which its "
                  "formula gives a silently wrong map (unless classifier= is given)")
def cam(split: Split, x: Tensor, cls: _targets.Target, *, classifier: Any = None,
        normalize: bool = True, chunk_size: int | None = None,
        eigen_smooth: bool = False) -> Computed:
    r"""CAM: the feature maps weighted by the classifier's weights for the class.

    .. math:: L_c = \sum_k W_{ck} A_k

    for a model ending in global average pooling and a linear layer (or a 1x1
    conv), :math:`S_c = \sum_k W_{ck} \frac{1}{Z}\sum_{ij} A_k(i,j) + b_c`. No
    ReLU, as torchcam does. :math:`W_{ck}` is read as
    :math:`\sum_{ij} \partial S_c / \partial A_k(i,j)`, which is exact for such
    a tail and works for any ``cls`` form. A tail of another form raises a
    ``ValueError`` (checked eagerly, at the cost of one more head pass and
    five tail passes; skipped under ``torch.compile``). Where the weights cannot
    be read that way (a tail that ends in more than the linear layer), give
    ``classifier``: the ``nn.Linear`` or 1x1 convolution that reads the pooled
    activations, its name in ``split.model`` (as torchcam's ``fc_layer``), or its
    ``(num_classes, C)`` weight; then :math:`W_{ck}` is read from it, for class indices.

    Zhou et al., "Learning Deep Features for Discriminative Localization",
    CVPR 2016.

    Example:
        >>> s = camfunc.split(model, "layer4")            # layer4 -> avgpool -> fc
        >>> camfunc.cam(s, x, 3).shape
        torch.Size([2, 4, 4])
        >>> camfunc.cam(s, x, camfunc.topk(5)).shape
        torch.Size([2, 5, 4, 4])
        >>> torch.allclose(camfunc.cam(s, x, 3, classifier="fc"), camfunc.cam(s, x, 3))
        True
    """
    if classifier is not None:
        if split.num_layers > 1:
            raise ValueError("camfunc.cam takes a split at one layer: the one before the pooling")
        return _cam_from_classifier(split, x, cls, classifier, normalize=normalize,
                                    eigen_smooth=eigen_smooth)
    if not torch.compiler.is_dynamo_compiling():
        with torch.no_grad():
            _check_pooled_linear_tail(split, x)
    return gradient_cam(split, x, cls, _summed_gradient, normalize=normalize, chunk_size=chunk_size,
                        relu=False,
                        eigen_smooth=eigen_smooth)


@cam_method(draws=Draws("weights", "channel_weights"))
def randomcam(split: Split, x: Tensor, cls: _targets.Target = 0, *, weights: Tensor | None = None,
              generator: torch.Generator | None = None, normalize: bool = True,
              eigen_smooth: bool = False) -> Computed:
    r"""Random-CAM: channels weighted by uniform random numbers, the baseline of evaluations.

    .. math:: L = \mathrm{ReLU}\Big(\sum_k w_k A_k\Big), \quad w_k \sim U(-1, 1)

    A map that knows nothing about the class, to compare faithfulness metrics
    against (pytorch-grad-cam's ``RandomCAM``). ``weights`` (B, C) fixes the draw;
    otherwise it comes from ``generator``, eagerly (pass ``weights`` under
    ``torch.compile``). The map is repeated along the class axis ``cls`` asks for.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> camfunc.randomcam(s, x, generator=g).shape
        torch.Size([2, 4, 4])
        >>> camfunc.randomcam(s, x, weights=torch.rand(2, 16) * 2 - 1).shape    # (B, C) weights
        torch.Size([2, 4, 4])
    """

    def raw_map(a: Tensor) -> Tensor:
        w = weights
        if w is None:
            _draws.refuse_while_compiling("randomcam", "weights")
            w = _draws.draw(_draws.uniform_signed, tuple(a.shape[:2]), generator, a)
        if tuple(w.shape) != tuple(a.shape[:2]):
            raise ValueError(f"weights must be (B, C) = {tuple(a.shape[:2])}, got {tuple(w.shape)}")
        return weighted_sum(a, w.to(a), eigen_smooth)

    return activation_cam(split, x, cls, raw_map, normalize=normalize)
