"""Differentiable maps (``differentiable=True``): gradients of a loss on the map reach the
parameters and the input exactly as a hook-and-autograd double backward does, gradcheck
passes in float64, training mode updates batch norm once, and a compiled training step
equals an eager one."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import camfunc

pytestmark = pytest.mark.core

DIFFERENTIABLE = ["gradcam", "gradcampp", "xgradcam", "layercam", "hirescam",
                  "gradcam_elementwise", "eigengradcam", "segeigencam", "smooth_gradcampp",
                  "shapleycam", "finercam"]


# ----------------------------------------------------------------------------
# The reference: hooks and autograd.grad(create_graph=True), written here


def hooked(model: nn.Module, layer: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's output (with its graph) and the model's output, from one forward."""
    stored = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: stored.setdefault("a", o))
    try:
        out = model(x)
    finally:
        handle.remove()
    return stored["a"], out


def reference_gradcam(model, layer, x, cls):
    """Grad-CAM from the paper (Selvaraju et al. 2017): ReLU(sum_k mean(dS/dA_k) A_k), raw."""
    a, out = hooked(model, layer, x)
    score = out.gather(1, cls[:, None]).sum()
    (g,) = torch.autograd.grad(score, a, create_graph=True)
    weights = g.mean(tuple(range(2, a.ndim)), keepdim=True)
    return (weights * a).sum(1).clamp_min(0), out


def reference_layercam(model, layer, x, cls):
    """Layer-CAM (Jiang et al. 2021): ReLU(sum_k ReLU(dS/dA_k) * A_k), raw."""
    a, out = hooked(model, layer, x)
    (g,) = torch.autograd.grad(out.gather(1, cls[:, None]).sum(), a, create_graph=True)
    return (g.clamp_min(0) * a).sum(1).clamp_min(0), out


def min_max(maps):
    flat = maps.flatten(1)
    low, high = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    return ((flat - low) / (high - low)).view_as(maps)


def parameter_gradients(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)


def resnet(dtype=torch.float64):
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=5).to(dtype).eval()


def loss_on(maps, pattern):
    """A scalar that weighs every position differently, so that no error can cancel."""
    return (maps * pattern).sum()


@pytest.mark.parametrize("layer", ["layer3", "layer3.0.conv2"])  # a stage's output; inside a block
@pytest.mark.parametrize("normalize", [False, True])
def test_parameter_and_input_gradients_equal_the_double_backward_reference(layer, normalize):
    model = resnet()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64, requires_grad=True)
    cls = torch.tensor([1, 3])
    maps, scores = camfunc.gradcam(camfunc.split(model, layer), x, cls, differentiable=True,
                                   normalize=normalize, return_scores=True)
    want, out = reference_gradcam(model, layer, x, cls)
    want = min_max(want) if normalize else want
    pattern = torch.rand(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(maps, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(scores, out, rtol=1e-12, atol=1e-12)
    got = parameter_gradients(model, loss_on(maps, pattern) + scores.square().sum())
    expected = parameter_gradients(model, loss_on(want, pattern) + out.square().sum())
    for g, e in zip(got, expected):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    (gx,) = torch.autograd.grad(loss_on(maps, pattern), x)
    (ex,) = torch.autograd.grad(loss_on(want, pattern), x)
    torch.testing.assert_close(gx, ex, rtol=1e-9, atol=1e-12)


def test_float32_gradients_match_the_reference_to_1e_5():
    model = resnet(torch.float32)
    x = torch.randn(2, 3, 48, 48)
    cls = torch.tensor([4, 0])
    maps = camfunc.layercam(camfunc.split(model, "layer3.0.conv2"), x, cls, differentiable=True,
                            normalize=False)
    want, _ = reference_layercam(model, "layer3.0.conv2", x, cls)
    pattern = torch.rand(want.shape, generator=torch.Generator().manual_seed(2))
    got = parameter_gradients(model, loss_on(maps, pattern))
    expected = parameter_gradients(model, loss_on(want, pattern))
    for g, e in zip(got, expected):
        if e is not None:
            scale = float(e.abs().max()) or 1.0
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_every_differentiable_method_gives_maps_with_a_graph_equal_to_its_plain_maps(name):
    model = resnet(torch.float32)
    s = camfunc.split(model, "layer4")
    x = torch.randn(2, 3, 96, 96)  # 3x3 maps at layer4
    options = {"noise": torch.randn(2, *x.shape, generator=torch.Generator().manual_seed(0)),
               "num_samples": 2} if name == "smooth_gradcampp" else {}
    plain = camfunc.METHODS[name](s, x, [1, 2], **options)
    maps = camfunc.METHODS[name](s, x, [1, 2], differentiable=True, **options)
    assert not plain.requires_grad and maps.requires_grad and maps.dtype == torch.float32
    torch.testing.assert_close(maps.detach(), plain, rtol=1e-5, atol=1e-6)
    maps.sum().backward()
    assert model.fc.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0


def test_gradcheck_in_float64_on_the_input_and_on_a_parameter_through_functional_call():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 3, 3, padding=1),
                          nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)).double().eval()
    s = camfunc.split(model, "2")
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    # Grad-CAM++'s weights and the map (ReLU aside) are smooth in x here; tanh keeps A smooth.
    assert torch.autograd.gradcheck(
        lambda x: camfunc.gradcampp(s, x, 1, differentiable=True, normalize=False), (x,))

    class Explained(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return camfunc.gradcam(s, x, 1, differentiable=True, normalize=False)

    explained = Explained()
    weight = model[2].weight.detach().clone().requires_grad_()

    def of_weight(w):
        return torch.func.functional_call(explained, {"model.2.weight": w}, (x.detach(),))

    assert torch.autograd.gradcheck(of_weight, (weight,))
    grad = torch.func.grad(lambda w: of_weight(w).sum())(weight.detach())
    assert grad.shape == weight.shape and grad.abs().sum() > 0


# ----------------------------------------------------------------------------
# Training mode


def batch_norm_state(model):
    return [t.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)
            for t in (m.running_mean, m.running_var, m.num_batches_tracked)]


@pytest.mark.parametrize("layer", ["layer2", "layer3.0.conv2"])  # batch norm after the cut too
def test_training_mode_updates_batch_norm_as_one_forward_and_matches_the_reference(layer):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).double().train()
    plain, reference = copy.deepcopy(model), copy.deepcopy(model)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    cls = torch.tensor([0, 1, 2, 3])
    maps, scores = camfunc.gradcam(camfunc.split(model, layer), x, cls, differentiable=True,
                                   normalize=False, return_scores=True)
    plain(x)
    want, out = reference_gradcam(reference, layer, x, cls)
    for got, once, ref in zip(batch_norm_state(model), batch_norm_state(plain), batch_norm_state(reference)):
        assert torch.equal(got, once) and torch.equal(got, ref)
    torch.testing.assert_close(scores, out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(maps, want, rtol=1e-10, atol=1e-12)
    got = parameter_gradients(model, maps.sum())
    expected = parameter_gradients(reference, want.sum())
    for g, e in zip(got, expected):
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-12)


def test_dropout_masks_are_the_forwards():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 3)).train()
    x = torch.randn(2, 3, 6, 6)
    cls = torch.tensor([0, 2])
    s = camfunc.split(model, "2")
    torch.manual_seed(7)
    maps = camfunc.gradcam(s, x, cls, differentiable=True, normalize=False)
    torch.manual_seed(7)
    want, _ = reference_gradcam(model, "2", x, cls)  # one forward draws the same mask
    torch.testing.assert_close(maps, want)
    torch.manual_seed(8)
    other, _ = reference_gradcam(model, "2", x, cls)
    assert not torch.allclose(other, want)  # the mask matters: the check above can fail


def test_methods_that_run_the_model_twice_refuse_training_mode():
    model = resnet(torch.float32).train()
    s = camfunc.split(model, "layer4")
    before = batch_norm_state(model)
    with pytest.raises(ValueError, match="more than once.*eval mode"):
        camfunc.smooth_gradcampp(s, torch.randn(2, 3, 32, 32), 1, differentiable=True)
    with pytest.raises(ValueError, match="shapleycam runs the model more than once"):
        camfunc.shapleycam(s, torch.randn(2, 3, 32, 32), 1, differentiable=True)
    assert all(torch.equal(a, b) for a, b in zip(before, batch_norm_state(model)))  # refused first


# ----------------------------------------------------------------------------
# Compile and losses


def shapes_step(model, s, x, y, mask):
    maps, scores = camfunc.gradcam(s, x, y, differentiable=True, return_scores=True)
    return nn.functional.cross_entropy(scores, y) + camfunc.losses.energy_outside(maps, mask)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_compiled_training_step_equals_the_eager_one(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    getattr(model, mode)()
    compiled_model = copy.deepcopy(model)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    mask = (torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    eager = shapes_step(model, camfunc.split(model, "4"), x, y, mask)
    eager.backward()
    step = torch.compile(shapes_step, fullgraph=True, backend="aot_eager")
    compiled = step(compiled_model, camfunc.split(compiled_model, "4"), x, y, mask)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for p, q in zip(model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7)
    assert all(torch.equal(a, b) for a, b in zip(batch_norm_state(model), batch_norm_state(compiled_model)))


def test_the_readmes_training_loop_runs():
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Training with CAMs", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    assert "range(400)" in code and "differentiable=True" in code
    namespace: dict = {}
    exec(compile(code.replace("range(400)", "range(2)"), "README.md", "exec"), namespace)
    model = namespace["model"]
    assert not model.training and all(p.grad is not None for p in model.parameters())


def test_differentiable_calls_from_threads_equal_sequential_ones():
    import threading

    model = resnet(torch.float32)
    s = camfunc.split(model, "layer3.0.conv2")
    params = [p for p in model.parameters() if p.requires_grad]
    inputs = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def gradients(x):
        maps = camfunc.gradcam(s, x, [1, 2], differentiable=True)
        return torch.autograd.grad(maps.square().sum(), params, allow_unused=True)

    sequential = [gradients(x) for x in inputs]
    threaded: list = [None] * len(inputs)

    def work(i):
        threaded[i] = gradients(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for want, got in zip(sequential, threaded):
        for w, g in zip(want, got):
            assert (w is None) == (g is None)
            if w is not None:
                torch.testing.assert_close(g, w)
