"""One real inductor compile: equal to eager, and the batch becomes dynamic after one recompile."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import camfunc
from helpers import small_cnn

pytestmark = pytest.mark.core


def test_inductor_matches_eager_and_batch_size_changes_recompile_once():
    torch._dynamo.reset()
    s = camfunc.split(small_cnn(), "3")
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(camfunc.gradcampp, fullgraph=True, backend=counter)
    for batch in (4, 3, 5, 2):  # the second size makes the batch dynamic; no more compiles
        x = torch.randn(batch, 3, 8, 8)
        cls = torch.randint(0, 5, (batch, 2))
        torch.testing.assert_close(compiled(s, x, cls), camfunc.gradcampp(s, x, cls),
                                   atol=1e-5, rtol=1e-4)
    assert counter.frame_count == 2


@pytest.mark.parametrize("name", ["gradcam", "scorecam"])
def test_int_classes_that_change_between_calls_compile(name):
    # The second int makes dynamo treat cls as a symbolic int; torch 2.4 could not then
    # compare it by identity with the "no class given" sentinel, and raised Unsupported.
    model = small_cnn()
    s = camfunc.split(model, "4")
    x = torch.randn(2, 3, 8, 8)
    method = camfunc.METHODS[name]
    compiled = torch.compile(method, backend="aot_eager", fullgraph=True)
    for cls in (0, 1, 3):
        torch.testing.assert_close(compiled(s, x, cls), method(s, x, cls))
