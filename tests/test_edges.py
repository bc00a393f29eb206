"""The edges a new user meets: each works and equals a hook-and-autograd reference, or errs clearly.

In-place writes across the cut, forward arguments with defaults, a required
extra argument, dict outputs, a model that adds its own channel axis,
non-finite input, ``cls`` as numpy arrays, huge ints and badly shaped callables,
and models that change their own state while traced.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camfunc
from helpers import assert_unchanged, hook_gradcam, logit, small_cnn, snapshot

pytestmark = pytest.mark.core


def image(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class WritesAcrossTheCut(nn.Module):
    """A skip connection written in place after the cut: ``idn.add_(block(idn))``."""

    def __init__(self, inplace_relu: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.inplace_relu = inplace_relu
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        idn = self.stem(x)
        out = self.block(idn)
        idn.add_(out)  # a reader of idn below must see this write
        if self.inplace_relu:
            self.relu(idn)  # and this one, made by a module
        pooled = idn.mean((2, 3))
        return self.fc(pooled)


class OutOfPlaceTwin(WritesAcrossTheCut):
    """The same network with every write made out of place: what the in-place one computes."""

    def forward(self, x):
        idn = self.stem(x)
        idn = idn + self.block(idn)
        if self.inplace_relu:
            idn = torch.relu(idn)
        return self.fc(idn.mean((2, 3)))


@pytest.mark.parametrize("inplace_relu", [False, True])
def test_inplace_write_across_the_cut_is_ordered_as_the_model_orders_it(inplace_relu):
    model = WritesAcrossTheCut(inplace_relu).eval()
    x = image((2, 3, 8, 8))
    s = camfunc.check(camfunc.split(model, "block"), model, x)
    got = camfunc.gradcam(s, x, [0, 2], normalize=False)
    want = hook_gradcam(model, model.block, x, logit([0, 2]), lambda t: t)
    assert want.amax() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # The tail re-runs (Score-CAM, Ablation-CAM under vmap) each see the context the model
    # would: the maps equal those of the out-of-place twin, and a second call the first.
    twin = OutOfPlaceTwin(inplace_relu).eval()
    twin.load_state_dict(model.state_dict())
    plain = camfunc.split(twin, "block")
    for name in ("scorecam", "ablationcam", "shapleycam", "layercam"):
        first = camfunc.METHODS[name](s, x, [0, 2], normalize=False)
        torch.testing.assert_close(first, camfunc.METHODS[name](plain, x, [0, 2], normalize=False))
        assert first.amax() > 0
        torch.testing.assert_close(camfunc.METHODS[name](s, x, [0, 2], normalize=False), first)
    camfunc.check(s, model, x)


def test_a_model_writing_its_input_in_place_leaves_the_callers_tensor_alone():
    class Normalises(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            x.sub_(0.5)  # the model's own in-place preprocessing
            return self.fc(F.relu(self.conv(x)).mean((2, 3)))

    model = Normalises().eval()
    x = image((2, 3, 6, 6))
    before = x.clone()
    s = camfunc.split(model, "conv")
    cams = camfunc.gradcam(s, x, 1, normalize=False)
    assert torch.equal(x, before)
    want = hook_gradcam(model, model.conv, x.clone(), logit([1, 1]), lambda t: t)
    torch.testing.assert_close(cams, want)


class Optional(nn.Module):
    """Extra forward arguments with defaults; tracing must take the branches a plain call takes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.side_fc = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x, side=None, scale=2.0, *, mode="mean"):
        y = F.relu(self.conv(x))
        y = y.mean((2, 3)) if mode == "mean" else y.amax((2, 3))
        if side is not None:
            y = y + self.side_fc(side)
        return self.fc(y * scale)


def test_optional_forward_arguments_keep_their_defaults():
    model = Optional().eval()
    x = image((2, 3, 6, 6))
    s = camfunc.check(camfunc.split(model, "conv"), model, x)
    want = hook_gradcam(model, model.conv, x, logit([0, 1]), lambda t: t)
    torch.testing.assert_close(camfunc.gradcam(s, x, [0, 1], normalize=False), want)


def test_a_required_extra_argument_is_a_clear_error():
    class Needs(Optional):
        def forward(self, x, side):
            return self.fc(F.relu(self.conv(x)).mean((2, 3)) + side)

    model = Needs().eval()
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"needs the argument 'side'.*forward\(x\).*camfunc\.Split"):
        camfunc.split(model, "conv")
    assert_unchanged(before, model)


class DictOut(nn.Module):
    def __init__(self, kind=collections.OrderedDict):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)
        self.kind = kind

    def forward(self, x):
        a = F.relu(self.conv(x))
        logits = self.fc(a.mean((2, 3)))
        return self.kind(logits=logits, pooled=a.mean((2, 3)))


@pytest.mark.parametrize("kind", [dict, collections.OrderedDict])
def test_dict_output_uses_its_logits_and_check_compares_by_keys(kind):
    model = DictOut(kind).eval()
    x = image((2, 3, 6, 6))
    s = camfunc.check(camfunc.split(model, "conv"), model, x)
    want = hook_gradcam(model, model.conv, x, lambda out: out["logits"][:, 2], lambda t: t)
    torch.testing.assert_close(camfunc.gradcam(s, x, 2, normalize=False), want)
    with pytest.warns(camfunc.LayerChoiceWarning):
        auto = camfunc.split(model, example_input=x)
    assert auto.layers == ("conv",)
    pooled = camfunc.split(model, "conv", output="pooled")
    torch.testing.assert_close(pooled(x), model(x)["pooled"])
    with pytest.raises(KeyError, match="no field 'nope'.*'logits', 'pooled'"):
        camfunc.split(model, "conv", output="nope")(x)


def test_tuple_output_is_picked_by_index():
    class Pair(DictOut):
        def forward(self, x):
            out = super().forward(x)
            return out["logits"], out["pooled"]

    model = Pair().eval()
    x = image((2, 3, 6, 6))
    with pytest.raises(ValueError, match=r"tuple of 2 values.*output=0"):
        camfunc.gradcam(camfunc.split(model, "conv"), x, 1)
    s = camfunc.split(model, "conv", output=0)
    want = hook_gradcam(model, model.conv, x, lambda out: out[0][:, 1], lambda t: t)
    torch.testing.assert_close(camfunc.gradcam(s, x, 1, normalize=False), want)


def test_check_names_a_structure_that_differs():
    model = DictOut().eval()
    x = image((2, 3, 6, 6))
    other = camfunc.split(DictOut(dict).eval(), "conv")
    camfunc.check(other, model, x)  # a dict and an OrderedDict with equal items agree
    wrong = camfunc.Split(lambda v: v, lambda v: {"logits": model(v)["logits"]}, model=model)
    with pytest.raises(ValueError, match=r"keys \['logits'\], the model's \['logits', 'pooled'\]"):
        camfunc.check(wrong, model, x)


def test_input_rank_is_read_from_the_graph_not_the_first_conv():
    class Waveform(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 4, 5, stride=2)
            self.fc = nn.Linear(4, 2)

        def forward(self, wave):  # (B, T): the model adds the channel axis itself
            return self.fc(F.relu(self.conv(wave.unsqueeze(1))).mean(2))

    model = Waveform().eval()
    wave = image((2, 40))
    s = camfunc.split(model, "conv")
    assert s.input_ndim is None  # the input does not go straight into a convolution
    want = hook_gradcam(model, model.conv, wave, logit([1, 0]), lambda t: t)
    torch.testing.assert_close(camfunc.gradcam(s, wave, [1, 0], normalize=False), want)
    cnn = camfunc.split(small_cnn(), "4")
    assert cnn.input_ndim == 4
    with pytest.raises(ValueError, match=r"expects 4-D input.*unsqueeze\(0\)"):
        camfunc.gradcam(cnn, image((3, 7, 7)), 1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_sample_gets_nan_maps_and_a_warning_and_the_others_are_untouched(bad):
    model = small_cnn()
    s = camfunc.split(model, "4")
    x = image((3, 3, 7, 7))
    x[1, 0, 3, 3] = bad
    with pytest.warns(camfunc.NonFiniteWarning, match=r"sample\(s\) \[1\]"):
        cams = camfunc.gradcam(s, x, [0, 1, 2], normalize=False)
    assert cams[1].isnan().all()
    clean = camfunc.gradcam(s, x[[0, 2]], [0, 2], normalize=False)
    torch.testing.assert_close(cams[[0, 2]], clean)
    with pytest.warns(camfunc.NonFiniteWarning):
        assert camfunc.gradcam(s, x, 1).isnan().flatten(1).all(1).tolist() == [False, True, False]


def test_nonfinite_input_in_the_whole_model_methods_and_dff():
    model = small_cnn()
    s = camfunc.split(model, "4")
    x = image((3, 3, 16, 16))
    x[1, 2, 0, 0] = float("nan")
    g = torch.Generator().manual_seed(0)
    w0, h0 = torch.rand(6, 2, generator=g), torch.rand(2, 3 * 16 * 16, generator=g)
    for method in (lambda: camfunc.fullgrad(model, x, 1), lambda: camfunc.guided_backprop(model, x, 1),
                   lambda: camfunc.guided_gradcam(s, x, 1), lambda: camfunc.sess(s, x, 1),
                   lambda: camfunc.dff(s, x, 2, init=(w0, h0)).maps):
        with pytest.warns(camfunc.NonFiniteWarning):
            maps = method()
        assert maps[1].isnan().all() and torch.isfinite(maps[[0, 2]]).all()
    # DFF factorises the batch jointly: the NaN sample takes no part at all.
    with pytest.warns(camfunc.NonFiniteWarning):
        joint = camfunc.dff(s, x, 2, init=(w0, h0))
    keep = torch.cat([h0[:, :256], h0[:, 512:]], 1)
    alone = camfunc.dff(s, x[[0, 2]], 2, init=(w0, keep))
    torch.testing.assert_close(joint.maps[[0, 2]], alone.maps)
    torch.testing.assert_close(joint.concepts, alone.concepts)


def test_cls_as_numpy_arrays():
    s = camfunc.split(small_cnn(), "4")
    x = image((2, 3, 7, 7))
    torch.testing.assert_close(camfunc.gradcam(s, x, np.array([1, 3])),
                               camfunc.gradcam(s, x, torch.tensor([1, 3])))
    torch.testing.assert_close(camfunc.gradcam(s, x, np.array([[1, 3], [0, 2]], dtype=np.int32)),
                               camfunc.gradcam(s, x, torch.tensor([[1, 3], [0, 2]])))
    torch.testing.assert_close(camfunc.gradcam(s, x, np.int64(4)), camfunc.gradcam(s, x, 4))
    with pytest.raises(TypeError, match="integer class indices, got dtype float64"):
        camfunc.gradcam(s, x, np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="3 rows but the batch has 2"):
        camfunc.gradcam(s, x, np.array([1, 2, 3]))


@pytest.mark.parametrize("cls", [10**20, -1, 5, [0, 10**30], [0, -3]])
def test_out_of_range_classes_are_an_index_error_before_any_work(cls):
    model = small_cnn()
    before = snapshot(model)
    with pytest.raises(IndexError, match=r"out of range: the model has 5 classes, so valid indices are 0 to 4"):
        camfunc.gradcam(camfunc.split(model, "4"), image((2, 3, 7, 7)), cls)
    assert_unchanged(before, model)


def test_callable_target_of_the_wrong_batch_or_type_is_an_error():
    s = camfunc.split(small_cnn(), "4")
    x = image((2, 3, 7, 7))
    with pytest.raises(ValueError, match="returned 1 scores for a batch of 2"):
        camfunc.gradcam(s, x, lambda out: out[:1, 0])
    with pytest.raises(TypeError, match="must return a tensor.*got float"):
        camfunc.gradcam(s, x, lambda out: 1.0)


class CachesWhileTracing(nn.Module):
    """Caches a derived tensor on itself, keyed by device, as timm's LeViT does."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bias = nn.Parameter(torch.randn(4))
        self.cache = {}
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.bias * 2
        return self.fc(F.relu(self.conv(x)).mean((2, 3)) + self.cache[key])


def test_tracing_leaves_the_models_own_state_as_it_was():
    model = CachesWhileTracing().eval()
    x = image((2, 3, 6, 6))
    attributes = dict(vars(model))
    first = camfunc.split(model, "conv")
    second = camfunc.split(model, "conv")  # a proxy left in the cache would break this one
    assert model.cache == {} and vars(model).keys() == attributes.keys()
    assert not any(k.startswith("_tensor_constant") for k in vars(model))
    for s in (first, second):
        camfunc.check(s, model, x)
