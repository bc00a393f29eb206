"""Hypothesis strategies for CAM test cases: small models, inputs drawn value by value, targets."""

from __future__ import annotations

import dataclasses
from typing import Any

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
    a sentence. Build one for your own model with :meth:`Case.of`.

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

    @classmethod
    def of(cls, model: nn.Module, layer: str, x: Tensor, target: Target) -> Case:
        """A case from your model, cut at ``layer``."""
        return cls(model, split_model(model, layer), x, target, f"{type(model).__name__} at {layer!r}")

    def __repr__(self) -> str:
        return (f"Case({self.description}; x {tuple(self.x.shape)} with values "
                f"{self.x.flatten()[:6].tolist()}...; cls {_describe_target(self.cls)})")


def _describe_target(target: Target) -> str:
    if isinstance(target, Tensor):
        return f"tensor {target.tolist()}"
    return repr(target)


class KitNet(nn.Module):
    """``stem -> [norm] -> act -> body (cut here) [+ stem's output] -> act -> [1x1 conv -> act]
    -> global average pool -> linear``, on 1-, 2- or 3-D inputs with 2 channels.

    Example:
        >>> net = camfunc.testing.KitNet(2, 4, 3, skip=True, batchnorm=True, deep_tail=False,
        ...                              activation="relu", inplace=True, seed=0)
        >>> net(torch.randn(2, 2, 5, 5)).shape
        torch.Size([2, 3])
    """

    def __init__(self, dims: int, channels: int, classes: int, *, skip: bool, batchnorm: bool,
                 deep_tail: bool, activation: str, inplace: bool, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        self.stem = conv(2, channels, 3, padding=1)
        self.norm: nn.Module = nn.Identity()
        if batchnorm:  # eval-mode statistics that are not the identity
            statistics = norm(channels)
            statistics.running_mean = torch.empty(channels).uniform_(-0.5, 0.5)
            statistics.running_var = torch.empty(channels).uniform_(0.5, 2.0)
            self.norm = statistics
        self.act = nn.GELU() if activation == "gelu" else nn.ReLU(inplace=inplace)
        self.body = conv(channels, channels, 3, padding=1)
        self.skip = skip
        self.deep = conv(channels, channels, 1) if deep_tail else None
        self.pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[dims](1)
        self.fc = nn.Linear(channels, classes)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.norm(self.stem(x)))
        a = self.body(h)
        if self.skip:  # a value from the head crosses the cut
            a = a + h
        a = self.act(a)  # in place, after the cut, when drawn so
        if self.deep is not None:
            a = self.act(self.deep(a))
        return self.fc(self.pool(a).flatten(1))


@st.composite
def models(draw: Any, dims: st.SearchStrategy[int] = st.integers(1, 3),
           classes: st.SearchStrategy[int] = st.integers(2, 5),
           channels: st.SearchStrategy[int] = st.integers(1, 5)) -> KitNet:
    """Small random models cut at ``"body"``; weights from a drawn seed.

    Skip connections across the cut, batch norm in eval mode, an in-place ReLU after the
    cut, GELU, and deeper tails are each drawn, as are the spatial rank and widths.

    Example:
        >>> from hypothesis import strategies as st
        >>> strategy = camfunc.testing.models(dims=st.just(2))   # 2-D models only
        >>> isinstance(strategy, st.SearchStrategy)
        True
    """
    return KitNet(draw(dims), draw(channels), draw(classes), skip=draw(st.booleans()),
                  batchnorm=draw(st.booleans()), deep_tail=draw(st.booleans()),
                  activation=draw(st.sampled_from(["relu", "gelu"])), inplace=draw(st.booleans()),
                  seed=draw(st.integers(0, 2**16)))


def _values() -> st.SearchStrategy[float]:
    # Zeros, ties and negatives come up often; extremes stay where float32 rounding is sane.
    return st.one_of(st.just(0.0), st.sampled_from([-1.0, 1.0]), st.floats(-3.0, 3.0, width=32))


@st.composite
def inputs(draw: Any, dims: int, batch: st.SearchStrategy[int] = st.integers(1, 4),
           size: st.SearchStrategy[int] = st.integers(3, 6)) -> Tensor:
    """An input batch ``(B, 2, *spatial)`` for a ``dims``-D model, drawn value by value.

    Example:
        >>> from hypothesis import strategies as st
        >>> strategy = camfunc.testing.inputs(2, batch=st.just(3))   # (3, 2, h, w) batches
        >>> isinstance(strategy, st.SearchStrategy)
        True
    """
    shape = (draw(batch), 2, *(draw(size) for _ in range(dims)))
    array = draw(hnp.arrays(np.float32, shape, elements=_values()))
    return torch.from_numpy(array)


@st.composite
def targets(draw: Any, batch: int, classes: int, forms: tuple[str, ...] = ("int", "per_sample",
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
def cases(draw: Any, dims: st.SearchStrategy[int] = st.integers(1, 3),
          batch: st.SearchStrategy[int] = st.integers(1, 4),
          forms: tuple[str, ...] = ("int", "per_sample", "classes", "topk")) -> Case:
    """A whole :class:`Case`: a drawn model split at ``"body"``, an input, a target.

    Example:
        >>> from hypothesis import given, settings, strategies as st
        >>> @settings(max_examples=5, database=None)
        ... @given(camfunc.testing.cases(dims=st.just(2)))
        ... def test_unit_range(case):
        ...     camfunc.testing.PROPERTIES["unit_range"](camfunc.gradcam, case)
        >>> test_unit_range()    # passes; a failing property raises its shrunk counterexample
    """
    spatial_rank = draw(dims)
    model = draw(models(dims=st.just(spatial_rank)))
    x = draw(inputs(spatial_rank, batch=batch))
    target = draw(targets(x.shape[0], model.fc.out_features, forms))
    description = (f"{spatial_rank}-D KitNet, {model.body.in_channels} channels, "
                   f"{model.fc.out_features} classes, skip={model.skip}, "
                   f"batchnorm={not isinstance(model.norm, nn.Identity)}, "
                   f"deep_tail={model.deep is not None}, {type(model.act).__name__}")
    return Case(model, split_model(model, LAYER), x, target, description)
