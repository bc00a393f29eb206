"""Model-randomisation sanity check: do the maps change when the model's weights do?

Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018, Section 3.
Layers are re-initialised in a cascade from the output down, in a deep copy of
the model; after each step the maps are recomputed and compared with the
original ones by rank correlation and structural similarity.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from camfunc._core import ops as _ops
from camfunc._core.splitter import layer_name, split as split_model
from camfunc._methods import METHODS
from camfunc._util import draws as _draws
from camfunc._util.gaussian import sampled_gaussian, separable_filter
from camfunc.metrics import _inputs
from camfunc.metrics._inputs import Classes

#: SSIM's window (Wang et al. 2004): 11 samples of a Gaussian with sigma 1.5.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


class Randomisation(NamedTuple):
    """One row per cascade step; step 0 is the unchanged model."""

    #: step s: the modules re-initialised so far, in the order they were (step 0: none).
    reinitialised: tuple[tuple[str, ...], ...]
    #: ``(S + 1, B)`` Spearman rank correlation with the original maps.
    spearman: Tensor
    #: ``(S + 1, B)`` the same on absolute values.
    spearman_abs: Tensor
    #: ``(S + 1, B)`` SSIM with the original maps, each min-max normalised.
    ssim: Tensor
    #: ``(S + 1, B, *map_spatial)`` the maps at each step, as the method returned them.
    maps: Tensor
    #: ``(B,)`` the class explained, fixed on the original model.
    classes: Tensor


def _paired(a: Any, b: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError(f"expected two tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(
            f"expected two batches of maps of the same shape (B, *spatial), got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    return a.detach().double(), b.detach().double()


def average_ranks(values: Tensor) -> Tensor:
    """Ranks 1..N along the last axis of ``(B, N)``; tied values share their mean rank."""
    ordered, order = values.sort(dim=1, stable=True)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = starts.long().cumsum(1) - 1
    positions = torch.arange(1, values.shape[1] + 1, dtype=torch.float64, device=values.device)
    positions = positions.expand_as(ordered)
    totals = torch.zeros_like(positions).scatter_add(1, group, positions)
    counts = torch.zeros_like(positions).scatter_add(1, group, torch.ones_like(positions))
    mean_rank = (totals / counts.clamp_min(1)).gather(1, group)
    return torch.empty_like(mean_rank).scatter(1, order, mean_rank)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    r"""Spearman rank correlation of each pair of maps, ``(B,)``.

    .. math:: \rho = \frac{\sum_k (r_k - \bar r)(s_k - \bar s)}
              {\sqrt{\sum_k (r_k - \bar r)^2 \sum_k (s_k - \bar s)^2}}

    with :math:`r, s` the ranks of the flattened maps' values, ties given their
    average rank (as ``scipy.stats.spearmanr``). NaN where a map is constant.

    Spearman, "The proof and measurement of association between two things",
    Am. J. Psychol. 1904; used on saliency maps by Adebayo et al., NeurIPS 2018.

    Example:
        >>> a = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
        >>> camfunc.metrics.spearman(a, a.exp()), camfunc.metrics.spearman(a, -a)   # only ranks count
        (tensor([1.]), tensor([-1.]))
    """
    a, b = _paired(a, b)
    ranks_a = average_ranks(a.flatten(1))
    ranks_b = average_ranks(b.flatten(1))
    ranks_a = ranks_a - ranks_a.mean(1, keepdim=True)
    ranks_b = ranks_b - ranks_b.mean(1, keepdim=True)
    scale = (ranks_a.square().sum(1) * ranks_b.square().sum(1)).sqrt()
    rho = (ranks_a * ranks_b).sum(1) / scale.where(scale > 0, 1.0)
    return rho.where(scale > 0, math.nan).float()


def ssim(a: Tensor, b: Tensor, *, window_size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA,
         data_range: float = 1.0) -> Tensor:
    r"""Structural similarity of each pair of maps, ``(B,)``.

    .. math:: \mathrm{SSIM} = \operatorname{mean}_{p}
              \frac{(2\mu_a\mu_b + C_1)(2\sigma_{ab} + C_2)}
                   {(\mu_a^2 + \mu_b^2 + C_1)(\sigma_a^2 + \sigma_b^2 + C_2)}

    with local means, variances and covariance weighted by a Gaussian window
    (11 samples, sigma 1.5, normalised) at every position p where the window
    fits, :math:`C_1 = (0.01 L)^2`, :math:`C_2 = (0.03 L)^2` and L the
    ``data_range``. Maps are ``(B, *spatial)`` with 1 to 3 spatial axes.

    Wang et al., "Image Quality Assessment: From Error Visibility to Structural
    Similarity", IEEE TIP 2004.

    Example:
        >>> a = camfunc.normalize(torch.rand(2, 16, 16))
        >>> camfunc.metrics.ssim(a, a)
        tensor([1., 1.])
    """
    a, b = _paired(a, b)
    if not isinstance(window_size, int) or window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"window_size must be a positive odd int, got {window_size!r}")
    if not sigma > 0 or not data_range > 0:
        raise ValueError(f"sigma and data_range must be positive, got {sigma!r} and {data_range!r}")
    if a.ndim > 4 or min(a.shape[1:]) < window_size:
        raise ValueError(
            f"SSIM needs maps (B, *spatial) with 1 to 3 spatial axes of at least window_size="
            f"{window_size} pixels, got shape {tuple(a.shape)}; upsample them or pass a smaller window"
        )
    kernel = sampled_gaussian(window_size, sigma)

    def local_mean(t: Tensor) -> Tensor:
        return separable_filter(t.unsqueeze(1), kernel, padding=0).squeeze(1)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mean_a, mean_b = local_mean(a), local_mean(b)
    var_a = local_mean(a * a) - mean_a ** 2
    var_b = local_mean(b * b) - mean_b ** 2
    cov = local_mean(a * b) - mean_a * mean_b
    index = ((2 * mean_a * mean_b + c1) * (2 * cov + c2)
             / ((mean_a ** 2 + mean_b ** 2 + c1) * (var_a + var_b + c2)))
    return index.flatten(1).mean(1).float()


def cascade_order(model: nn.Module) -> list[str]:
    """Modules that own floating parameters, output first: the reverse of their
    registration order (execution order for ``nn.Sequential`` and torchvision's models).
    The root is named ``""`` when it owns parameters itself."""
    owners = [name for name, module in model.named_modules()
              if any(p.is_floating_point() for p in module.parameters(recurse=False))]
    return owners[::-1]


def reinitialise(module: nn.Module, generator: torch.Generator | None) -> None:
    r"""Redraws a module's own parameters in place, :math:`U(-1/\sqrt{n}, 1/\sqrt{n})`
    with n the fan-in of its weight (PyTorch's default bound for linear and conv
    layers); n = 1 for modules with no weight of 2 or more axes (norm layers).
    For the deep copy only; draws from ``generator``, not the global RNG when given."""
    params = [p for p in module.parameters(recurse=False) if p.is_floating_point()]
    weight_fan_in = next((p[0].numel() for p in params if p.ndim >= 2), 1)
    with torch.no_grad():
        for p in params:
            bound = 1 / math.sqrt(p[0].numel() if p.ndim >= 2 else weight_fan_in)
            draw = _draws.draw(torch.rand, tuple(p.shape), generator, p, torch.float32)
            p.copy_((draw * 2 - 1) * bound)


def _method_of(method: Any) -> Callable[..., Any]:
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
        return METHODS[method]
    if not callable(method):
        raise TypeError(f"method must be a camfunc method or its name, got {type(method).__name__}")
    given: Callable[..., Any] = method
    return given


def _cascade(model: nn.Module, modules: Sequence[str] | None, steps: int | None) -> list[str]:
    order = cascade_order(model)
    if modules is not None:
        if isinstance(modules, str) or not all(isinstance(m, str) for m in modules):
            raise TypeError("modules must be a sequence of module names, output side first")
        unknown = [m for m in modules if m not in order]
        if unknown:
            raise ValueError(
                f"modules {unknown} are not modules of the model that own parameters; "
                f"choose from {order}"
            )
        if len(set(modules)) != len(modules):
            raise ValueError(f"modules {list(modules)} name a module twice")
        order = list(modules)
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= len(order):
            raise ValueError(f"steps must be an int from 0 to {len(order)}, got {steps!r}")
        order = order[:steps]
    return order


def _maps(method: Callable[..., Any], model: nn.Module, layer: str, x: Tensor,
          classes: Tensor) -> Tensor:
    maps = method(split_model(model, layer), x, classes)
    if not isinstance(maps, Tensor) or maps.shape[0] != x.shape[0] or maps.ndim != x.ndim - 1:
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(
            f"the method must return one map per image, (B, *spatial), got {shape}; "
            "use a single layer and a method that takes (split, x, cls)"
        )
    return maps.detach().float()


def _window_for(size: Sequence[int]) -> int:
    """SSIM's 11-sample window, or the largest odd one that fits a smaller map."""
    smallest = min(size)
    return min(SSIM_WINDOW, smallest if smallest % 2 else smallest - 1)


def model_randomisation(model: nn.Module, layer: str | nn.Module, method: Any, x: Tensor,
                        cls: Classes = None, *, generator: torch.Generator | None = None,
                        steps: int | None = None,
                        modules: Sequence[str] | None = None) -> Randomisation:
    r"""Cascading model randomisation: re-initialise the model's layers from the output
    down, one more at each step, and compare each step's maps with the original ones.

    .. math:: \rho_s = \mathrm{Spearman}(M_0, M_s), \quad
              \rho^{|\cdot|}_s = \mathrm{Spearman}(|M_0|, |M_s|), \quad
              \mathrm{SSIM}_s = \mathrm{SSIM}(\hat M_0, \hat M_s)

    with :math:`M_s` the maps after the top s modules are re-initialised,
    resized to the input (bilinear) before comparing, and :math:`\hat M` min-max
    normalised (SSIM's data range 1; 11-sample Gaussian window, shrunk to fit
    inputs under 11 pixels). A method whose maps survive randomisation explains
    the input, not the model. Modules are those owning floating parameters, in
    reverse registration order (or ``modules``, output side first); each is
    redrawn as :func:`reinitialise` says, from ``generator``; buffers (batch
    norm's statistics) are kept. The user's model is never changed: each step
    edits one deep copy and splits it at ``layer`` again. The class is fixed on
    the original model (``cls``, or each image's top class).

    Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018.

    Args:
        model: an ``nn.Module`` in eval mode that ``camfunc.split`` can cut at ``layer``.
        layer: the layer's name, or the module itself.
        method: a function ``(split, x, cls) -> maps`` (a camfunc method, or a
            ``functools.partial`` of one with fixed noise) or a name in ``camfunc.METHODS``.
        steps: how many modules to re-initialise (default: all).
        modules: the modules to re-initialise, in order (default: all, output first).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> table = camfunc.metrics.model_randomisation(model, "layer4", "gradcam", x, 3, generator=g, steps=2)
        >>> table.reinitialised[-1], table.spearman.shape       # the modules redrawn at each step
        (('fc', 'layer4.1'), torch.Size([3, 2]))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be an nn.Module (its weights are re-initialised in a copy), "
            f"got {type(model).__name__}"
        )
    _inputs.check_model_and_images(model, x)
    _inputs.check_classes(cls, x.shape[0])
    method = _method_of(method)
    layer = layer_name(model, layer)
    order = _cascade(model, modules, steps)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")

    classes = _inputs.chosen_classes(cls, _inputs.model_scores(model, x, probabilities=False))
    per_step = [_maps(method, model, layer, x, classes)]
    randomised = copy.deepcopy(model)
    owners = dict(randomised.named_modules())
    for name in order:
        reinitialise(owners[name], generator)
        per_step.append(_maps(method, randomised, layer, x, classes))

    size = tuple(x.shape[2:])
    original = _ops.upsample(per_step[0], size)
    rows = []
    for maps in per_step:
        resized = _ops.upsample(maps, size)
        rows.append((spearman(original, resized), spearman(original.abs(), resized.abs()),
                     ssim(_ops.normalize(original), _ops.normalize(resized),
                          window_size=_window_for(size))))
    spearmans, spearmans_abs, ssims = (torch.stack(column) for column in zip(*rows, strict=True))
    reinitialised = tuple(tuple(order[:s]) for s in range(len(order) + 1))
    return Randomisation(reinitialised, spearmans, spearmans_abs, ssims, torch.stack(per_step), classes)
