"""Invariants of the methods, hunted by hypothesis on small random tails.

The split is built by hand with the identity as head, so ``x`` *is* the
activations ``A`` and hypothesis controls them directly.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import camfunc
from helpers import LinearTail, permute_channels, random_inputs, sample_slice

pytestmark = pytest.mark.core

# CAM needs a pooled-linear tail and has no ReLU; it has its own closed-form test.
NAMES = sorted(set(camfunc.METHODS) - {"cam"})


def identity(a):
    return a


class Tail(nn.Module):
    """1x1 conv -> ReLU -> global average pool -> linear."""

    def __init__(self, channels: int, hidden: int, classes: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.mix = nn.Conv2d(channels, hidden, 1)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, a):
        return self.fc(torch.relu(self.mix(a)).mean((2, 3)))


@st.composite
def problems(draw, nonnegative: bool = False):
    batch = draw(st.integers(1, 3))
    channels = draw(st.integers(1, 5))
    height, width = draw(st.integers(2, 5)), draw(st.integers(2, 5))
    classes = draw(st.integers(2, 4))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    a = torch.randn((batch, channels, height, width), generator=g)
    if nonnegative:
        a = a.clamp_min(0)
    cls = torch.randint(0, classes, (batch,), generator=g)
    return a, cls, channels, classes, seed


def call(name, s, a, cls, randomness=None, **kwargs):
    """Calls a method; random ones get explicit draws (default: seeded for ``a``)."""
    if randomness is None:
        randomness = random_inputs(name, a, a.shape[1], seed=1)
    return camfunc.METHODS[name](s, a, cls, **randomness, **kwargs)


@pytest.mark.parametrize("name", NAMES)
@given(problem=problems())
def test_maps_are_in_unit_range_and_finite(name, problem):
    a, cls, channels, classes, seed = problem
    tail = Tail(channels, 4, classes, seed).eval()
    cams = call(name, camfunc.Split(identity, tail), a, cls)
    raw = call(name, camfunc.Split(identity, tail), a, cls, normalize=False)
    assert torch.isfinite(cams).all() and torch.isfinite(raw).all()
    assert (raw >= 0).all()
    assert (cams >= 0).all() and (cams <= 1).all()


@pytest.mark.parametrize("name", NAMES)
@given(problem=problems(), data=st.data())
def test_invariant_to_a_permutation_of_the_channels(name, problem, data):
    a, cls, channels, classes, seed = problem
    perm = torch.tensor(data.draw(st.permutations(range(channels))))
    tail = Tail(channels, 4, classes, seed).eval()
    permuted = Tail(channels, 4, classes, seed).eval()
    with torch.no_grad():
        permuted.mix.weight.copy_(tail.mix.weight[:, perm])
    randomness = random_inputs(name, a, channels, seed=seed)
    want = call(name, camfunc.Split(identity, tail), a, cls, randomness, normalize=False)
    got = call(name, camfunc.Split(identity, permuted), a[:, perm], cls,
               permute_channels(randomness, perm), normalize=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["gradcam", "xgradcam", "layercam", "hirescam", "gradcam_elementwise"])
@given(problem=problems(), scale=st.floats(1e-3, 1e3))
def test_normalised_map_ignores_a_positive_scaling_of_the_logits(name, problem, scale):
    # Grad-CAM++ is left out on purpose: its alpha = 1/(2 + sum(A) g) depends on g's scale.
    a, cls, channels, classes, seed = problem
    tail = Tail(channels, 4, classes, seed).eval()
    scaled = Tail(channels, 4, classes, seed).eval()
    with torch.no_grad():
        scaled.fc.weight.mul_(scale)
        scaled.fc.bias.mul_(scale)
    want = call(name, camfunc.Split(identity, tail), a, cls)
    got = call(name, camfunc.Split(identity, scaled), a, cls)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("name", ["gradcam", "xgradcam", "hirescam"])
@given(problem=problems(nonnegative=True))
def test_on_a_pool_linear_tail_equals_relu_of_the_original_cam(name, problem):
    # With S_c = W_c . mean(A), dS_c/dA_k = W_ck / Z everywhere, so both weightings
    # give W_ck / Z: ReLU(sum_k W_ck A_k) / Z, the CAM of Zhou et al. (2016), up to 1/Z.
    a, cls, channels, classes, seed = problem
    tail = LinearTail(channels, classes, seed).eval()
    got = call(name, camfunc.Split(identity, tail), a, cls)
    w = tail.fc.weight.detach()[cls]  # (B, C)
    cam = torch.einsum("bc,bchw->bhw", w, a).clamp_min(0)
    torch.testing.assert_close(got, camfunc.normalize(cam), atol=1e-5, rtol=1e-4)


@given(problem=problems())
def test_gradcampp_weights_follow_eq_19(problem):
    # alpha = g^2 / (2 g^2 + sum_ab(A) g^3), 0 where g = 0 or the denominator <= 0.
    a, cls, channels, classes, seed = problem
    tail = Tail(channels, 4, classes, seed).eval()
    a64 = a.double().requires_grad_()
    tail64 = Tail(channels, 4, classes, seed).double().eval()
    score = tail64(a64).gather(1, cls[:, None]).sum()
    (g,) = torch.autograd.grad(score, a64)
    a64 = a64.detach()
    total = a64.sum((2, 3), keepdim=True)
    den = 2 * g**2 + total * g**3
    alpha = torch.where((g != 0) & (den > 0), g**2 / torch.where(den > 0, den, 1.0), 0.0)
    w = (alpha * g.clamp_min(0)).sum((2, 3))
    cam = torch.einsum("bc,bchw->bhw", w, a64).clamp_min(0).float()
    got = camfunc.gradcampp(camfunc.Split(identity, tail), a, cls)
    torch.testing.assert_close(got, camfunc.normalize(cam), atol=1e-5, rtol=1e-4)


@given(problem=problems())
def test_smooth_gradcampp_with_zero_std_is_gradcampp(problem):
    a, cls, channels, classes, seed = problem
    s = camfunc.Split(identity, Tail(channels, 4, classes, seed).eval())
    got = camfunc.smooth_gradcampp(s, a, cls, std=0.0, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(got, camfunc.gradcampp(s, a, cls), atol=1e-5, rtol=1e-4)


@given(problem=problems(), seed=st.integers(0, 100))
def test_smooth_gradcampp_is_deterministic_under_a_fixed_generator(problem, seed):
    a, cls, channels, classes, tail_seed = problem
    s = camfunc.Split(identity, Tail(channels, 4, classes, tail_seed).eval())
    first = camfunc.smooth_gradcampp(s, a, cls, std=0.5, generator=torch.Generator().manual_seed(seed))
    second = camfunc.smooth_gradcampp(s, a, cls, std=0.5, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(first, second)


@pytest.mark.parametrize("name", NAMES)
@given(problem=problems(), k=st.integers(1, 3))
def test_class_axis_equals_k_separate_calls(name, problem, k):
    a, _, channels, classes, seed = problem
    s = camfunc.Split(identity, Tail(channels, 4, classes, seed).eval())
    g = torch.Generator().manual_seed(seed)
    many = torch.randint(0, classes, (a.shape[0], k), generator=g)
    together = call(name, s, a, many)
    for j in range(k):
        torch.testing.assert_close(together[:, j], call(name, s, a, many[:, j]), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
@given(problem=problems())
def test_a_sample_in_a_batch_gets_its_map_alone(name, problem):
    a, cls, channels, classes, seed = problem
    s = camfunc.Split(identity, Tail(channels, 4, classes, seed).eval())
    randomness = random_inputs(name, a, channels, seed=seed)
    batched = call(name, s, a, cls, randomness, normalize=False)
    for i in range(a.shape[0]):
        alone = call(name, s, a[i:i + 1], cls[i:i + 1], sample_slice(randomness, i), normalize=False)
        torch.testing.assert_close(batched[i:i + 1], alone, atol=1e-5, rtol=1e-4)
