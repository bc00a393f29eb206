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
