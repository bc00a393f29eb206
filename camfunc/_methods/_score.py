"""Score-CAM and its smoothed and integrated variants: channels weighted by masked-input scores.

Each channel of ``A``, min-max normalised and upsampled to the input's size,
masks the input; the model's score for the class on that masked input,
softmaxed over channels, is the channel's weight. Follows torchcam 0.5.0's
conventions: logits (not probabilities) of the masked inputs, softmax over
channels, ReLU of the weighted sum of the raw activations.

Masked inputs are built ``batch_size`` at a time, never all at once. A channel
that is constant (its normalised mask is all zeros) masks every input to 0, so
all such channels share one score: eagerly they are answered by a single
forward pass of a zero input (skipped under ``torch.compile``, where shapes
cannot depend on values).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from camfunc._core import engine as _engine, ops as _ops, targets as _targets, validate as _validate
from camfunc._core.split import Split
from camfunc._methods._combine import Computed, check_activations, maps_from_class_weights
from camfunc._methods._method import Draws, cam_method
from camfunc._util import draws as _draws
from camfunc._util.host import reads_are_free

# A mask transform gets the upsampled masks of one chunk and the chunk's flat
# (sample * channel) indices, and returns the masks to multiply the input by.
MaskTransform = Callable[[Tensor, Tensor], Tensor]


def channel_masks(a: Tensor) -> Tensor:
    """Each channel min-max normalised over positions: ``(B, C, *sp)``, in [0, 1]."""
    return _ops.normalize(a, spatial_dims=a.ndim - 2)


def masked_scores(split: Split, x: Tensor, masks: Tensor, pick: _targets.Picker,
                  batch_size: int, transform: MaskTransform | None = None) -> Tensor:
    """Target scores of ``x`` masked by each channel: ``(B, C, *sp)`` masks -> ``(B, C, K)``.

    Runs the whole model on ``batch_size`` masked inputs at a time (whole image
    batches, at least one, for a plain callable target, which reads them as one).
    """
    batch, channels = masks.shape[:2]
    flat = masks.flatten(0, 1)  # (B*C, *sp)
    size = x.shape[2:]
    total = batch * channels
    todo = torch.arange(total, device=x.device)
    step = batch_size
    whole = getattr(pick, "whole_batches", False)
    if whole:  # a plain callable target: each pass holds whole image batches, channel by channel
        todo = todo.reshape(batch, channels).t().flatten()
        step = batch * max(1, batch_size // batch)
    shared = None
    # Skipping flat masks reads values: free on the CPU, a host-device sync elsewhere.
    if not whole and transform is None and reads_are_free(x):
        varying = flat.flatten(1).amax(1) > 0
        if not bool(varying.all()):
            todo = todo[varying]
            zero = _engine.forward(split, torch.zeros_like(x[:1]))[1]
            shared = (~varying, zero)
    parts = []
    for start in range(0, todo.numel(), step):
        flat_index = todo[start:start + step]
        rows = torch.div(flat_index, channels, rounding_mode="floor")
        up = _ops.upsample(flat[flat_index], size).unsqueeze(1).to(x.dtype)
        if transform is not None:
            up = transform(up, flat_index)
        out = _engine.forward(split, x[rows] * up)[1]
        parts.append(pick(out, rows, copies=flat_index.numel() // batch if whole else None).float())
    values = torch.cat(parts) if parts else None
    if whole and values is not None:  # back to sample-major order
        values = values[torch.argsort(todo)]
    if shared is not None:
        _constant, zero_out = shared
        rows = torch.div(torch.arange(total, device=x.device), channels, rounding_mode="floor")
        filled = pick(zero_out.expand(total, *zero_out.shape[1:]), rows).float()
        if values is not None:
            filled[todo] = values
        values = filled
    if values is None:
        raise ValueError(f"no masked input to score: the batch has {batch} samples and the "
                         f"layer {channels} channels")
    return values.reshape(batch, channels, -1)


def score_cam_from(split: Split, x: Tensor, cls: _targets.Target,
                   channel_scores: Callable[[int, Tensor, _targets.Picker], Tensor], *,
                   normalize: bool, eigen_smooth: bool = False) -> Computed:
    """Shared driver: ``channel_scores(layer, a, pick) -> (B, C, K)`` becomes softmax weights."""
    acts, scores = _engine.forward(split, x)
    pick, keep_k = _targets.picker(cls, scores, x.shape[0])
    maps = []
    for layer, a in enumerate(acts):
        check_activations(a)
        weights = torch.softmax(channel_scores(layer, a, pick), dim=1)  # (B, C, K)
        maps.append(maps_from_class_weights(a, weights, keep_k, normalize=normalize,
                                            eigen_smooth=eigen_smooth))
    return tuple(maps), scores


@cam_method()
def scorecam(split: Split, x: Tensor, cls: _targets.Target, *, batch_size: int = 32,
             normalize: bool = True,
             eigen_smooth: bool = False) -> Computed:
    r"""Score-CAM: each channel weighted by the score of the input it masks.

    .. math:: w_k = \mathrm{softmax}_k\big(Y^c(X \odot M_k) - Y^c(X)\big), \quad
              L = \mathrm{ReLU}\Big(\sum_k w_k A_k\Big)

    with :math:`M_k` the channel min-max normalised and upsampled to the input
    size, and :math:`Y^c` the logit (the baseline :math:`Y^c(X)` cancels in the
    softmax). C masked forwards per image, ``batch_size`` at a time; constant
    channels share one forward.

    Wang et al., "Score-CAM: Score-Weighted Visual Explanations for
    Convolutional Neural Networks", CVPR Workshops 2020.

    Example:
        >>> s = camfunc.split(model, "layer4")            # 16 channels: 16 masked inputs per image
        >>> camfunc.scorecam(s, x, 3, batch_size=8).shape
        torch.Size([2, 4, 4])
        >>> camfunc.scorecam(s, x, camfunc.topk(2)).shape
        torch.Size([2, 2, 4, 4])
    """
    _validate.check_count(batch_size, "batch_size")

    def channel_scores(layer: int, a: Tensor, pick: _targets.Picker) -> Tensor:
        return masked_scores(split, x, channel_masks(a), pick, batch_size)

    return score_cam_from(split, x, cls, channel_scores, normalize=normalize, eigen_smooth=eigen_smooth)


@cam_method()
def iscam(split: Split, x: Tensor, cls: _targets.Target, *, num_samples: int = 10,
          batch_size: int = 32, normalize: bool = True,
          eigen_smooth: bool = False) -> Computed:
    r"""IS-CAM: Score-CAM with scores averaged along a path of growing masks.

    .. math:: w_k = \mathrm{softmax}_k\Big(\frac{1}{N}\sum_{i=1}^N
              Y^c\big(X \odot (\textstyle\sum_{j=1}^{i} \frac{j}{N}) M_k\big) - Y^c(X)\Big)

    The cumulative coefficients are torchcam 0.5.0's. ``N * C`` masked forwards per image.

    Naidu et al., "IS-CAM: Integrated Score-CAM for axiomatic-based
    explanations", arXiv:2010.03023, 2020.

    Example:
        >>> s = camfunc.split(model, "layer4")
        >>> camfunc.iscam(s, x, [1, 2], num_samples=2).shape     # one class per image
        torch.Size([2, 4, 4])
    """
    _validate.check_count(batch_size, "batch_size")
    _validate.check_count(num_samples, "num_samples")

    def channel_scores(layer: int, a: Tensor, pick: _targets.Picker) -> Tensor:
        masks = channel_masks(a)
        coefficient = 1 / num_samples
        total = masked_scores(split, x, coefficient * masks, pick, batch_size)
        for i in range(1, num_samples):
            coefficient += (i + 1) / num_samples
            total = total + masked_scores(split, x, coefficient * masks, pick, batch_size)
        return total / num_samples

    return score_cam_from(split, x, cls, channel_scores, normalize=normalize, eigen_smooth=eigen_smooth)


@cam_method(draws=Draws("noise", "layer_noise"))
def sscam(split: Split, x: Tensor, cls: _targets.Target, *, num_samples: int = 35,
          std: float = 2.0, noise: Tensor | None = None, generator: torch.Generator | None = None,
          batch_size: int = 32, normalize: bool = True,
          eigen_smooth: bool = False) -> Computed:
    r"""SS-CAM: Score-CAM with scores averaged over noisy masks.

    .. math:: w_k = \mathrm{softmax}_k\Big(\frac{1}{N}\sum_{i=1}^N
              Y^c\big(X \odot (M_k + \delta_i)\big) - Y^c(X)\Big), \quad
              \delta_i \sim \mathcal N(0, \sigma^2)

    The noise is added to the upsampled mask, at the input's resolution, as
    torchcam 0.5.0 does. It is drawn chunk by chunk from ``generator``
    (eagerly), or given as ``noise``, standard-normal draws of shape
    ``(num_samples, B, C, *input_spatial)`` scaled by ``std`` (needed under
    ``torch.compile``; large). ``N * C`` masked forwards per image.

    Wang et al., "SS-CAM: Smoothed Score-CAM for Sharper Visual Feature
    Localization", arXiv:2006.14255, 2020.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> camfunc.sscam(s, x, 3, num_samples=2, generator=g).shape
        torch.Size([2, 4, 4])
        >>> torch.allclose(camfunc.sscam(s, x, 3, num_samples=1, std=0.0), camfunc.scorecam(s, x, 3))
        True
    """
    _validate.check_count(batch_size, "batch_size")
    _validate.check_count(num_samples, "num_samples")
    if noise is None:
        _draws.refuse_while_compiling("sscam", "noise")

    def channel_scores(layer: int, a: Tensor, pick: _targets.Picker) -> Tensor:
        masks = channel_masks(a)
        if noise is not None:
            expected = (num_samples, *a.shape[:2], *x.shape[2:])
            if tuple(noise.shape) != expected:
                raise ValueError(f"noise must have shape {expected}, got {tuple(noise.shape)}")

        def noisy_scores(i: int) -> Tensor:
            def add_noise(up: Tensor, flat_index: Tensor, i: int = i) -> Tensor:
                if noise is not None:
                    draw = noise[i].flatten(0, 1)[flat_index].unsqueeze(1)
                else:
                    draw = _draws.draw(torch.randn, tuple(up.shape), generator, up)
                return up + std * draw.to(up)
            return masked_scores(split, x, masks, pick, batch_size, transform=add_noise)

        total = noisy_scores(0)
        for i in range(1, num_samples):
            total = total + noisy_scores(i)
        return total / num_samples

    return score_cam_from(split, x, cls, channel_scores, normalize=normalize, eigen_smooth=eigen_smooth)
