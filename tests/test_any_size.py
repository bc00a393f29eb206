"""Models users bring, split once and explained at sizes other than the one captured.

Each model is built from a config with random weights; the split is made with
default arguments (the capture's example comes from the model's own config), and
Grad-CAM at other input sizes, one non-square, must equal the hook-and-autograd
oracle (``helpers.hook_gradcam``) on raw values. The oracle's view of tokens as a
grid is written by hand from each architecture.
"""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
from transformers import (SegformerConfig, SegformerForSemanticSegmentation, ViTConfig,
                          ViTForImageClassification)

import camfunc
from helpers import hook_gradcam, logit, tokens_to_grid


def image(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _seeded(build):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # libraries' own notices about configs
        return build().eval()


def identity(t):
    return t


def segmentation_score(out):
    return out.logits[:, 1].mean((1, 2))  # how much of class 1 the model sees, per sample


# name: (build, layer, forward_kwargs, sizes (the first is the capture's), objective,
#        oracle's grid view for a size)
MODELS = {
    "timm vit, dynamic_img_size": (
        lambda: timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=64, depth=2,
                                  embed_dim=32, num_heads=2, dynamic_img_size=True),
        "blocks.0", {}, [(64, 64), (32, 128), (48, 80), (96, 64), (80, 80)], logit([1, 3]),
        lambda size: tokens_to_grid(1, (size[0] // 16, size[1] // 16))),
    "hf vit, interpolate_pos_encoding": (
        lambda: ViTForImageClassification(ViTConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=64, num_labels=5)),
        "vit.layers.0", {"interpolate_pos_encoding": True}, [(32, 32), (48, 64), (40, 40), (24, 56)],
        logit([1, 3]), lambda size: tokens_to_grid(1, (size[0] // 8, size[1] // 8))),
    "hf segformer": (
        lambda: SegformerForSemanticSegmentation(SegformerConfig(
            num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
            hidden_sizes=[8, 16], num_attention_heads=[1, 2], decoder_hidden_size=16,
            num_labels=4, image_size=64)),
        "segformer.stages.1", {}, [(64, 64), (96, 96), (64, 96)], segmentation_score,
        lambda size: identity),
    "timm mobilevit (cfg 256)": (
        lambda: timm.create_model("mobilevit_xxs", num_classes=5), "stages.3", {},
        [(256, 256), (224, 224), (160, 224)], logit([1, 3]), lambda size: identity),
    "timm convit, built at 64 (its cfg says 224)": (
        lambda: timm.create_model("convit_tiny", num_classes=5, img_size=64, depth=3,
                                  embed_dim=48, local_up_to_layer=1),
        "blocks.1", {}, [(64, 64)], logit([1, 3]), lambda size: tokens_to_grid(1, (4, 4))),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_one_split_explains_every_size_the_model_takes(name):
    build, layer, kwargs, sizes, objective, to_grid = MODELS[name]
    model = _seeded(build)
    s = camfunc.split(model, layer, forward_kwargs=kwargs)
    for size in sizes:
        x = image((2, 3, *size), seed=sum(size))
        got = camfunc.gradcam(s, x, objective, normalize=False)
        want = hook_gradcam(lambda v: model(v, **kwargs), model.get_submodule(layer), x,
                            objective, to_grid(size))
        assert want.amax() > 0, size
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    camfunc.check(s, model, x)


def test_a_size_a_fixed_size_model_refuses_is_a_one_line_error_naming_both_sizes():
    model = _seeded(MODELS["timm convit, built at 64 (its cfg says 224)"][0])
    s = camfunc.split(model, "blocks.1")
    with pytest.raises(TypeError, match=r"made for inputs of shape \(2, 3, 64, 64\) does not hold "
                                        r"for \(2, 3, 48, 48\).*Input height \(48\) doesn't match"):
        camfunc.gradcam(s, image((2, 3, 48, 48)), 1)


def test_the_third_other_size_is_captured_with_dynamic_sizes_which_serve_the_rest():
    build, layer, _, _, _, _ = MODELS["timm vit, dynamic_img_size"]
    model = _seeded(build)
    s = camfunc.split(model, layer)
    others = [s.bound(image((1, 3, 16 * h, 16 * w))) for h, w in [(2, 8), (3, 5), (6, 4)]]
    assert len({id(o) for o in others}) == 3  # two fixed captures, then a dynamic one
    for h, w in [(5, 5), (2, 3), (7, 2)]:  # served by the dynamic capture, nothing new
        assert s.bound(image((2, 3, 16 * h, 16 * w))) is others[-1]
