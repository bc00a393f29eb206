"""Where reading a tensor's values on the host is free, and a switch that says it is not.

camfunc reads values on purpose only where that costs nothing: eagerly, in host
memory (the range check of a class tensor, the non-finite warning, Score-CAM's
skip of all-zero masks). On an accelerator the same read would stall the host
until the device catches up, so those paths take their device form there.

:func:`as_on_a_device` makes host tensors take the device form too, so that a
CPU-only test can see every read a GPU run would make (``tests/test_sync_dispatch.py``).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor

_ON_A_DEVICE = contextvars.ContextVar("camfunc_as_on_a_device", default=False)


def reads_are_free(t: Tensor) -> bool:
    """Reading ``t``'s values costs no host-device sync: it is in host memory, eagerly, and
    :func:`as_on_a_device` is not in force."""
    return t.device.type == "cpu" and not torch.compiler.is_dynamo_compiling() and not _ON_A_DEVICE.get()


@contextlib.contextmanager
def as_on_a_device() -> Iterator[None]:
    """Within it (in this thread or task), host tensors take the paths a device's would:
    no value is read on purpose, and a class tensor is checked with ``torch._assert_async``."""
    token = _ON_A_DEVICE.set(True)
    try:
        yield
    finally:
        _ON_A_DEVICE.reset(token)


F = TypeVar("F", bound=Callable[..., Any])


def syncs(reason: str | None) -> Callable[[F], F]:
    """Records on a whole-model function why it reads a device value on the host (its
    ``syncs`` attribute, as ``@cam_method(syncs=...)`` does for a method; None: it never does)."""
    def mark(fn: F) -> F:
        setattr(fn, "syncs", reason)
        return fn
    return mark
