"""Layouts decided from geometry: the activation's shape against the input's, and the graph.

Properties (hypothesis) of the rule, then models whose layer outputs are
channels-first, channels-last or tokens in 1-D, 2-D and 3-D, each compared
with the hook oracle whose grid conversion is written here by hand.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given
from hypothesis import strategies as st
from torch import nn

import camfunc
from camfunc._core.layout import LayoutRule, _grids, _scaled, resolve
from helpers import hook_gradcam, logit

pytestmark = pytest.mark.core


def image(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------
# The rule


@given(st.lists(st.integers(1, 512), min_size=1, max_size=3), st.integers(1, 64),
       st.sampled_from([math.floor, math.ceil]))
@example([224, 224], 32, math.floor)   # ResNet's layer4
@example([299, 299], 37, math.floor)   # Inception's last map, 8x8
@example([7, 9], 2, math.ceil)         # padded stride-2 convolutions round up
def test_an_input_divided_by_one_stride_is_recognised(spatial, stride, rounding):
    sizes = [rounding(s / stride) for s in spatial]
    assume(all(a >= 1 for a in sizes))
    assert _scaled(sizes, spatial)


def one_stride_exists(sizes, spatial):
    """Search every stride that could round each axis: the constraints' endpoints and the
    midpoints between them, in exact fractions."""
    ends = sorted({Fraction(s, a + d) for a, s in zip(sizes, spatial) for d in (-1, 0, 1) if a + d > 0})
    candidates = ends + [(lo + hi) / 2 for lo, hi in zip(ends, ends[1:])] + [ends[-1] + 1]
    return any(all(rounding(Fraction(s) / f) == a for a, s in zip(sizes, spatial))
               for f in candidates for rounding in (math.floor, math.ceil))


@given(st.lists(st.integers(1, 40), min_size=1, max_size=3), st.data())
@example([2, 2], None)  # [5, 2] on [16, 4]: 3.5 rounds both up (no integer stride, still one stride)
def test_one_grid_exactly_when_one_stride_rounds_every_axis(sizes, data):
    spatial = [16, 4] if data is None else [a * data.draw(st.integers(1, 8)) + data.draw(st.integers(0, 3)) for a in sizes]
    if data is None:
        sizes = [5, 2]
    else:  # also off-grid sizes: one axis moved by a few cells
        sizes = [max(1, a + data.draw(st.integers(-2, 2))) if i == 0 else a for i, a in enumerate(sizes)]
    assert _scaled(sizes, spatial) == one_stride_exists(sizes, spatial)


def test_axes_scaled_by_clearly_different_strides_are_not_one_grid():
    assert not _scaled([7, 14], [224, 224])  # strides 32 and 16
    assert not _scaled([4, 2], [16, 16])
    assert not _scaled([8, 8, 2], [64, 64, 64])


def rule(**kw):
    return LayoutRule("layer", **kw)


@given(channels=st.integers(1, 64), spatial=st.lists(st.integers(1, 256), min_size=1, max_size=3),
       stride=st.integers(1, 32), evidence=st.sampled_from(["first", None]))
@example(channels=16, spatial=[64, 64], stride=4, evidence=None)  # (B, 16, 16, 16): both fit
def test_a_channels_first_map_is_never_read_over_its_channel_axis(channels, spatial, stride, evidence):
    grid = [max(1, s // stride) for s in spatial]
    act = (channels, *grid)
    try:
        layout = resolve(rule(feature_axis=evidence), (3, *spatial), act)
    except ValueError as err:  # ambiguity is allowed, and must say what to pass
        assert "layout=" in str(err)
        assert evidence is None
        return
    assert layout.kind == "channels_first"


@given(channels=st.integers(1, 64), spatial=st.lists(st.integers(1, 256), min_size=1, max_size=3),
       stride=st.integers(1, 32), evidence=st.sampled_from(["last", None]))
def test_a_channels_last_map_is_never_read_over_its_channel_axis(channels, spatial, stride, evidence):
    grid = [max(1, s // stride) for s in spatial]
    try:
        layout = resolve(rule(feature_axis=evidence), (3, *spatial), (*grid, channels))
    except ValueError as err:
        assert "layout=" in str(err) and evidence is None
        return
    assert layout.kind == "channels_last"


@given(spatial=st.lists(st.integers(8, 512), min_size=2, max_size=3), patch=st.integers(2, 32),
       prefix=st.integers(0, 8), width=st.integers(1, 64))
@example(spatial=[224, 224], patch=16, prefix=1, width=768)   # ViT-B/16
@example(spatial=[224, 224], patch=14, prefix=5, width=384)   # DINOv2 with 4 registers
@example(spatial=[32, 64], patch=8, prefix=1, width=32)       # a non-square input
@example(spatial=[8, 132, 285], patch=5, prefix=0, width=4)   # 1482 = 1x26x57 = 2x19x39: both fit
def test_tokens_fill_the_patch_grid_after_the_models_prefix_tokens(spatial, patch, prefix, width):
    grid = tuple(s // patch for s in spatial)
    assume(all(g >= 1 for g in grid))
    n = math.prod(grid) + prefix
    try:
        layout = resolve(rule(prefix_hint=prefix), (3, *spatial), (n, width))
    except ValueError as err:  # several grids fit: the error lists the true one and says how to pick
        said = str(err)
        assert "fit several grids" in said and f"{'x'.join(map(str, grid))} + {prefix}" in said
        assert "grid=(" in said
        chosen = resolve(rule(grid=grid, prefix_tokens=prefix), (3, *spatial), (n, width))
        assert (chosen.prefix_tokens, chosen.grid) == (prefix, grid)
        return
    assert (layout.kind, layout.prefix_tokens, layout.grid) == ("tokens", prefix, grid)


@given(st.integers(1, 300), st.integers(1, 3))
def test_grids_are_every_ordered_factorisation(count, dims):
    found = _grids(count, dims)
    assert all(math.prod(g) == count and len(g) == dims for g in found)
    assert len(found) == len(set(found))
    if dims == 2:
        assert len(found) == sum(count % a == 0 for a in range(1, count + 1))


def test_evidence_that_contradicts_the_shape_is_an_error():
    with pytest.raises(ValueError, match="reads as channels-first, but the ops.*last axis.*layout="):
        resolve(rule(feature_axis="last"), (3, 32, 32), (64, 8, 8))
    with pytest.raises(ValueError, match="both channels-first and channels-last fit.*layout='channels_first'"):
        resolve(rule(), (3, 64, 64), (16, 16, 16))
    assert resolve(rule(kind="channels_last"), (3, 64, 64), (16, 16, 16)).kind == "channels_last"


# ----------------------------------------------------------------------------
# Models


class SquareCNN(nn.Module):
    """(B, 8, 8, 8) maps of an 8x8 image: channels = height = width, so only the ops can tell."""

    def __init__(self, dims=2):
        super().__init__()
        torch.manual_seed(0)
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.conv1 = conv(3, 8, 3, padding=1)
        self.conv2 = conv(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        a = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(a.flatten(2).mean(2))


class ChannelsLast(nn.Module):
    """Patchify, then linear blocks on (B, *grid, C): channels = grid size again."""

    def __init__(self, dims=2, width=4, patch=2):
        super().__init__()
        torch.manual_seed(0)
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.patch = conv(3, width, patch, stride=patch)
        self.norm = nn.LayerNorm(width)
        self.block = nn.Linear(width, width)
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        h = self.patch(x).movedim(1, -1)
        h = h + F.gelu(self.block(self.norm(h)))
        return self.head(h.flatten(1, -2).mean(1))


def cl_to_grid(t):
    return t.movedim(-1, 1)


CASES = {
    "1-D channels-first": (lambda: SquareCNN(1), "conv2", (2, 3, 8), lambda t: t),
    "2-D channels-first, C = H = W": (lambda: SquareCNN(2), "conv2", (2, 3, 8, 8), lambda t: t),
    "3-D channels-first, C = T = H = W": (lambda: SquareCNN(3), "conv2", (2, 3, 8, 8, 8), lambda t: t),
    "1-D channels-last": (lambda: ChannelsLast(1, width=4), "block", (2, 3, 8), cl_to_grid),
    "2-D channels-last, C = H = W": (lambda: ChannelsLast(2, width=4), "block", (2, 3, 8, 8), cl_to_grid),
    "3-D channels-last": (lambda: ChannelsLast(3, width=4), "block", (2, 3, 8, 8, 8), cl_to_grid),
}


@pytest.mark.parametrize("name", list(CASES))
def test_layouts_the_shape_cannot_tell_are_read_from_the_ops(name):
    build, layer, shape, to_grid = CASES[name]
    model = build().eval()
    x = image(shape)
    s = camfunc.check(camfunc.split(model, layer), model, x)
    got = camfunc.gradcam(s, x, [1, 2], normalize=False)
    want = hook_gradcam(model, model.get_submodule(layer), x, logit([1, 2]), to_grid)
    assert want.amax() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


class Opaque(nn.Module):
    """The cut's producer is an einsum, which says nothing about axes: the shape must."""

    def __init__(self, channels=8):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.mix = nn.Identity()
        self.weight = nn.Parameter(torch.randn(channels, channels))
        self.fc = nn.Linear(channels, 3)

    def forward(self, x):
        a = self.mix(torch.einsum("bchw,cd->bdhw", F.relu(self.conv(x)), self.weight))
        return self.fc(a.mean((2, 3)))


def test_an_ambiguous_shape_with_no_evidence_asks_for_layout():
    model = Opaque().eval()
    x = image((2, 3, 8, 8))  # (B, 8, 8, 8): no way to tell
    s = camfunc.split(model, "mix")
    with pytest.raises(ValueError, match=r"layer 'mix' outputs \(B, 8, 8, 8\).*layout="):
        camfunc.gradcam(s, x, 1)
    told = camfunc.split(model, "mix", layout="channels_first")
    want = hook_gradcam(model, model.mix, x, logit([1, 1]), lambda t: t)
    torch.testing.assert_close(camfunc.gradcam(told, x, 1, normalize=False), want)
    wide = image((2, 3, 16, 16))  # (B, 8, 16, 16): the shape alone decides
    want = hook_gradcam(model, model.mix, wide, logit([1, 1]), lambda t: t)
    torch.testing.assert_close(camfunc.gradcam(s, wide, 1, normalize=False), want)


class LateClassToken(nn.Module):
    """CaiT-like: a class token parameter that joins only after the first blocks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.patch = nn.Conv2d(3, 8, 8, stride=8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.early = nn.Linear(8, 8)
        self.late = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = tokens + F.gelu(self.early(tokens))  # 16 patches, no class token yet
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], 1)
        tokens = tokens + F.gelu(self.late(tokens))   # 17 tokens
        return self.head(tokens[:, 0] + tokens[:, 1:].mean(1))


def test_prefix_tokens_come_from_the_model_and_may_join_late():
    model = LateClassToken().eval()
    x = image((2, 3, 32, 32))
    for layer, prefix in (("early", 0), ("late", 1)):
        s = camfunc.split(model, layer)
        to_grid = lambda t, p=prefix: t[:, p:].transpose(1, 2).reshape(2, 8, 4, 4)  # noqa: E731
        want = hook_gradcam(model, model.get_submodule(layer), x, logit([0, 2]), to_grid)
        torch.testing.assert_close(camfunc.gradcam(s, x, [0, 2], normalize=False), want)


def test_a_class_token_the_model_does_not_name_is_an_error_not_a_shifted_grid():
    class Unnamed(LateClassToken):
        def __init__(self):
            super().__init__()
            self.prepended = self.cls_token  # registered under a second name...
            del self.cls_token               # ...and no longer under a name with "token"

        def forward(self, x):
            tokens = self.patch(x).flatten(2).transpose(1, 2)
            tokens = torch.cat([self.prepended.expand(x.shape[0], -1, -1), tokens], 1)
            tokens = tokens + F.gelu(self.late(tokens))
            return self.head(tokens[:, 0])

    model = Unnamed().eval()
    s = camfunc.split(model, "late")
    with pytest.raises(ValueError, match=r"17 tokens fit no grid: with 0 class/register token.*prefix_tokens="):
        camfunc.gradcam(s, image((2, 3, 32, 32)), 1)
    told = camfunc.split(model, "late", prefix_tokens=1)
    assert camfunc.gradcam(told, image((2, 3, 32, 32)), 1).shape == (2, 4, 4)
