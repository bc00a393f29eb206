"""Prepared copies of a model (traced graphs), built once per model and reused.

Keyed weakly by the model, so a model that is dropped takes its entry with it;
a cached value must not hold the model itself, only its submodules. An entry
is rebuilt when the model's structure changes (a module, parameter or buffer
replaced, or a training flag flipped), which a traced graph would not see.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = ["prepared"]

T = TypeVar("T")

Entry = tuple[tuple, Any]  # (the model's fingerprint, what was built from it)

_CACHES: dict[str, weakref.WeakKeyDictionary[nn.Module, Entry]] = {}
_LOCK = threading.Lock()


def fingerprint(model: nn.Module) -> tuple:
    """What a traced copy depends on: module, parameter and buffer identities, and modes."""
    return (tuple((name, id(m), m.training) for name, m in model.named_modules()),
            tuple(id(p) for p in model.parameters()), tuple(id(b) for b in model.buffers()))


def prepared(kind: str, model: nn.Module, build: Callable[[nn.Module], T]) -> T:
    """``build(model)``, cached per model under ``kind`` until the model's structure changes."""
    key = fingerprint(model)
    with _LOCK:
        cache = _CACHES.setdefault(kind, weakref.WeakKeyDictionary())
        hit = cache.get(model)
    if hit is not None and hit[0] == key:
        cached: T = hit[1]
        return cached
    value = build(model)  # outside the lock: tracing takes the trace lock itself
    with _LOCK:
        cache[model] = (key, value)
    return value


def cached(kind: str, model: nn.Module) -> Any:
    """The current entry, if any (for tests and for reading what was built)."""
    with _LOCK:
        cache = _CACHES.get(kind)
        hit = None if cache is None else cache.get(model)
    return None if hit is None or hit[0] != fingerprint(model) else hit[1]
