"""Input checks that run before any work, so bad input changes nothing.

They read only types, shapes, dtypes and module flags, so they also run
(and are guarded on) under ``torch.compile``.
"""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from camfunc._core.split import TRAINING_MESSAGE, Split, modes_of, unwrap
from camfunc._util.host import reads_are_free

F = TypeVar("F", bound=Callable[..., Any])


def _major_minor(version: str) -> tuple[int, int]:
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None:
        raise RuntimeError(f"cannot read a major.minor version from torch {version!r}")
    return int(found[1]), int(found[2])


#: The installed torch, as (major, minor).
TORCH_VERSION = _major_minor(torch.__version__)

@torch._dynamo.assume_constant_result  # runs while dynamo traces, so its message reaches the user
def _refuse(message: str) -> None:
    raise NotImplementedError(message)


def refuse_while_compiling(message: str) -> None:
    """Raises ``message`` when called inside ``torch.compile``; nothing in eager mode."""
    if torch.compiler.is_dynamo_compiling():
        _refuse(message)


def check_compilable(method: str, since: tuple[int, int]) -> None:
    """A clear error while ``torch.compile`` traces ``method`` on a torch older than ``since``,
    whose compiler cannot (the method's ``compiles_since``)."""
    if torch.compiler.is_dynamo_compiling() and since > TORCH_VERSION:
        _refuse(f"camfunc.{method} cannot be compiled before torch {since[0]}.{since[1]} (this is "
                f"{torch.__version__}); call it without torch.compile, or use a newer torch")


def compiles_since(since: tuple[int, int]) -> Callable[[F], F]:
    """Records on a whole-model function the first torch whose compiler traces it (its
    ``compiles_since`` attribute, as ``@cam_method(compiles_since=...)`` does for a method)."""
    def mark(fn: F) -> F:
        setattr(fn, "compiles_since", since)
        return fn
    return mark


class NonFiniteWarning(UserWarning):
    """Some samples' maps are NaN: their input or the model's activations were not finite."""


def nonfinite_maps(maps: Tensor, inputs: Tensor | None = None) -> Tensor:
    """Every map of a sample holding a NaN (or whose ``inputs`` are not finite) becomes
    all NaN, and on the CPU a warning names the samples.

    A NaN or Inf in one sample's input reaches its activations and gradients;
    its map must not read as zeros ("no evidence"). Methods whose maps can lose
    the NaN on the way (guided ReLUs, SESS's patch filter) pass their input.
    The check reads values, so it warns only where that is free: eagerly on the
    CPU. On a GPU it would stall the stream; the NaN maps say it there.
    """
    bad = maps.flatten(1).isnan().any(1)
    if inputs is not None:
        bad = bad | ~torch.isfinite(inputs).flatten(1).all(1)
    maps = torch.where(bad.reshape(-1, *(1,) * (maps.ndim - 1)), torch.full_like(maps, float("nan")), maps)
    if reads_are_free(maps) and bool(bad.any()):
        samples = bad.nonzero().flatten().tolist()
        warnings.warn(
            f"the maps of sample(s) {samples} are NaN: their input or the model's activations "
            "hold NaN or Inf", NonFiniteWarning, stacklevel=user_stacklevel())
    return maps


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning raised here at the first caller outside camfunc."""
    level = 1
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").startswith("camfunc."):
        frame, level = frame.f_back, level + 1
    return level


def check_split(split: Any) -> Split:
    if not isinstance(split, Split):
        raise TypeError(
            f"expected a camfunc.Split as first argument, got {type(split).__name__}; "
            "build one with camfunc.split(model, layer)"
        )
    return split


def _modules_of(split: Split) -> list[nn.Module]:
    if split.model is not None:
        return [split.model]
    return [f for f in split.stages if isinstance(f, nn.Module)]


def check_traced_modes(split: Split) -> None:
    """The model is in the modes it was traced in: tracing baked in its ``self.training`` branches."""
    if split.model is None or split.traced_modes is None:
        return
    now = modes_of(split.model)
    if now != split.traced_modes:
        was = "training" if any(split.traced_modes) else "eval"
        raise ValueError(
            f"this split was traced with the model in {was} mode, and the model's modes have "
            "changed since (tracing bakes in `if self.training` branches); split it again with "
            "camfunc.split(model, layer) after model.train() or model.eval()"
        )


def check_eval_mode(split: Split) -> None:
    # A traced split baked in the model's control flow, so every module counts.
    # A hand-built split may wrap fresh containers (``model[:4]`` is a new
    # Sequential in training mode): there only the leaves do the work.
    if split.model is not None:
        modules = list(split.model.modules())
    else:
        modules = [m for root in _modules_of(split) for m in root.modules()
                   if not list(m.children())]
    for module in modules:
        if module.training:
            raise ValueError(TRAINING_MESSAGE)


def _param_dtype(split: Split) -> torch.dtype | None:
    for root in _modules_of(split):
        for p in root.parameters():
            if p.is_floating_point():
                return p.dtype
    return None


def check_input(split: Split, x: Any) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor batch, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"x must be a floating-point tensor, got dtype {x.dtype}; "
            "convert images with x.float() (and normalise them as the model expects)"
        )
    if x.ndim < 2:
        raise ValueError(f"x must be a batch (B, ...), got shape {tuple(x.shape)}")
    if split.input_ndim is not None and x.ndim != split.input_ndim:
        raise ValueError(
            f"the model expects {split.input_ndim}-D input (B, C, ...), got shape "
            f"{tuple(x.shape)}; add the batch axis with x.unsqueeze(0) if it is one sample"
        )
    if x.shape[0] == 0:
        raise ValueError("x is an empty batch (B = 0); give at least one sample")
    if split.batch is not None and x.shape[0] != split.batch:
        raise ValueError(
            f"this split was captured by torch.export for batches of {split.batch} only (the model "
            f"fixes its batch size); got {x.shape[0]}. Split again with example_input of your batch"
        )
    dtype = _param_dtype(split)
    if dtype is not None and dtype != x.dtype:
        raise TypeError(
            f"x has dtype {x.dtype} but the model's parameters are {dtype}; "
            f"cast the input with x.to({dtype})"
        )


def check_call(split: Any, x: Any, *, differentiable: bool = False) -> Split:
    """The split and input checks every method runs; returns the split bound to ``x``
    (:meth:`Split.bound`). Training mode is allowed only for differentiable maps
    (training with them is what it is for)."""
    split = check_split(split)
    check_input(split, x)
    bound: Split = split.bound(x)  # a capture valid for x and the model as it is now
    check_traced_modes(bound)
    if not differentiable:
        check_eval_mode(bound)
    return bound


def check_one_forward(split: Split, method: str) -> None:
    """A method that runs the model more than once per call refuses training mode, where
    each run would update batch norm's statistics again."""
    if (split.model is not None and any(modes_of(split.model))) or any(
            m.training for f in split.stages if isinstance(f, nn.Module) for m in f.modules()):
        raise ValueError(
            f"{method} runs the model more than once per call, so in training mode batch norm "
            "would update its statistics more than once; call it with the model in eval mode, "
            "or train with a one-forward method (gradcam, gradcampp, xgradcam, layercam, hirescam)"
        )


def check_count(value: Any, name: str, *, minimum: int = 1) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``; else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        wanted = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return value


def whole_model(model: Any, method: str) -> nn.Module:
    """The model a whole-model method works on: ``model`` itself or a split's, unwrapped."""
    if isinstance(model, Split):
        if model.model is None:
            raise ValueError(f"{method} needs the whole model: pass it, or a split with split.model")
        model = model.model
    if not isinstance(model, nn.Module):
        raise TypeError(f"{method} takes the model (or a Split), got {type(model).__name__}")
    return unwrap(model)
