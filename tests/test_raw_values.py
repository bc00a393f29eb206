"""Raw maps (``normalize=False``) of every gradient method against its paper, for drawn values.

The tail is linear in ``A`` with a drawn weight tensor ``W``: ``S_c = sum W_c * A``,
so ``dS_c / dA = W_c`` exactly. Hypothesis draws the values of both ``A`` and
``G = W_c`` (not seeds), in 1-D, 2-D and 3-D, and shrinks a failure to the
smallest counterexample. Each paper's formula is written out here in float64.
Explicit examples pin the edges: a flat map, ties, all-negative gradients, a
single position, a dead channel, a channel summing to zero, K = 1 and K = C.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

import camfunc

pytestmark = pytest.mark.core


class LinearMapTail(nn.Module):
    """``scores[b, c] = sum over channels and positions of W[c] * A[b]``."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, a):
        return torch.einsum("bk...,ck...->bc", a, self.weight)


def identity(a):
    return a


def floats(width=32):
    return st.floats(-4, 4, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=width)


@st.composite
def problems(draw, dims=None):
    """``(A, W, cls)``: values drawn element by element."""
    dims = draw(st.sampled_from([1, 2, 3])) if dims is None else dims
    batch, channels, classes = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    spatial = tuple(draw(st.integers(1, 4)) for _ in range(dims))
    a = draw(hnp.arrays(np.float32, (batch, channels, *spatial), elements=floats()))
    w = draw(hnp.arrays(np.float32, (classes, channels, *spatial), elements=floats()))
    k = draw(st.integers(1, classes))
    cls = draw(hnp.arrays(np.int64, (batch, k), elements=st.integers(0, classes - 1)))
    return torch.from_numpy(a), torch.from_numpy(w), torch.from_numpy(cls)


def grid(*values, shape):
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


EDGES = {
    # a flat map: every position equal
    "flat": (torch.ones(2, 3, 3, 3), torch.rand(2, 3, 3, 3, generator=torch.Generator().manual_seed(0)),
             torch.tensor([[0], [1]])),
    # ties, and gradients that are negative everywhere
    "negative": (grid(1, 1, 2, 2, 0, 1, 1, 0, shape=(1, 2, 2, 2)), -torch.ones(1, 2, 2, 2),
                 torch.tensor([[0]])),
    # a single spatial position
    "single": (grid(1.5, -2.0, shape=(1, 2, 1, 1)), grid(0.5, 1.0, shape=(1, 2, 1, 1)), torch.tensor([[0]])),
    # a dead channel and a channel whose activations sum to exactly zero; K = C = 2 classes
    "dead and zero-sum": (grid(0, 0, 0, 0, 1, -1, 2, -2, 3, 1, 0, 2, shape=(1, 3, 2, 2)),
                          torch.arange(24, dtype=torch.float32).reshape(2, 3, 2, 2) / 10 - 1,
                          torch.tensor([[0, 1]])),
}


def spatial(t):
    return tuple(range(2, t.ndim))


def relu(t):
    return t.clamp_min(0)


def first_component(terms: torch.Tensor) -> torch.Tensor:
    """The centred projection on the first right singular vector, largest magnitude positive;
    on a tie, the loadings sum positive. ``(C, *sp) -> (*sp)``, float64."""
    x = terms.flatten(1).T.numpy()  # (positions, channels)
    x = x - x.mean(0)
    _, sv, vh = np.linalg.svd(x, full_matrices=False)
    assume(len(sv) < 2 or sv[0] - sv[1] > 1e-3 * max(sv[0], 1e-12))  # a well-defined direction
    projection = x @ vh[0]
    lean, peak = projection.max() + projection.min(), np.abs(projection).max()
    # camfunc calls sides equal within 16 float32 ulps a tie; stay clear of that line.
    assume(abs(abs(lean) - 16 * 1.2e-7 * peak) > 1e-4 * peak)
    tie = abs(lean) <= 16 * 1.2e-7 * peak
    assume(not tie or abs(vh[0].sum()) > 1e-6)
    if (vh[0].sum() < 0) if tie else (lean < 0):
        projection = -projection
    return torch.from_numpy(projection).reshape(terms.shape[1:])


def gradcam(a, g):
    return relu((g.mean(spatial(g), keepdim=True) * a).sum(1))


def gradcampp(a, g):  # Eq. 19
    total = a.sum(spatial(a), keepdim=True)
    den = 2 * g ** 2 + total * g ** 3
    positive = (g > 0) & (den > 0)
    # Near-zero denominators make alpha ill-conditioned in float32: not the formula's question.
    assume(bool((den.abs() > 1e-3 * g ** 2)[g > 0].all()) if bool((g > 0).any()) else True)
    alpha = torch.where(positive, g ** 2 / torch.where(positive, den, 1), 0)
    return relu(((alpha * relu(g)).sum(spatial(g), keepdim=True) * a).sum(1))


def xgradcam(a, g):
    total = a.sum(spatial(a), keepdim=True)
    assume(bool(((total == 0) | (total.abs() > 1e-2)).all()))  # tiny sums: precision, not the rule
    w = torch.where(total != 0, (a * g).sum(spatial(a), keepdim=True) / torch.where(total != 0, total, 1), 0)
    return relu((w * a).sum(1))


def layercam(a, g):
    return relu((relu(g) * a).sum(1))


def hirescam(a, g):
    return relu((g * a).sum(1))


def gradcam_elementwise(a, g):
    return relu(g * a).sum(1)


def eigengradcam(a, g):
    return relu(first_component(g * a))


def segeigencam(a, g):
    return relu(first_component(g.abs() * a))


FORMULAS = {f.__name__: f for f in (gradcam, gradcampp, xgradcam, layercam, hirescam,
                                    gradcam_elementwise, eigengradcam, segeigencam)}
PER_SAMPLE = {"eigengradcam", "segeigencam"}


def oracle(name, a, w, cls):
    """``(B, K, *sp)`` in float64 from the formula, one sample and class at a time when needed."""
    a64, w64 = a.double(), w.double()
    maps = []
    for b in range(a.shape[0]):
        per_class = []
        for c in cls[b].tolist():
            per_class.append(FORMULAS[name](a64[b:b + 1], w64[c:c + 1])[0]
                             if name not in PER_SAMPLE else FORMULAS[name](a64[b], w64[c]))
        maps.append(torch.stack(per_class))
    return torch.stack(maps)


def check(name, a, w, cls):
    s = camfunc.Split(identity, LinearMapTail(w).eval())
    got = camfunc.METHODS[name](s, a, cls, normalize=False)
    want = oracle(name, a, w, cls)
    scale = float((w.double().abs().amax(0, keepdim=True) * a.double().abs()).sum(1).amax()) + 1e-6
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("name", list(FORMULAS))
@given(problem=problems())
@example(problem=EDGES["flat"])
@example(problem=EDGES["negative"])
@example(problem=EDGES["single"])
@example(problem=EDGES["dead and zero-sum"])
def test_raw_map_is_the_papers_formula(name, problem):
    check(name, *problem)


@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("name", ["gradcam", "gradcampp", "xgradcam", "layercam"])
@given(data=st.data())
def test_raw_map_in_1d_and_3d(name, dims, data):
    check(name, *data.draw(problems(dims=dims)))


@given(problem=problems())
def test_smooth_gradcampp_on_a_linear_tail_is_gradcampp(problem):
    # A linear tail's gradient does not depend on the input: every D_n is G^n.
    a, w, cls = problem
    s = camfunc.Split(identity, LinearMapTail(w).eval())
    noise = torch.randn((3, *a.shape), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(camfunc.smooth_gradcampp(s, a, cls, noise=noise, num_samples=3, normalize=False),
                               camfunc.gradcampp(s, a, cls, normalize=False), rtol=1e-4, atol=1e-5)


@given(problem=problems(), weights=st.data())
def test_randomcam_raw_map_with_given_weights(problem, weights):
    a, w, cls = problem
    drawn = torch.from_numpy(weights.draw(hnp.arrays(np.float32, a.shape[:2], elements=floats())))
    s = camfunc.Split(identity, LinearMapTail(w).eval())
    got = camfunc.randomcam(s, a, cls[:, 0], weights=drawn, normalize=False)
    want = relu((drawn.double()[(...,) + (None,) * (a.ndim - 2)] * a.double()).sum(1))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------
# The eigen sign rule, stated as properties


@given(terms=hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(2, 4), st.integers(2, 4)),
                        elements=st.floats(-4, 4, allow_nan=False, allow_subnormal=False)))
def test_eigen_projection_puts_its_largest_magnitude_on_the_positive_side(terms):
    from camfunc._methods._projection import first_component as projection

    t = torch.from_numpy(terms)[None]
    p = projection(t)[0]
    assert float(p.max()) >= -float(p.min()) - 1e-9 * (float(p.abs().max()) + 1e-12)


@given(terms=hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(2, 4), st.integers(2, 4)),
                        elements=st.floats(-4, 4, allow_nan=False, allow_subnormal=False)))
def test_eigen_projection_does_not_depend_on_the_svds_sign(terms):
    # Negating the features flips the SVD's sign freedom; the rule must give the same map.
    from camfunc._methods._projection import first_component as projection

    t = torch.from_numpy(terms)[None]
    p = projection(t)[0]
    lean = float(p.max() + p.min())
    assume(abs(lean) > 1e-6 * (float(p.abs().max()) + 1e-12))  # a tie falls to the loadings' rule
    torch.testing.assert_close(projection(-t)[0], p, rtol=1e-6, atol=1e-9)
