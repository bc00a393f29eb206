"""The skeleton every CAM method shares: checks first, maps in the user's layer order, scores.

A method is written as its paper's maths, ``compute(split, x, cls, **options)``,
returning ``(maps, scores)`` with one map tensor per cut, in the split's chain
order. :func:`cam_method` turns it into the public function
``method(split, x, cls, ..., return_scores=False)``, which

1. checks the split, the input and the class form before any work (and refuses,
   with a clear message, to be compiled on a torch too old for it);
2. puts the maps back in the user's layer order (a tensor for one layer, a
   list for several), NaN for samples whose input was not finite;
3. returns ``(maps, scores)`` only when asked.

Registered methods are collected in ``camfunc.METHODS`` in the order their
modules are imported, which is how the docs, the dataset runs and the
conformance suite find them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, TypeVar, cast, overload

import torch
from torch import Tensor

from camfunc._core import targets as _targets, validate as _validate
from camfunc._core.split import Split
from camfunc._methods._combine import Computed, arrange, in_chain_order
from camfunc._util import draws as _draws

#: Where a method's maps live: at each cut's layer, or one fused map at the input's size.
Resolution = Literal["layer", "input"]

# Bound per call: a method given a Split[MapsT] returns MapsT (a tensor, or a list of them).
MapsT = TypeVar("MapsT")


@dataclasses.dataclass(frozen=True)
class Draws:
    """The random numbers a method draws, so that runs and tests can hand it fixed ones.

    ``keyword`` names the argument that takes them; ``kind`` says what they are:
    ``"input"``, standard normal ``(num_samples, *x.shape)``; ``"layer_noise"``,
    standard normal ``(num_samples, B, C, *x.shape[2:])``; ``"channel_weights"``,
    uniform in [-1, 1) ``(B, C)``. :meth:`shape` gives that shape for an input and
    :meth:`sample` draws it from a generator, the one place that decodes the kind.

    Example:
        >>> camfunc.sscam.draws
        Draws(keyword='noise', kind='layer_noise')
        >>> camfunc.gradcam.draws is None
        True
    """

    keyword: str
    kind: Literal["input", "layer_noise", "channel_weights"]

    @property
    def counted(self) -> bool:
        """Whether the draws come ``num_samples`` at a time (a leading samples axis)."""
        return self.kind != "channel_weights"

    @property
    def per_channel(self) -> bool:
        """Whether the draws' shape depends on the layer's channels."""
        return self.kind != "input"

    @property
    def batch_axis(self) -> int:
        """The axis that runs over the input's samples."""
        return 1 if self.counted else 0

    def shape(self, x_shape: Sequence[int], channels: int, num_samples: int) -> tuple[int, ...]:
        """The draws' shape for an input of ``x_shape`` whose layer has ``channels`` channels."""
        batch, rest = int(x_shape[0]), tuple(int(n) for n in x_shape[1:])
        if self.kind == "input":
            return (num_samples, batch, *rest)
        if self.kind == "layer_noise":
            return (num_samples, batch, channels, *rest[1:])
        return (batch, channels)

    def sample(self, x_shape: Sequence[int], channels: int, num_samples: int,
               generator: torch.Generator | None = None) -> Tensor:
        """Fresh draws of :meth:`shape` from ``generator``: standard normal, or uniform in
        [-1, 1) for channel weights."""
        sampler = torch.randn if self.counted else _draws.uniform_signed
        return sampler(self.shape(x_shape, channels, num_samples), generator=generator)

    def options(self, values: Tensor, num_samples: int) -> dict[str, Any]:
        """The keyword arguments that hand ``values`` to the method."""
        return {"num_samples": num_samples, self.keyword: values} if self.counted else {self.keyword: values}


class CamMethod(Protocol):
    """A CAM method: ``method(split, x, cls, **options)``, as :func:`cam_method` makes one.

    Returns the maps, ``(B, *spatial)`` or ``(B, K, *spatial)`` for a ``Split[Tensor]``
    (one layer) and a list of those for a ``Split[list[Tensor]]``; with
    ``return_scores=True``, ``(maps, scores)``. Its facts, as :func:`cam_method` records
    them: ``compiles_since``, the first torch whose compiler traces it; ``resolution``,
    ``"layer"`` or ``"input"``; ``draws``, which random numbers it takes (None: none);
    ``syncs``, why it makes the host wait for an accelerator on every call (None: it never does).

    Example:
        >>> method: camfunc.CamMethod = camfunc.METHODS["gradcam"]
        >>> method(s, x, 3).shape, method.draws, method.syncs
        (torch.Size([2, 4, 4]), None, None)
    """

    __name__: str
    compiles_since: tuple[int, int]
    resolution: Resolution
    draws: Draws | None
    syncs: str | None

    @overload
    def __call__(self, split: Split[MapsT], x: Tensor, cls: _targets.Target = ..., *,
                 return_scores: Literal[False] = False, **options: Any) -> MapsT: ...

    @overload
    def __call__(self, split: Split[MapsT], x: Tensor, cls: _targets.Target = ..., *,
                 return_scores: Literal[True], **options: Any) -> tuple[MapsT, Tensor]: ...

    def __call__(self, split: Split[MapsT], x: Tensor, cls: _targets.Target = ..., *,
                 return_scores: bool = False, **options: Any) -> Any: ...


class _Required:
    """The type of ``_REQUIRED``, which stands for "no default" in a method's cls. Tested by
    type: torch 2.4's compiler cannot compare a symbolic int's identity with an object."""


_REQUIRED = _Required()

#: Every registered method by name, in registration order.
REGISTRY: dict[str, CamMethod] = {}


def _with_return_scores(signature: inspect.Signature) -> inspect.Signature:
    """``compute``'s signature with ``return_scores`` added, for help() and the docs."""
    flag = inspect.Parameter("return_scores", inspect.Parameter.KEYWORD_ONLY, default=False,
                             annotation="bool")
    parameters = list(signature.parameters.values())
    at = next((i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.VAR_KEYWORD),
              len(parameters))
    return signature.replace(parameters=[*parameters[:at], flag, *parameters[at:]],
                             return_annotation="Any")


def cam_method(*, compiles_since: tuple[int, int] = (0, 0), resolution: Resolution = "layer",
               draws: Draws | None = None, syncs: str | None = None,
               register: bool = True) -> Callable[[Callable[..., Computed]], CamMethod]:
    """Turns ``compute(split, x, cls, **options) -> (maps, scores)`` into a public method.

    The arguments are facts about the method, kept on it as attributes of the same names:
    ``compiles_since`` is the first torch (major, minor) whose compiler can trace it
    (older ones get a clear refusal under ``torch.compile``); ``resolution`` is where its
    maps live: ``"layer"``, one map per cut, at that layer's size, or ``"input"``, one map
    fused over the cuts at the input's size (``compute`` returns it as a 1-tuple);
    ``draws`` records the random numbers it takes (see :class:`Draws`);
    ``syncs`` says why it reads a device value on the host in every call,
    stalling it until the device catches up (None: it reads none, which
    ``tests/test_sync_dispatch.py`` holds every registered method to);
    ``register=False`` keeps it out of ``METHODS`` (``sess``, which takes only images).

    Example:
        >>> @camfunc.cam_method(register=False)    # register=True adds it to METHODS
        ... def activation_mean(split, x, cls, *, normalize=True):
        ...     a = split.head(x)
        ...     return (camfunc.normalize(a.mean(1)) if normalize else a.mean(1),), split.tail(a)
        >>> activation_mean(s, x, 3).shape
        torch.Size([2, 4, 4])
    """

    def decorate(compute: Callable[..., Computed]) -> CamMethod:
        name = compute.__name__
        signature = inspect.signature(compute)
        if list(signature.parameters)[:3] != ["split", "x", "cls"]:
            raise TypeError(f"{name}: a method's compute step takes (split, x, cls, ...)")
        cls_default = signature.parameters["cls"].default
        if cls_default is inspect.Parameter.empty:
            cls_default = _REQUIRED

        # Plain Python, no signature read at call time, so that torch.compile traces it.
        def method(split: Any, x: Any, cls: Any = cls_default, *, return_scores: bool = False,
                   **options: Any) -> Any:
            if isinstance(cls, _Required):
                raise TypeError(f"{name}() missing its class argument: cls (an int, a class per "
                                "sample, a (B, K) tensor, camfunc.topk(k) or a callable)")
            _validate.check_compilable(name, compiles_since)
            split = _validate.check_call(split, x, differentiable=options.get("differentiable") is True)
            _targets.check_form(cls, x.shape[0])
            computed, scores = compute(split, x, cls, **options)
            fused = resolution == "input" or len(computed) != split.num_layers  # one map for all cuts
            maps = computed[0] if fused else arrange(split, computed)
            return (maps, scores) if return_scores else maps

        # A code object of its own per method: torch.compile caches compiled code per code
        # object, and every method sharing one would exhaust its recompile limit.
        method.__code__ = method.__code__.replace(co_name=name)
        functools.update_wrapper(method, compute)
        setattr(method, "__signature__", _with_return_scores(signature))
        setattr(method, "compiles_since", compiles_since)
        setattr(method, "resolution", resolution)
        setattr(method, "draws", draws)
        setattr(method, "syncs", syncs)
        public = cast(CamMethod, method)
        if register:
            if name in REGISTRY:
                raise ValueError(f"a method named {name!r} is already registered")
            REGISTRY[name] = public
        return public

    return decorate


def composed(method: Callable[..., Any], split: Split[Any], x: Tensor, cls: _targets.Target,
             **options: Any) -> Computed:
    """A compute step made of another public method: its maps (back in the chain's order,
    which the decorator undoes) and scores. A fused map (one for several cuts) stays one."""
    maps, scores = method(split, x, cls, return_scores=True, **options)
    if not isinstance(maps, list):
        return (maps,), scores
    return in_chain_order(split, tuple(maps)), scores

