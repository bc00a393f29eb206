"""Targets compose with every method, or are refused clearly (no silent wrong map).

A per-sample callable target read by methods and metrics that run the model on
many derived inputs per sample; targets that do not depend on the layer;
contrastive targets through the smoothing wrappers; Finer-CAM's arguments;
``fuse`` and ``overlay`` inputs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import camfunc
from camfunc import metrics
from helpers import random_inputs, small_cnn

pytestmark = pytest.mark.core

CLASSES = [1, 2, 4]


def image(shape=(3, 3, 8, 8), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def per_sample(out):
    """A callable written for the image batch: sample i's score for CLASSES[i]."""
    return out[torch.arange(len(CLASSES)), torch.tensor(CLASSES)]


@pytest.mark.parametrize("name", ["scorecam", "sscam", "iscam"])
@pytest.mark.parametrize("batch_size", [1, 2, 5, 32])
def test_score_family_reads_a_per_sample_callable_as_the_image_batch(name, batch_size):
    s = camfunc.split(small_cnn(), "4")
    x = image()
    randomness = random_inputs(name, x, 6, samples=2)
    want = camfunc.METHODS[name](s, x, CLASSES, batch_size=batch_size, **randomness)
    got = camfunc.METHODS[name](s, x, per_sample, batch_size=batch_size, **randomness)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_metrics_read_a_per_sample_callable_as_the_image_batch():
    model = small_cnn()
    s = camfunc.split(model, "4")
    x = image((3, 3, 16, 16))
    cams = camfunc.gradcam(s, x, CLASSES)
    logits = {"probabilities": False}  # a callable's value is the score: compare with logits
    for metric in (lambda c, **kw: metrics.deletion(s, x, cams, c, step=40, batch_size=7, **kw).auc,
                   lambda c, **kw: metrics.insertion(s, x, cams, c, step=40, batch_size=5, **kw).auc,
                   lambda c, **kw: metrics.confidence_change(s, x, cams, c, **kw).drop):
        torch.testing.assert_close(metric(per_sample), metric(CLASSES, **logits))
    with pytest.raises(ValueError, match="probabilities applies to class indices only"):
        metrics.deletion(s, x, cams, per_sample, probabilities=True)
    g1, g2 = (torch.Generator().manual_seed(3) for _ in range(2))
    torch.testing.assert_close(
        metrics.sensitivity_max(camfunc.gradcam, s, x, per_sample, n_perturb_samples=3, batch_size=4, generator=g1),
        metrics.sensitivity_max(camfunc.gradcam, s, x, CLASSES, n_perturb_samples=3, batch_size=4, generator=g2))


def test_a_target_that_does_not_depend_on_the_layer_is_an_error():
    s = camfunc.split(small_cnn(), "4")
    x = image()
    with pytest.raises(ValueError, match="do not depend on the layer's activations"):
        camfunc.gradcam(s, x, lambda out: out.detach()[:, 1])
    with pytest.raises(ValueError, match="do not depend on the layer's activations"):
        camfunc.layercam(s, x, lambda out: torch.ones(out.shape[0]))

    class Unused(nn.Module):  # a branch whose output the model never uses
        def __init__(self):
            super().__init__()
            self.body, self.side = small_cnn(), nn.Conv2d(3, 3, 1)

        def forward(self, x):
            self.side(x)
            return self.body(x)

    with pytest.raises(ValueError, match="do not depend on the layer's activations"):
        camfunc.gradcam(camfunc.split(Unused().eval(), "side"), x, 1)


TARGETS = {
    "rest": lambda: camfunc.rest(CLASSES),
    "finer": lambda: camfunc.finer(CLASSES),
    "finer topk": lambda: camfunc.finer(camfunc.topk(2)),
    "per-sample callable": lambda: per_sample,
}


@pytest.mark.parametrize("target", list(TARGETS))
def test_smooth_gradcampp_takes_every_target(target):
    s = camfunc.split(small_cnn(), "4")
    x = image()
    # std 0: every noisy copy is the input, so it must equal Grad-CAM++.
    torch.testing.assert_close(camfunc.smooth_gradcampp(s, x, TARGETS[target](), std=0.0, num_samples=3),
                               camfunc.gradcampp(s, x, TARGETS[target]()), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("target", list(TARGETS))
def test_aug_smooth_takes_every_target(target):
    s = camfunc.split(small_cnn(), "4")
    x = image()
    got = camfunc.aug_smooth(camfunc.gradcam)(s, x, TARGETS[target]())
    variants = [(flip, factor) for flip in (False, True) for factor in (0.9, 1.0, 1.1)]
    want = []
    for flip, factor in variants:  # one call per variant, written out
        v = (x.flip(-1) if flip else x) * factor
        m = camfunc.gradcam(s, v, TARGETS[target]())
        want.append(m.flip(-1) if flip else m)
    torch.testing.assert_close(got, torch.stack(want).mean(0), atol=1e-6, rtol=1e-5)


def test_finercam_through_smooth_gradcampp():
    s = camfunc.split(small_cnn(), "4")
    x = image()
    torch.testing.assert_close(camfunc.finercam(s, x, CLASSES, method=camfunc.smooth_gradcampp, std=0.0),
                               camfunc.finercam(s, x, CLASSES, method=camfunc.gradcampp))


@pytest.mark.parametrize("make, error, message", [
    (lambda: camfunc.finer(1, gamma=math.inf), ValueError, "finite non-negative"),
    (lambda: camfunc.finer(1, gamma=-0.1), ValueError, "finite non-negative"),
    (lambda: camfunc.finer(True), TypeError, "cls must be an int"),
    (lambda: camfunc.finer([0, True]), TypeError, "Python ints"),
    (lambda: camfunc.finer(1, references=[]), ValueError, "non-empty"),
    (lambda: camfunc.finer(1, references=[2, 2]), ValueError, "repeat a class"),
    (lambda: camfunc.finer(1, references=[True, 2]), TypeError, "ints"),
    (lambda: camfunc.finer(1, references=[[1, 2], [3]]), ValueError, "equal length"),
    (lambda: camfunc.finer(1, references=torch.tensor([1.0, 2.0])), TypeError, "integer"),
    (lambda: camfunc.finer(lambda out: out[:, 0]), TypeError, "not a callable"),
])
def test_finer_refuses_invalid_arguments_when_built(make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize("target, error, message", [
    (lambda: camfunc.finer(1, references=[1, 2]), ValueError, "include its target class 1"),
    (lambda: camfunc.finer(1, references=[2, 9]), IndexError, "reference class 9 is out of range"),
    (lambda: camfunc.finer([1, 2]), ValueError, "2 entries but the batch has 3"),
    (lambda: camfunc.finer(CLASSES, references=torch.tensor([[0, 3]])), ValueError, "1 rows"),
    (lambda: camfunc.finer(7), IndexError, "class index 7 is out of range"),
])
def test_finer_refuses_invalid_arguments_when_called(target, error, message):
    model = small_cnn()
    s = camfunc.split(model, "4")
    with pytest.raises(error, match=message):
        camfunc.gradcam(s, image(), target())


def test_finer_references_as_a_count_and_per_sample():
    s = camfunc.split(small_cnn(), "4")
    x = image()
    torch.testing.assert_close(camfunc.finercam(s, x, CLASSES, references=2),
                               camfunc.finercam(s, x, CLASSES, num_references=2))
    rows = [[0, 3], [0, 4], [0, 2]]
    together = camfunc.finercam(s, x, CLASSES, references=rows, normalize=False)
    for i in range(3):
        alone = camfunc.finercam(s, x[i:i + 1], CLASSES[i], references=rows[i], normalize=False)
        torch.testing.assert_close(together[i:i + 1], alone)


def test_fuse_refuses_a_bare_tensor_and_fuses_by_product():
    maps = torch.rand(3, 4, 4)
    with pytest.raises(TypeError, match=r"list of maps.*\[maps\]"):
        camfunc.fuse(maps)
    coarse, fine = torch.rand(3, 2, 2), torch.rand(3, 4, 4)
    want = camfunc.upsample(coarse, (4, 4)) * fine
    torch.testing.assert_close(camfunc.fuse([coarse, fine], "product"), want)


def test_refinecam_of_one_layer_is_the_methods_normalised_map_at_the_input_size():
    s = camfunc.split(small_cnn(), "4")
    x = image((3, 3, 6, 6))
    want = camfunc.normalize(camfunc.upsample(camfunc.gradcampp(s, x, CLASSES), (6, 6)))
    torch.testing.assert_close(camfunc.refinecam(s, x, CLASSES), want)


def test_overlay_alpha_channels_and_colormap_objects():
    import matplotlib
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    cam = torch.rand(3, 3)
    plain = np.asarray(camfunc.viz.overlay(rgb, cam))
    opaque = np.concatenate([rgb, np.full((6, 5, 1), 255, np.uint8)], -1)
    assert np.array_equal(np.asarray(camfunc.viz.overlay(opaque, cam)), plain)
    assert np.array_equal(np.asarray(camfunc.viz.overlay(Image.fromarray(opaque, "RGBA"), cam)), plain)
    translucent = opaque.copy()
    translucent[0, 0, 3] = 10
    with pytest.raises(ValueError, match="translucent alpha.*alpha_composite"):
        camfunc.viz.overlay(translucent, cam)
    with pytest.raises(ValueError, match="translucent alpha"):
        camfunc.viz.overlay(Image.fromarray(translucent, "RGBA"), cam)
    by_object = np.asarray(camfunc.viz.overlay(rgb, cam, colormap=matplotlib.colormaps["viridis"]))
    assert np.array_equal(by_object, np.asarray(camfunc.viz.overlay(rgb, cam, colormap="viridis")))
    assert not np.array_equal(by_object, plain)


def test_metrics_can_leave_out_images_whose_maps_are_nan():
    model = small_cnn()
    s = camfunc.split(model, "4")
    x = image((3, 3, 16, 16))
    cams = camfunc.gradcam(s, x, CLASSES)
    bad = cams.clone()
    bad[1] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        metrics.deletion(s, x, bad, CLASSES)  # refused unless asked
    kept = [0, 2]
    for metric, per_image in (
            (lambda m, xs, c, **kw: metrics.confidence_change(s, xs, m, c, **kw), "drop"),
            (lambda m, xs, c, **kw: metrics.deletion(s, xs, m, c, step=40, **kw), "auc"),
            (lambda m, xs, c, **kw: metrics.insertion(s, xs, m, c, step=40, **kw), "auc")):
        for target, subset in ((CLASSES, [CLASSES[i] for i in kept]), (None, None)):
            skipped = metric(bad, x, target, skip_nonfinite=True)
            alone = metric(cams[kept], x[kept], subset)
            assert torch.isnan(getattr(skipped, per_image)[1])
            torch.testing.assert_close(getattr(skipped, per_image)[kept], getattr(alone, per_image))
    # A per-sample callable is read for the kept images in their own batch.
    skipped = metrics.deletion(s, x, bad, per_sample, step=40, skip_nonfinite=True)
    torch.testing.assert_close(skipped.auc[kept], metrics.deletion(
        s, x[kept], cams[kept], [CLASSES[i] for i in kept], step=40, probabilities=False).auc)
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    masks[:, 4:12, 4:12] = True
    game = metrics.pointing_game(bad, masks, skip_nonfinite=True)
    assert not game.hits[1] and game.points[1].tolist() == [-1, -1] and torch.isnan(game.distances[1])
    torch.testing.assert_close(game.accuracy, metrics.pointing_game(cams[kept], masks[kept]).accuracy)
    energy = metrics.energy_pointing_game(bad, masks, skip_nonfinite=True)
    torch.testing.assert_close(energy.mean, metrics.energy_pointing_game(cams[kept], masks[kept]).mean)
    with pytest.raises(ValueError, match="every map holds NaN"):
        metrics.pointing_game(torch.full((2, 4, 4), float("nan")), masks[:2], skip_nonfinite=True)
