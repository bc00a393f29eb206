"""Models users bring: timm, Hugging Face and torchvision families, split with default arguments.

Each model is built from a config with random weights and a small input. The
oracle is Grad-CAM computed the way hook libraries do it (a forward hook, then
``autograd.grad``), written in ``helpers.hook_gradcam``; the layout conversion
of the oracle (which tokens are patches, which axis is channels) is written
here by hand from each architecture, so a wrong layout choice in camfunc fails.
Raw values are compared (``normalize=False``).
"""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.models.deit import VisionTransformerDistilled
from timm.models.levit import Levit
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers import (ConvNextConfig, ConvNextForImageClassification, ViTConfig,
                          ViTForImageClassification)

import camfunc
from helpers import channels_last_to_grid, hook_gradcam, logit, tokens_to_grid

CLASSES = [1, 3]


def image(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class Waveform(nn.Module):
    """Takes (B, T) and adds its own channel axis, as audio models do."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(1, 8, 9, stride=4, padding=4)
        self.conv2 = nn.Conv1d(8, 12, 5, stride=2, padding=2)
        self.fc = nn.Linear(12, 5)

    def forward(self, wave):
        h = F.relu(self.conv1(wave.unsqueeze(1)))
        h = F.relu(self.conv2(h))
        return self.fc(h.mean(2))


def _seeded(build):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # libraries' own notices about configs
        return build().eval()


def identity(t):
    return t


# name: (build, layer, input shape, oracle's view of the activations as a grid, map shape)
MODELS = {
    "timm resnet18": (lambda: timm.create_model("resnet18", num_classes=5), "layer3",
                      (2, 3, 64, 64), identity, (4, 4)),
    "timm convnext_atto": (lambda: timm.create_model("convnext_atto", num_classes=5), "stages.2",
                           (2, 3, 64, 64), identity, (4, 4)),
    "timm efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", num_classes=5), "blocks.4",
                             (2, 3, 64, 64), identity, (4, 4)),
    "timm vit, 2 registers": (
        lambda: VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                  num_classes=5, reg_tokens=2),
        "blocks.0", (2, 3, 32, 32), tokens_to_grid(3, (4, 4)), (4, 4)),
    "timm vit, non-square": (
        lambda: VisionTransformer(img_size=(32, 64), patch_size=8, embed_dim=32, depth=2,
                                  num_heads=2, num_classes=5),
        "blocks.0", (2, 3, 32, 64), tokens_to_grid(1, (4, 8)), (4, 8)),
    "timm deit (distilled)": (
        lambda: VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                           num_heads=2, num_classes=5),
        "blocks.0", (2, 3, 32, 32), tokens_to_grid(2, (4, 4)), (4, 4)),
    "timm swin (channels-last stages)": (
        lambda: SwinTransformer(img_size=32, patch_size=4, window_size=2, embed_dim=16,
                                depths=(1, 1), num_heads=(2, 2), num_classes=5),
        "layers.0", (2, 3, 32, 32), channels_last_to_grid, (8, 8)),
    "timm levit (tokens, no class token)": (
        lambda: Levit(img_size=64, embed_dim=(32, 48), key_dim=8, num_heads=(2, 2),
                      depth=(1, 1), num_classes=5),
        "stages.0", (2, 3, 64, 64), tokens_to_grid(0, (4, 4)), (4, 4)),
    "hf vit (torch.export)": (
        lambda: ViTForImageClassification(ViTConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3,
            num_attention_heads=2, intermediate_size=64, num_labels=5)),
        "vit.layers.1", (2, 3, 32, 32), tokens_to_grid(1, (4, 4)), (4, 4)),
    "hf convnext (torch.export)": (
        lambda: ConvNextForImageClassification(ConvNextConfig(
            num_channels=3, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_labels=5,
            image_size=64)),
        "convnext.encoder.stages.2", (2, 3, 64, 64), identity, (4, 4)),
    "1-D waveform (model adds its channel axis)": (Waveform, "conv2", (2, 400), identity, (50,)),
    "3-D torchvision r3d_18": (lambda: torchvision.models.video.r3d_18(num_classes=5), "layer3",
                               (2, 3, 4, 32, 32), identity, (1, 4, 4)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_default_split_gives_the_hook_oracles_gradcam(name):
    build, layer, shape, to_grid, map_shape = MODELS[name]
    model = _seeded(build)
    x = image(shape)
    s = camfunc.split(model, layer)
    got = camfunc.gradcam(s, x, CLASSES, normalize=False)
    want = hook_gradcam(model, model.get_submodule(layer), x, logit(CLASSES), to_grid)
    assert got.shape == (2, *map_shape)
    assert want.amax() > 0  # a map with something in it
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_segmentation_model_with_a_dict_output():
    model = _seeded(lambda: torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=4))
    x = image((2, 3, 64, 64))
    s = camfunc.check(camfunc.split(model, "backbone.16"), model, x)  # the dict compares by keys

    def road(out):  # how much of class 1 the model sees, over every pixel
        return out["out"][:, 1].mean((1, 2))

    got = camfunc.gradcam(s, x, road, normalize=False)
    want = hook_gradcam(model, model.backbone.get_submodule("16"), x, road, identity)
    assert want.amax() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    with pytest.raises(ValueError, match=r"keys \['out'\].*output='out'.*callable cls"):
        camfunc.gradcam(s, x, 1)
    with pytest.warns(camfunc.LayerChoiceWarning):  # chosen on the dict output's first tensor
        auto = camfunc.split(model, example_input=x)
    assert camfunc.gradcam(auto, x, road, normalize=False).amax() > 0
    picked = camfunc.split(model, "backbone.16", output="out")
    assert isinstance(picked(x), torch.Tensor)
    with pytest.raises(ValueError, match=r"\(B, num_classes\) scores.*callable cls"):
        camfunc.gradcam(picked, x, 1)


def test_hugging_face_output_keeps_its_type_and_its_logits_answer_class_indices():
    build, layer, shape, to_grid, _ = MODELS["hf vit (torch.export)"]
    model = _seeded(build)
    x = image(shape)
    s = camfunc.split(model, layer)
    cams, scores = camfunc.gradcam(s, x, camfunc.topk(2), return_scores=True)
    assert type(scores).__name__ == "ImageClassifierOutput"
    torch.testing.assert_close(scores.logits, model(x).logits)
    top = scores.logits.topk(2, dim=1).indices
    for k in range(2):
        want = hook_gradcam(model, model.get_submodule(layer), x, logit(top[:, k]), to_grid)
        torch.testing.assert_close(camfunc.normalize(cams[:, k]), camfunc.normalize(want), atol=1e-5, rtol=0)
    camfunc.check(s, model, x)
    logits_only = camfunc.split(model, layer, output="logits")
    torch.testing.assert_close(logits_only(x), model(x).logits)


@pytest.mark.parametrize("batch", [1, 3])
def test_exported_split_takes_other_batch_sizes(batch):
    build, layer, _, to_grid, _ = MODELS["hf vit (torch.export)"]
    model = _seeded(build)
    s = camfunc.split(model, layer)  # exported with the config's example: a batch of 2
    x = image((batch, 3, 32, 32), seed=1)
    classes = list(range(batch))
    want = hook_gradcam(model, model.get_submodule(layer), x, logit(classes), to_grid)
    torch.testing.assert_close(camfunc.gradcam(s, x, classes, normalize=False), want,
                               rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_exported_split_shares_the_models_parameters():
    build, layer, shape, _, _ = MODELS["hf vit (torch.export)"]
    model = _seeded(build)
    x = image(shape)
    s = camfunc.split(model, layer)
    before = camfunc.gradcam(s, x, 1, normalize=False)
    with torch.no_grad():
        model.classifier.weight.mul_(-1)  # the split sees the change: no copies
    after = camfunc.gradcam(s, x, 1, normalize=False)
    torch.testing.assert_close(s(x).logits, model(x).logits)
    assert not torch.allclose(before, after)


def test_export_needs_an_example_when_the_model_does_not_give_its_input_size():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            feats = [self.conv(x)]  # iterating a Proxy is what fx cannot do
            a, = feats
            for _ in a.shape[:1]:
                pass
            return self.fc(a.mean((2, 3)))

    model = Untraceable().eval()
    with pytest.raises(TypeError, match=r"example_input=x.*camfunc\.Split\(head, tail\)"):
        camfunc.split(model, "conv")
    s = camfunc.split(model, "conv", example_input=image((2, 3, 8, 8)))
    camfunc.check(s, model, image((3, 3, 8, 8), seed=2))


def test_auto_layer_choice_on_an_exported_model():
    build, _, shape, _, _ = MODELS["hf vit (torch.export)"]
    model = _seeded(build)
    x = image(shape)
    with pytest.warns(camfunc.LayerChoiceWarning):
        s = camfunc.split(model, example_input=x)
    assert s.layers[0].startswith("vit.layers.2")  # the last block whose patch tokens matter
    assert camfunc.gradcam(s, x, 1, normalize=False).amax() > 0
