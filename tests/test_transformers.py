"""Vision transformers: token and channels-last layouts seen as grids."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from pytorch_grad_cam import GradCAM as PgcGradCAM
from torch import nn

import camfunc
from helpers import pytorch_grad_cam_raw

GRADIENT_METHODS = ["gradcam", "gradcampp", "xgradcam", "layercam", "hirescam",
                    "gradcam_elementwise", "eigengradcam", "shapleycam", "finercam"]


def tiny_vit(seed: int = 0) -> nn.Module:
    """torchvision's VisionTransformer, small: 32x32 input, 8x8 patches -> a 4x4 grid + class token."""
    torch.manual_seed(seed)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=5)
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision zero-initialises the head
    return model.eval()


def image(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn((batch, 3, size, size), generator=torch.Generator().manual_seed(seed))


def test_vit_tokens_become_a_grid_and_the_class_token_is_set_aside():
    model = tiny_vit()
    x = image()
    s = camfunc.split(model, "encoder.layers.encoder_layer_1")
    camfunc.check(s, model, x, atol=1e-5)
    with torch.no_grad():
        grid, class_token = s.head(x)[:2]
        tokens = model.encoder.layers[:2](_embedded(model, x))
    assert grid.shape == (2, 16, 4, 4)
    torch.testing.assert_close(grid.flatten(2).transpose(1, 2), tokens[:, 1:])
    torch.testing.assert_close(class_token, tokens[:, :1])


def _embedded(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    tokens = model._process_input(x)
    tokens = torch.cat([model.class_token.expand(x.shape[0], -1, -1), tokens], dim=1)
    return tokens + model.encoder.pos_embedding


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_every_gradient_method_works_on_vit(name):
    s = camfunc.split(tiny_vit(), "encoder.layers.encoder_layer_1")
    cams = camfunc.METHODS[name](s, image(), [1, 3])
    assert cams.shape == (2, 4, 4)
    assert torch.isfinite(cams).all() and cams.amax() > 0


def test_vit_gradcam_matches_pytorch_grad_cam_with_its_reshape_transform():
    model = tiny_vit()
    x = image()
    classes = [1, 3]

    def reshape(t):
        return t[:, 1:].reshape(t.shape[0], 4, 4, t.shape[2]).permute(0, 3, 1, 2)

    ref_model = copy.deepcopy(model)
    layer = ref_model.encoder.layers.encoder_layer_1
    extractor = PgcGradCAM(model=ref_model, target_layers=[layer], reshape_transform=reshape)
    want = pytorch_grad_cam_raw(extractor, layer, x, classes)
    got = camfunc.gradcam(camfunc.split(model, "encoder.layers.encoder_layer_1"), x, classes,
                          normalize=False)
    assert want.flatten(1).amax(1).min() > 0
    torch.testing.assert_close(camfunc.normalize(got), camfunc.normalize(want), atol=1e-5, rtol=0)


def test_last_block_patch_tokens_get_zero_gradient_and_auto_choice_skips_them():
    model = tiny_vit()
    x = image()
    last = camfunc.split(model, "encoder.layers.encoder_layer_2")
    assert torch.equal(camfunc.gradcam(last, x, 1, normalize=False), torch.zeros(2, 4, 4))
    with pytest.warns(camfunc.LayerChoiceWarning) as record:
        chosen = camfunc.split(model, example_input=x)
    assert chosen.layers[0] not in ("encoder", "encoder.ln", "encoder.layers.encoder_layer_2",
                                     "encoder.layers")
    assert chosen.layers[0] in str(record[0].message)
    assert camfunc.gradcam(chosen, x, 1, normalize=False).amax() > 0


def test_zero_initialised_vit_head_gives_zero_maps_not_nan():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=5).eval()  # torchvision's own zero head
    cams = camfunc.gradcam(camfunc.split(model, "encoder.layers.encoder_layer_0"), image(), 1)
    assert torch.equal(cams, torch.zeros_like(cams))


def test_token_count_that_fits_no_grid_is_a_clear_error():
    model = tiny_vit()
    s = camfunc.split(model, "encoder.layers.encoder_layer_1", layout="tokens", prefix_tokens=0)
    with pytest.raises(ValueError, match=r"17 tokens fit no grid.*grid=\(h, w\)"):
        camfunc.gradcam(s, image(), 1)
    s = camfunc.split(model, "encoder.layers.encoder_layer_1", layout="tokens", grid=(2, 8))
    assert camfunc.gradcam(s, image(), 1).shape == (2, 2, 8)


class RegisterViT(nn.Module):
    """A timm-style ViT: ``num_prefix_tokens`` (class + one register) and ``blocks``."""

    num_prefix_tokens = 2

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.patch = nn.Conv2d(3, 8, 8, stride=8)
        self.prefix = nn.Parameter(torch.randn(1, 2, 8))
        self.blocks = nn.Sequential(*[nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
                                      for _ in range(2)])
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.prefix.expand(x.shape[0], -1, -1), tokens], dim=1)
        return self.head(self.norm(self.blocks(tokens)).mean(1))


def test_timm_style_prefix_tokens_are_recognised():
    model = RegisterViT().eval()
    x = image()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nn.TransformerEncoderLayer's fast-path notice
        s = camfunc.split(model, "blocks.0")
        camfunc.check(s, model, x, atol=1e-5)
        with torch.no_grad():
            grid, aside = s.head(x)[:2]
        assert grid.shape == (2, 8, 4, 4) and aside.shape == (2, 2, 8)
        assert camfunc.gradcam(s, x, 1).shape == (2, 4, 4)


def test_swin_channels_last_blocks_become_channels_first():
    torch.manual_seed(0)
    model = torchvision.models.swin_t().eval()
    x = image(batch=1, size=64)
    s = camfunc.split(model, "features.5")
    camfunc.check(s, model, x, atol=1e-4)
    with torch.no_grad():
        grid = s.head(x)[0]
        native = model.features[:6](x)
    torch.testing.assert_close(grid, native.permute(0, 3, 1, 2))
    by_hand = camfunc.Split(lambda v: model.features[:6](v).permute(0, 3, 1, 2),
                            lambda g: model.head(model.flatten(model.avgpool(model.permute(
                                model.norm(model.features[6:](g.permute(0, 2, 3, 1))))))))
    torch.testing.assert_close(camfunc.gradcam(s, x, 3, normalize=False),
                               camfunc.gradcam(by_hand, x, 3, normalize=False), atol=1e-6, rtol=1e-5)


def test_with_layout_for_a_split_built_by_hand():
    model = tiny_vit()
    x = image()

    def head(v):
        return model.encoder.layers[:2](_embedded(model, v))

    def tail(tokens):
        return model.heads(model.encoder.ln(model.encoder.layers[2:](tokens))[:, 0])

    s = camfunc.with_layout(camfunc.Split(head, tail, model=model), "tokens")
    via_fx = camfunc.split(model, "encoder.layers.encoder_layer_1")
    torch.testing.assert_close(camfunc.gradcam(s, x, 2), camfunc.gradcam(via_fx, x, 2))
    with pytest.raises(ValueError, match="layout must be"):
        camfunc.Layout("rows")
