"""Explanation properties: each checks one method on one case and raises a readable
``AssertionError`` when the property fails.

A method is any callable ``method(split, x, cls, **options)`` returning maps
``(B, *spatial)`` or ``(B, K, *spatial)``, as camfunc's methods do.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from hypothesis import reject, strategies as st
from hypothesis.control import currently_in_test_context
from torch import Tensor, nn

from camfunc import TopK
from camfunc.metrics import spearman
from camfunc.testing._cases import Case, KitNet, TokenNet, randomised as redraw

Method = Callable[..., Any]
Property = Callable[..., None]

ATOL, RTOL = 1e-5, 1e-4  # float32 maps computed in two batch shapes or kernel orders


def _call(method: Method, case: Case, x: Tensor, cls: Any, **options: Any) -> Tensor:
    """The method's maps, with a fresh seeded generator for methods that take one and are
    not handed their random numbers."""
    if "generator" in inspect.signature(method).parameters and "generator" not in options:
        options = {**options, "generator": torch.Generator().manual_seed(0)}
    maps = method(case.split, x, cls, **options)
    if not isinstance(maps, Tensor):
        raise AssertionError(f"{_name(method)} returned {type(maps).__name__}, not a tensor of maps")
    return maps


def _activations(case: Case, x: Tensor) -> Tensor:
    with torch.no_grad():
        carry = case.split.head(x)
    first: Tensor = carry[0] if isinstance(carry, tuple) else carry
    return first


def _with_draws(method: Method, case: Case, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` plus seeded random numbers for a method that says what it draws
    (camfunc's ``method.draws``), so that the calls a property compares see the same ones."""
    spec = getattr(method, "draws", None)
    if spec is None or spec.keyword in options:
        return options
    channels = _activations(case, case.x).shape[1] if spec.per_channel else 0
    drawn = spec.options(spec.sample(case.x.shape, channels, 2, torch.Generator().manual_seed(0)), 2)
    return {**drawn, **options}


def _moved_draws(method: Method, options: dict[str, Any], move: Callable[[Tensor, str], Tensor]) -> dict[str, Any]:
    """``options`` with the method's drawn numbers passed through ``move(value, kind)``."""
    spec = getattr(method, "draws", None)
    if spec is None or spec.keyword not in options:
        return options
    return {**options, spec.keyword: move(options[spec.keyword], spec.kind)}


def _name(method: Method) -> str:
    return getattr(method, "__name__", repr(method))


def _close(got: Tensor, want: Tensor, what: str, method: Method, case: Case,
           atol: float = ATOL, rtol: float = RTOL) -> None:
    if got.shape != want.shape:
        raise AssertionError(f"{_name(method)}: {what}: shape {tuple(got.shape)}, expected "
                             f"{tuple(want.shape)}\n  on {case!r}")
    if not torch.allclose(got, want, atol=atol, rtol=rtol, equal_nan=True):
        worst = (got - want).abs().nan_to_num(float("inf")).max().item()
        raise AssertionError(f"{_name(method)}: {what}: maps differ by up to {worst:.3g} "
                             f"(tolerance {atol} + {rtol} x |value|)\n  on {case!r}")


def _sample_target(cls: Any, i: int) -> Any:
    if (isinstance(cls, Tensor) and cls.ndim >= 1) or isinstance(cls, (list, tuple)):
        return cls[i:i + 1]  # one class per sample (or a row of classes per sample)
    return cls


def batch_independent(method: Method, case: Case, **options: Any) -> None:
    """A sample's map does not depend on the rest of the batch: each sample alone gives
    the row it got in the batch.

    Example:
        >>> case = camfunc.testing.Case.of(model, "layer4", x, 3)
        >>> camfunc.testing.batch_independent(camfunc.gradcam, case)   # holds: returns None
    """
    options = _with_draws(method, case, options)
    together = _call(method, case, case.x, case.cls, **options)
    for i in range(case.x.shape[0]):
        def own(value: Tensor, kind: str, i: int = i) -> Tensor:  # the sample's share of the draws
            return value[i:i + 1] if kind == "channel_weights" else value[:, i:i + 1]

        alone = _call(method, case, case.x[i:i + 1], _sample_target(case.cls, i),
                      **_moved_draws(method, options, own))
        _close(together[i:i + 1], alone, f"sample {i} alone vs in its batch", method, case)


def class_axis_consistent(method: Method, case: Case, *, classes: Tensor | None = None,
                          **options: Any) -> None:
    """``(B, K)`` classes give, at ``[:, j]``, the maps of a call for column ``j`` alone:
    the class axis follows the classes asked for, in their order. ``classes`` (default:
    up to three distinct classes per sample, in orders that differ between samples) are
    the ``(B, K)`` classes to ask for.

    Example:
        >>> case = camfunc.testing.Case.of(model, "layer4", x, 3)
        >>> camfunc.testing.class_axis_consistent(camfunc.gradcam, case)
    """
    options = _with_draws(method, case, options)
    if classes is None:
        with torch.no_grad():
            count = case.split(case.x).shape[1]
        k = min(3, count)
        rows = [(torch.arange(k) + i) % count for i in range(case.x.shape[0])]
        classes = torch.stack([row.flip(0) if i % 2 else row for i, row in enumerate(rows)])
    many = classes
    k = many.shape[1]
    together = _call(method, case, case.x, many, **options)
    if together.shape[:2] != many.shape:
        raise AssertionError(f"{_name(method)}: (B, K) classes {tuple(many.shape)} gave maps "
                             f"{tuple(together.shape)}, not (B, K, ...)\n  on {case!r}")
    for j in range(k):
        alone = _call(method, case, case.x, many[:, j], **options)
        _close(together[:, j], alone, f"class column {j} ({many[:, j].tolist()}) vs its own call",
               method, case)


def deterministic(method: Method, case: Case, **options: Any) -> None:
    """The same inputs (and a generator seeded alike) give the same maps, bit for bit.

    Example:
        >>> case = camfunc.testing.Case.of(model, "layer4", x, 3)
        >>> camfunc.testing.deterministic(camfunc.gradcam, case)
    """
    options = _with_draws(method, case, options)
    first = _call(method, case, case.x, case.cls, **options)
    again = _call(method, case, case.x, case.cls, **options)
    if not torch.equal(first.nan_to_num(-1.0), again.nan_to_num(-1.0)):
        raise AssertionError(f"{_name(method)}: two identical calls differ by up to "
                             f"{(first - again).abs().max().item():.3g}\n  on {case!r}")


def unit_range(method: Method, case: Case, **options: Any) -> None:
    """Normalised maps are finite and in [0, 1].

    Example:
        >>> case = camfunc.testing.Case.of(model, "layer4", x, 3)
        >>> camfunc.testing.unit_range(camfunc.gradcam, case)
    """
    maps = _call(method, case, case.x, case.cls, **_with_draws(method, case, options))
    if not torch.isfinite(maps).all():
        raise AssertionError(f"{_name(method)}: maps hold NaN or Inf for a finite input\n  on {case!r}")
    low, high = maps.min().item(), maps.max().item()
    if low < 0 or high > 1:
        raise AssertionError(f"{_name(method)}: normalised maps span [{low:.3g}, {high:.3g}], "
                             f"not [0, 1]\n  on {case!r}")


def logit_scale_invariant(method: Method, case: Case, *, scale: float = 3.0, **options: Any) -> None:
    """Multiplying the model's outputs by ``scale > 0`` leaves normalised maps unchanged
    (with the same classes: a ``topk`` target is fixed on the unscaled scores).

    Example:
        >>> case = camfunc.testing.Case.of(model, "layer4", x, 3)
        >>> camfunc.testing.logit_scale_invariant(camfunc.gradcam, case)
    """
    tail = case.split.tail

    def scaled_tail(*carry: Any) -> Any:
        return scale * tail(*carry)

    cls = case.cls
    if isinstance(cls, TopK):
        cls = case.split(case.x).topk(cls.k, dim=1).indices
    scaled = dataclasses.replace(case, split=dataclasses.replace(case.split, tail=scaled_tail))
    options = _with_draws(method, case, options)
    plain = _call(method, case, case.x, cls, **options)
    got = _call(method, scaled, case.x, cls, **options)
    _close(got, plain, f"outputs scaled by {scale}", method, case, atol=1e-4, rtol=1e-3)


def compile_equivalent(method: Method, case: Case, **options: Any) -> None:
    """``torch.compile(method, fullgraph=True)`` (backend ``aot_eager``) gives the eager maps.

    Example:
        >>> case = camfunc.testing.Case.of(model, "layer4", x, 3)
        >>> camfunc.testing.compile_equivalent(camfunc.gradcam, case)
    """
    compiled = torch.compile(method, backend="aot_eager", fullgraph=True)
    options = _with_draws(method, case, options)
    eager = _call(method, case, case.x, case.cls, **options)
    got = _call(compiled, case, case.x, case.cls, **options)
    _close(got, eager, "compiled vs eager", method, case)


def _one_layer(case: Case, name: str) -> None:
    if case.split.num_layers != 1:
        raise ValueError(f"{name} takes a split at one layer, got {case.split.num_layers} layers")


def channel_permutation_invariant(method: Method, case: Case, *, seed: int = 0, **options: Any) -> None:
    """Permuting the cut layer's channels, with the next layer's weights permuted to
    match (the same function), permutes nothing in the map: a CAM may not depend on the
    order in which a network happens to store its channels.

    The permuted split is ``head' = P head``, ``tail' = tail P^-1``, with ``P`` a seeded
    permutation of the channel axis; drawn channel weights and layer noise are permuted
    with it.

    Example:
        >>> case = camfunc.testing.Case.of(model, "layer4", x, 3)
        >>> camfunc.testing.channel_permutation_invariant(camfunc.gradcam, case)
    """
    _one_layer(case, "channel_permutation_invariant")
    channels = _activations(case, case.x).shape[1]
    order = torch.randperm(channels, generator=torch.Generator().manual_seed(seed))
    if channels > 1 and torch.equal(order, torch.arange(channels)):
        order = order.roll(1)  # a permutation that moves every channel
    undo = order.argsort()
    head, tail = case.split.head, case.split.tail

    def permuted_head(x: Tensor) -> Any:
        carry = head(x)
        if isinstance(carry, tuple):
            return (carry[0].index_select(1, order), *carry[1:])
        return carry.index_select(1, order)

    def permuted_tail(a: Tensor, *context: Any) -> Any:
        return tail(a.index_select(1, undo), *context)

    def permuted(value: Tensor, kind: str) -> Tensor:
        return value if kind == "input" else value.index_select(1 if kind == "channel_weights" else 2, order)

    options = _with_draws(method, case, options)
    shuffled = dataclasses.replace(case, split=dataclasses.replace(case.split, head=permuted_head,
                                                                   tail=permuted_tail))
    want = _call(method, case, case.x, case.cls, **options)
    got = _call(method, shuffled, case.x, case.cls, **_moved_draws(method, options, permuted))
    _close(got, want, f"channels permuted as {order.tolist()}", method, case)


def implementation_invariant(method: Method, case: Case, *, twin: nn.Module | None = None,
                             **options: Any) -> None:
    """Two functionally equal models give the same map (Sundararajan et al., "Axiomatic
    Attribution for Deep Networks", ICML 2017, state it for attributions to the input).

    ``twin`` computes what ``case.model`` computes, built otherwise, with a layer of the
    same name whose output is the same; kit models make their own (:meth:`KitNet.twin`:
    batch norm folded, activations written out, the linear layer before the pooling).

    Example:
        >>> net = camfunc.testing.KitNet(2, 4, 3, skip=True, batchnorm=True, deep_tail=False,
        ...                              activation="relu", inplace=False, seed=0)
        >>> case = camfunc.testing.Case.of(net, "body", torch.randn(2, 2, 5, 5), 1)
        >>> camfunc.testing.implementation_invariant(camfunc.gradcam, case, twin=net.twin())
    """
    if twin is None:
        make = getattr(case.model, "twin", None)
        if make is None:
            raise ValueError(f"implementation_invariant needs twin=, a model that computes what "
                             f"{type(case.model).__name__} computes, built otherwise")
        twin = make()
    other = case.with_model(twin, "and its twin")
    with torch.no_grad():
        same = torch.allclose(other.split(case.x), case.split(case.x), atol=1e-5, rtol=1e-4)
    if not same:
        raise ValueError("twin computes another function than the case's model: "
                         "implementation_invariant compares functionally equal models")
    options = _with_draws(method, case, options)
    _close(_call(method, other, case.x, case.cls, **options),
           _call(method, case, case.x, case.cls, **options),
           "a functionally equal model built otherwise", method, case)


def translation_equivariant(method: Method, case: Case, *, shift: int = 1, **options: Any) -> None:
    """Shifting the input circularly by ``shift`` along every spatial axis shifts the maps
    the same way, for a model that is itself translation-equivariant up to the cut and
    invariant after it (fully convolutional, circular padding, stride 1: draw such cases
    with ``cases(circular=True)``).

    Example:
        >>> net = camfunc.testing.KitNet(2, 4, 3, skip=True, batchnorm=False, deep_tail=True,
        ...                              activation="gelu", inplace=False, seed=0, circular=True)
        >>> case = camfunc.testing.Case.of(net, "body", torch.randn(2, 2, 5, 6), 1)
        >>> camfunc.testing.translation_equivariant(camfunc.gradcam, case, shift=2)
    """
    dims = tuple(range(2, case.x.ndim))
    shifts = (shift,) * len(dims)
    moved_x = case.x.roll(shifts, dims)
    with torch.no_grad():
        invariant = torch.allclose(case.split(moved_x), case.split(case.x), atol=1e-5, rtol=1e-4)
        same_grid = _activations(case, case.x).shape[2:] == case.x.shape[2:]
    if not (invariant and same_grid):
        raise ValueError("translation_equivariant needs a model whose scores do not change when "
                         "the input is shifted circularly, with maps at the input's resolution "
                         "(draw cases(circular=True))")

    def moved(value: Tensor, kind: str) -> Tensor:  # noise over x's grid moves with x
        return value if kind == "channel_weights" else value.roll(shifts, tuple(d + 1 for d in dims))

    options = _with_draws(method, case, options)
    want = _call(method, case, case.x, case.cls, **options)
    got = _call(method, case, moved_x, case.cls, **_moved_draws(method, options, moved))
    spatial = tuple(range(want.ndim - len(dims), want.ndim))
    _close(got, want.roll(shifts, spatial), f"input shifted by {shift} (circularly)", method, case)


def randomisation_sensitive(method: Method, case: Case, *, threshold: float = 0.9,
                            randomised: nn.Module | Sequence[nn.Module] | None = None,
                            seed: int = 0, **options: Any) -> None:
    """Adebayo et al.'s model-parameter randomisation test ("Sanity Checks for Saliency
    Maps", NeurIPS 2018), as a property: with the layers after the cut redrawn, the maps
    must change. Their mean Spearman rank correlation with the model's own maps, over
    the maps that are not constant and over the redrawn models, must stay at most
    ``threshold`` (0.9: maps that barely move fail). The test is statistical, so it is
    best drawn on typical inputs (``CASES_FOR["randomisation_sensitive"]``).

    ``randomised`` is the model (or several) with its top layers redrawn; kit models make
    their own, three of them (:func:`camfunc.testing.randomised`, from ``seed``).

    Example:
        >>> net = camfunc.testing.KitNet(2, 8, 3, skip=True, batchnorm=True, deep_tail=False,
        ...                              activation="relu", inplace=False, seed=0)
        >>> case = camfunc.testing.Case.of(net, "body", torch.randn(4, 2, 8, 8), 1)
        >>> redrawn = [camfunc.testing.randomised(net, seed) for seed in range(3)]
        >>> camfunc.testing.randomisation_sensitive(camfunc.gradcam, case, randomised=redrawn)
        >>> camfunc.testing.randomisation_sensitive(camfunc.eigencam, case)   # ignores the tail
        Traceback (most recent call last):
        AssertionError: eigencam: with the layers after the cut redrawn, the maps keep a Spearman rank correlation of 1.000 ...
    """
    if randomised is None:
        if not isinstance(case.model, (KitNet, TokenNet)):
            raise ValueError(f"randomisation_sensitive needs randomised=, a copy of "
                             f"{type(case.model).__name__} with its layers after the cut redrawn")
        randomised = [redraw(case.model, seed + i) for i in range(3)]
    models = [randomised] if isinstance(randomised, nn.Module) else list(randomised)
    options = _with_draws(method, case, options)
    own = _call(method, case, case.x, case.cls, **options)
    spatial = case.x.ndim - 2
    rhos = []
    for model in models:
        redrawn = _call(method, case.with_model(model, "with its tail redrawn"), case.x, case.cls, **options)
        rho = spearman(own.flatten(0, -spatial - 1), redrawn.flatten(0, -spatial - 1))
        rhos += [r for r in rho.tolist() if r == r]
    if not rhos:  # nothing to compare: under hypothesis, another case; else say so
        if currently_in_test_context():
            reject()
        raise ValueError("every map is constant on this case, so a change cannot show")
    mean = sum(rhos) / len(rhos)
    if mean > threshold:
        raise AssertionError(f"{_name(method)}: with the layers after the cut redrawn, the maps "
                             f"keep a Spearman rank correlation of {mean:.3f} (over {len(rhos)} "
                             f"maps) with the model's own, above {threshold}\n  on {case!r}")


#: Every property by name: ``PROPERTIES[name](method, case, **options)`` returns None when it
#: holds and raises ``AssertionError`` with the counterexample when it does not.
PROPERTIES: dict[str, Property] = {
    "batch_independent": batch_independent,
    "class_axis_consistent": class_axis_consistent,
    "deterministic": deterministic,
    "unit_range": unit_range,
    "logit_scale_invariant": logit_scale_invariant,
    "channel_permutation_invariant": channel_permutation_invariant,
    "implementation_invariant": implementation_invariant,
    "translation_equivariant": translation_equivariant,
    "randomisation_sensitive": randomisation_sensitive,
    "compile_equivalent": compile_equivalent,  # last: the matrix's slow column
}

#: What each property asks of its cases: keyword arguments for :func:`cases` (the
#: property matrix draws with them).
CASES_FOR: dict[str, dict[str, Any]] = {
    "translation_equivariant": {"circular": True},
    # A statistical check: typical inputs on models wide enough for a map to have a shape.
    "randomisation_sensitive": {"values": "gaussian", "batch": st.just(4), "dims": st.just(2),
                                "channels": st.integers(4, 8), "size": st.integers(6, 8)},
}
