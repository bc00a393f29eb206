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
    return st.floats(-4, 4, allow_nan=False, allow_infinity=False, allow_subnormal=True, width=width)


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
    # ties, and gradients that are negative everywhere; for the eigen methods an exact tie
    # (the projection is +-1 on two positions each), which the loadings' sum decides
    "negative": (grid(1, 1, 2, 2, 0, 2, 2, 0, shape=(1, 2, 2, 2)), -torch.ones(1, 2, 2, 2),
                 torch.tensor([[0]])),
    # a single spatial position
    "single": (grid(1.5, -2.0, shape=(1, 2, 1, 1)), grid(0.5, 1.0, shape=(1, 2, 1, 1)), torch.tensor([[0]])),
    # two positions: the eigen projection is exactly +-a, and float32's centring of terms
    # near 12.9 leans by an ulp of 12.9 (the tie line once ignored it; found by hypothesis)
    "two-position tie": (grid(3.6875, 3.6875, shape=(1, 1, 2)), grid(3.489285469055176, 3.5, shape=(1, 1, 2)),
                         torch.tensor([[0]])),
    # a dead channel and a channel whose activations sum to exactly zero; K = C = 2 classes
    "dead and zero-sum": (grid(0, 0, 0, 0, 1, -1, 2, -2, 3, 1, 0, 2, shape=(1, 3, 2, 2)),
                          torch.arange(24, dtype=torch.float32).reshape(2, 3, 2, 2) / 10 - 1,
                          torch.tensor([[0, 1]])),
}


def spatial(t):
    return tuple(range(2, t.ndim))


def relu(t):
    return t.clamp_min(0)


EPS32 = float(np.finfo(np.float32).eps)
UNIT32 = EPS32 / 2  # float32's unit roundoff
TINY32 = 2.0 ** -149  # its smallest subnormal: below it, rounding is absolute


def first_component(terms: torch.Tensor) -> torch.Tensor:
    """The centred projection on the first right singular vector, largest magnitude positive;
    on a tie, the loadings sum positive; positions equal within sqrt(eps) of the largest
    feature give a zero map. ``(C, *sp) -> (*sp)``, float64."""
    features = terms.flatten(1).T.numpy()  # (positions, channels)
    x = features - features.mean(0)
    spread, largest = np.abs(x).max(), np.abs(features).max()
    # camfunc's flat line, sqrt(eps) of the largest feature; its float32 centring moves the
    # spread by at most 2 n ulps of the largest feature: stay clear of the line by that much.
    line = EPS32 ** 0.5 * largest
    if spread == 0 or spread <= line - 2 * len(x) * EPS32 * largest:
        return torch.zeros(terms.shape[1:], dtype=torch.float64)
    assume(spread > line + 2 * len(x) * EPS32 * largest)
    _, sv, vh = np.linalg.svd(x, full_matrices=False)
    assume(len(sv) < 2 or sv[0] - sv[1] > 1e-3 * sv[0])  # a well-defined direction
    projection = x @ vh[0]
    lean, peak = projection.max() + projection.min(), np.abs(projection).max()
    # An exact tie (float64's rounding aside) is a tie. camfunc calls sides within its
    # rounding line a tie (16 float32 ulps of the peak plus sqrt(C) of the largest feature);
    # a lean between float64's rounding and 4 times that line could land on either side of
    # it by float32's rounding: stay clear of it.
    tie = abs(lean) <= 1e-9 * peak
    line = 16 * EPS32 * (peak + x.shape[1] ** 0.5 * largest)
    assume(tie or abs(lean) > 4 * line)
    assume(not tie or abs(vh[0].sum()) > 1e-6)  # the loadings decide: their sum must not be 0
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
    # An exactly zero one is the rule's (alpha = 0) where float32 sums the channel exactly.
    clear = (den.abs() > 1e-3 * g ** 2) | ((den == 0) & exact_in_float32(a))
    assume(bool(clear[g > 0].all()) if bool((g > 0).any()) else True)
    alpha = torch.where(positive, g ** 2 / torch.where(positive, den, 1), 0)
    return relu(((alpha * relu(g)).sum(spatial(g), keepdim=True) * a).sum(1))


def exact_in_float32(a):
    """Per channel ``(1, C, 1...)``: float32 sums the channel's values exactly, in any order:
    scaled to integers, their absolute sum (a bound on every partial sum) is below 2^24."""
    values = a.flatten(2)
    exact = torch.zeros(values.shape[:2], dtype=torch.bool)
    for m in range(0, 150):  # every float32, subnormals too, is an integer times 2^-149
        scaled = values * 2.0 ** m
        whole = (scaled == scaled.round()).all(-1)
        exact |= whole & (scaled.abs().sum(-1) < 2.0 ** 24) & ~exact
        if bool(whole.all()):
            break
    return exact.reshape(*values.shape[:2], *(1,) * (a.ndim - 2))


def xgradcam(a, g):
    total = a.sum(spatial(a), keepdim=True)
    w = torch.where(total != 0, (a * g).sum(spatial(a), keepdim=True) / torch.where(total != 0, total, 1), 0)
    return relu((w * a).sum(1))


def xgradcam_rounding(a, g):
    """How far float32 may move XGrad-CAM's map from the float64 formula's, ``(*sp)`` for one
    sample and class (inf where float32 cannot tell the weight at all).

    camfunc computes w_k = sum_p fl(A_p / T) g_p with T = fl(sum_p A_p), over n positions.
    With unit roundoff u and gamma_n = n u / (1 - n u) (Higham, Accuracy and Stability, 3.1):
    |T32 - T| <= gamma_n sum|A| (0 when the sum is exact in float32), and the quotient,
    product and sum add gamma_{n+2} sum|A g| / |T32|, so

        |w32 - w| <= (gamma_{n+2} sum|A g| + |w| |T32 - T|) / (|T| - |T32 - T|),

    plus, for subnormal results, an absolute 2^-149 per operation, 3 n of them, divided by
    |T32| where the quotient is scaled by it. The map moves by sum_k |w32 - w|_k |A_k(p)|
    (the ReLU does not add). Where |T| <= |T32 - T|, float32's sum may be 0 or of either
    sign: the weight is not determined by float32 data, and neither is the map.
    """
    axes = spatial(a)
    n = int(np.prod(a.shape[2:]))
    gamma = lambda k: k * UNIT32 / (1 - k * UNIT32)  # noqa: E731
    total = a.sum(axes, keepdim=True)
    w = torch.where(total != 0, (a * g).sum(axes, keepdim=True) / torch.where(total != 0, total, 1), 0)
    exact = exact_in_float32(a)
    sum_error = torch.where(exact, 0.0, gamma(n) * a.abs().sum(axes, keepdim=True) + n * TINY32)
    low = total.abs() - sum_error
    moved = (gamma(n + 2) * (a * g).abs().sum(axes, keepdim=True) + w.abs() * sum_error
             + 3 * n * TINY32 * (1 + g.abs().amax(axes, keepdim=True))) / torch.where(low > 0, low, 1)
    moved = torch.where(exact & (total == 0), 0.0, torch.where(low > 0, moved, float("inf")))
    reach = torch.where(a != 0, moved * a.abs(), 0.0)  # a zero activation ignores its weight
    return reach.sum(1)


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
    if name == "xgradcam":  # its division by a channel's sum: the derived bound, added
        bound = torch.stack([torch.stack([xgradcam_rounding(a.double()[b:b + 1], w.double()[c:c + 1])[0]
                                          for c in cls[b].tolist()]) for b in range(a.shape[0])])
        error = (got.double() - want).abs()
        allowed = 1e-5 * scale + 1e-4 * want.abs() + bound
        assert bool((error <= allowed).all()), (error - allowed).amax()
        return
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("name", list(FORMULAS))
@given(problem=problems())
@example(problem=EDGES["flat"])
@example(problem=EDGES["negative"])
@example(problem=EDGES["single"])
@example(problem=EDGES["dead and zero-sum"])
@example(problem=EDGES["two-position tie"])
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
    # Up to the documented tie line, where the loadings decide instead.
    line = 16 * 2.3e-16 * (float(p.abs().max()) + terms.shape[0] ** 0.5 * float(t.abs().max()))
    assert float(p.max()) >= -float(p.min()) - line - 1e-12 * float(p.abs().max())


@given(terms=hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(2, 4), st.integers(2, 4)),
                        elements=st.floats(-4, 4, allow_nan=False, allow_subnormal=False)))
def test_eigen_projection_does_not_depend_on_the_svds_sign(terms):
    # Negating the features flips the SVD's sign freedom; the rule must give the same map.
    from camfunc._methods._projection import first_component as projection

    t = torch.from_numpy(terms)[None]
    p = projection(t)[0]
    lean = float(p.max() + p.min())
    # A tie falls to the loadings' rule (negating flips the map); stay clear of its line.
    line = 16 * 2.3e-16 * (float(p.abs().max()) + terms.shape[0] ** 0.5 * float(t.abs().max()))
    assume(abs(lean) > max(4 * line, 1e-6 * float(p.abs().max())))
    torch.testing.assert_close(projection(-t)[0], p, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------
# The eigen sign rule where it decides: exact ties, by hand
#
# first_component centres each channel over positions, takes v_1 of the centred matrix X
# (positions by channels) and maps X v_1, signed so that its largest magnitude is
# positive; where the largest and smallest projections cancel (a tie), so that v_1's
# loadings sum to a positive number. Eigen-Grad-CAM decomposes G * A, Seg-Eigen-CAM
# |G| * A, Eigen-CAM A; each then takes the ReLU.

R2, R5 = 2 ** 0.5, 5 ** 0.5
TIES = {
    # Two positions: centred rows are +u and -u, so X v_1 = (+|u|, -|u|) up to sign, always a
    # tie. A = [[3, 1], [2, 0]] (channels by positions): u = (1, 1), v_1 = (1, 1)/sqrt 2 (sum
    # > 0), X v_1 = (sqrt 2, -sqrt 2), ReLU: (sqrt 2, 0).
    "two positions, first": ("eigencam", [[3, 1], [2, 0]], [[1, 1], [1, 1]], [R2, 0]),
    # A = [[3, 1], [0, 4]]: u = (1, -2); v_1 with a positive sum is (-1, 2)/sqrt 5, X v_1 =
    # (-sqrt 5, sqrt 5): the second position, though the first has the larger first channel.
    "two positions, second": ("eigencam", [[3, 1], [0, 4]], [[1, 1], [1, 1]], [0, R5]),
    # G = -1: Eigen-Grad-CAM decomposes -A, whose rows are -u; v_1 is fixed by its loadings,
    # not by the data's sign, so the map moves to the other position: (0, sqrt 2).
    "negated gradients": ("eigengradcam", [[3, 1], [2, 0]], [[-1, -1], [-1, -1]], [0, R2]),
    # Seg-Eigen-CAM takes |G|: -1 decomposes A itself, (sqrt 2, 0).
    "absolute gradients": ("segeigencam", [[3, 1], [2, 0]], [[-1, -1], [-1, -1]], [R2, 0]),
    # One channel [0, 2, 1, 1]: centred (-1, 1, 0, 0), v_1 = +1 (its sum), the map (0, 1, 0, 0);
    # mirrored [2, 0, 1, 1] gives (1, 0, 0, 0).
    "one channel": ("eigencam", [[0, 2, 1, 1]], [[1, 1, 1, 1]], [0, 1, 0, 0]),
    "one channel, mirrored": ("eigencam", [[2, 0, 1, 1]], [[1, 1, 1, 1]], [1, 0, 0, 0]),
    # Not a tie, for contrast: channel 0 centred is c = (-1.25, 1.75, -0.25, -0.25) and
    # channel 1 is -2c, so v_1 = +-(1, -2)/sqrt 5 and X v_1 = +-sqrt 5 c. The larger side
    # (1.75) is positive with v_1 = (1, -2)/sqrt 5, whose loadings sum to -1/sqrt 5: the lean
    # decides, not the loadings. Map: sqrt 5 (0, 1.75, 0, 0).
    "no tie, against the loadings": ("eigencam", [[0, 3, 1, 1], [6.5, 0.5, 4.5, 4.5]],
                                     [[1, 1, 1, 1], [1, 1, 1, 1]], [0, 1.75 * R5, 0, 0]),
    # EDGES["negative"] as a 2x2 grid: A channels (1, 1, 2, 2) and (0, 2, 2, 0), G = -1.
    # Terms -A centre to (.5, .5, -.5, -.5) and (1, -1, -1, 1): X^T X = diag(1, 4), so
    # v_1 = (0, 1) and X v_1 = (1, -1, -1, 1), a tie the loadings settle: ReLU (1, 0, 0, 1).
    "negative, Eigen-Grad-CAM": ("eigengradcam", [[1, 1, 2, 2], [0, 2, 2, 0]], [[-1] * 4, [-1] * 4], [1, 0, 0, 1]),
    # |G| A = A: its second channel centres to (-1, 1, 1, -1): (0, 1, 1, 0).
    "negative, Seg-Eigen-CAM": ("segeigencam", [[1, 1, 2, 2], [0, 2, 2, 0]], [[-1] * 4, [-1] * 4], [0, 1, 1, 0]),
}


@pytest.mark.parametrize("case", list(TIES))
def test_the_eigen_sign_rule_on_hand_built_ties(case):
    name, a, g, want = TIES[case]
    a, g = torch.tensor([a], dtype=torch.float32), torch.tensor([g], dtype=torch.float32)
    if a.shape[-1] == 4 and "negative" in case:  # as a 2x2 grid, like the edge example
        a, g, want = a.reshape(1, -1, 2, 2), g.reshape(1, -1, 2, 2), torch.tensor(want).reshape(2, 2)
    s = camfunc.Split(identity, LinearMapTail(g).eval())  # G = dS_0/dA = g
    got = camfunc.METHODS[name](s, a, torch.tensor([0]), normalize=False)[0]
    # float32's SVD and centring round by a few ulps of the values (at most 4.5 here).
    torch.testing.assert_close(got.double(), torch.as_tensor(want, dtype=torch.float64).reshape(got.shape),
                               rtol=0, atol=8 * 1.2e-7 * 4.5)
