"""Invariants of the methods, hunted by hypothesis on small random tails.

The split is built by hand with the identity as head, so ``x`` *is* the
activations ``A`` and hypothesis controls them directly.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

import camfunc
import camfunc.testing as kit
from helpers import CONV, permute_channels, random_inputs

pytestmark = pytest.mark.core

# CAM needs a pooled-linear tail and has no ReLU; it has its own closed-form test.
NAMES = sorted(set(camfunc.METHODS) - {"cam"})


def identity(a):
    return a


class Tail(nn.Module):
    """1x1 conv -> ReLU or GELU -> global average pool -> linear, on 1-D, 2-D or 3-D activations.
    GELU lets negative pre-activations through and has curvature everywhere."""

    def __init__(self, channels: int, hidden: int, classes: int, seed: int, dims: int = 2,
                 act: str = "relu"):
        super().__init__()
        torch.manual_seed(seed)
        self.mix = CONV[dims](channels, hidden, 1)
        self.fc = nn.Linear(hidden, classes)
        self.act = nn.GELU() if act == "gelu" else nn.ReLU()

    def forward(self, a):
        return self.fc(self.act(self.mix(a)).flatten(2).mean(2))


class Problem(NamedTuple):
    a: torch.Tensor
    cls: torch.Tensor
    channels: int
    classes: int
    seed: int
    dims: int
    act: str

    def tail(self, hidden: int = 4) -> nn.Module:
        return Tail(self.channels, hidden, self.classes, self.seed, self.dims, self.act).eval()


@st.composite
def problems(draw, nonnegative: bool = False):
    """Activations drawn value by value (zeros, ties, negatives and extremes included),
    in 1, 2 or 3 spatial dimensions, with a ReLU or a GELU tail."""
    dims = draw(st.sampled_from([1, 2, 3]))
    batch = draw(st.integers(1, 3))
    channels = draw(st.integers(1, 5))
    spatial = draw(st.lists(st.integers(1 if dims == 3 else 2, 4 if dims == 3 else 5),
                            min_size=dims, max_size=dims))
    classes = draw(st.integers(2, 4))
    seed = draw(st.integers(0, 2**16))
    lowest = 0.0 if nonnegative else -4.0
    values = hnp.arrays(np.float32, (batch, channels, *spatial),
                        elements=st.floats(lowest, 4.0, width=32, allow_subnormal=False))
    a = torch.from_numpy(draw(values).copy())
    cls = torch.tensor(draw(st.lists(st.integers(0, classes - 1), min_size=batch, max_size=batch)))
    act = draw(st.sampled_from(["relu", "gelu"]))
    return Problem(a, cls, channels, classes, seed, dims, act)


# The features whose first principal component an eigen method projects on, from A and G.
EIGEN_FEATURES = {"eigencam": lambda a, g: a, "eigengradcam": lambda a, g: g * a,
                  "segeigencam": lambda a, g: g.abs() * a}


def well_conditioned(name: str, problem: Problem) -> None:
    """Inputs where the answer is not float32 rounding amplified, which is not the question
    these properties ask, so hypothesis looks elsewhere.

    Ablation-CAM divides by the class score (pytorch-grad-cam's formula): near 0, two
    summation orders disagree. An eigen method's direction is defined only up to the gap
    between the top two singular values, its sign only up to the lean of the projection,
    and its flat rule (sqrt(eps)) flips near its threshold: without margins, a batched and
    a lone SVD (whose BLAS may run on another thread count) pick different answers.
    """
    if name == "ablationcam":
        with torch.no_grad():
            assume(bool((problem.tail()(problem.a).abs() > 1e-2).all()))
    if name in EIGEN_FEATURES:
        out, pull = torch.func.vjp(problem.tail(), problem.a)
        (g,) = pull(nn.functional.one_hot(problem.cls, out.shape[1]).to(out.dtype))
        features = EIGEN_FEATURES[name](problem.a, g).detach().double()
        x = features.flatten(2).transpose(1, 2)
        x = x - x.mean(1, keepdim=True)
        spread = x.abs().flatten(1).amax(1) / features.abs().flatten(1).amax(1).clamp_min(1e-300)
        flat_rule = torch.finfo(torch.float32).eps ** 0.5
        assume(bool(((spread < flat_rule / 4) | (spread > flat_rule * 4)).all()))
        values, directions = torch.linalg.svd(x, full_matrices=False)[1:]
        second = values[:, 1] if values.shape[1] > 1 else torch.zeros_like(values[:, 0])
        flat = spread < flat_rule / 4
        assume(bool((flat | (values[:, 0] - second > 1e-2 * values[:, 0])).all()))
        projection = (x @ directions[:, 0, :].unsqueeze(-1)).squeeze(-1)
        lean = (projection.amax(1) + projection.amin(1)).abs()
        assume(bool((flat | (lean > 1e-3 * projection.abs().amax(1))).all()))


def call(name, s, a, cls, randomness=None, **kwargs):
    """Calls a method; random ones get explicit draws (default: seeded for ``a``)."""
    if randomness is None:
        randomness = random_inputs(name, a, a.shape[1], seed=1)
    return camfunc.METHODS[name](s, a, cls, **randomness, **kwargs)


@pytest.mark.parametrize("name", NAMES)
@given(problem=problems())
def test_maps_are_in_unit_range_and_finite(name, problem):
    a, cls = problem.a, problem.cls
    tail = problem.tail()
    cams = call(name, camfunc.Split(identity, tail), a, cls)
    raw = call(name, camfunc.Split(identity, tail), a, cls, normalize=False)
    assert torch.isfinite(cams).all() and torch.isfinite(raw).all()
    assert (raw >= 0).all()
    assert (cams >= 0).all() and (cams <= 1).all()


@pytest.mark.parametrize("name", NAMES)
@given(problem=problems(), data=st.data())
def test_invariant_to_a_permutation_of_the_channels(name, problem, data):
    well_conditioned(name, problem)
    a, cls, channels = problem.a, problem.cls, problem.channels
    perm = torch.tensor(data.draw(st.permutations(range(channels))))
    tail, permuted = problem.tail(), problem.tail()
    with torch.no_grad():
        permuted.mix.weight.copy_(tail.mix.weight[:, perm])
    randomness = random_inputs(name, a, channels, seed=problem.seed)
    want = call(name, camfunc.Split(identity, tail), a, cls, randomness, normalize=False)
    got = call(name, camfunc.Split(identity, permuted), a[:, perm], cls,
               permute_channels(randomness, perm), normalize=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["gradcam", "xgradcam", "layercam", "hirescam", "gradcam_elementwise"])
@given(problem=problems(), scale=st.floats(1e-3, 1e3))
def test_normalised_map_ignores_a_positive_scaling_of_the_logits(name, problem, scale):
    # Grad-CAM++ is left out on purpose: its alpha = 1/(2 + sum(A) g) depends on g's scale.
    a, cls = problem.a, problem.cls
    tail, scaled = problem.tail(), problem.tail()
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
    a, cls = problem.a, problem.cls
    torch.manual_seed(problem.seed)
    fc = nn.Linear(problem.channels, problem.classes).eval()
    got = call(name, camfunc.Split(identity, lambda a: fc(a.flatten(2).mean(2))), a, cls)
    w = fc.weight.detach()[cls]  # (B, C)
    cam = torch.einsum("bc,bc...->b...", w, a).clamp_min(0)
    torch.testing.assert_close(got, camfunc.normalize(cam), atol=1e-5, rtol=1e-4)


@given(problem=problems())
def test_gradcampp_weights_follow_eq_19(problem):
    # alpha = g^2 / (2 g^2 + sum_ab(A) g^3), 0 where g = 0 or the denominator <= 0.
    a, cls = problem.a, problem.cls
    tail = problem.tail()
    a64 = a.double().requires_grad_()
    score = problem.tail().double()(a64).gather(1, cls[:, None]).sum()
    (g,) = torch.autograd.grad(score, a64)
    a64 = a64.detach()
    spatial = tuple(range(2, a.ndim))
    total = a64.sum(spatial, keepdim=True)
    den = 2 * g**2 + total * g**3
    # Near-zero denominators make alpha ill-conditioned in float32: not the formula's question.
    assume(bool((den.abs() > 1e-3 * g**2)[g > 0].all()))
    alpha = torch.where((g != 0) & (den > 0), g**2 / torch.where(den > 0, den, 1.0), 0.0)
    w = (alpha * g.clamp_min(0)).sum(spatial)
    cam = torch.einsum("bc,bc...->b...", w, a64).clamp_min(0).float()
    got = camfunc.gradcampp(camfunc.Split(identity, tail), a, cls)
    torch.testing.assert_close(got, camfunc.normalize(cam), atol=1e-5, rtol=1e-4)


@given(problem=problems())
def test_smooth_gradcampp_with_zero_std_is_gradcampp(problem):
    a, cls = problem.a, problem.cls
    s = camfunc.Split(identity, problem.tail())
    got = camfunc.smooth_gradcampp(s, a, cls, std=0.0, generator=torch.Generator().manual_seed(problem.seed))
    torch.testing.assert_close(got, camfunc.gradcampp(s, a, cls), atol=1e-5, rtol=1e-4)


@given(problem=problems(), seed=st.integers(0, 100), samples=st.integers(1, 4))
def test_smooth_gradcampp_draws_standard_normal_noise_of_the_inputs_shape_from_the_generator(
        problem, seed, samples):
    # The documented draw: num_samples standard-normal tensors shaped like x, scaled by std.
    a, cls = problem.a, problem.cls
    s = camfunc.Split(identity, problem.tail())
    drawn = camfunc.smooth_gradcampp(s, a, cls, std=0.5, num_samples=samples,
                                     generator=torch.Generator().manual_seed(seed))
    noise = torch.randn((samples, *a.shape), generator=torch.Generator().manual_seed(seed))
    given_noise = camfunc.smooth_gradcampp(s, a, cls, std=0.5, num_samples=samples, noise=noise)
    assert torch.equal(drawn, given_noise)


@pytest.mark.parametrize("name", NAMES)
@given(problem=problems(), k=st.integers(1, 3))
def test_class_axis_equals_k_separate_calls(name, problem, k):
    well_conditioned(name, problem)
    a = problem.a
    s = camfunc.Split(identity, problem.tail())
    g = torch.Generator().manual_seed(problem.seed)
    many = torch.randint(0, problem.classes, (a.shape[0], k), generator=g)
    # Raw maps: min-max scaling would amplify the rounding of vmap's batched kernels
    # against one class's kernels wherever a map's range is small against its values.
    together = call(name, s, a, many, normalize=False)
    for j in range(k):
        alone = call(name, s, a, many[:, j], normalize=False)
        scale = float(alone.abs().max().clamp_min(1e-12))
        torch.testing.assert_close(together[:, j], alone, atol=1e-5 * scale, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
@given(problem=problems())
def test_a_sample_in_a_batch_gets_its_map_alone(name, problem):
    well_conditioned(name, problem)
    tail = problem.tail()
    case = kit.Case(tail, camfunc.Split(identity, tail), problem.a, problem.cls, "A given directly")
    kit.batch_independent(camfunc.METHODS[name], case, normalize=False)


@pytest.mark.parametrize("name", NAMES)
@given(problem=problems(), value=st.floats(-4.0, 4.0, width=32), k=st.integers(1, 3))
# A GELU tail's backward rounds positions 35 ulps apart (vectorised and scalar paths).
@example(problem=Problem(torch.zeros(1, 2, 3, 3), torch.tensor([0]), 2, 2, 45469, 2, "gelu"), value=-4.0, k=2)
# Subnormal activations: 1 / sum(A) overflowed float32 in XGrad-CAM's weights (NaN maps).
@example(problem=Problem(torch.zeros(1, 1, 2), torch.tensor([0]), 1, 2, 0, 1, "relu"),
         value=2.1019476964872256e-44, k=1)
def test_flat_activations_give_a_zero_map(name, problem, value, k):
    # Every position alike: no position is more relevant than another. A method that
    # shows contrast here is showing rounding (an SVD of gradients that vmap over classes
    # left a few ulps apart did).
    a = torch.full_like(problem.a, value)
    classes = (torch.arange(k) % problem.classes).expand(a.shape[0], k)
    cams = call(name, camfunc.Split(identity, problem.tail()), a, classes)
    assert torch.equal(cams, torch.zeros_like(cams))
