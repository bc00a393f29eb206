"""Random draws, in one place: on the generator's device, and never inside torch.compile.

Methods and metrics that draw take either given values or a ``torch.Generator``;
drawing goes through :func:`draw`, so that every site picks the device the same way
and refuses, with the same message, to draw while ``torch.compile`` traces (inductor's
random numbers differ from eager's).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Sampler = Callable[..., Tensor]  # torch.randn or torch.rand: (shape, *, generator, device, dtype)


def refuse_while_compiling(owner: str, keyword: str) -> None:
    """A clear error when ``owner`` would draw ``keyword`` inside torch.compile."""
    if torch.compiler.is_dynamo_compiling():
        raise ValueError(f"{owner} cannot draw {keyword} inside torch.compile (inductor's random "
                         f"numbers differ from eager's); draw it outside and pass {keyword}=")


def draw(sampler: Sampler, shape: tuple[int, ...], generator: torch.Generator | None,
         near: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``sampler(shape)`` from ``generator``, on its device (``near``'s without one)."""
    return sampler(shape, generator=generator, device=device_for(generator, near), dtype=dtype)


def device_for(generator: torch.Generator | None, near: Tensor) -> torch.device:
    """Where draws happen: on the generator's device, else on ``near``'s."""
    return generator.device if generator is not None else near.device


def uniform_signed(shape: tuple[int, ...], *, generator: torch.Generator | None = None,
                   device: torch.device | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """Uniform in [-1, 1)."""
    return torch.rand(shape, generator=generator, device=device, dtype=dtype) * 2 - 1
