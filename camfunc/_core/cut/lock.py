"""One process-wide lock between tracing a model and running one.

``torch.fx`` patches ``nn.Module.__call__`` and ``__getattr__`` for the whole
process while it traces, and ``torch.export`` traces the same way. A module
call in another thread during that time is recorded into the trace or fails.
So camfunc's own tracing holds the lock exclusively, and every stage camfunc
runs holds it shared: a trace waits for running stages, and stages wait for a
trace. Calls nest freely in one thread; a thread that holds it shared may
still trace (it steps out of its shared hold while it waits).

Code camfunc does not run (a user's own ``symbolic_trace`` in another thread,
or a model called directly) is outside this lock.

camfunc asks ``torch.compiler.is_dynamo_compiling()``, never ``is_compiling()``,
whether it is being compiled: the latter is a process-wide flag that
``torch.export`` sets, so it reads True in every thread while any thread exports.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import torch

__all__ = ["TRACE_LOCK", "TraceLock", "holding_calls"]

F = TypeVar("F", bound=Callable)


class TraceLock:
    """A readers-writer lock: many model calls at once, or one trace alone."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: int | None = None
        self._waiting_writers = 0
        self._local = threading.local()

    def _depth(self) -> int:
        return getattr(self._local, "depth", 0)

    @contextlib.contextmanager
    def calling(self) -> Iterator[None]:
        """Held while camfunc runs a model's stage; re-entrant within a thread."""
        if torch.compiler.is_dynamo_compiling():  # compiled code does not run Module.__call__
            yield
            return
        depth = self._depth()
        if depth or self._writer == threading.get_ident():
            self._local.depth = depth + 1
            try:
                yield
            finally:
                self._local.depth = depth
            return
        with self._cond:
            # Writers first, so a stream of calls cannot starve a trace.
            while self._writer is not None or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        self._local.depth = 1
        try:
            yield
        finally:
            self._local.depth = 0
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def tracing(self) -> Iterator[None]:
        """Held while camfunc traces; excludes every camfunc call in other threads."""
        me = threading.get_ident()
        if self._writer == me:
            yield
            return
        held = self._depth()
        with self._cond:
            if held:  # step out of this thread's shared hold, or wait for ourselves
                self._readers -= 1
            self._waiting_writers += 1
            try:
                while self._writer is not None or self._readers:
                    self._cond.wait()
            finally:
                self._waiting_writers -= 1
            self._writer = me
        try:
            yield
        finally:
            with self._cond:
                self._writer = None
                if held:
                    self._readers += 1
                self._cond.notify_all()


#: The lock every camfunc trace and every camfunc stage call takes.
TRACE_LOCK = TraceLock()


def holding_calls(fn: F) -> F:
    """Runs ``fn`` holding :data:`TRACE_LOCK` shared: for code that calls a split's stages,
    hand-built ones included (camfunc's own stages also hold it themselves)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_dynamo_compiling():
            return fn(*args, **kwargs)
        with TRACE_LOCK.calling():
            return fn(*args, **kwargs)
    return cast(F, wrapper)
