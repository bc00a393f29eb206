"""Whole-model and composite methods under torch.compile(fullgraph=True), against eager.

Tracing cannot run inside a compiled region, so FullGrad and guided
backpropagation compile a function of the prepared model
(``fullgrad_model``, ``guided_model``); DFF takes an explicit initialisation.
"""

import pytest
import torch
import torch._dynamo.testing

import camfunc
from camfunc._core.validate import TORCH_VERSION
from helpers import assert_unchanged, small_cnn, snapshot

pytestmark = pytest.mark.core


def compiled(fn):
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    return torch.compile(fn, fullgraph=True, backend=counter), counter


def test_prepared_fullgrad_compiles_matches_eager_and_does_not_recompile():
    model = small_cnn()
    before = snapshot(model)
    prepared = camfunc.fullgrad_model(model)
    run, counter = compiled(lambda x, c: camfunc.fullgrad(prepared, x, c))
    for seed in range(2):
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
        c = torch.tensor([seed, 3])
        torch.testing.assert_close(run(x, c), camfunc.fullgrad(model, x, c), atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1
    assert_unchanged(before, model)


def test_prepared_guided_backprop_and_guided_gradcam_compile_and_match_eager():
    model = small_cnn()
    before = snapshot(model)
    guided = camfunc.guided_model(model)
    split = camfunc.split(model, "4")
    x = torch.randn(3, 3, 8, 8)
    run, counter = compiled(lambda x: camfunc.guided_backprop(guided, x, camfunc.topk(2)))
    if TORCH_VERSION < camfunc.guided_backprop.compiles_since:  # this torch's compiler cannot: say so
        with pytest.raises(Exception, match="camfunc.guided_backprop cannot be compiled before torch 2.11"):
            run(x)
        return
    torch.testing.assert_close(run(x), camfunc.guided_backprop(model, x, camfunc.topk(2)))
    both, _ = compiled(lambda x: camfunc.guided_gradcam(split, x, 1, guided=guided))
    torch.testing.assert_close(both(x), camfunc.guided_gradcam(split, x, 1), atol=1e-6, rtol=1e-5)
    assert counter.frame_count == 1
    assert_unchanged(before, model)


def test_guided_model_is_idempotent():
    guided = camfunc.guided_model(small_cnn())
    assert camfunc.guided_model(guided) is guided


def test_dff_with_an_explicit_initialisation_compiles():
    model = small_cnn()
    split = camfunc.split(model, "4")
    x = torch.randn(2, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    init = (torch.rand(6, 3, generator=g), torch.rand(3, 2 * 64, generator=g))
    run, _ = compiled(lambda x: camfunc.dff(split, x, 3, iterations=20, init=init))
    got, want = run(x), camfunc.dff(split, x, 3, iterations=20, init=init)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_aug_smooth_compiles():
    split = camfunc.split(small_cnn(), "4")
    x = torch.randn(2, 3, 8, 8)
    smoothed = camfunc.aug_smooth(camfunc.gradcampp)
    run, _ = compiled(lambda x: smoothed(split, x, 2))
    torch.testing.assert_close(run(x), smoothed(split, x, 2), atol=1e-5, rtol=1e-5)
