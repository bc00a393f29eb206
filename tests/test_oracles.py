"""Independent oracles for what had none: SS-CAM against torchcam, DFF, Guided Grad-CAM,
``fuse``, the randomisation cascade, curve reductions with uneven steps, and values (not
shapes) for the gradient methods on a ViT and for Finer-CAM with a perturbation method."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torchcam.methods import SSCAM as TcSSCAM

import camfunc
from camfunc import metrics
from helpers import hook_gradcam, logit, small_cnn


def image(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def strided_cnn(seed=0):
    """16x16 -> 4x4 maps: a model that downsamples, so mask upsampling and noise order matter."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).eval()


def test_sscam_equals_torchcam_with_the_same_noise_on_a_downsampling_model():
    model = strided_cnn()
    x, classes, samples, std = image((2, 3, 16, 16)), [1, 3], 3, 0.7
    reference = copy.deepcopy(model)
    extractor = TcSSCAM(reference, "3", batch_size=5, num_samples=samples, std=std, input_shape=(3, 16, 16))
    scores = reference(x)
    torch.manual_seed(123)  # torchcam draws Normal(0, std) at the input's size from the global RNG
    (want,) = extractor(classes, scores, normalized=False)
    extractor.remove_hooks()
    torch.manual_seed(123)
    draws = [torch.distributions.normal.Normal(0, std).sample((2, 6, 16, 16)) for _ in range(samples)]
    noise = torch.stack(draws) / std
    got = camfunc.sscam(camfunc.split(model, "3"), x, classes, num_samples=samples, std=std,
                        noise=noise, batch_size=5, normalize=False)
    assert want.flatten(1).amax(1).min() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_dff_is_the_multiplicative_updates_written_out():
    model = small_cnn()
    s = camfunc.split(model, "4")
    x = image((2, 3, 6, 6))
    k, iterations = 3, 40
    g = torch.Generator().manual_seed(1)
    w0, h0 = torch.rand(6, k, generator=g), torch.rand(k, 2 * 36, generator=g)
    got = camfunc.dff(s, x, k, iterations=iterations, init=(w0, h0), normalize=False)
    with torch.no_grad():
        a = model[:5](x).double()  # (B, C, 6, 6)
    v = a.transpose(0, 1).reshape(6, -1)
    offset = v.amin(1, keepdim=True)
    v = v - offset
    w, h = w0.double(), h0.double()
    for _ in range(iterations):  # Lee & Seung, 2001
        h = h * (w.T @ v) / (w.T @ w @ h)
        w = w * (v @ h.T) / (w @ h @ h.T)
    torch.testing.assert_close(got.concepts.double(), (w + offset).T, rtol=1e-3, atol=1e-4)
    maps = h.reshape(k, 2, 6, 6).transpose(0, 1)
    torch.testing.assert_close(got.maps.double(), maps, rtol=1e-3, atol=1e-4 * float(maps.abs().max()))
    # Each concept everywhere, through the pool + linear tail: the classifier on the concept.
    want = model[7](got.concepts)
    torch.testing.assert_close(got.concept_scores, want, rtol=1e-4, atol=1e-5)


class _GuidedReLUReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad.clamp_min(0) * (x > 0)


class _GuidedReLUModule(nn.Module):
    def forward(self, x):
        return _GuidedReLUReference.apply(x)


def test_guided_gradcam_is_guided_backprop_times_the_upsampled_gradcam_written_out():
    model = small_cnn()
    x, classes = image((2, 3, 8, 8)), [1, 3]
    guided = copy.deepcopy(model)  # the test's own copy: its ReLU modules swapped for guided ones
    for i, module in enumerate(guided):
        if isinstance(module, nn.ReLU):
            guided[i] = _GuidedReLUModule()
    xg = x.clone().requires_grad_()
    (gb,) = torch.autograd.grad(guided(xg).gather(1, torch.tensor(classes)[:, None]).sum(), xg)
    cam = hook_gradcam(model, model[4], x, logit(classes), lambda t: t)
    heat = camfunc.normalize(F.interpolate(cam[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0])
    want = gb * heat[:, None]
    got = camfunc.guided_gradcam(camfunc.split(model, "4"), x, classes)
    assert want.abs().amax() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_fuse_by_hand_in_1d_3d_and_with_a_class_axis():
    fine1, coarse1 = torch.rand(2, 8), torch.rand(2, 4)
    up1 = F.interpolate(coarse1[:, None], size=8, mode="linear", align_corners=False)[:, 0]
    torch.testing.assert_close(camfunc.fuse([coarse1, fine1], "product"), up1 * fine1)
    fine3, coarse3 = torch.rand(2, 4, 4, 4), torch.rand(2, 2, 2, 2)
    up3 = F.interpolate(coarse3[:, None], size=(4, 4, 4), mode="trilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(camfunc.fuse([coarse3, fine3], "mean"), (up3 + fine3) / 2)
    fine_k, coarse_k = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 2, 2)  # (B, K, *spatial)
    up_k = F.interpolate(coarse_k, size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(camfunc.fuse([coarse_k, fine_k], "max", spatial_dims=2), torch.maximum(up_k, fine_k))
    gamma = 2.0
    scaled = [torch.tanh(gamma * m / m.flatten(-2).amax(-1)[..., None, None]) for m in (up_k, fine_k)]
    torch.testing.assert_close(camfunc.fuse([coarse_k, fine_k], "product", tanh_gamma=gamma, spatial_dims=2),
                               scaled[0] * scaled[1])


def redraw_like_pytorch_default(module, generator):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias, fan_in of the weight,
    one float32 draw per parameter in registration order (Adebayo et al.'s cascade)."""
    weight = module.weight
    fan_in = weight[0].numel()
    with torch.no_grad():
        for p in (module.weight, module.bias):
            p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) / math.sqrt(fan_in))


def test_randomisation_cascade_redraws_exactly_the_top_modules_in_order():
    model = small_cnn(classes=5)
    x = image((3, 3, 16, 16))
    table = metrics.model_randomisation(model, "4", "gradcam", x, generator=torch.Generator().manual_seed(7))
    # Step s: the same modules, re-initialised in the same order from the same generator,
    # in the test's own copy.
    own = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(7)
    owners = dict(own.named_modules())
    for step, names in enumerate(table.reinitialised):
        if step:
            redraw_like_pytorch_default(owners[names[-1]], generator)
        want = camfunc.gradcam(camfunc.split(own, "4"), x, table.classes)
        torch.testing.assert_close(table.maps[step], want)
        redrawn = {n for n, m in own.named_modules() if any(
            not torch.equal(p, model.get_submodule(n).get_parameter(k)) for k, p in m.named_parameters(recurse=False))}
        assert redrawn == set(names)


def test_deletion_curve_and_auc_by_hand_with_an_uneven_last_step():
    model = small_cnn()
    x = image((2, 3, 4, 5))  # 20 pixels
    saliency = torch.arange(40, dtype=torch.float32).reshape(2, 4, 5).flip(-1)  # distinct, known order
    step = 6  # points at 0, 6, 12, 18 and 20 pixels: the last step moves 2
    got = metrics.deletion(model, x, saliency, [1, 3], step=step, probabilities=False)
    order = saliency.flatten(1).argsort(1, descending=True)
    counts = [0, 6, 12, 18, 20]
    curves = []
    with torch.no_grad():
        for b, c in enumerate([1, 3]):
            row = []
            for n in counts:
                deleted = x[b].clone().flatten(1)
                deleted[:, order[b, :n]] = 0  # RISE's deletion substrate: zeros
                row.append(float(model(deleted.reshape(1, 3, 4, 5))[0, c]))
            curves.append(row)
    curves = torch.tensor(curves)
    fractions = torch.tensor(counts, dtype=torch.float32) / 20
    torch.testing.assert_close(got.fractions, fractions)
    torch.testing.assert_close(got.curves, curves, rtol=1e-5, atol=1e-6)
    auc = sum(0.5 * (curves[:, i] + curves[:, i - 1]) * (fractions[i] - fractions[i - 1]) for i in range(1, 5))
    torch.testing.assert_close(got.auc, auc, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.mean_auc, auc.mean(), rtol=1e-5, atol=1e-6)
