"""Servers call camfunc from many threads while other threads split new models.

``torch.fx`` patches ``nn.Module.__call__`` for the whole process while it
traces; before camfunc took a lock, a trace in one thread broke calls in the
others (32 of 32 failed) and could leave the patch installed.
"""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch
import torchvision
from torch import nn

import camfunc
from camfunc._core.cut import cache
from helpers import small_cnn

pytestmark = pytest.mark.core

MODULE_CALL = nn.Module.__call__
MODULE_GETATTR = nn.Module.__getattr__


def run_threads(workers, *args):
    errors = []
    start = threading.Barrier(len(workers))

    def guarded(work, *a):
        start.wait()
        try:
            work(*a)
        except BaseException as err:  # noqa: BLE001 - the test reports every failure
            errors.append(err)

    threads = [threading.Thread(target=guarded, args=(w, *args)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    return errors


def test_tracing_in_one_thread_breaks_no_call_in_another():
    model = small_cnn()
    s = camfunc.split(model, "4")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = camfunc.gradcam(s, x, [1, 2], normalize=False)
    others = [torchvision.models.resnet18(num_classes=3).eval() for _ in range(4)]  # nothing cached
    tracing, done, calls, wrong = threading.Event(), threading.Event(), [], []

    def compute():  # until every trace is done, so the calls overlap them
        while not done.is_set():
            got = camfunc.gradcam(s, x, [1, 2], normalize=False)
            calls.append(tracing.is_set())
            if not torch.equal(got, expected):
                wrong.append(got)

    def trace():
        try:
            tracing.set()
            for other in others:
                camfunc.split(other, "layer3")
                camfunc.guided_model(other)
                camfunc.fullgrad_model(other)
        finally:
            done.set()

    errors = run_threads([compute, compute, compute, trace])
    assert not errors, errors[:3]
    assert not wrong
    assert sum(calls) >= 5  # calls ran between the traces, while the tracer was at work
    assert nn.Module.__call__ is MODULE_CALL and nn.Module.__getattr__ is MODULE_GETATTR


def test_a_failed_trace_leaves_no_patch_behind():
    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            if self.conv(x).sum() > 0:  # data-dependent: fx gives up halfway
                return x
            return x * 2

    def split_it():
        for _ in range(5):
            with pytest.raises(TypeError):
                camfunc.split(Fails().eval(), "conv")

    errors = run_threads([split_it, split_it])
    assert not errors, errors[:3]
    assert nn.Module.__call__ is MODULE_CALL and nn.Module.__getattr__ is MODULE_GETATTR
    model = small_cnn()
    with torch.no_grad():
        model(torch.randn(1, 3, 7, 7))  # plain calls work afterwards


def test_whole_model_methods_from_many_threads_agree():
    model = small_cnn()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    expected = {"fullgrad": camfunc.fullgrad(model, x, 1), "guided": camfunc.guided_backprop(model, x, 1)}
    wrong = []

    def compute():
        for _ in range(3):
            for name, method in (("fullgrad", camfunc.fullgrad), ("guided", camfunc.guided_backprop)):
                if not torch.equal(method(model, x, 1), expected[name]):
                    wrong.append(name)

    errors = run_threads([compute] * 4)
    assert not errors, errors[:3]
    assert not wrong


def test_whole_model_methods_trace_once_per_model_and_notice_a_replaced_module():
    model = small_cnn()
    x = torch.randn(1, 3, 8, 8)
    camfunc.fullgrad(model, x, 1)
    first = cache.cached("fullgrad", model)
    camfunc.fullgrad(model, x, 1)
    assert cache.cached("fullgrad", model) is first  # no second trace
    assert camfunc.guided_model(model) is camfunc.guided_model(model)

    model[7] = nn.Linear(6, 5).eval()  # a new head: a stale copy would still use the old one
    with torch.no_grad():
        model[7].weight.mul_(3)
    assert cache.cached("fullgrad", model) is None
    camfunc.fullgrad(model, x, 1)
    assert cache.cached("fullgrad", model) is not first
    guided = camfunc.guided_model(model)
    torch.testing.assert_close(guided(x), model(x))


def test_the_cache_does_not_keep_a_model_alive():
    model = small_cnn()
    camfunc.fullgrad(model, torch.randn(1, 3, 8, 8), 1)
    guided = camfunc.guided_model(model)
    assert cache.cached("fullgrad", model) is not None and cache.cached("guided", model) is guided
    alive = weakref.ref(model)
    del model, guided
    gc.collect()
    assert alive() is None
