"""Infidelity and max-sensitivity (Yeh et al., NeurIPS 2019) for class activation maps.

The attribution of a map ``M`` (any resolution) is ``Phi[b, c, *s] =
upsample(M)[b, *s]``: upsampled to the input and the same for every channel,
not multiplied by the input. CAMs are local explanations (captum lists
Grad-CAM among them), which is captum's ``multiply_by_inputs=False`` case:
the perturbation enters as ``I``, not ``I / x``.

Perturbations are drawn one ``(B, *x.shape[1:])`` block per sample index, in
order, from ``generator`` (so the draws do not depend on ``batch_size``), or
given whole; the model, or the method, sees ``batch_size`` rows at a time.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from camfunc._core import targets as _targets
from camfunc._core.validate import check_count
from camfunc.metrics import _inputs, _model_calls

__all__ = ["infidelity", "sensitivity_max"]


def _sample_count(n_perturb_samples: int | None, perturbations: Tensor | None) -> int:
    if n_perturb_samples is None:
        return perturbations.shape[0] if isinstance(perturbations, Tensor) else 10
    check_count(n_perturb_samples, "n_perturb_samples")
    return n_perturb_samples


def infidelity(model: Any, x: Tensor, maps: Tensor, cls: _targets.Target | None = None, *,
               n_perturb_samples: int | None = None, std: float = 0.2,
               perturbations: Tensor | None = None, generator: torch.Generator | None = None,
               normalize: bool = True, batch_size: int = 32) -> Tensor:
    r"""Infidelity: how far the map's linear prediction misses the score change, ``(B,)``.

    .. math:: \mathrm{INFD} = \frac{1}{N}\sum_{n=1}^N \big(\beta\, I_n^\top \Phi
              - (f_c(x) - f_c(x - I_n))\big)^2, \qquad
              \beta = \frac{\sum_n I_n^\top \Phi\, (f_c(x) - f_c(x - I_n))}{\sum_n (I_n^\top \Phi)^2}

    with :math:`\Phi` the map upsampled to the input and repeated over
    channels (not multiplied by the input), :math:`f_c` the target score
    (``cls`` as for the methods; ``None``: each image's top class) and
    :math:`I_n \sim \mathcal N(0, \mathrm{std}^2)` (the paper's code uses 0.2),
    or ``perturbations`` ``(N, B, *x.shape[1:])`` given. ``normalize=True``
    fits the scale :math:`\beta` (the paper's code does, so the value does not
    depend on the map's arbitrary scale); ``normalize=False`` uses
    :math:`\beta = 1`. Equals ``captum.metrics.infidelity`` with the same
    perturbations and attributions; captum's default is ``normalize=False``.
    Lower is better.

    Yeh et al., "On the (In)fidelity and Sensitivity of Explanations", NeurIPS 2019.

    Example:
        >>> cams = camfunc.gradcam(s, x, 3)
        >>> g = torch.Generator().manual_seed(0)
        >>> camfunc.metrics.infidelity(s, x, cams, 3, n_perturb_samples=8, generator=g).shape
        torch.Size([2])
    """
    _model_calls.checked(model, x, batch_size)
    _model_calls.check_non_negative(std, "std")
    phi = _inputs.input_maps(maps, x).unsqueeze(1)  # (B, 1, *spatial), broadcast over channels
    count = _sample_count(n_perturb_samples, perturbations)
    draw = _model_calls.per_sample_draws(
        "perturbations", perturbations, count, x, generator,
        lambda device: std * torch.randn(x.shape, generator=generator, device=device))
    target, clean = _model_calls.fix_target(model, x, cls)
    rows = torch.arange(x.shape[0], device=x.device)
    dots = []

    def perturbed() -> Iterator[tuple[Tensor, Tensor]]:
        for n in range(count):
            step = draw(n)
            dots.append((step.float() * phi).flatten(1).sum(1))
            yield x - step, rows

    after = _model_calls.stream_values(model, target, perturbed(), batch_size).reshape(count, -1)
    predicted = torch.stack(dots).double()
    change = (clean - after).double()
    if normalize:
        denominator = predicted.square().sum(0)
        beta = (predicted * change).sum(0) / torch.where(denominator == 0, 1.0, denominator)
        predicted = beta * predicted
    return (predicted - change).square().mean(0).float()


def _norm_order(norm_ord: Any) -> float:
    if norm_ord == "fro":
        return 2.0
    if isinstance(norm_ord, numbers.Real) and not isinstance(norm_ord, bool) \
            and float(norm_ord) > 0:
        return float(norm_ord)
    raise ValueError(f"norm_ord must be 'fro' or a positive number (math.inf too), got {norm_ord!r}")


def sensitivity_max(method: _model_calls.Method, split: Any, x: Tensor,
                    cls: _targets.Target | None = None, *,
                    radius: float = 0.02, n_perturb_samples: int | None = None,
                    perturbations: Tensor | None = None, generator: torch.Generator | None = None,
                    norm_ord: float | str = "fro", batch_size: int = 32) -> Tensor:
    r"""Max-sensitivity: the largest relative change of the map under small input noise, ``(B,)``.

    .. math:: \mathrm{SENS}_{\max} = \max_{n} \frac{\lVert \Phi(x + \delta_n) - \Phi(x) \rVert}
              {\lVert \Phi(x) \rVert}, \qquad \delta_n \sim \mathcal U[-r, r]^{d}

    with :math:`\Phi` the ``method``'s map upsampled to the input (repeating
    it over channels, as :func:`infidelity` does, scales both norms alike),
    the class fixed on the clean input (``None``: its top class), :math:`\lVert\cdot\rVert` the
    ``norm_ord`` vector norm of the flattened map ("fro": 2), and a zero
    denominator read as 1. ``perturbations`` ``(N, B, *x.shape[1:])`` gives
    the :math:`\delta_n`; otherwise they are drawn uniform in the
    :math:`L_\infty` ball of radius ``radius`` (captum's default sampler).
    Equals ``captum.metrics.sensitivity_max`` with the same perturbations.
    Lower is better.

    Yeh et al., "On the (In)fidelity and Sensitivity of Explanations", NeurIPS 2019.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> sens = camfunc.metrics.sensitivity_max(camfunc.gradcam, s, x, 3, n_perturb_samples=4, generator=g)
        >>> sens.shape
        torch.Size([2])
    """
    _model_calls.checked(split, x, batch_size)
    _model_calls.check_non_negative(radius, "radius")
    order = _norm_order(norm_ord)
    count = _sample_count(n_perturb_samples, perturbations)
    draw = _model_calls.per_sample_draws(
        "perturbations", perturbations, count, x, generator,
        lambda device: torch.empty(x.shape, device=device).uniform_(-radius, radius, generator=generator))
    target, _ = _model_calls.fix_target(split, x, cls)
    rows = torch.arange(x.shape[0], device=x.device)
    base = _model_calls.method_maps(method, split, x, target.for_rows(rows)).flatten(1)
    base_norm = torch.linalg.vector_norm(base, ord=order, dim=1)
    base_norm = torch.where(base_norm == 0, 1.0, base_norm)
    blocks = ((x + draw(n), rows) for n in range(count))
    ratios = []
    for xs, sample in _model_calls.rebatch(blocks, batch_size):
        maps = _model_calls.method_maps(method, split, xs, target.for_rows(sample)).flatten(1)
        change = torch.linalg.vector_norm(maps - base[sample], ord=order, dim=1)
        ratios.append(change / base_norm[sample])
    return torch.cat(ratios).reshape(count, -1).amax(0)

