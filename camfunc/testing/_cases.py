"""Hypothesis strategies for CAM test cases: small models, inputs drawn value by value, targets."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from copy import deepcopy
from typing import Any, Literal, cast

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import Tensor, nn

from camfunc._core.split import Split
from camfunc._core.splitter import split as split_model
from camfunc._core.targets import Target, TopK

LAYER = "body"  # where every drawn model is cut


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
    """One test case: a model, its split, an input batch and the classes to explain.

    ``description`` says how the model was drawn, so a shrunk counterexample reads as
    a sentence; ``layer`` and ``split_options`` say how ``split`` was made, so that a
    property can split a related model (a twin, a randomised copy) the same way. Build
    one for your own model with :meth:`Case.of`.

    Example:
        >>> case = camfunc.testing.Case.of(model, "layer4", x, 3)
        >>> case.x.shape, case.cls
        (torch.Size([2, 3, 64, 64]), 3)
    """

    model: nn.Module
    split: Split[Tensor]
    x: Tensor
    cls: Target
    description: str = ""
    layer: str = LAYER
    split_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, model: nn.Module, layer: str, x: Tensor, target: Target, **split_options: Any) -> Case:
        """A case from your model, cut at ``layer`` (``split_options`` go to :func:`camfunc.split`)."""
        return cls(model, split_model(model, layer, **split_options), x, target,
                   f"{type(model).__name__} at {layer!r}", layer, dict(split_options))

    def with_model(self, model: nn.Module, what: str) -> Case:
        """The same input and classes on another model, split the same way."""
        return dataclasses.replace(self, model=model, description=f"{self.description}, {what}",
                                   split=split_model(model, self.layer, **self.split_options))

    def __repr__(self) -> str:
        return (f"Case({self.description}; x {tuple(self.x.shape)} with values "
                f"{self.x.flatten()[:6].tolist()}...; cls {_describe_target(self.cls)})")


def _describe_target(target: Target) -> str:
    if isinstance(target, Tensor):
        return f"tensor {target.tolist()}"
    return repr(target)


def _redrawn(model: nn.Module, modules: Sequence[nn.Module], seed: int) -> nn.Module:
    """A copy of ``model`` whose ``modules`` (given as the original's) have freshly drawn
    weights: each parameter normal with the standard deviation it had, or 1."""
    chosen = {id(p) for m in modules for p in m.parameters()}
    copy = deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for original, new in zip(model.parameters(), copy.parameters(), strict=True):
            if id(original) in chosen:
                spread = float(original.std()) if original.numel() > 1 else 1.0
                new.copy_(torch.randn(new.shape, generator=generator) * (spread or 1.0))
    return copy


class KitNet(nn.Module):
    """``stem -> [norm] -> act -> body (cut here) [+ stem's output] -> act -> [1x1 conv -> act]
    -> global average pool -> linear``, on 1-, 2- or 3-D inputs with 2 channels.

    ``circular=True`` pads circularly (every layer is then translation-equivariant and the
    scores translation-invariant); ``pooled_linear_tail=True`` moves the activation into the
    cut layer and drops the skip and the deep tail, so that pooling and the linear layer
    are all that follow the cut (the form CAM needs).

    Example:
        >>> net = camfunc.testing.KitNet(2, 4, 3, skip=True, batchnorm=True, deep_tail=False,
        ...                              activation="relu", inplace=True, seed=0)
        >>> net(torch.randn(2, 2, 5, 5)).shape
        torch.Size([2, 3])
    """

    def __init__(self, dims: int, channels: int, classes: int, *, skip: bool, batchnorm: bool,
                 deep_tail: bool, activation: str, inplace: bool, seed: int, circular: bool = False,
                 pooled_linear_tail: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        padding: Literal["circular", "zeros"] = "circular" if circular else "zeros"
        self.dims, self.channels, self.classes, self.activation = dims, channels, classes, activation
        self.stem = conv(2, channels, 3, padding=1, padding_mode=padding)
        self.norm: nn.Module = nn.Identity()
        if batchnorm:  # eval-mode statistics that are not the identity
            statistics = norm(channels)
            statistics.running_mean = torch.empty(channels).uniform_(-0.5, 0.5)
            statistics.running_var = torch.empty(channels).uniform_(0.5, 2.0)
            self.norm = statistics
        self.act = nn.GELU() if activation == "gelu" else nn.ReLU(inplace=inplace)
        body = conv(channels, channels, 3, padding=1, padding_mode=padding)
        self.pooled_linear_tail = pooled_linear_tail
        self.body: nn.Module = nn.Sequential(body, deepcopy(self.act)) if pooled_linear_tail else body
        self.skip = skip and not pooled_linear_tail
        self.deep = conv(channels, channels, 1) if deep_tail and not pooled_linear_tail else None
        self.pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[dims](1)
        self.fc = nn.Linear(channels, classes)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.norm(self.stem(x)))
        a = self.body(h)
        if self.pooled_linear_tail:
            pooled: Tensor = self.fc(self.pool(a).flatten(1))
            return pooled
        if self.skip:  # a value from the head crosses the cut
            a = a + h
        a = self.act(a)  # in place, after the cut, when drawn so
        if self.deep is not None:
            a = self.act(self.deep(a))
        scores: Tensor = self.fc(self.pool(a).flatten(1))
        return scores

    def tail_modules(self) -> list[nn.Module]:
        """The layers that run after the cut, top first."""
        return [self.fc] + ([self.deep] if self.deep is not None else [])

    def twin(self) -> nn.Module:
        """A functionally equal model built otherwise: batch norm folded into the stem,
        the activation written out, the linear layer applied before the pooling."""
        return _KitTwin(self).eval()

    def describe(self) -> str:
        return (f"{self.dims}-D KitNet, {self.channels} channels, {self.classes} classes, "
                f"skip={self.skip}, batchnorm={not isinstance(self.norm, nn.Identity)}, "
                f"deep_tail={self.deep is not None}, {type(self.act).__name__}"
                + (", circular" if self.stem.padding_mode == "circular" else "")
                + (", pooled linear tail" if self.pooled_linear_tail else ""))


def _written_out(activation: str, a: Tensor) -> Tensor:
    if activation == "gelu":
        return 0.5 * a * (1 + torch.erf(a / math.sqrt(2)))
    return torch.where(a > 0, a, torch.zeros_like(a))


class _KitTwin(nn.Module):
    """:meth:`KitNet.twin`: the same function with other internals."""

    def __init__(self, net: KitNet):
        super().__init__()
        self.net_dims, self.activation = net.dims, net.activation
        self.stem = deepcopy(net.stem)
        if isinstance(net.norm, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            norm = net.norm
            mean, variance = cast(Tensor, norm.running_mean), cast(Tensor, norm.running_var)
            scale = norm.weight / torch.sqrt(variance + norm.eps)
            bias = cast(Tensor, self.stem.bias)
            with torch.no_grad():
                self.stem.weight.mul_(scale.view(-1, *[1] * (self.stem.weight.ndim - 1)))
                bias.copy_((bias - mean) * scale + norm.bias)
        self.body = deepcopy(net.body)
        self.pooled_linear_tail, self.skip = net.pooled_linear_tail, net.skip
        self.deep = deepcopy(net.deep)
        self.fc = deepcopy(net.fc)

    def forward(self, x: Tensor) -> Tensor:
        h = _written_out(self.activation, self.stem(x))
        a = self.body(h)
        if not self.pooled_linear_tail:
            a = _written_out(self.activation, a + h if self.skip else a)
            if self.deep is not None:  # a 1x1 convolution is a linear map of the channel axis
                mixed = torch.einsum("oc,bc...->bo...", self.deep.weight.flatten(1), a)
                shift = cast(Tensor, self.deep.bias).view(1, -1, *[1] * self.net_dims)
                a = _written_out(self.activation, mixed + shift)
        per_position = torch.einsum("kc,bc...->bk...", self.fc.weight, a)  # mean and linear commute
        return per_position.flatten(2).mean(2) + self.fc.bias


class TokenNet(nn.Module):
    """``patch embedding (a stride-patch conv) -> tokens (B, N, D) [with a class token
    first] -> body: a linear map of each token (cut here) [+ its input] -> act -> mean over
    tokens -> linear``, on 2-D inputs with 2 channels: a ViT-like layout, in miniature.

    Example:
        >>> net = camfunc.testing.TokenNet(4, 3, patch=2, class_token=True, skip=True,
        ...                                activation="gelu", seed=0)
        >>> net(torch.randn(2, 2, 6, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(self, width: int, classes: int, *, patch: int, class_token: bool, skip: bool,
                 activation: str, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.width, self.classes, self.patch, self.activation = width, classes, patch, activation
        self.embed = nn.Conv2d(2, width, patch, stride=patch)
        self.class_token = nn.Parameter(torch.randn(1, 1, width)) if class_token else None
        self.num_prefix_tokens = int(class_token)
        self.body = nn.Linear(width, width)
        self.skip = skip
        self.act = nn.GELU() if activation == "gelu" else nn.ReLU()
        self.fc = nn.Linear(width, classes)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        if self.class_token is not None:
            tokens = torch.cat([self.class_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        a = self.body(tokens)
        if self.skip:
            a = a + tokens
        scores: Tensor = self.fc(self.act(a).mean(1))
        return scores

    def tail_modules(self) -> list[nn.Module]:
        """The layers that run after the cut, top first."""
        return [self.fc]

    def twin(self) -> nn.Module:
        """A functionally equal model built otherwise: the activation written out, the
        linear layer applied to each token before the mean."""
        return _TokenTwin(self).eval()

    def describe(self) -> str:
        return (f"TokenNet, {self.width} wide, {self.classes} classes, patch {self.patch}, "
                f"class_token={self.class_token is not None}, skip={self.skip}, "
                f"{type(self.act).__name__}")


class _TokenTwin(nn.Module):
    """:meth:`TokenNet.twin`: the same function with other internals."""

    def __init__(self, net: TokenNet):
        super().__init__()
        self.embed, self.body, self.fc = deepcopy(net.embed), deepcopy(net.body), deepcopy(net.fc)
        self.class_token = deepcopy(net.class_token)
        self.skip, self.activation = net.skip, net.activation

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        if self.class_token is not None:
            tokens = torch.cat([self.class_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        a = self.body(tokens)
        a = _written_out(self.activation, a + tokens if self.skip else a)
        return (a @ self.fc.weight.T).mean(1) + self.fc.bias


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of a kit model with the layers after the cut redrawn (the first steps of
    Adebayo et al.'s cascading randomisation, top first); the head is untouched.

    Example:
        >>> net = camfunc.testing.KitNet(2, 4, 3, skip=False, batchnorm=False, deep_tail=False,
        ...                              activation="relu", inplace=False, seed=0)
        >>> torch.equal(camfunc.testing.randomised(net).fc.weight, net.fc.weight)
        False
    """
    if not isinstance(model, (KitNet, TokenNet)):
        raise TypeError(f"randomised() takes a KitNet or a TokenNet, got {type(model).__name__}")
    return _redrawn(model, model.tail_modules(), seed)


@st.composite
def models(draw: st.DrawFn, dims: st.SearchStrategy[int] = st.integers(1, 3),
           classes: st.SearchStrategy[int] = st.integers(2, 5),
           channels: st.SearchStrategy[int] = st.integers(1, 5), *, circular: bool = False,
           pooled_linear_tail: bool = False) -> KitNet:
    """Small random :class:`KitNet` models cut at ``"body"``; weights from a drawn seed.

    Skip connections across the cut, batch norm in eval mode, an in-place ReLU after the
    cut, GELU, and deeper tails are each drawn, as are the spatial rank and widths.
    ``circular`` and ``pooled_linear_tail`` restrict them as :class:`KitNet` says.

    Example:
        >>> from hypothesis import strategies as st
        >>> strategy = camfunc.testing.models(dims=st.just(2))   # 2-D models only
        >>> isinstance(strategy, st.SearchStrategy)
        True
    """
    return KitNet(draw(dims), draw(channels), draw(classes), skip=draw(st.booleans()),
                  batchnorm=draw(st.booleans()), deep_tail=draw(st.booleans()),
                  activation=draw(st.sampled_from(["relu", "gelu"])), inplace=draw(st.booleans()),
                  seed=draw(st.integers(0, 2**16)), circular=circular,
                  pooled_linear_tail=pooled_linear_tail)


@st.composite
def token_models(draw: st.DrawFn, classes: st.SearchStrategy[int] = st.integers(2, 5),
                 width: st.SearchStrategy[int] = st.integers(1, 5)) -> TokenNet:
    """Small random :class:`TokenNet` models (tokens ``(B, N, D)`` at the cut, with or
    without a class token before the patch grid).

    Example:
        >>> from hypothesis import strategies as st
        >>> strategy = camfunc.testing.token_models(width=st.just(4))
        >>> isinstance(strategy, st.SearchStrategy)
        True
    """
    return TokenNet(draw(width), draw(classes), patch=draw(st.integers(1, 2)),
                    class_token=draw(st.booleans()), skip=draw(st.booleans()),
                    activation=draw(st.sampled_from(["relu", "gelu"])),
                    seed=draw(st.integers(0, 2**16)))


def _values() -> st.SearchStrategy[float]:
    # Zeros, ties and negatives come up often; extremes stay where float32 rounding is sane.
    return st.one_of(st.just(0.0), st.sampled_from([-1.0, 1.0]), st.floats(-3.0, 3.0, width=32))


@st.composite
def inputs(draw: st.DrawFn, dims: int, batch: st.SearchStrategy[int] = st.integers(1, 4),
           size: st.SearchStrategy[int] = st.integers(3, 6), *, values: str = "drawn") -> Tensor:
    """An input batch ``(B, 2, *spatial)`` for a ``dims``-D model, drawn value by value
    (``values="drawn"``: zeros, ties and extremes come up, and shrink), or standard normal
    from a drawn seed (``values="gaussian"``: typical inputs, for statistical properties).

    Example:
        >>> from hypothesis import strategies as st
        >>> strategy = camfunc.testing.inputs(2, batch=st.just(3))   # (3, 2, h, w) batches
        >>> isinstance(strategy, st.SearchStrategy)
        True
    """
    shape = (draw(batch), 2, *(draw(size) for _ in range(dims)))
    if values == "gaussian":
        return torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    if values != "drawn":
        raise ValueError(f"values are 'drawn' or 'gaussian', got {values!r}")
    array = draw(hnp.arrays(np.float32, shape, elements=_values()))
    return torch.from_numpy(array)


@st.composite
def targets(draw: st.DrawFn, batch: int, classes: int, forms: tuple[str, ...] = ("int", "per_sample",
                                                                        "classes", "topk")) -> Target:
    """``cls`` in each form a method takes: an int, one class per sample ``(B,)``, ``(B, K)``
    classes, or ``camfunc.topk(k)``.

    Example:
        >>> from hypothesis import strategies as st
        >>> strategy = camfunc.testing.targets(2, 5, forms=("classes",))   # (2, K) class tensors
        >>> isinstance(strategy, st.SearchStrategy)
        True
    """
    form = draw(st.sampled_from(forms))
    if form == "int":
        return draw(st.integers(0, classes - 1))
    if form == "per_sample":
        return torch.tensor(draw(st.lists(st.integers(0, classes - 1), min_size=batch, max_size=batch)))
    if form == "topk":
        return TopK(draw(st.integers(1, classes)))
    k = draw(st.integers(1, classes))
    rows = [draw(st.permutations(range(classes)))[:k] for _ in range(batch)]
    return torch.tensor(rows)


@st.composite
def cases(draw: st.DrawFn, dims: st.SearchStrategy[int] = st.integers(1, 3),
          batch: st.SearchStrategy[int] = st.integers(1, 4),
          forms: tuple[str, ...] = ("int", "per_sample", "classes", "topk"), *,
          layouts: tuple[str, ...] = ("channels_first", "tokens"), circular: bool = False,
          pooled_linear_tail: bool = False, channels: st.SearchStrategy[int] = st.integers(1, 5),
          size: st.SearchStrategy[int] = st.integers(3, 6), values: str = "drawn") -> Case:
    """A whole :class:`Case`: a drawn model split at ``"body"``, an input, a target.

    ``layouts`` are the activations' layouts to draw: ``"channels_first"`` (a
    :class:`KitNet` in ``dims`` dimensions) and ``"tokens"`` (a 2-D :class:`TokenNet`).
    ``circular`` and ``pooled_linear_tail`` draw only KitNets of that kind. ``channels``
    (the width at the cut), ``size`` (of each spatial axis) and ``values`` go to
    :func:`models` and :func:`inputs`.

    Example:
        >>> from hypothesis import given, settings, strategies as st
        >>> @settings(max_examples=5, database=None)
        ... @given(camfunc.testing.cases(dims=st.just(2)))
        ... def test_unit_range(case):
        ...     camfunc.testing.PROPERTIES["unit_range"](camfunc.gradcam, case)
        >>> test_unit_range()    # passes; a failing property raises its shrunk counterexample
    """
    if circular or pooled_linear_tail:
        layouts = ("channels_first",)
    unknown = set(layouts) - {"channels_first", "tokens"}
    if not layouts or unknown:
        raise ValueError(f"layouts are 'channels_first' and 'tokens', got {layouts!r}")
    if draw(st.sampled_from(layouts)) == "tokens":
        net = draw(token_models(width=channels))
        x = draw(inputs(2, batch=batch, size=size.filter(lambda n: n >= 2 * net.patch), values=values))
        grid = tuple(s // net.patch for s in x.shape[2:])
        options: dict[str, Any] = {"layout": "tokens", "grid": grid,
                                   "prefix_tokens": net.num_prefix_tokens}
        target = draw(targets(x.shape[0], net.classes, forms))
        return Case(net, split_model(net, LAYER, **options), x, target, net.describe(), LAYER, options)
    spatial_rank = draw(dims)
    model = draw(models(dims=st.just(spatial_rank), channels=channels, circular=circular,
                        pooled_linear_tail=pooled_linear_tail))
    x = draw(inputs(spatial_rank, batch=batch, size=size, values=values))
    target = draw(targets(x.shape[0], model.classes, forms))
    return Case(model, split_model(model, LAYER), x, target, model.describe())
