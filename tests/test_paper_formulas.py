"""The five seed methods' raw maps against their papers' formulas, written out here.

``A`` and ``G`` come from a forward hook and ``torch.autograd.grad`` (not from
camfunc's engine), in float64, and each paper's formula is applied to them in
its own notation. Raw values (``normalize=False``), 1-D, 2-D and 3-D, on a
tail with a nonlinearity (so the gradient varies over positions) and on
negative activations. These run on the oldest supported torch too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import camfunc

pytestmark = pytest.mark.core

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class Net(nn.Module):
    """conv -> conv (the cut, GELU: negative activations) -> conv -> ReLU -> pool -> linear."""

    def __init__(self, dims, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = CONV[dims](3, 5, 3, padding=1)
        self.cut = CONV[dims](5, 6, 3, padding=1)
        self.act = nn.GELU()
        self.conv3 = CONV[dims](6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        a = self.act(self.cut(F.relu(self.conv1(x))))
        return self.fc(F.relu(self.conv3(a)).flatten(2).mean(2))


def acts_and_grads(model, x, cls):
    """A and dS_c/dA at ``model.act`` by hook and autograd, in float64."""
    model = model.double()
    kept = {}
    handle = model.act.register_forward_hook(lambda m, i, o: kept.__setitem__("a", o))
    try:
        with torch.enable_grad():
            scores = model(x.double())
            g = torch.autograd.grad(scores[torch.arange(len(cls)), cls].sum(), kept["a"])[0]
    finally:
        handle.remove()
        model.float()
    return kept["a"].detach(), g


def spatial(t):
    return tuple(range(2, t.ndim))


def gradcam(a, g):
    w = g.mean(spatial(g), keepdim=True)
    return (w * a).sum(1).clamp_min(0)


def gradcampp(a, g):
    # Eq. 19: alpha = g^2 / (2 g^2 + sum_ab(A) g^3), on positive gradients, 0 elsewhere.
    total = a.sum(spatial(a), keepdim=True)
    den = 2 * g ** 2 + total * g ** 3
    alpha = torch.where((g > 0) & (den > 0), g ** 2 / torch.where(den > 0, den, 1), 0)
    w = (alpha * F.relu(g)).sum(spatial(g), keepdim=True)
    return (w * a).sum(1).clamp_min(0)


def xgradcam(a, g):
    total = a.sum(spatial(a), keepdim=True)
    w = (a / torch.where(total != 0, total, 1) * g).sum(spatial(g), keepdim=True)
    w = torch.where(total != 0, w, 0)
    return (w * a).sum(1).clamp_min(0)


def layercam(a, g):
    return (F.relu(g) * a).sum(1).clamp_min(0)


def xgradcam_rounding(a, g):
    """How far float32 may take XGrad-CAM's map from the float64 formula's, per sample.

    w_k = sum(A_k g_k) / sum(A_k) loses digits as sum(A_k) cancels (GELU's negative
    activations): a relative rounding eps in each term moves w_k by up to
    eps (sum|A_k g_k| + |w_k| sum|A_k|) / |sum A_k|, and the map by that times |A_k|.
    The 4 covers float32 convolutions' own rounding of A and g.
    """
    axes = spatial(a)
    total = a.sum(axes, keepdim=True)
    safe = torch.where(total != 0, total, 1)  # a zero total gives w = 0 on both sides
    w = (a * g).sum(axes, keepdim=True) / safe
    moved = 4 * torch.finfo(torch.float32).eps * (
        (a * g).abs().sum(axes, keepdim=True) + w.abs() * a.abs().sum(axes, keepdim=True)) / safe.abs()
    moved = torch.where(total != 0, moved, 0)
    return (moved * a.abs()).sum(1).amax()


FORMULAS = {"gradcam": gradcam, "gradcampp": gradcampp, "xgradcam": xgradcam, "layercam": layercam}


def inputs(dims, batch=2, seed=0, scale=1.0):
    size = {1: (12,), 2: (8, 8), 3: (4, 6, 6)}[dims]
    return scale * torch.randn((batch, 3, *size), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(FORMULAS))
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_raw_map_is_the_papers_formula(name, dims):
    model = Net(dims).eval()
    x, cls = inputs(dims), [1, 3]
    got = camfunc.METHODS[name](camfunc.split(model, "act"), x, cls, normalize=False)
    a, g = acts_and_grads(model, x, cls)
    assert (a < 0).any()  # GELU: negative activations take part
    want = FORMULAS[name](a, g).float()
    assert want.amax() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


@given(name=st.sampled_from(list(FORMULAS)), dims=st.sampled_from([1, 2, 3]),
       seed=st.integers(0, 2**16), scale=st.floats(0.05, 20.0), classes=st.lists(st.integers(0, 3), min_size=1, max_size=3))
def test_raw_map_is_the_papers_formula_for_drawn_inputs(name, dims, seed, scale, classes):
    model = Net(dims, seed=seed % 7).eval()
    x = inputs(dims, batch=len(classes), seed=seed, scale=scale)
    got = camfunc.METHODS[name](camfunc.split(model, "act"), x, classes, normalize=False)
    a, g = acts_and_grads(model, x, classes)
    want = FORMULAS[name](a, g).float()
    rounding = float(xgradcam_rounding(a, g)) if name == "xgradcam" else 0.0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-12 + rounding)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_smooth_gradcampp_is_a_loop_over_the_noisy_inputs(dims):
    """Omeiza et al.: D_n = mean over noisy copies of g^n; alpha from D_2, D_3; weights from D_1;
    the map on the clean input's activations."""
    model = Net(dims).eval()
    x, cls = inputs(dims), [0, 2]
    noise = torch.randn((5, *x.shape), generator=torch.Generator().manual_seed(3))
    std = 0.4
    got = camfunc.smooth_gradcampp(camfunc.split(model, "act"), x, cls, num_samples=5, std=std,
                                   noise=noise, normalize=False)
    a, _ = acts_and_grads(model, x, cls)
    grads = torch.stack([acts_and_grads(model, x + std * n, cls)[1] for n in noise])
    d1, d2, d3 = grads.mean(0), (grads ** 2).mean(0), (grads ** 3).mean(0)
    total = a.sum(spatial(a), keepdim=True)
    den = 2 * d2 + total * d3
    alpha = torch.where((d2 > 0) & (den > 0), d2 / torch.where(den > 0, den, 1), 0)
    w = (alpha * F.relu(d1)).sum(spatial(a), keepdim=True)
    want = (w * a).sum(1).clamp_min(0).float()
    assert want.amax() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("name", [*FORMULAS, "smooth_gradcampp"])
def test_compiled_seed_method_equals_eager(name):
    model = Net(2).eval()
    s = camfunc.split(model, "act")
    x = inputs(2)
    kwargs = {"noise": torch.randn((3, *x.shape), generator=torch.Generator().manual_seed(1)),
              "num_samples": 3} if name == "smooth_gradcampp" else {}
    torch._dynamo.reset()
    method = torch.compile(camfunc.METHODS[name], fullgraph=True, backend="aot_eager")
    for cls in (torch.tensor([1, 3]), torch.tensor([[0, 1], [2, 3]])):
        torch.testing.assert_close(method(s, x, cls, normalize=False, **kwargs),
                                   camfunc.METHODS[name](s, x, cls, normalize=False, **kwargs),
                                   rtol=1e-5, atol=1e-6)
