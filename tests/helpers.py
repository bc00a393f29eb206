"""Small models and checks shared by the tests."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


def small_cnn(dims: int = 2, channels: int = 6, classes: int = 5, seed: int = 0) -> nn.Sequential:
    """conv-bn-relu, conv-relu ("4"), then global pool + linear. Eval mode."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        CONV[dims](3, channels, 3, padding=1), BN[dims](channels), nn.ReLU(),
        CONV[dims](channels, channels, 3, padding=1), nn.ReLU(),
        POOL[dims](1), nn.Flatten(), nn.Linear(channels, classes),
    )
    # Non-trivial running statistics, so batch norm is not the identity.
    bn = model[1]
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


class Block(nn.Module):
    """A residual block ending in a functional op, like torchvision's BasicBlock."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        out = F.relu(self.conv1(x))
        out = self.conv2(out)
        return F.relu(out + x)


class ResNetish(nn.Module):
    """stem -> block1 -> block2 -> pool -> fc, with a layer-scale parameter read via get_attr."""

    def __init__(self, channels: int = 6, classes: int = 7, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU())
        self.block1 = Block(channels)
        self.block2 = Block(channels)
        self.scale = nn.Parameter(torch.rand(1, channels, 1, 1) + 0.5)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.block1(x)
        x = self.block2(x) * self.scale
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def snapshot(model: nn.Module) -> dict:
    """Everything a CAM call must leave as it was."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
             len(getattr(m, "_backward_pre_hooks", {})))
            for m in model.modules()
        ],
        "param_ids": [id(p) for p in model.parameters()],
        "modules": [id(m) for m in model.modules()],
    }


def assert_unchanged(before: dict, model: nn.Module) -> None:
    after = snapshot(model)
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    assert before["hooks"] == after["hooks"]
    assert before["param_ids"] == after["param_ids"]
    assert before["modules"] == after["modules"]
    for g0, g1 in zip(before["grads"], after["grads"]):
        assert (g0 is None) == (g1 is None)
        if g0 is not None:
            assert torch.equal(g0, g1)
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k


def fresh(model: nn.Module) -> nn.Module:
    """A deep copy, for reference libraries that register hooks on what they get."""
    return copy.deepcopy(model)


def random_inputs(name: str, x: torch.Tensor, channels: int, samples: int = 2, seed: int = 0) -> dict:
    """Explicit draws for the random methods (as each method's ``draws`` says), so that
    their results are comparable; {} for the others."""
    import camfunc

    draws = camfunc.METHODS[name].draws if name in camfunc.METHODS else None
    if draws is None:
        return {}
    value = draws.sample(x.shape, channels, samples, torch.Generator().manual_seed(seed))
    return draws.options(value.to(x.dtype), samples)


def sample_slice(randomness: dict, i: int) -> dict:
    """The part of ``random_inputs`` that belongs to sample ``i`` alone."""
    out = {}
    for key, value in randomness.items():
        if key == "noise":
            value = value[:, i:i + 1]
        elif key == "weights":
            value = value[i:i + 1]
        out[key] = value
    return out


def permute_channels(randomness: dict, perm: torch.Tensor) -> dict:
    """Random inputs for channel-permuted activations (the input *is* the activations)."""
    out = dict(randomness)
    if "weights" in out:
        out["weights"] = out["weights"][:, perm]
    if "noise" in out:  # (samples, B, C, ...) for both noisy methods
        out["noise"] = out["noise"].index_select(2, perm)
    return out


def pytorch_grad_cam_raw(extractor, layer, x: torch.Tensor, classes: list[int],
                         eigen_smooth: bool = False, relu: bool = True) -> torch.Tensor:
    """A pytorch-grad-cam extractor's map at the layer's resolution, before it resizes.

    Runs its own hooks and backward, then its ``get_cam_image``; releases the hooks.
    ReLU'd unless ``relu=False`` (to see an eigen projection's sign).
    """
    import numpy as np
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    targets = [ClassifierOutputTarget(c) for c in classes]
    outputs = extractor.activations_and_grads(x)
    if extractor.uses_gradients:
        extractor.model.zero_grad()
        sum(t(o) for t, o in zip(targets, outputs)).backward()
    acts = extractor.activations_and_grads.activations[0].cpu().numpy()
    grads = (extractor.activations_and_grads.gradients[0].cpu().numpy()
             if extractor.uses_gradients else None)
    raw = extractor.get_cam_image(x, layer, targets, acts, grads, eigen_smooth)
    extractor.activations_and_grads.release()
    return torch.from_numpy(np.maximum(raw, 0) if relu else raw).float()


def pytorch_grad_cam_box_gradcam(model: nn.Module, layer: nn.Module, x: torch.Tensor,
                                  boxes: list[torch.Tensor], labels: list[torch.Tensor]) -> torch.Tensor:
    """pytorch-grad-cam's Grad-CAM for its ``FasterRCNNBoxScoreTarget``, one per image, at the
    layer's resolution and ReLU'd: its own hooks and backward on a ``model`` that returns
    torchvision's per-image dicts. Clears the gradients it leaves on the parameters."""
    import numpy as np
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    peer_targets = [FasterRCNNBoxScoreTarget(lab.tolist(), box.numpy())
                    for box, lab in zip(boxes, labels, strict=True)]
    with GradCAM(model, [layer]) as extractor:
        outputs = extractor.activations_and_grads(x)
        model.zero_grad()
        sum(t(o) for t, o in zip(peer_targets, outputs, strict=True)).backward()
        acts = extractor.activations_and_grads.activations[0].numpy()
        grads = extractor.activations_and_grads.gradients[0].numpy()
        raw = extractor.get_cam_image(x, layer, peer_targets, acts, grads, False)
    model.zero_grad(set_to_none=True)
    return torch.from_numpy(np.maximum(raw, 0)).float()


class LinearTail(nn.Module):
    """The original CAM's setting: global average pool -> linear."""

    def __init__(self, channels: int, classes: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(channels, classes)

    def forward(self, a):
        return self.fc(a.mean((2, 3)))


def hook_gradcam(model: nn.Module, layer: nn.Module, x: torch.Tensor, objective, to_grid,
                 item: int | str | None = None) -> torch.Tensor:
    """Grad-CAM the way the hook libraries compute it, written out: the oracle for any model.

    A forward hook keeps the layer's output (element ``item`` of it, for a layer
    returning a list), ``autograd.grad`` of the summed objective gives its gradient,
    ``to_grid`` turns both into ``(B, C, *spatial)``, and the map is
    ``ReLU(sum_k mean(G_k) A_k)``, not normalised.
    """
    kept = {}

    def keep(module, inputs, output):
        kept["a"] = output if item is None else output[item]

    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            scores = objective(model(x))
            g = torch.autograd.grad(scores.sum(), kept["a"])[0]
    finally:
        handle.remove()
    a, g = to_grid(kept["a"].detach()), to_grid(g)
    weights = g.mean(tuple(range(2, g.ndim)), keepdim=True)
    return (weights * a).sum(1).clamp_min(0)


def logit(classes):
    """An objective: each sample's logit for its class, from a tensor or a ``.logits`` output."""
    def objective(out):
        out = out.logits if hasattr(out, "logits") else out
        return out.gather(1, torch.as_tensor(classes).view(-1, 1)).squeeze(1)
    return objective


def image(shape, seed: int = 0) -> torch.Tensor:
    """A seeded standard-normal input batch."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def identity(t):
    return t


def tokens_to_grid(prefix: int, grid: tuple[int, ...]):
    """(B, N, D) tokens after ``prefix`` class/register tokens -> (B, D, *grid)."""
    return lambda t: t[:, prefix:].transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid)


def channels_last_to_grid(t: torch.Tensor) -> torch.Tensor:
    return t.movedim(-1, 1)


def assert_cut_at(split, model: nn.Module, layer: str, x: torch.Tensor, atol: float = 1e-5) -> None:
    """The split's head gives what ``model.<layer>`` outputs, taken by a forward hook here,
    and its tail after its head gives ``model(x)``: a cut at the wrong layer fails the first."""
    module = model.get_submodule(layer)
    kept = {}
    handle = module.register_forward_hook(lambda m, i, o: kept.__setitem__("a", o))
    try:
        with torch.no_grad():
            want_scores = model(x)
    finally:
        handle.remove()
    with torch.no_grad():
        carry = split.bound(x).head(x)
        head = carry[0] if isinstance(carry, tuple) else carry
        torch.testing.assert_close(head, kept["a"], atol=atol, rtol=1e-4)
        torch.testing.assert_close(split(x), want_scores, atol=atol, rtol=1e-4)


def assert_gradcam_oracle(split, model: nn.Module, layer: str, x: torch.Tensor, classes, to_grid=identity,
                          item: int | str | None = None, objective=None,
                          forward_kwargs: dict | None = None) -> torch.Tensor:
    """camfunc's raw Grad-CAM (``normalize=False``) of ``split`` for ``classes`` (or a callable
    ``objective`` of the model's output) equals :func:`hook_gradcam` at ``model.<layer>``
    (element ``item`` of its output), and the oracle's map is not empty. The oracle calls
    the model with ``forward_kwargs``."""
    import functools

    import camfunc

    got = camfunc.gradcam(split, x, classes if objective is None else objective, normalize=False)
    want = hook_gradcam(functools.partial(model, **(forward_kwargs or {})), model.get_submodule(layer),
                        x, objective or logit(classes), to_grid, item=item)
    assert want.amax() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    return got


def saved_timm(folder, name: str, num_classes: int, config: dict):
    """A random-weight timm model (seed 0) saved as ``folder/ckpt.pt``, with ``config`` as
    ``folder/cfg.json`` (a pretrained-config overlay): what ``--weights`` and
    ``--pretrained-cfg`` take. Returns ``folder``."""
    import json

    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    torch.save(model.state_dict(), folder / "ckpt.pt")
    (folder / "cfg.json").write_text(json.dumps(config))
    return folder
