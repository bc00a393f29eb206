"""SESS: against pytorch-grad-cam 1.5.7's ``SESS``, and its invariants.

pytorch-grad-cam's SESS (with its own GradCAM or LayerCAM as base method,
hooks on a deep copy) is the reference: its maps are final (normalised, at
the input's size), so they are compared with camfunc's normalised maps at an
absolute tolerance of 1e-5. The Gaussian blur is checked against OpenCV's,
which pytorch-grad-cam calls.
"""

from __future__ import annotations

import functools
from fractions import Fraction

import cv2
import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_grad_cam import SESS, GradCAM, LayerCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import camfunc
from camfunc._methods import sess
from camfunc._methods._sess import gaussian_blur
from helpers import assert_unchanged, fresh, small_cnn, snapshot

ATOL = 1e-5


def strided_cnn(seed: int = 0) -> nn.Sequential:
    """conv(stride 2)-bn-relu, conv-relu ("4") at half the input's size, pool, linear."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
    model[1].running_mean.uniform_(-0.2, 0.2)
    model[1].running_var.uniform_(0.5, 1.5)
    return model.eval()


def image(batch: int = 2, height: int = 12, width: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, 3, height, width), generator=g)


def reference(model: nn.Module, layers: list[str], x: torch.Tensor, classes, base=GradCAM,
              **options) -> torch.Tensor:
    """pytorch-grad-cam's SESS on a deep copy; ``classes=None`` is its own argmax target."""
    copy = fresh(model)
    targets = None if classes is None else [ClassifierOutputTarget(c) for c in classes]
    with SESS(copy, [copy.get_submodule(name) for name in layers], base_method=base,
              **options) as cam:
        return torch.from_numpy(cam(x, targets))


OPTIONS = [
    {"num_scales": 3},
    {"num_scales": 3, "pool": "max"},
    {"num_scales": 4, "pre_filter_ratio": 0.5},
    {"num_scales": 3, "theta": 0.2, "step_size": 5},
    {"num_scales": 2, "smooth": False, "use_softmax_scores": False},
    {"scales": [12, 16], "window_size": 8, "step_size": 4, "batch_size": 5},
    {"num_scales": 3, "window_size": 10, "scale_step_ratio": 0.37, "pool": "max",
     "pre_filter_ratio": 0.25},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_matches_pytorch_grad_cam_sess(options):
    model = strided_cnn()
    x = image()  # 12x16: not square, so scaled widths are truncated and windows shifted back
    want = reference(model, ["4"], x, [1, 3], **options)
    got = sess(camfunc.split(model, "4"), x, [1, 3], **options)
    assert got.shape == (2, 12, 16)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@functools.lru_cache(maxsize=None)
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.mark.parametrize("base, method, layers, options", [
    (GradCAM, camfunc.gradcam, ["layer4"], {"num_scales": 2}),  # 2x2 maps of 64px patches
    (LayerCAM, camfunc.layercam, ["layer3", "layer4"], {"num_scales": 2, "pre_filter_ratio": 0.3}),
])
def test_matches_pytorch_grad_cam_sess_on_resnet18(base, method, layers, options):
    model = resnet18()
    x = image(height=64, width=64)
    want = reference(model, layers, x, [2, 7], base=base, **options)
    got = sess(camfunc.split(model, layers), x, [2, 7], method=method, **options)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def exact_landings(source: int, target: int) -> set[int]:
    """Target pixels whose sample position (i + 1/2) source / target - 1/2 is a whole source pixel."""
    return {i for i in range(target)
            if ((Fraction(2 * i + 1, 2) * Fraction(source, target) - Fraction(1, 2))
                .denominator == 1)}


def test_pytorch_grad_cam_counts_pixels_that_only_rounding_reaches():
    # Output column 10 of an 18 -> 14 resize samples canvas column 13 exactly:
    # 10.5 * 18 / 14 - 0.5 = 13. OpenCV (which pytorch-grad-cam pastes with)
    # computes it in double, gets 13.000000000000002, and gives column 14 a
    # weight of ~2e-15.
    canvas = np.zeros((18, 18), np.float32)
    canvas[:, 14] = 1.0
    assert 0 < cv2.resize(canvas, (14, 14))[0, 10] < 1e-12
    # Where a patch map is exactly 0 at the sampled pixel (outside the patch,
    # or ReLU'd away) and positive next to it, that pixel then counts as
    # covered in pytorch-grad-cam's mean fusion (~1e-16 > theta = 0), and its
    # mean drops by up to n / (n + 1). camfunc's exact weights leave it out.
    # Only such pixels differ; the max fusion, which does not count, agrees.
    model = strided_cnn()
    s = camfunc.split(model, "4")
    x = image(height=14, width=14, seed=1)
    landings = exact_landings(18, 14)
    for pool in ("mean", "max"):
        want = reference(model, ["4"], x, [1, 3], scales=[14, 18], smooth=False, pool=pool)
        got = sess(s, x, [1, 3], scales=[14, 18], smooth=False, pool=pool)
        differ = ((got - want).abs() > ATOL).nonzero()[:, 1:].tolist()
        if pool == "max":
            assert not differ
            continue
        assert differ, "pytorch-grad-cam's rounding no longer shows; compare with atol alone"
        assert all(r in landings or c in landings for r, c in differ)


def test_topk_one_is_pytorch_grad_cam_default_target():
    model = strided_cnn(seed=3)
    x = image(batch=3, seed=4)
    want = reference(model, ["4"], x, None, num_scales=2)
    got = sess(camfunc.split(model, "4"), x, camfunc.topk(1), num_scales=2)
    assert got.shape == (3, 1, 12, 16)
    torch.testing.assert_close(got[:, 0], want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (3, 4), (5, 17), (12, 16), (30, 9)])
def test_blur_is_opencv_gaussian_blur(size):
    maps = torch.rand((2, *size), generator=torch.Generator().manual_seed(0))
    want = np.stack([cv2.GaussianBlur(m, (11, 11), 5.0, 0) for m in maps.numpy()])
    torch.testing.assert_close(gaussian_blur(maps), torch.from_numpy(want), atol=1e-6, rtol=0)


@settings(max_examples=10)  # examples: each runs SESS's scales and windows, about 1 s
@given(seed=st.integers(0, 2**16), cls=st.integers(0, 4), pool=st.sampled_from(["mean", "max"]))
def test_one_scale_one_window_is_the_upsampled_method_map(seed, cls, pool):
    # One patch, the image itself, weight s / max s = 1: every positive pixel
    # counts once (mean) or is the max, so SESS is the base map at the input size.
    model = strided_cnn()
    x = image(batch=2, height=10, width=10, seed=seed)
    s = camfunc.split(model, "4")
    got = sess(s, x, cls, scales=[10], smooth=False, pool=pool)
    want = camfunc.normalize(camfunc.upsample(camfunc.gradcam(s, x, cls), (10, 10)))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def symmetric_cnn(seed: int) -> nn.Sequential:
    """Kernels mirrored left-right: the model commutes with horizontal flips."""
    model = small_cnn(seed=seed)
    with torch.no_grad():
        for conv in (model[0], model[3]):
            conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)
    return model


@settings(max_examples=10)  # examples: each runs SESS twice (flipped), about 2 s
@given(seed=st.integers(0, 2**16), cls=st.integers(0, 4), pool=st.sampled_from(["mean", "max"]),
       step=st.sampled_from([4, 8]))
def test_flip_commutes_when_the_windows_are_symmetric(seed, cls, pool, step):
    # Scaled widths 8, 16 are multiples of the step, so at every scale the
    # window starts are their own mirror image (s -> width - 8 - s); resizing,
    # blur (mirrored borders) and the model all commute with flips, hence SESS does.
    s = camfunc.split(symmetric_cnn(seed % 7), "4")
    x = image(batch=2, height=8, width=8, seed=seed)
    options = {"scales": [8, 16], "step_size": step, "pool": pool, "normalize": False}
    flipped = sess(s, x.flip(-1), cls, **options)
    torch.testing.assert_close(flipped, sess(s, x, cls, **options).flip(-1), atol=ATOL, rtol=0)


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_batch_equals_per_image_calls(ratio):
    s = camfunc.split(strided_cnn(), "4")
    x = image(batch=3)
    classes = [0, 3, 1]
    batched = sess(s, x, classes, num_scales=3, pre_filter_ratio=ratio, normalize=False)
    for i in range(3):
        alone = sess(s, x[i:i + 1], classes[i], num_scales=3, pre_filter_ratio=ratio,
                     normalize=False)
        torch.testing.assert_close(batched[i:i + 1], alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_batch_size_does_not_change_the_result(pool):
    s = camfunc.split(strided_cnn(), "4")
    x = image(batch=2)
    runs = [sess(s, x, [1, 2], num_scales=2, step_size=5, pool=pool, batch_size=size)
            for size in (1, 7, 1000)]
    for other in runs[1:]:  # batch composition moves float32 convolutions by ~1e-6
        torch.testing.assert_close(other, runs[0], atol=ATOL, rtol=0)


def test_method_is_called_with_at_most_batch_size_patches():
    sizes = []

    def counting(split, patches, cls, **kwargs):
        sizes.append(patches.shape[0])
        return camfunc.gradcam(split, patches, cls, **kwargs)

    s = camfunc.split(strided_cnn(), "4")
    sess(s, image(batch=2), 0, num_scales=3, method=counting, batch_size=4)
    # Scales 12, 15, 18 of a 12x16 input: 12x16, 15x20, 18x24 images, holding
    # 1x2, 2x2 and 2x2 windows of 12 (the last of each row shifted back); two images.
    assert sum(sizes) == 2 * 10 and max(sizes) == 4


def test_class_axis_topk_and_class_forms_agree():
    s = camfunc.split(strided_cnn(), "4")
    x = image(batch=2)
    classes = torch.tensor([[0, 4], [2, 2]])
    together, scores = sess(s, x, classes, num_scales=2, return_scores=True)
    assert together.shape == (2, 2, 12, 16)
    for k in range(2):
        alone = sess(s, x, classes[:, k], num_scales=2)
        torch.testing.assert_close(together[:, k], alone, atol=1e-6, rtol=0)
    best = scores.topk(2, dim=1).indices
    torch.testing.assert_close(sess(s, x, camfunc.topk(2), num_scales=2),
                               sess(s, x, best, num_scales=2))
    torch.testing.assert_close(sess(s, x, 3, num_scales=2), sess(s, x, [3, 3], num_scales=2))


def test_output_range_and_scores():
    model = strided_cnn()
    x = image(batch=2)
    cams, scores = sess(camfunc.split(model, "4"), x, 1, num_scales=3, return_scores=True)
    assert cams.dtype == torch.float32 and cams.shape == (2, 12, 16)
    assert torch.equal(cams.amin((1, 2)), torch.zeros(2))
    assert torch.equal(cams.amax((1, 2)), torch.ones(2))
    with torch.no_grad():
        torch.testing.assert_close(scores, model(x))


def test_method_options_are_passed_on():
    s = camfunc.split(strided_cnn(), "4")
    x = image(batch=2)
    chunked = sess(s, x, torch.tensor([[0, 1], [2, 3]]), num_scales=2, chunk_size=1)
    torch.testing.assert_close(chunked, sess(s, x, torch.tensor([[0, 1], [2, 3]]), num_scales=2))
    # One scale, one window (the image itself): SESS is its base method's map at the
    # input's size, so Score-CAM's values, not Grad-CAM's, must come out.
    square = image(batch=2, height=10, width=10)
    scored = sess(s, square, 1, scales=[10], smooth=False, method=camfunc.scorecam, batch_size=3)
    want = camfunc.normalize(camfunc.upsample(camfunc.scorecam(s, square, 1), (10, 10)))
    assert not torch.allclose(want, camfunc.normalize(camfunc.upsample(camfunc.gradcam(s, square, 1), (10, 10))))
    torch.testing.assert_close(scored, want, atol=ATOL, rtol=0)


def test_flat_activations_give_zeros_not_nan():
    model = strided_cnn()
    with torch.no_grad():
        model[3].weight.zero_()
        model[3].bias.fill_(0.5)
    cams = sess(camfunc.split(model, "4"), image(), 2, num_scales=2)
    assert torch.equal(cams, torch.zeros_like(cams))


def test_model_is_left_as_it_was():
    model = strided_cnn()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    model[3].register_forward_hook(lambda m, i, o: None)
    before = snapshot(model)
    sess(camfunc.split(model, "4"), image(), torch.tensor([[0, 1]] * 2), num_scales=3,
         pre_filter_ratio=0.5)
    assert_unchanged(before, model)


def test_half_precision_model_is_close_to_float():
    x = image(batch=2, height=10, width=12)
    want = sess(camfunc.split(small_cnn(), "4"), x, 1, num_scales=3)
    got = sess(camfunc.split(small_cnn().half(), "4"), x.half(), 1, num_scales=3)
    assert got.dtype == torch.float32
    assert (got - want).abs().max() < 0.05


def test_compiles_fullgraph_equal_to_eager_without_recompiles():
    torch._dynamo.reset()
    s = camfunc.split(small_cnn(), ["4", "2"])
    classes = torch.tensor([[0, 1], [2, 3]])
    options = {"scales": [8, 12], "step_size": 4, "pre_filter_ratio": 0.5, "pool": "max"}
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(sess, backend=counter, fullgraph=True)
    x = image(batch=2, height=8, width=10)
    torch.testing.assert_close(compiled(s, x, classes, **options), sess(s, x, classes, **options))
    compiled(s, image(batch=2, height=8, width=10, seed=5), torch.tensor([[4, 4], [0, 1]]),
             **options)
    assert counter.frame_count == 1


def not_2d(split, x, cls, **kwargs):
    return camfunc.gradcam(split, x, cls, **kwargs).flatten(-2)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"pool": "avg"}, ValueError, r"pool must be 'mean' or 'max', got 'avg'"),
    ({"pre_filter_ratio": 1.0}, ValueError, r"pre_filter_ratio must be in \[0, 1\)"),
    ({"pre_filter_ratio": -0.1}, ValueError, r"pre_filter_ratio"),
    ({"num_scales": 0}, ValueError, r"num_scales must be a positive int"),
    ({"window_size": 0}, ValueError, r"window_size must be a positive int"),
    ({"step_size": 2.5}, ValueError, r"step_size must be a positive int"),
    ({"scales": [12, 8]}, ValueError, r"scale must be an int >= the window size 12, got 8"),
    ({"scales": 12}, ValueError, r"non-empty sequence"),
    ({"theta": "0"}, TypeError, r"theta must be a number"),
    ({"batch_size": 0}, ValueError, r"batch_size must be a positive int"),
    ({"method": 3}, TypeError, r"method must be a camfunc method"),
    ({"method": not_2d}, ValueError, r"2-D maps"),
])
def test_bad_options(kwargs, error, message):
    model = strided_cnn()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        sess(camfunc.split(model, "4"), image(), 0, **kwargs)
    assert_unchanged(before, model)


@pytest.mark.parametrize("cls, error, message", [
    (lambda out: out[:, 0], TypeError, r"sess needs class indices"),
    (camfunc.finer(1), TypeError, r"sess needs class indices"),
    (5, IndexError, r"valid indices are 0 to 4"),
    ([0, 1, 2], ValueError, r"3 entries but the batch has 2"),
    (camfunc.topk(6), ValueError, r"more classes than the model's 5"),
])
def test_bad_classes(cls, error, message):
    model = strided_cnn()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        sess(camfunc.split(model, "4"), image(), cls)
    assert_unchanged(before, model)


def test_non_images_and_training_mode_are_refused():
    model = small_cnn(dims=1)
    with pytest.raises(ValueError, match=r"x must be \(B, C, H, W\), got shape \(2, 3, 8\)"):
        sess(camfunc.split(model, "4"), torch.randn(2, 3, 8), 0)
    model = strided_cnn()
    s = camfunc.split(model, "4")
    model.train()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        sess(s, image(), 0)
    assert_unchanged(before, model)
