"""Average drop and increase in confidence: torchcam's ClassificationMetric, hand-computed cases, errors."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from torch import nn
from torchcam.methods import GradCAM as TcGradCAM
from torchcam.metrics import ClassificationMetric

import camfunc
from camfunc import metrics
from helpers import ResNetish, assert_unchanged, small_cnn, snapshot


def torchcam_summary(model: nn.Module, x: torch.Tensor, layer: str, probabilities: bool,
                     make_metric=ClassificationMetric, **options):
    """torchcam's Grad-CAM maps for the top classes, and the summary of its metric
    ``make_metric(extractor, logits_fn, **options)`` after one update; on a copy."""
    ref = copy.deepcopy(model)
    extractor = TcGradCAM(ref, target_layer=layer, input_shape=tuple(x.shape[1:]))
    logits_fn = functools.partial(torch.softmax, dim=-1) if probabilities else None
    try:
        out = ref(x)
        scores = out if logits_fn is None else logits_fn(out)
        maps = extractor.fuse_cams(extractor(scores.argmax(1).tolist(), scores)).detach()
        metric = make_metric(extractor, logits_fn, **options)
        metric.update(x)
        summary = metric.summary()
    finally:
        extractor.remove_hooks()
    return maps, summary


@pytest.mark.parametrize("probabilities", [True, False])
@pytest.mark.parametrize("model_fn, layer, size", [
    # Seeds picked so that drops and increases both occur.
    (functools.partial(small_cnn, classes=7, seed=1), "4", 12),
    (functools.partial(small_cnn, classes=7, seed=4), "1", 12),
    (lambda: ResNetish().eval(), "block1", 10),
])
def test_matches_torchcam_classification_metric(model_fn, layer, size, probabilities):
    model = model_fn()
    x = torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(1))
    maps, summary = torchcam_summary(model, x, layer, probabilities)
    assert not torch.isnan(maps).any()  # torchcam would drop such images; all count here
    result = metrics.confidence_change(model, x, maps, probabilities=probabilities)
    # torchcam adds 1e-7 to the denominator; the scores here are far from 0.
    assert result.score.abs().min() > 1e-3
    assert result.average_drop.item() == pytest.approx(summary["avg_drop"], rel=1e-4, abs=1e-6)
    assert result.increase.sum().item() == round(summary["conf_increase"] * x.shape[0])
    assert result.increase_in_confidence.item() == pytest.approx(summary["conf_increase"], abs=1e-6)
    assert torch.equal(result.classes, model(x).argmax(1))


def test_matches_torchcam_through_a_split():
    model = small_cnn(classes=7, seed=4)
    x = torch.randn(5, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    maps, summary = torchcam_summary(model, x, "1", True)
    s = camfunc.split(model, "1")
    assert metrics.average_drop(s, x, maps).item() == pytest.approx(summary["avg_drop"], rel=1e-4)
    assert metrics.increase_in_confidence(s, x, maps).item() == pytest.approx(summary["conf_increase"])


class SumLogits(nn.Module):
    """Class 0's logit is the sum of the pixels, class 1's its negative."""

    def forward(self, x):
        total = x.sum((1, 2, 3))
        return torch.stack([total, -total], 1)


SUM = SumLogits().eval()
X = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]).repeat(2, 1, 1, 1)  # two 1x2x2 images, sum 10
MAPS = torch.tensor([[[1.0, 0.0], [0.5, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])


def _sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def test_hand_computed_logits():
    # Image 0, class 0: Y = 10, O = 1 + 0.5 * 3 = 2.5, drop 0.75.
    # Image 1, class 1: Y = -10, O = 0 (all masked): an increase, no drop.
    result = metrics.confidence_change(SUM, X, MAPS, [0, 1], probabilities=False)
    assert result.score.tolist() == [10.0, -10.0]
    assert result.masked_score.tolist() == [2.5, 0.0]
    assert result.drop.tolist() == [0.75, 0.0]
    assert result.increase.tolist() == [False, True]
    assert result.average_drop.item() == pytest.approx(0.375)
    assert result.increase_in_confidence.item() == 0.5


def test_hand_computed_probabilities():
    # Two classes with logits (s, -s): p0 = sigmoid(2 s), p1 = sigmoid(-2 s).
    result = metrics.confidence_change(SUM, X, MAPS, [0, 1])
    y0, o0 = _sigmoid(20.0), _sigmoid(5.0)
    y1, o1 = _sigmoid(-20.0), _sigmoid(0.0)
    assert result.score.tolist() == pytest.approx([y0, y1], rel=1e-6)
    assert result.masked_score.tolist() == pytest.approx([o0, o1], rel=1e-6)
    assert result.drop.tolist() == pytest.approx([(y0 - o0) / y0, 0.0], rel=1e-5)
    assert result.increase.tolist() == [False, True]


def test_low_resolution_maps_are_upsampled():
    # A constant 1x1 map of 0.5 becomes 0.5 everywhere: O = 5, drop 0.5.
    half = torch.full((2, 1, 1), 0.5)
    for maps in (half, half.unsqueeze(1)):
        result = metrics.confidence_change(SUM, X, maps, 0, probabilities=False)
        assert result.masked_score.tolist() == [5.0, 5.0]
        assert result.drop.tolist() == [0.5, 0.5]


def test_zero_score_with_a_drop_is_infinite_and_without_is_zero():
    x = torch.tensor([[[[1.0, -1.0]]], [[[1.0, -1.0]]]])  # sum 0
    maps = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]])      # O = -1 (a drop), O = 1 (none)
    result = metrics.confidence_change(SUM, x, maps, 0, probabilities=False)
    assert result.drop[0].item() == math.inf
    assert result.drop[1].item() == 0.0


def test_top_class_by_default_and_nothing_changes():
    model = small_cnn(classes=7, seed=3)
    x = torch.randn(4, 3, 8, 8)
    x_before = x.clone()
    maps = torch.rand(4, 4, 4)
    before = snapshot(model)
    result = metrics.confidence_change(model, x, maps)
    assert torch.equal(result.classes, model(x).argmax(1))
    explicit = metrics.confidence_change(model, x, maps, result.classes)
    assert torch.equal(explicit.drop, result.drop)
    assert_unchanged(before, model)
    assert torch.equal(x, x_before)
    assert result.drop.grad_fn is None


@pytest.mark.parametrize("maps, kwargs, error, message", [
    (torch.rand(3, 4, 4), {}, ValueError, r"3 maps but the batch has 2"),
    (torch.rand(2, 3, 4, 4), {}, ValueError, r"3 maps per image.*maps\[:, k\]"),
    (torch.rand(2, 4), {}, ValueError, r"\(B, \*spatial\) or \(B, 1, \*spatial\)"),
    (torch.rand(2, 4, 4) * 2, {}, ValueError, r"\[0, 1\].*camfunc\.normalize"),
    (torch.full((2, 4, 4), math.nan), {}, ValueError, r"NaN"),
    ([[0.5]], {}, TypeError, r"maps must be a torch\.Tensor"),
    (torch.rand(2, 4, 4), {"cls": camfunc.topk(1)}, TypeError, r"one target per image.*got topk"),
    (torch.rand(2, 4, 4), {"cls": torch.zeros(2, 2, dtype=torch.long)}, ValueError, r"several classes"),
    (torch.rand(2, 4, 4), {"cls": 9}, IndexError, r"0 to 4"),
    (torch.rand(2, 4, 4), {"probabilities": "yes"}, TypeError, r"True, False or None"),
])
def test_bad_input(maps, kwargs, error, message):
    model = small_cnn()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        metrics.confidence_change(model, torch.randn(2, 3, 8, 8), maps, **kwargs)
    assert_unchanged(before, model)


def test_training_mode_and_bad_models_are_refused():
    model = small_cnn().train()
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        metrics.confidence_change(model, torch.randn(2, 3, 8, 8), torch.rand(2, 4, 4))
    assert all(m.training for m in model.modules())
    with pytest.raises(TypeError, match=r"callable x -> scores"):
        metrics.confidence_change("resnet", torch.randn(2, 3, 8, 8), torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, num_classes\) scores"):
        metrics.confidence_change(lambda x: x, torch.randn(2, 3, 8, 8), torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match=r"1 to 3 spatial axes"):
        metrics.confidence_change(small_cnn(), torch.randn(2, 8), torch.rand(2, 4))
