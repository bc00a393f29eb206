"""Bad input gets a clear error, and nothing is changed."""

from __future__ import annotations

import pytest
import torch

import camfunc
from helpers import assert_unchanged, small_cnn, snapshot

pytestmark = pytest.mark.core


@pytest.fixture
def model():
    return small_cnn()


@pytest.fixture
def s(model):
    return camfunc.split(model, "3")


X = torch.randn(3, 3, 8, 8)


@pytest.mark.parametrize("cls, error, message", [
    (5, IndexError, r"valid indices are 0 to 4"),
    (-1, IndexError, r"class index -1 is out of range.*0 to 4"),
    ([0, 1, 9], IndexError, r"class index 9"),
    (torch.tensor([[0, 7]] * 3), IndexError, r"0 to 4"),
    ([0, 1], ValueError, r"2 entries but the batch has 3"),
    (torch.tensor([0, 1, 2, 3]), ValueError, r"4 rows but the batch has 3"),
    (torch.tensor([0.0, 1.0, 2.0]), TypeError, r"integer class indices"),
    ("cat", TypeError, r"cls must be"),
    (1.5, TypeError, r"cls must be"),
    (camfunc.topk(6), ValueError, r"more classes than the model's 5"),
])
def test_bad_classes(model, s, cls, error, message):
    before = snapshot(model)
    with pytest.raises(error, match=message):
        camfunc.gradcam(s, X, cls)
    assert_unchanged(before, model)


@pytest.mark.parametrize("x, error, message", [
    (torch.randn(3, 8, 8), ValueError, r"expects 4-D input"),
    (torch.randn(1, 1, 3, 8, 8), ValueError, r"expects 4-D input"),
    (torch.randn(0, 3, 8, 8), ValueError, r"empty batch"),
    (torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8), TypeError, r"floating-point.*x\.float\(\)"),
    (torch.randn(2, 3, 8, 8, dtype=torch.float64), TypeError, r"cast the input"),
    ([[1.0]], TypeError, r"torch\.Tensor"),
])
def test_bad_inputs(model, s, x, error, message):
    before = snapshot(model)
    with pytest.raises(error, match=message):
        camfunc.gradcam(s, x, 0)
    assert_unchanged(before, model)


@pytest.mark.parametrize("name", sorted(camfunc.METHODS))
def test_training_mode_is_refused_and_left_alone(model, s, name):
    model.train()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"traced with the model in eval mode.*split it again"):
        camfunc.METHODS[name](s, X, 0)  # a split traced in eval mode, called in training mode
    trained = camfunc.split(model, "3")
    with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\).*differentiable=True"):
        camfunc.METHODS[name](trained, X, 0)  # maps to look at are asked in eval mode
    assert_unchanged(before, model)  # running statistics untouched


def test_hand_split_of_a_dropout_model_in_training_mode_is_refused():
    model = small_cnn()
    head, tail = model[:4], torch.nn.Sequential(torch.nn.Dropout(), *model[4:])
    s = camfunc.Split(head, tail)
    tail[0].train()
    with pytest.raises(ValueError, match="training mode"):
        camfunc.gradcam(s, X, 0)


def test_first_argument_must_be_a_split(model):
    with pytest.raises(TypeError, match=r"camfunc\.split\(model, layer\)"):
        camfunc.gradcam(model, X, 0)


def test_class_indices_need_2d_scores():
    model = small_cnn()
    s = camfunc.Split(model[:4], lambda a: model[4:](a).unsqueeze(-1))
    with pytest.raises(ValueError, match="callable cls"):
        camfunc.gradcam(s, X, 0)
    # ...and a callable target works for that output.
    cams = camfunc.gradcam(s, X, lambda out: out[:, 2, 0])
    torch.testing.assert_close(cams, camfunc.gradcam(camfunc.split(model, "3"), X, 2))


def test_layer_without_spatial_axes_is_refused(model):
    s = camfunc.split(model, "6")  # Flatten: (B, C)
    with pytest.raises(ValueError, match=r"\(B, C, \*spatial\)"):
        camfunc.gradcam(s, X, 0)


def test_smooth_noise_of_wrong_shape(model, s):
    with pytest.raises(ValueError, match=r"num_samples=noise\.shape\[0\]"):
        camfunc.smooth_gradcampp(s, X, 0, noise=torch.randn(5, *X.shape))


def test_topk_needs_positive_k():
    with pytest.raises(ValueError, match="positive int"):
        camfunc.topk(0)


def test_callable_target_of_bad_shape(s):
    with pytest.raises(ValueError, match=r"\(B,\) or \(B, K\)"):
        camfunc.gradcam(s, X, lambda scores: scores.unsqueeze(-1).unsqueeze(-1))
