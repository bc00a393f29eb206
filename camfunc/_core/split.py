"""The :class:`Split` value: a model as ``head: x -> A`` and ``tail: A -> scores``.

A plain immutable value holding callables. :func:`camfunc.split` builds one
from a model (``camfunc._core.splitter``); anyone can build one by hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol

from torch import Tensor, nn
from typing_extensions import TypeVar

#: What a method returns for this split: a tensor for one layer, a list for several.
MapsT = TypeVar("MapsT", default=Tensor, covariant=True)

__all__ = ["TRAINING_MESSAGE", "MapsT", "Source", "Split", "as_tuple", "math_twin", "run_chain", "run_stage", "unwrap"]

TRAINING_MESSAGE = (
    "the model is in training mode: batch norm would update its running statistics "
    "and dropout would make maps random. Call model.eval() first, or pass "
    "differentiable=True to a gradient method to train with its maps"
)


@dataclasses.dataclass(frozen=True, eq=False)
class Split(Generic[MapsT]):
    """A model cut at one or more layers, as pure callables.

    ``head(x)`` returns the first layer's activations ``A``, or a tuple
    ``(A, *context)`` when values other than ``A`` cross the cut (a skip
    connection, say). ``tail(A, *context)`` returns the model's output.
    For several layers, ``middle[i](A_i, *context)`` returns
    ``(A_{i+1}, *context')``, so the model is
    ``tail(*middle[-1](*...middle[0](*head(x))))``.
    ``order`` (optional) lists, for each layer in the order the user gave, its
    position in that chain; maps are returned in the user's order.

    Build one with :func:`split`, or by hand for models that neither
    ``torch.fx`` nor ``torch.export`` can capture. ``model`` (optional) is
    checked for ``training`` mode before each call; ``layers`` names the cuts in
    messages; ``input_ndim`` (optional) is the input rank the model needs;
    ``batch`` (optional) the only batch size the split accepts; ``listed``
    asks for maps as a list even for one layer (a split made from a list of
    layers); ``traced_modes`` each of ``model.modules()``' ``training`` flag
    when it was traced (tracing bakes in ``if self.training`` branches, so a
    call in other modes is refused); ``forward_kwargs`` the arguments the model
    was captured with besides ``x`` (:func:`check` calls it with them); ``source`` (set by :func:`split`) keeps the
    model's captures valid: :meth:`bound` uses it. ``functional=False`` says the
    stages after the head hold ops that ``torch.func`` cannot transform (custom
    autograd functions such as torchvision's ``roi_align``): gradients then come
    from one ordinary backward per class. All but ``head`` and ``tail``
    are keyword-only.

    ``Split[Tensor]`` (the default) gives methods' maps as one tensor;
    ``Split[list[Tensor]]`` as a list, one per layer.

    Example:
        >>> head = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
        >>> tail = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
        >>> camfunc.gradcam(camfunc.Split(head, tail), x, 0).shape       # model(x) = tail(head(x))
        torch.Size([2, 62, 62])
    """

    head: Callable[..., Any]
    tail: Callable[..., Any]
    _: dataclasses.KW_ONLY
    middle: tuple[Callable[..., Any], ...] = ()
    layers: tuple[str, ...] = ()
    model: nn.Module | None = dataclasses.field(default=None, repr=False)
    input_ndim: int | None = None
    order: tuple[int, ...] = ()
    batch: int | None = None
    listed: bool = False
    traced_modes: tuple[bool, ...] | None = None
    forward_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: Source | None = dataclasses.field(default=None, repr=False, compare=False)
    functional: bool = True

    def __post_init__(self) -> None:
        for field in ("head", "tail"):
            if not callable(getattr(self, field)):
                raise TypeError(
                    f"Split.{field} must be callable, got {type(getattr(self, field)).__name__}"
                )
        object.__setattr__(self, "middle", tuple(self.middle))
        object.__setattr__(self, "layers", tuple(self.layers))
        if not all(callable(m) for m in self.middle):
            raise TypeError("Split.middle must hold callables, one per extra layer")

    @property
    def num_layers(self) -> int:
        return len(self.middle) + 1

    @property
    def stages(self) -> tuple[Callable[..., Any], ...]:
        """``(head, *middle, tail)``."""
        return (self.head, *self.middle, self.tail)

    def bound(self, x: Tensor, *, check_model: bool = True) -> Split[MapsT]:
        """The split to run on ``x``: itself, or for a split :func:`camfunc.split` made, one
        whose capture holds for ``x`` and for the model as it is now (captured again when
        none is: an exported graph may hold for one input size only, and a module, tensor or
        forward hook of the model may have been replaced since). Methods call it themselves.

        Example:
            >>> s.bound(x) is s                                # its capture holds for x
            True
            >>> model.fc = nn.Linear(16, 10).eval()
            >>> s.bound(x) is s                                # a module replaced: captured again
            False
        """
        if self.source is None:
            return self
        return self.source.bound(self, x, check_model=check_model)

    def __call__(self, x: Any) -> Any:
        """Runs the whole model: ``tail(...head(x))``."""
        split = self.bound(x) if isinstance(x, Tensor) else self
        carry = as_tuple(split.head(x))
        last = [carry, *run_chain(split.middle, carry, keep=False)][-1]
        return run_stage(split.tail, last, keep=False)  # nothing is kept: no copies


class Source(Protocol):
    """What keeps a split's captures valid (``camfunc._core.cut.captures.Captures``)."""

    def bound(self, split: Split[Any], x: Tensor, *, check_model: bool = True) -> Split[Any]: ...


def modes_of(model: nn.Module) -> tuple[bool, ...]:
    """Each of ``model.modules()``' ``training`` flag, in order."""
    return tuple(m.training for m in model.modules())


def math_twin(stage: Callable[..., Any]) -> Callable[..., Any]:
    """``stage`` with its attention on the math kernel, for ``vmap`` over classes and forward
    AD (fused kernels batch and differentiate only by looping), or ``stage`` itself: a stage
    :func:`camfunc.split` built, or a wrapper of one, carries its twin; any other callable
    is its own."""
    return getattr(stage, "math_twin", stage)


def as_tuple(carry: Any) -> tuple[Any, ...]:
    return carry if isinstance(carry, tuple) else (carry,)


def run_stage(stage: Callable[..., Any], carry: tuple[Any, ...], *, keep: bool = True) -> Any:
    """``stage`` on ``(A, *context)``; with ``keep``, on a copy of ``A``, so that its in-place
    ops leave the carry (kept as a cut's activations) as it was."""
    return stage(carry[0].clone(), *carry[1:]) if keep else stage(*carry)


def run_chain(stages: Sequence[Callable[..., Any]], carry: tuple[Any, ...], *,
              keep: bool = True) -> list[tuple[Any, ...]]:
    """What each of ``stages`` hands on, in turn, starting from ``carry`` (``keep``: as
    :func:`run_stage`)."""
    found = []
    for stage in stages:
        carry = as_tuple(run_stage(stage, carry, keep=keep))
        found.append(carry)
    return found


def unwrap(model: nn.Module) -> nn.Module:
    """Strips DataParallel / DistributedDataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model
