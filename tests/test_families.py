"""The families that failed on main (issue 19, part 3), with timm and Hugging Face models.

Each model is built from a config with random weights, small, in eval mode. The
oracle is Grad-CAM computed the way hook libraries do it (``helpers.hook_gradcam``,
raw values: ``normalize=False``), with its view of the activations as a grid
written here by hand from each architecture; each family is checked at a square
and a non-square input where the model takes one (CoaT and CrossViT are built for
one size: CoaT is built again for the other). Where camfunc cannot cut, the test
holds it to a one-line error that says what to do.
"""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
from timm.models._efficientnet_builder import decode_arch_def
from timm.models.vision_transformer import VisionTransformer
from transformers import (CLIPConfig, CLIPForImageClassification, CLIPVisionConfig, CLIPVisionModel,
                          MetaClip2Config, MetaClip2ForImageClassification)

import camfunc
from helpers import assert_gradcam_oracle, channels_last_to_grid, identity, image, tokens_to_grid

CLASSES = [1, 3]
SQUARE, WIDE = (2, 3, 64, 64), (2, 3, 64, 96)


def seeded(build, *args, **kwargs):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # libraries' own notices about configs
        return build(*args, **kwargs).eval()


def picked(model, x, **options):
    """``camfunc.split`` choosing the layer, and the layer it names."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", camfunc.RepeatedLayerWarning)  # CoaT calls cpe4 per block
        with pytest.warns(camfunc.LayerChoiceWarning) as said:
            s = camfunc.split(model, example_input=x, **options)
    assert any(f"picked layer {s.layers[0]!r}" in str(w.message) for w in said)
    return s


# ----------------------------------------------------------------------------
# 1. timm EfficientViT (MIT): autocast regions in its exported graph


@pytest.mark.parametrize("shape", [SQUARE, WIDE])
def test_efficientvit_mit_is_cut_through_its_autocast_regions(shape):
    model = seeded(timm.create_model, "efficientvit_b0", num_classes=5, depths=(1, 1, 1, 1, 1))
    x = image(shape)
    s = camfunc.check(camfunc.split(model, "stages.2", example_input=x), model, x)
    assert_gradcam_oracle(s, model, "stages.2", x, CLASSES)


# ----------------------------------------------------------------------------
# 2. timm HRNet: stages output a list of branches


@pytest.mark.parametrize("shape", [SQUARE, WIDE])
@pytest.mark.parametrize("item", [0, -1])
def test_hrnet_stage_branches_are_cut_with_the_index_syntax(shape, item):
    model = seeded(timm.create_model, "hrnet_w18_small", num_classes=5)
    x = image(shape)
    s = camfunc.check(camfunc.split(model, f"stage3[{item}]"), model, x)
    assert_gradcam_oracle(s, model, "stage3", x, CLASSES, item=item)


def test_an_hrnet_stage_without_an_index_is_a_one_line_error_naming_the_syntax():
    model = seeded(timm.create_model, "hrnet_w18_small", num_classes=5)
    with pytest.raises(ValueError, match=r"^layer 'stage3' outputs a list of 3, not one tensor; pick an element "
                                         r"with camfunc.split\(model, 'stage3\[0\]'\) \(0 to 2\)$"):
        camfunc.gradcam(camfunc.split(model, "stage3"), image(SQUARE), CLASSES)


# ----------------------------------------------------------------------------
# 3. Gradient checkpointing


def test_a_timm_resnet_stage_under_gradient_checkpointing_is_a_one_line_error():
    model = seeded(timm.create_model, "resnet18", num_classes=5)
    model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match=r"^layer 'layer3' is never called: ResNet has gradient checkpointing "
                                         r"on.*call model.set_grad_checkpointing\(False\) and split again, or "
                                         r"cut at a block such as 'layer3.1'$"):
        camfunc.split(model, "layer3")


@pytest.mark.parametrize("shape", [SQUARE, WIDE])
def test_a_timm_resnet_block_under_gradient_checkpointing_gives_the_oracle(shape):
    model = seeded(timm.create_model, "resnet18", num_classes=5)
    model.set_grad_checkpointing(True)
    x = image(shape)
    assert_gradcam_oracle(camfunc.split(model, "layer3.1"), model, "layer3.1", x, CLASSES)


@pytest.mark.parametrize("shape,grid", [((2, 3, 32, 32), (4, 4)), ((2, 3, 32, 48), (4, 6))])
def test_a_timm_vit_under_gradient_checkpointing_still_gives_the_oracle(shape, grid):
    model = seeded(VisionTransformer, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                   num_classes=5, dynamic_img_size=True)
    model.set_grad_checkpointing(True)
    x = image(shape)
    s = camfunc.split(model, "blocks.0", example_input=x)
    assert_gradcam_oracle(s, model, "blocks.0", x, CLASSES, tokens_to_grid(1, grid))


# ----------------------------------------------------------------------------
# 4. Hugging Face CLIP and MetaCLIP 2: the class token is `class_embedding`

VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2)


def clip_classifier():
    return CLIPForImageClassification(CLIPConfig(vision_config=VISION, num_labels=5))


def metaclip2_classifier():
    return MetaClip2ForImageClassification(MetaClip2Config(vision_config=VISION, num_labels=5))


@pytest.mark.parametrize("build", [clip_classifier, metaclip2_classifier], ids=["clip", "metaclip2"])
@pytest.mark.parametrize("shape,grid", [((2, 3, 32, 32), (4, 4)), ((2, 3, 32, 48), (4, 6))])
def test_clip_class_token_is_counted(build, shape, grid):
    model = seeded(build)
    x = image(shape)
    options = {} if shape[2] == shape[3] else {"interpolate_pos_encoding": True}
    layer = "vision_model.encoder.layers.0"
    s = camfunc.split(model, layer, example_input=x, forward_kwargs=options)
    assert_gradcam_oracle(s, model, layer, x, CLASSES, tokens_to_grid(1, grid), forward_kwargs=options)


def test_clip_vision_model_is_explained_on_a_field_of_its_output():
    model = seeded(CLIPVisionModel, CLIPVisionConfig(**VISION))
    x = image((2, 3, 32, 32))
    layer = "encoder.layers.0"

    def feature(out):  # one feature of the pooled class token
        return out.pooler_output[:, 3]

    s = camfunc.split(model, layer, example_input=x)
    assert_gradcam_oracle(s, model, layer, x, CLASSES, tokens_to_grid(1, (4, 4)), objective=feature)


def test_the_layer_search_picks_clips_vision_tower_not_its_patch_embedding():
    model = seeded(clip_classifier)
    x = image((2, 3, 32, 32))
    s = picked(model, x)
    assert s.layers == ("vision_model",)  # its last hidden state feeds the classifier's mean of patches
    assert_gradcam_oracle(s, model, "vision_model", x, CLASSES, tokens_to_grid(1, (4, 4)),
                          item="last_hidden_state")


# ----------------------------------------------------------------------------
# 5. A class token per stage (CoaT) or per branch (CrossViT)


@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_coat_class_tokens_count_once_per_stage(size):
    model = seeded(timm.create_model, "coat_lite_tiny", num_classes=5, img_size=size,
                   serial_depths=(1, 1, 1, 1))
    x = image((2, 3, *size))
    grid = (size[0] // 16, size[1] // 16)
    s = camfunc.split(model, "serial_blocks3.0")
    assert_gradcam_oracle(s, model, "serial_blocks3.0", x, CLASSES, tokens_to_grid(1, grid))
    if size[0] != size[1]:
        return  # the layer search is the same at one size
    auto = picked(model, x)
    layer = "serial_blocks4.0.factoratt_crpe.qkv"  # the last stage's last attention: its class token first
    assert auto.layers == (layer,)
    assert_gradcam_oracle(auto, model, layer, x, CLASSES, tokens_to_grid(1, (size[0] // 32, size[1] // 32)))


def test_crossvit_class_tokens_count_once_per_branch():
    model = seeded(timm.create_model, "crossvit_tiny_240", num_classes=5, img_size=120,
                   depth=[[1, 1, 0], [1, 1, 0]])
    x = image((2, 3, 120, 120))
    layer = "blocks.1.blocks.0"  # branch 0: 12-pixel patches, 10x10 of them, after its class token
    assert_gradcam_oracle(camfunc.split(model, layer), model, layer, x, CLASSES, tokens_to_grid(1, (10, 10)))
    auto = picked(model, x)
    assert auto.layers == ("blocks.1.fusion.1.attn.wv",)  # branch 0's patches, seen by branch 1's token
    assert_gradcam_oracle(auto, model, auto.layers[0], x, CLASSES, tokens_to_grid(1, (10, 10)))


# ----------------------------------------------------------------------------
# 6. The default call, where the layer search picked a layer fx traces only as a leaf


def mobilenetv5_small():
    arch = [["er_r1_k3_s2_e4_c16"], ["uir_r1_a3_k5_s2_e4_c24"],
            ["uir_r1_a3_k5_s2_e4_c32", "mqa_r1_k3_h2_s1_d8_c32", "uir_r1_a0_k0_s1_e2_c32"]]
    return timm.create_model("mobilenetv5_300m", num_classes=5, stem_size=16, num_features=64,
                             block_args=decode_arch_def(arch))


def tokens_of(height_width):
    return tokens_to_grid(0, height_width)


# name: (build, layer picked, input shapes, the oracle's view of it per shape)
DEFAULTS = {
    "efficientvit_m0": (lambda: timm.create_model("efficientvit_m0", num_classes=5, depth=(1, 1, 1)), "stages",
                        [(2, 3, 128, 128), (2, 3, 128, 192)], [identity, identity]),
    "tiny_vit_5m_224": (lambda: timm.create_model("tiny_vit_5m_224", num_classes=5, depths=(1, 1, 1, 1)),
                        "stages",
                        [SQUARE, WIDE], [identity, identity]),
    # Its fusion adapter resizes to a fixed 16x16, which no stride makes of a non-square input:
    # there camfunc asks for layout= (test_mobilenetv5_on_a_non_square_input_with_its_layout_said).
    "mobilenetv5 (small blocks)": (mobilenetv5_small, "msfa", [SQUARE, (2, 3, 128, 128)],
                                   [identity, identity]),
    "gemma4_vit (small)": (
        lambda: timm.create_model("gemma4_vit_167m", num_classes=5, img_size=64, embed_dim=32, depth=2,
                                  num_heads=2, head_dim=16, intermediate_size=64),
        "encoder", [SQUARE, WIDE], [tokens_of((4, 4)), tokens_of((4, 6))]),
    "qwen3_vit (small)": (
        lambda: timm.create_model("qwen3_vit_88m", num_classes=5, img_size=64, embed_dim=32, depth=2,
                                  num_heads=2),
        "encoder", [SQUARE, WIDE], [channels_last_to_grid, channels_last_to_grid]),
}


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_the_default_call_gives_the_oracle(name):
    build, layer, shapes, views = DEFAULTS[name]
    model = seeded(build)
    s = picked(model, image(shapes[0]))
    assert s.layers == (layer,)
    for shape, view in zip(shapes, views):
        x = image(shape)
        assert_gradcam_oracle(s, model, layer, x, CLASSES, view)


def test_mobilenetv5_on_a_non_square_input_with_its_layout_said():
    model = seeded(mobilenetv5_small)
    x = image(WIDE)
    with pytest.raises(ValueError, match=r"'msfa' outputs \(B, 64, 16, 16\).*layout='channels_first'"):
        camfunc.gradcam(camfunc.split(model, "msfa"), x, CLASSES)
    assert_gradcam_oracle(camfunc.split(model, "msfa", layout="channels_first"), model, "msfa", x, CLASSES)
