"""Score-CAM, SS-CAM, IS-CAM and Ablation-CAM: references, formulas and invariants."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torchvision
from hypothesis import given
from hypothesis import strategies as st
from pytorch_grad_cam import AblationCAM as PgcAblationCAM
from torch import nn
from torchcam.methods import ISCAM as TcISCAM
from torchcam.methods import ScoreCAM as TcScoreCAM

import camfunc
from helpers import LinearTail, ResNetish, pytorch_grad_cam_raw, small_cnn


@functools.lru_cache(maxsize=None)
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


def image(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn((batch, 3, size, size), generator=torch.Generator().manual_seed(seed))


def top_classes(model: nn.Module, x: torch.Tensor) -> list[int]:
    # Each sample's own best class, so no reference map is trivially zero.
    with torch.no_grad():
        return model(x).argmax(1).tolist()


@pytest.mark.parametrize("method, reference, kwargs", [
    ("scorecam", TcScoreCAM, {}),
    ("iscam", TcISCAM, {"num_samples": 3}),
])
@pytest.mark.parametrize("model_name, layer", [("small", "4"), ("resnet18", "layer2")])
def test_score_family_matches_torchcam(method, reference, kwargs, model_name, layer):
    model = small_cnn() if model_name == "small" else resnet18()
    x = image(size=8) if model_name == "small" else image()
    classes = top_classes(model, x)
    ref_model = copy.deepcopy(model)
    extractor = reference(ref_model, target_layer=layer, batch_size=16,
                          input_shape=tuple(x.shape[1:]), **kwargs)
    with torch.no_grad():
        scores = ref_model(x)
    (want,) = extractor(class_idx=classes, scores=scores, normalized=False)
    extractor.remove_hooks()
    got = camfunc.METHODS[method](camfunc.split(model, layer), x, classes, normalize=False,
                                  batch_size=16, **kwargs)
    assert want.flatten(1).amax(1).min() > 0  # a real map, not an empty one
    torch.testing.assert_close(camfunc.normalize(got), camfunc.normalize(want), atol=1e-5, rtol=0)


def test_scorecam_formula_written_out():
    model = small_cnn()
    x = image(size=8)
    classes = [1, 3]
    with torch.no_grad():
        a = model[:5](x)
        masks = []
        for b in range(2):
            for k in range(a.shape[1]):
                m = a[b, k]
                span = m.max() - m.min()
                m = (m - m.min()) / span if span > 0 else torch.zeros_like(m)
                masks.append(model(x[b:b + 1] * m)[0, classes[b]])
        scores = torch.stack(masks).reshape(2, -1)
        w = torch.softmax(scores, dim=1)
        want = torch.einsum("bc,bchw->bhw", w, a).clamp_min(0)
    got = camfunc.scorecam(camfunc.split(model, "4"), x, classes, normalize=False)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_sscam_with_zero_std_is_scorecam_and_noise_is_reproducible():
    model = small_cnn()
    x = image(size=8)
    s = camfunc.split(model, "4")
    torch.testing.assert_close(camfunc.sscam(s, x, 2, std=0.0, num_samples=2), camfunc.scorecam(s, x, 2))
    first = camfunc.sscam(s, x, 2, num_samples=2, generator=torch.Generator().manual_seed(1))
    second = camfunc.sscam(s, x, 2, num_samples=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, second)


def test_sscam_formula_with_explicit_noise():
    model = small_cnn()
    x = image(size=8)
    s = camfunc.split(model, "4")
    noise = torch.randn((2, 2, 6, 8, 8), generator=torch.Generator().manual_seed(2))
    std = 0.5
    with torch.no_grad():
        a = model[:5](x)
        lo = a.amin((2, 3), keepdim=True)
        span = a.amax((2, 3), keepdim=True) - lo
        masks = torch.where(span > 0, (a - lo) / torch.where(span > 0, span, 1), 0)
        total = torch.zeros(2, 6)
        for i in range(2):
            for b in range(2):
                for k in range(6):
                    mask = masks[b, k] + std * noise[i, b, k]
                    total[b, k] += model(x[b:b + 1] * mask)[0, 2]
        w = torch.softmax(total / 2, dim=1)
        want = torch.einsum("bc,bchw->bhw", w, a).clamp_min(0)
    got = camfunc.sscam(s, x, 2, num_samples=2, std=std, noise=noise, normalize=False)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_flat_channels_share_one_score_exactly():
    model = small_cnn()
    with torch.no_grad():
        model[3].weight[:3].zero_()  # three constant channels at the cut
    x = image(size=8)
    s = camfunc.split(model, "4")
    shortcut = camfunc.scorecam(s, x, 1, normalize=False)
    # SS-CAM transforms every mask, so it runs all channels; with std=0 it must agree.
    full = camfunc.sscam(s, x, 1, std=0.0, num_samples=1, normalize=False)
    torch.testing.assert_close(shortcut, full, atol=1e-6, rtol=1e-5)
    assert shortcut.flatten(1).amax(1).min() > 0


def test_ablationcam_matches_pytorch_grad_cam():
    model = resnet18()
    x = image(size=64)
    classes = top_classes(model, x)
    ref_model = copy.deepcopy(model)
    extractor = PgcAblationCAM(model=ref_model, target_layers=[ref_model.layer4], batch_size=64)
    want = pytorch_grad_cam_raw(extractor, ref_model.layer4, x, classes)
    got = camfunc.ablationcam(camfunc.split(model, "layer4"), x, classes, normalize=False)
    assert want.flatten(1).amax(1).min() > 0
    torch.testing.assert_close(camfunc.normalize(got), camfunc.normalize(want), atol=1e-5, rtol=0)


def test_ablationcam_reruns_the_tail_with_context():
    # A cut inside a residual block: the skip tensor must reach every ablated tail run.
    model = ResNetish().eval()
    x = image(size=8)
    s = camfunc.split(model, "block2.conv1")
    got = camfunc.ablationcam(s, x, 2, normalize=False, batch_size=4)
    with torch.no_grad():
        identity = model.block1(model.stem(x))
        a = model.block2.conv1(identity)

        def tail(v):
            out = torch.relu(model.block2.conv2(torch.relu(v)) + identity) * model.scale
            return model.fc(out.mean((2, 3)))[:, 2]

        y = tail(a)
        drops = torch.stack([y - tail(a * (torch.arange(6) != k).float()[None, :, None, None])
                             for k in range(6)], 1)
        want = torch.einsum("bc,bchw->bhw", drops / y[:, None], a).clamp_min(0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@given(seed=st.integers(0, 10_000), channels=st.integers(1, 5), side=st.integers(2, 4))
def test_ablationcam_on_a_linear_tail_equals_its_closed_form(seed, channels, side):
    # y - y_k = W_ck mean(A_k), so w_k = W_ck mean(A_k) / y.
    g = torch.Generator().manual_seed(seed)
    a = torch.rand((2, channels, side, side), generator=g)
    tail = LinearTail(channels, 3, seed).eval()
    cls = torch.randint(0, 3, (2,), generator=g)
    with torch.no_grad():
        y = tail(a).gather(1, cls[:, None])
        w = tail.fc.weight[cls] * a.mean((2, 3)) / y
        want = torch.einsum("bc,bchw->bhw", torch.where(y != 0, w, 0), a).clamp_min(0)
    got = camfunc.ablationcam(camfunc.Split(lambda v: v, tail), a, cls, normalize=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@given(batch_size=st.integers(1, 40), seed=st.integers(0, 100))
def test_scorecam_does_not_depend_on_batch_size(batch_size, seed):
    model = small_cnn()
    x = image(batch=3, size=6, seed=seed)
    s = camfunc.split(model, "4")
    want = camfunc.scorecam(s, x, [0, 1, 2], batch_size=32)
    torch.testing.assert_close(camfunc.scorecam(s, x, [0, 1, 2], batch_size=batch_size), want,
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["scorecam", "sscam", "iscam", "ablationcam"])
def test_batch_size_must_be_positive(name):
    s = camfunc.split(small_cnn(), "4")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        camfunc.METHODS[name](s, image(size=8), 0, batch_size=0)
