"""Splits stay true to the model: at every input size, and after the model changes.

The oracle is Grad-CAM computed the way hook libraries do it (``helpers.hook_gradcam``)
on the model as it is at call time. Each change below alters the model's output, so
a split that ignored it would fail against the oracle.
"""

from __future__ import annotations

import dataclasses
import threading

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from torch import nn

import camfunc
from camfunc._core.cut.captures import Snapshot
from helpers import ResNetish, hook_gradcam, logit, small_cnn

pytestmark = pytest.mark.core


def identity(t):
    return t


def image(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def assert_oracle(split, model, layer, x, classes):
    got = camfunc.gradcam(split, x, classes, normalize=False)
    want = hook_gradcam(model, layer, x, logit(classes), identity)
    assert want.amax() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    return got


class SizeScaled(nn.Module):
    """fx cannot trace it (it iterates a shape), so torch.export captures it; its output
    depends on the input size the way a graph fixed at one size gets silently wrong."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        for _ in h.shape[:1]:  # iterating a Proxy is what fx cannot do
            pass
        h = F.relu(self.conv2(h))
        return self.fc(h.sum((2, 3)) / (x.shape[2] * x.shape[3]))


# ----------------------------------------------------------------------------
# Input sizes


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 3, 16, 16), (3, 3, 8, 12), (1, 3, 12, 8)])
def test_an_exported_split_holds_at_every_input_size(shape):
    model = SizeScaled().eval()
    s = camfunc.split(model, "conv2", example_input=image((2, 3, 8, 8)))
    x = image(shape, seed=1)
    classes = [1, 3, 0][:shape[0]]
    assert_oracle(s, model, model.conv2, x, classes)
    torch.testing.assert_close(s(x), model(x))
    camfunc.check(s, model, x)


def test_a_second_size_is_captured_once_and_the_first_capture_still_serves():
    model = SizeScaled().eval()
    s = camfunc.split(model, "conv2", example_input=image((2, 3, 8, 8)))
    small, large = image((2, 3, 8, 8)), image((2, 3, 16, 16))
    assert s.bound(small) is s
    other = s.bound(large)
    assert other is not s and other.bound(large) is other and s.bound(large) is other
    assert other.bound(small) is s or other.bound(small).bound(small) is other.bound(small)


def test_a_direct_call_of_an_exported_head_at_another_size_is_refused():
    model = SizeScaled().eval()
    s = camfunc.split(model, "conv2", example_input=image((2, 3, 8, 8)))
    with pytest.raises(ValueError, match=r"does not hold for inputs of shape \(2, 3, 16, 16\).*"
                                         r"split\.bound\(x\)\.head"):
        s.head(image((2, 3, 16, 16)))
    x = image((2, 3, 16, 16))
    head = s.bound(x).head(x)  # (A, x's size) when the graph reads the size after the cut
    torch.testing.assert_close(head[0] if isinstance(head, tuple) else head,
                               model.conv2(F.relu(model.conv1(x))))


def test_another_dtype_is_captured_again():
    model = SizeScaled().eval()
    s = camfunc.split(model, "conv2", example_input=image((2, 3, 8, 8)))
    model.double()
    assert_oracle(s, model, model.conv2, image((2, 3, 8, 8)).double(), [1, 2])


def test_a_size_the_model_refuses_names_both_sizes():
    class FixedSize(SizeScaled):
        def forward(self, x):
            torch._check(x.shape[-1] == 8, lambda: "the model takes 8 pixels wide inputs only")
            return super().forward(x)

    model = FixedSize().eval()
    s = camfunc.split(model, "conv2", example_input=image((2, 3, 8, 8)))
    with pytest.raises(TypeError, match=r"made for inputs of shape \(2, 3, 8, 8\) does not hold "
                                        r"for \(2, 3, 8, 16\).*capturing it again"):
        camfunc.gradcam(s, image((2, 3, 8, 16)), 1)


def test_threads_at_several_sizes_get_the_maps_of_sequential_calls():
    model = SizeScaled().eval()
    s = camfunc.split(model, "conv2", example_input=image((2, 3, 8, 8)))
    shapes = [(2, 3, 8, 8), (2, 3, 16, 16), (2, 3, 8, 12), (2, 3, 12, 12)] * 2
    inputs = [image(shape, seed=i) for i, shape in enumerate(shapes)]
    results: dict[int, torch.Tensor] = {}
    errors = []

    def work(i):
        try:
            results[i] = camfunc.gradcam(s, inputs[i], [1, 2], normalize=False)
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for i, x in enumerate(inputs):
        torch.testing.assert_close(results[i], camfunc.gradcam(s, x, [1, 2], normalize=False))


def test_a_torch_export_in_another_thread_does_not_turn_eager_checks_off():
    # torch.compiler.is_compiling() is a process-wide flag that torch.export sets; camfunc's
    # eager checks and locks must not read it as "this call is being compiled".
    started, release = threading.Event(), threading.Event()

    class Waits(nn.Module):
        def forward(self, x):
            started.set()
            release.wait(60)
            return x * 2

    s = camfunc.split(small_cnn(), "3")
    exporting = threading.Thread(target=torch.export.export, args=(Waits(), (torch.ones(2, 3),)),
                                 kwargs={"strict": False})
    exporting.start()
    try:
        assert started.wait(60)
        with pytest.raises(ValueError, match="do not depend on the layer's activations"):
            camfunc.gradcam(s, image((2, 3, 8, 8)), lambda out: out.detach()[:, 0])
    finally:
        release.set()
        exporting.join()


def test_compiled_methods_use_the_capture_made_eagerly_and_refuse_a_new_size():
    torch._dynamo.reset()
    model = SizeScaled().eval()
    s = camfunc.split(model, "conv2", example_input=image((2, 3, 8, 8)))
    compiled = torch.compile(camfunc.gradcam, backend="aot_eager", fullgraph=True)
    large = image((2, 3, 16, 16))
    with pytest.raises(Exception, match="call the method once without torch.compile at this size"):
        compiled(s, large, 1)
    eager = camfunc.gradcam(s, large, 1)
    torch.testing.assert_close(compiled(s, large, 1), eager)


# ----------------------------------------------------------------------------
# Models that change after the split


CHANNEL_SCALE = torch.linspace(0.0, 2.0, 6).view(1, -1, 1, 1)  # ResNetish and SizeScaled have 6


def scale_channels(module, inputs, output):
    return output * CHANNEL_SCALE


def flip_input(module, args):
    return (args[0].flip(-1),)


CHANGES = {  # name: (model -> undo) ; each changes model(x)
    "forward hook on a block the stages trace through":
        lambda m: m.block2.register_forward_hook(scale_channels).remove,
    "forward pre-hook on a block": lambda m: m.block2.register_forward_pre_hook(flip_input).remove,
    "forward hook on the layer itself": lambda m: m.block1.register_forward_hook(scale_channels).remove,
    "forward hook on a leaf": lambda m: m.block2.conv2.register_forward_hook(scale_channels).remove,
    "forward hook on the model": lambda m: m.register_forward_hook(lambda mod, i, o: o.flip(1)).remove,
    "module replaced": lambda m: _swap(m, "fc", nn.Linear(6, 7)),
    "parameter replaced": lambda m: _swap(m, "scale", nn.Parameter(torch.linspace(0.1, 3, 6).view(1, 6, 1, 1))),
}


def _swap(model, name, value):
    torch.manual_seed(3)
    old = getattr(model, name)
    setattr(model, name, value.eval() if isinstance(value, nn.Module) else value)
    return lambda: setattr(model, name, old)


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_after_the_split_is_seen_and_undone(change):
    model = ResNetish().eval()
    x = image((2, 3, 8, 8))
    s = camfunc.split(model, "block1", example_input=x)
    before = assert_oracle(s, model, model.block1, x, [1, 3])
    undo = CHANGES[change](model)
    after = assert_oracle(s, model, model.block1, x, [1, 3])
    assert not torch.allclose(before, after)  # the change shows in the map
    undo()
    torch.testing.assert_close(camfunc.gradcam(s, x, [1, 3], normalize=False), before)


def test_weights_changed_in_place_keep_the_capture():
    model = ResNetish().eval()
    x = image((2, 3, 8, 8))
    s = camfunc.split(model, "block1")
    before = camfunc.gradcam(s, x, 1, normalize=False)
    state = {k: v * 1.5 for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    with torch.no_grad():
        model.fc.weight.neg_()
    assert s.bound(x) is s
    after = assert_oracle(s, model, model.block1, x, [1, 1])
    assert not torch.allclose(before, after)


def test_an_exported_split_sees_a_hook_added_and_removed():
    model = SizeScaled().eval()
    x = image((2, 3, 8, 8))
    s = camfunc.split(model, "conv2", example_input=x)
    before = assert_oracle(s, model, model.conv2, x, [1, 3])
    handle = model.conv1.register_forward_hook(scale_channels)
    after = assert_oracle(s, model, model.conv2, x, [1, 3])
    assert not torch.allclose(before, after)
    handle.remove()
    torch.testing.assert_close(camfunc.gradcam(s, x, [1, 3], normalize=False), before)


def test_a_hooked_module_holding_the_layer_runs_its_hooks():
    model = ResNetish().eval()
    x = image((2, 3, 8, 8))
    handle = model.block2.register_forward_hook(scale_channels)
    s = camfunc.split(model, "block2.conv1")
    hooked = assert_oracle(s, model, model.block2.conv1, x, [0, 4])
    handle.remove()
    assert not torch.allclose(hooked, assert_oracle(s, model, model.block2.conv1, x, [0, 4]))


def test_the_models_own_hooks_need_torch_export():
    model = ResNetish().eval()
    model.register_forward_hook(lambda module, inputs, output: output.flip(1))
    with pytest.raises(TypeError, match=r"forward hooks of its own.*example_input=x"):
        camfunc.split(model, "block1")
    x = image((2, 3, 8, 8))
    assert_oracle(camfunc.split(model, "block1", example_input=x), model, model.block1, x, [0, 4])


EDITS = ["replace a module", "add a module", "delete a module", "add a hook", "add a pre-hook",
         "remove a hook", "replace a parameter", "replace a buffer", "edit weights in place",
         "flip a training flag", "set a plain attribute"]
STRUCTURAL = set(EDITS[:8])


def _edit(model: nn.Sequential, edit: str, held: list, originals: list) -> None:
    if edit == "replace a module":
        model[3] = nn.Conv2d(6, 6, 3, padding=1)
    elif edit == "add a module":
        model.append(nn.Identity())
    elif edit == "delete a module":  # an original one, so an added module never cancels it
        name = [n for n, m in model.named_children() if any(m is o for o in originals)][-1]
        delattr(model, name)
    elif edit == "add a hook":
        held.append(model[0].register_forward_hook(lambda *a: None))
    elif edit == "add a pre-hook":
        held.append(model[3].register_forward_pre_hook(lambda *a: None))
    elif edit == "remove a hook":
        # The hook held from before the snapshot first, so an added one never cancels it.
        held.pop(0).remove() if held else model.append(nn.Identity())
    elif edit == "replace a parameter":
        model[0].bias = nn.Parameter(model[0].bias.detach().clone())
    elif edit == "replace a buffer":
        model[1].running_mean = model[1].running_mean.clone()
    elif edit == "edit weights in place":
        with torch.no_grad():
            model[0].weight.add_(1.0)
    elif edit == "flip a training flag":
        model[1].train(not model[1].training)
    else:
        model.note = "checked"


@example(edits=["add a hook", "remove a hook"])  # found by tests/hunt.py, seed 3564434265
@example(edits=["add a module", "delete a module"])  # found by CI's old code-derived seed
@given(edits=st.lists(st.sampled_from(EDITS), min_size=0, max_size=4))
def test_a_snapshot_sees_exactly_the_structural_edits(edits):
    model = small_cnn()
    held: list = [model[4].register_forward_hook(lambda *a: None)]  # one to remove
    originals = list(model.children())
    snapshot = Snapshot(model)
    for edit in edits:
        _edit(model, edit, held, originals)
    assert snapshot.unchanged() == (not STRUCTURAL.intersection(edits))


def test_a_split_made_by_replacing_stages_keeps_them_or_is_refused():
    model = SizeScaled().eval()
    x = image((2, 3, 8, 8))
    s = camfunc.split(model, "conv2", example_input=x)

    def negated_tail(*carry):
        return -s.tail(*carry)

    made = dataclasses.replace(s, tail=negated_tail)  # as camfunc.testing's properties do
    want = hook_gradcam(lambda v: -model(v), model.conv2, x, logit([1, 3]), identity)
    torch.testing.assert_close(camfunc.gradcam(made, x, [1, 3], normalize=False), want)
    with pytest.raises(ValueError, match=r"replacing its stages.*not for inputs of shape "
                                         r"\(2, 3, 16, 16\).*split\.bound\(x\)"):
        camfunc.gradcam(made, image((2, 3, 16, 16)), 1)
    model.conv1.register_forward_hook(scale_channels)
    with pytest.raises(ValueError, match="the model has changed since"):
        camfunc.gradcam(made, x, 1)
    assert_oracle(s, model, model.conv2, x, [1, 3])  # the split itself is captured again


def test_a_layout_given_afterwards_stays_given():
    model = ResNetish().eval()
    s = camfunc.split(model, "block1")
    x = image((2, 3, 8, 8))
    last = camfunc.with_layout(s, "channels_last")  # (B, 6, 8, 8) read as (B, 8, 8, 6)
    assert camfunc.gradcam(last, x, 1).shape == (2, 6, 8)
    model.fc = nn.Linear(6, 7)
    with pytest.raises(ValueError, match="the model has changed since"):
        camfunc.gradcam(last, x, 1)


# ----------------------------------------------------------------------------
# Forward arguments


class Tempered(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = small_cnn()[:5]
        self.fc = nn.Linear(6, 5)

    def forward(self, x, temperature: float = 1.0, flip: bool = False):
        h = self.features(x.flip(-1) if flip else x)
        return self.fc(h.mean((2, 3))) / temperature


def test_forward_kwargs_are_passed_to_the_capture_and_to_check():
    model = Tempered().eval()
    x = image((2, 3, 8, 8))
    kwargs = {"temperature": 0.25, "flip": True}
    s = camfunc.check(camfunc.split(model, "features.3", forward_kwargs=kwargs), model, x)
    torch.testing.assert_close(s(x), model(x, **kwargs))
    got = camfunc.gradcam(s, x, [1, 2], normalize=False)
    want = hook_gradcam(lambda v: model(v, **kwargs), model.features[3], x, logit([1, 2]), identity)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, camfunc.gradcam(camfunc.split(model, "features.3"), x, [1, 2],
                                                   normalize=False))


def test_forward_kwargs_must_be_constants_the_forward_takes():
    model = Tempered().eval()
    with pytest.raises(TypeError, match=r"forward_kwargs\['temperature'\] is a tensor"):
        camfunc.split(model, "features.3", forward_kwargs={"temperature": torch.tensor(2.0)})
    with pytest.raises(TypeError, match=r"takes no argument 'temp'.*flip, temperature"):
        camfunc.split(model, "features.3", forward_kwargs={"temp": 2.0})
