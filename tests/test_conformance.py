"""Every method in camfunc.METHODS passes the same checks.

Shapes in 1-D, 2-D and 3-D, batch consistency, (B, K) equal to K calls,
compile equal to eager without recompiles, the model left as it was, no NaN
on flat maps, half precision, thread safety. Per-method tests add the
paper-specific checks.
"""

from __future__ import annotations

import dataclasses
import inspect
import threading

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import camfunc
import camfunc.testing as kit
import helpers
from camfunc._core.validate import TORCH_VERSION
from helpers import assert_unchanged, sample_slice, small_cnn, snapshot

pytestmark = pytest.mark.core

NAMES = sorted(camfunc.METHODS)
THRESHOLDED = {"fem"}
SAMPLES = 3


def random_inputs(name, x, noise=None, channels=6):
    """Explicit randomness for the random methods (``noise`` overrides the draw)."""
    drawn = helpers.random_inputs(name, x, channels, samples=SAMPLES)
    if noise is not None and drawn:
        drawn["noise" if "noise" in drawn else "weights"] = noise
    return drawn


def run(name, s, x, cls, noise=None, **kwargs):
    """Calls a method, with explicit randomness for the random ones."""
    kwargs.update(random_inputs(name, x, noise))
    return camfunc.METHODS[name](s, x, cls, **kwargs)


def inputs(dims: int, batch: int = 3, size: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, 3, *(size,) * dims), generator=g)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_shapes_for_1d_2d_3d_activations(name, dims):
    model = small_cnn(dims)
    x = inputs(dims, size=5 if dims == 3 else 7)
    s = camfunc.split(model, "4")
    cams = run(name, s, x, 1)
    assert cams.shape == (3, *x.shape[2:])
    assert cams.dtype == torch.float32
    assert torch.isfinite(cams).all()
    assert cams.min() >= 0 and cams.max() <= 1
    multi = run(name, s, x, torch.tensor([[0, 4]] * 3))
    assert multi.shape == (3, 2, *x.shape[2:])


def same_cnn_in(dims: int, model2d: nn.Sequential) -> nn.Sequential:
    """``small_cnn(dims)`` computing what ``model2d`` computes on inputs one sample deep:
    a 3x3 kernel on a one-row input sees only its middle row (1-D); a 3x3x3 kernel on a
    one-slice input, only its middle slice (3-D)."""
    model = small_cnn(dims)
    with torch.no_grad():
        for i in (0, 3):
            if dims == 1:
                model[i].weight.copy_(model2d[i].weight[:, :, 1, :])
            else:
                model[i].weight.zero_()
                model[i].weight[:, :, 1].copy_(model2d[i].weight)
            model[i].bias.copy_(model2d[i].bias)
        for i in (1, 7):
            model[i].load_state_dict(model2d[i].state_dict())
    return model


@pytest.mark.parametrize("name", NAMES)
def test_1d_and_3d_maps_are_the_2d_maps_of_the_same_computation(name):
    # Values, not only shapes: a 1-D signal is a one-row image, and a 2-D image a one-slice
    # volume, to the same network. Every map must agree with the 2-D method's (itself
    # pinned against the oracles and the papers' formulas).
    model2d = small_cnn(2)
    g = torch.Generator().manual_seed(1)
    row, image = torch.randn(3, 3, 1, 7, generator=g), torch.randn(3, 3, 6, 5, generator=g)
    cls = torch.tensor([[0, 4]] * 3)
    want_row = run(name, camfunc.split(model2d, "4"), row, cls)[:, :, 0]
    got_row = run(name, camfunc.split(same_cnn_in(1, model2d), "4"), row[:, :, 0], cls)
    torch.testing.assert_close(got_row, want_row, atol=1e-6, rtol=1e-5)
    want_image = run(name, camfunc.split(model2d, "4"), image, cls)
    got_image = run(name, camfunc.split(same_cnn_in(3, model2d), "4"), image[:, :, None], cls)
    torch.testing.assert_close(got_image[:, :, 0], want_image, atol=1e-6, rtol=1e-5)
    assert want_image.flatten(2).amax(2).min() > 0  # real maps, not zeros


# The properties every method must have are camfunc.testing's, run here on one fixed model;
# the kit hands a random method the same seeded draws in each call it compares.
@pytest.mark.parametrize("name", NAMES)
def test_batch_consistency(name):
    case = kit.Case.of(small_cnn(), "4", inputs(2, batch=4), [0, 3, 1, 4])
    kit.batch_independent(camfunc.METHODS[name], case, normalize=False)
    kit.batch_independent(camfunc.METHODS[name], dataclasses.replace(case, cls=camfunc.topk(2)))


@pytest.mark.parametrize("name", NAMES)
def test_class_axis_equals_separate_calls(name):
    model = small_cnn()
    x = inputs(2)
    classes = torch.tensor([[0, 1, 2], [4, 4, 0], [3, 1, 2]])
    kit.class_axis_consistent(camfunc.METHODS[name], kit.Case.of(model, "4", x, 0), classes=classes)
    s = camfunc.split(model, "4")
    together = run(name, s, x, classes)
    if "chunk_size" in inspect.signature(camfunc.METHODS[name]).parameters:
        chunked = run(name, s, x, classes, chunk_size=2)
        torch.testing.assert_close(chunked, together, atol=1e-6, rtol=1e-5)
    if "batch_size" in inspect.signature(camfunc.METHODS[name]).parameters:
        small_batches = run(name, s, x, classes, batch_size=1)
        torch.testing.assert_close(small_batches, together, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_topk_is_descending_and_matches_explicit_classes(name):
    model = small_cnn()
    x = inputs(2)
    s = camfunc.split(model, "4")
    cams, scores = run(name, s, x, camfunc.topk(3), return_scores=True)
    with torch.no_grad():
        torch.testing.assert_close(scores, model(x))
        expected = model(x).topk(3, dim=1).indices
    explicit = run(name, s, x, expected)
    torch.testing.assert_close(cams, explicit)


@pytest.mark.parametrize("name", NAMES)
def test_model_is_left_as_it_was(name):
    model = small_cnn()
    model[0].weight.grad = torch.ones_like(model[0].weight)  # an existing .grad must survive
    model[3].register_forward_hook(lambda m, i, o: None)  # the user's own hook stays, and alone
    before = snapshot(model)
    s = camfunc.split(model, "4")
    run(name, s, inputs(2), torch.tensor([[0, 1]] * 3))
    assert_unchanged(before, model)


@pytest.mark.parametrize("name", NAMES)
def test_flat_maps_give_zeros_not_nan(name):
    model = small_cnn()
    with torch.no_grad():
        model[3].weight.zero_()
        model[3].bias.fill_(0.5)  # every activation at the cut is the same constant
    s = camfunc.split(model, "4")
    cams = run(name, s, inputs(2), 2)
    assert torch.isfinite(cams).all()
    assert torch.equal(cams, torch.zeros_like(cams))


class Double(nn.Module):
    def __init__(self, inplace: bool):
        super().__init__()
        self.inplace = inplace

    def forward(self, a):
        return a.mul_(2.0) if self.inplace else a * 2.0


@pytest.mark.parametrize("name", NAMES)
def test_in_place_op_after_the_cut_does_not_corrupt_activations(name):
    def model(inplace):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Double(inplace),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()

    x = inputs(2)
    extra = random_inputs(name, x, channels=4)
    got = camfunc.METHODS[name](camfunc.split(model(True), "1"), x, 1, normalize=False, **extra)
    want = camfunc.METHODS[name](camfunc.split(model(False), "1"), x, 1, normalize=False, **extra)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(name, dtype):
    model = small_cnn()
    x = inputs(2)
    extra = random_inputs(name, x)
    reference = camfunc.METHODS[name](camfunc.split(model, "4"), x, 1, **extra)
    low = small_cnn().to(dtype)
    extra = {k: v.to(dtype) if k == "noise" else v for k, v in extra.items()}
    cams = camfunc.METHODS[name](camfunc.split(low, "4"), x.to(dtype), 1, **extra)
    assert cams.dtype == torch.float32
    assert torch.isfinite(cams).all()
    tolerance = 0.05 if dtype == torch.float16 else 0.15  # bfloat16 keeps 8 bits of mantissa
    if name in THRESHOLDED and dtype == torch.bfloat16:
        # FEM counts activations above mean + 2 std: bfloat16 rounding moves values
        # across that line, so its weights jump; only sanity is checked.
        assert cams.amax() > 0
        return
    assert (cams - reference).abs().max() < tolerance


@pytest.mark.parametrize("name", NAMES)
def test_compiled_equals_eager_without_graph_breaks_or_recompiles(name):
    model = small_cnn()
    # CAM is defined at the layer before the pooling only; the others also run a chain.
    s = camfunc.split(model, ["4"] if name == "cam" else ["4", "2"])
    x = inputs(2)
    classes = torch.tensor([[0, 1], [2, 3], [4, 0]])
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(camfunc.METHODS[name], backend=counter, fullgraph=True)
    kwargs = random_inputs(name, x)
    if TORCH_VERSION < camfunc.METHODS[name].compiles_since:  # this torch's compiler cannot: say so
        with pytest.raises(Exception, match=f"camfunc.{name} cannot be compiled before torch"):
            compiled(s, x, classes, **kwargs)
        return
    got = compiled(s, x, classes, **kwargs)
    want = camfunc.METHODS[name](s, x, classes, **kwargs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    # New values, same shapes: no recompile.
    compiled(s, inputs(2, seed=7), torch.tensor([[1, 1], [0, 3], [2, 2]]), **kwargs)
    assert counter.frame_count == 1


@pytest.mark.parametrize("name", NAMES)
def test_concurrent_calls_from_threads_are_safe(name):
    model = small_cnn()
    s = camfunc.split(model, "4")
    xs = [inputs(2, seed=i) for i in range(6)]
    expected = [run(name, s, x, i % 5) for i, x in enumerate(xs)]
    results: dict[int, torch.Tensor] = {}

    def work(i: int) -> None:
        for _ in range(3):
            results[i] = run(name, s, xs[i], i % 5)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(6):
        torch.testing.assert_close(results[i], expected[i])


def test_all_thousand_classes_in_chunks_match_single_calls():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1000)).eval()
    s = camfunc.split(model, "1")
    x = inputs(2)
    every = torch.arange(1000).expand(3, 1000)
    cams = camfunc.gradcam(s, x, every, chunk_size=128)
    assert cams.shape == (3, 1000, 6, 6)
    for c in (0, 137, 999):
        torch.testing.assert_close(cams[:, c], camfunc.gradcam(s, x, c), atol=1e-6, rtol=1e-5)


# pytest.warns re-emits the other warnings from its own frame: torch's notice on its first jvp too.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nonfinite_sample_gets_nan_maps_and_leaves_the_others_alone(name, bad):
    model = small_cnn()
    s = camfunc.split(model, "4")
    x = inputs(2, batch=3)
    x[1, 0, 2, 2] = bad
    randomness = random_inputs(name, x)
    with pytest.warns(camfunc.NonFiniteWarning, match=r"sample\(s\) \[1\]"):
        cams = camfunc.METHODS[name](s, x, [0, 3, 1], normalize=False, **randomness)
    assert cams[1].isnan().all()
    for i in (0, 2):
        alone = camfunc.METHODS[name](s, x[i:i + 1], [0, 3, 1][i], normalize=False,
                                      **sample_slice(randomness, i))
        torch.testing.assert_close(cams[i:i + 1], alone, atol=1e-5, rtol=1e-4)
