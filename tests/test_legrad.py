"""LeGrad against torchcam's, on torchvision's ViT; batching, classes, purity, compile, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torchcam.methods import LeGrad
from torchvision.models.vision_transformer import EncoderBlock

import camfunc
from camfunc._tools.legrad import attention_probabilities, legrad
from helpers import assert_unchanged, small_cnn, snapshot

CLASSES = 10


def small_vit(seed: int = 0) -> nn.Module:
    """32x32 input, 8x8 patches: a 4x4 grid and a class token; three blocks."""
    torch.manual_seed(seed)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=CLASSES)
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision zero-initialises the head
    nn.init.normal_(model.heads.head.bias, std=0.5)
    return model.eval()


def image(batch: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn((batch, 3, size, size), generator=torch.Generator().manual_seed(seed))


MODEL = small_vit()


def torchcam_legrad(model: nn.Module, x: torch.Tensor, classes: int | list[int],
                    layers: list[int] | None = None) -> torch.Tensor:
    """torchcam's un-normalised LeGrad, on a copy (it hooks what it gets)."""
    model = copy.deepcopy(model)
    blocks = list(model.encoder.layers)
    targets = blocks if layers is None else [blocks[i] for i in layers]
    with LeGrad(model, targets) as extractor:
        scores = model(x)
        return extractor(classes, scores, normalized=False)[0].detach()


def assert_same_map(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal raw maps (to float32 rounding of their scale) and equal after the same normalisation."""
    assert want.abs().amax() > 0  # a zero head would make every comparison trivial
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().amax()))
    torch.testing.assert_close(camfunc.normalize(got), camfunc.normalize(want), rtol=0, atol=1e-5)


@pytest.mark.parametrize("layers", [None, [1, 2], [0]])
def test_matches_torchcam_on_a_small_vit(layers):
    x = image()
    classes = [1, 4, 7]
    got = legrad(MODEL, x, classes, layers=layers, normalize=False)
    assert got.shape == (3, 4, 4)
    assert_same_map(got, torchcam_legrad(MODEL, x, classes, layers))
    normalised = legrad(MODEL, x, classes, layers=layers)
    torch.testing.assert_close(normalised, camfunc.normalize(got))


def test_matches_torchcam_on_vit_b_16():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16()
    nn.init.normal_(model.heads.head.weight, std=0.02)
    model.eval()
    x = image(batch=1, size=224, seed=1)
    got = legrad(model, x, 281, layers=[-4, -3, -2, -1], normalize=False)
    assert got.shape == (1, 14, 14)
    assert_same_map(got, torchcam_legrad(model, x, 281, [8, 9, 10, 11]))


def test_recomputed_attention_is_multihead_attentions_own():
    block = MODEL.encoder.layers[1]
    z = torch.randn((3, 17, 32), generator=torch.Generator().manual_seed(2))  # class token + 4x4
    with torch.no_grad():
        h = block.ln_1(z)
        _, want = block.self_attention(h, h, h, need_weights=True, average_attn_weights=False)
        got, values = attention_probabilities(block, z)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert values.shape == (3, 2, 17, 16)


def test_layers_by_index_name_or_module_agree():
    x = image()
    by_index = legrad(MODEL, x, 2, layers=[0, -1])
    by_name = legrad(MODEL, x, 2, layers=["encoder.layers.encoder_layer_0",
                                          "encoder.layers.encoder_layer_2"])
    by_module = legrad(MODEL, x, 2, layers=(MODEL.encoder.layers[2], MODEL.encoder.layers[0]))
    torch.testing.assert_close(by_name, by_index)
    torch.testing.assert_close(by_module, by_index)
    torch.testing.assert_close(legrad(MODEL, x, 2, layers=1), legrad(MODEL, x, 2, layers=[1]))


def test_topk_scores_and_split():
    x = image()
    maps, scores = legrad(MODEL, x, camfunc.topk(2), return_scores=True)
    with torch.no_grad():
        torch.testing.assert_close(scores, MODEL(x), rtol=1e-5, atol=1e-5)
    assert maps.shape == (3, 2, 4, 4)
    torch.testing.assert_close(maps, legrad(MODEL, x, scores.topk(2).indices))
    s = camfunc.split(MODEL, "encoder.layers.encoder_layer_1")
    torch.testing.assert_close(legrad(s, x, 3), legrad(MODEL, x, 3))


@given(seed=st.integers(0, 2**16), batch=st.integers(1, 3), k=st.integers(1, 3))
def test_many_classes_equal_separate_calls_and_samples_equal_their_own_batch(seed, batch, k):
    x = image(batch, seed=seed)
    classes = torch.randint(0, CLASSES, (batch, k), generator=torch.Generator().manual_seed(seed))
    together = legrad(MODEL, x, classes, normalize=False, chunk_size=2)
    assert together.shape == (batch, k, 4, 4)
    for j in range(k):
        alone = legrad(MODEL, x, classes[:, j].tolist(), normalize=False)
        torch.testing.assert_close(together[:, j], alone, rtol=1e-5, atol=1e-8)
    for i in range(batch):
        own = legrad(MODEL, x[i:i + 1], classes[i:i + 1], normalize=False)
        torch.testing.assert_close(together[i:i + 1], own, rtol=1e-4, atol=1e-7)


def test_maps_are_normalised_and_nothing_is_changed():
    model = small_vit(seed=3)
    x = image().requires_grad_()
    x_before = x.detach().clone()
    before = snapshot(model)
    maps, scores = legrad(model, x, [0, 5, 9], return_scores=True)
    assert_unchanged(before, model)
    assert x.grad is None and torch.equal(x.detach(), x_before)
    assert maps.grad_fn is None and scores.grad_fn is None
    assert maps.dtype == torch.float32 and maps.amin() >= 0
    torch.testing.assert_close(maps.flatten(1).amax(1), torch.ones(3))


def test_half_precision_model_gives_float32_maps_close_to_float32():
    x = image()
    half = copy.deepcopy(MODEL).half()
    got = legrad(half, x.half(), [1, 4, 7])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, legrad(MODEL, x, [1, 4, 7]), rtol=0, atol=1e-2)


def test_compiles_fullgraph_and_matches_eager_without_recompiling():
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(legrad, fullgraph=True, backend=counter)
    x, classes = image(), torch.tensor([[1, 2], [3, 4], [5, 6]])
    torch.testing.assert_close(compiled(MODEL, x, classes), legrad(MODEL, x, classes),
                               rtol=1e-4, atol=1e-5)
    compiled(MODEL, image(seed=5), torch.tensor([[0, 9], [8, 7], [6, 5]]))
    assert counter.frame_count == 1


class OwnBlock(EncoderBlock):
    """A block whose forward is not torchvision's: its attention cannot be recomputed safely."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input) * 2


def vit_with_own_block() -> nn.Module:
    model = small_vit()
    model.encoder.layers[1] = OwnBlock(2, 32, 64, 0.0, 0.0).eval()
    return model


def test_bad_models():
    x = image()
    with pytest.raises(TypeError, match="torchvision's VisionTransformer.*got Sequential"):
        legrad(small_cnn(), torch.randn(2, 3, 8, 8), 0)
    with pytest.raises(TypeError, match="block 'encoder_layer_1' is a OwnBlock"):
        legrad(vit_with_own_block(), x, 0)
    with pytest.raises(TypeError, match="takes the model"):
        legrad(torch.relu, x, 0)
    with pytest.raises(ValueError, match="whole model"):
        legrad(camfunc.Split(nn.Identity(), nn.Identity()), x, 0)
    training = small_vit().train()
    with pytest.raises(ValueError, match="model.eval"):
        legrad(training, x, 0)
    unbatched = torchvision.models.VisionTransformer(32, 8, 1, 2, 32, 64).eval()
    unbatched.encoder.layers[0].self_attention = nn.MultiheadAttention(32, 2, batch_first=False)
    with pytest.raises(ValueError, match="batch-first attention"):
        legrad(unbatched, x, 0)


@pytest.mark.parametrize("x, cls, kwargs, error, message", [
    (image(size=64), 0, {}, ValueError, r"takes \(B, 3, 32, 32\) images, got shape \(3, 3, 64, 64\)"),
    (torch.randn(3, 32, 32), 0, {}, ValueError, r"unsqueeze\(0\)"),
    (image().double(), 0, {}, TypeError, r"cast the input"),
    (image(), lambda scores: scores[:, 0], {}, TypeError, r"not a callable"),
    (image(), 10, {}, IndexError, r"valid indices are 0 to 9"),
    (image(), [0, 1], {}, ValueError, r"2 entries but the batch has 3"),
    (image(), 0, {"layers": []}, ValueError, r"layers is empty"),
    (image(), 0, {"layers": [3]}, IndexError, r"block index 3 is out of range.*3 blocks"),
    (image(), 0, {"layers": [0, -3]}, ValueError, r"distinct blocks"),
    (image(), 0, {"layers": ["encoder.ln"]}, ValueError, r"not one of the model.s 3 transformer blocks"),
    (image(), 0, {"layers": ["encoder.layers.block_9"]}, ValueError, r"unknown layer"),
    (image(), 0, {"layers": [nn.Linear(2, 2)]}, ValueError, r"Linear is not one of"),
    (image(), 0, {"layers": [1.0]}, TypeError, r"indices, names or modules, got float"),
    (image(), 0, {"layers": [True]}, TypeError, r"got bool"),
])
def test_bad_input(x, cls, kwargs, error, message):
    model = small_vit()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        legrad(model, x, cls, **kwargs)
    assert_unchanged(before, model)


# ----------------------------------------------------------------------------
# Beyond torchvision: timm, Hugging Face, and blocks in torchvision's layout


def legrad_oracle(model, blocks, probabilities_of, project, x, classes, prefix, grid):
    """LeGrad written out: hooks keep each block's real attention probabilities and output,
    autograd differentiates s^l = project(mean(y^l)) with respect to them."""
    kept, handles = {}, []
    for i, block in enumerate(blocks):
        handles.append(probabilities_of(block).register_forward_hook(
            lambda m, args, out, i=i: kept.__setitem__(("p", i), out[1] if isinstance(out, tuple) else out)))
        handles.append(block.register_forward_hook(lambda m, args, out, i=i: kept.__setitem__(("y", i), out)))
    try:
        with torch.enable_grad():
            model(x)
            maps = []
            for i in range(len(blocks)):
                score = project(kept[("y", i)].mean(1)).gather(1, torch.tensor(classes)[:, None]).sum()
                (g,) = torch.autograd.grad(score, kept[("p", i)], retain_graph=True)
                maps.append(g.clamp_min(0).mean((1, 2)))
    finally:
        for h in handles:
            h.remove()
    per_key = torch.stack(maps).mean(0)
    return per_key[:, prefix:].reshape(x.shape[0], *grid).detach()


def test_timm_vit_with_registers_equals_the_written_out_oracle():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=(32, 48), patch_size=8, embed_dim=32, depth=3, num_heads=2,
                              num_classes=CLASSES, reg_tokens=2).eval()
    x, classes = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)), [3, 7]
    got = legrad(model, x, classes, normalize=False)
    reference = copy.deepcopy(model)
    for block in reference.blocks:
        block.attn.fused_attn = False  # its own softmax path, whose output attn_drop sees
    want = legrad_oracle(reference, list(reference.blocks), lambda b: b.attn.attn_drop,
                         lambda t: reference.head(reference.fc_norm(reference.norm(t))),
                         x, classes, prefix=3, grid=(4, 6))
    assert_same_map(got, want)


def test_hugging_face_vit_equals_the_written_out_oracle():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3,
                       num_attention_heads=2, intermediate_size=64, num_labels=CLASSES)
    model = ViTForImageClassification(config).eval()
    x, classes = image(batch=2), [1, 4]
    got, scores = legrad(model, x, classes, layers=[1, 2], normalize=False, return_scores=True)
    torch.testing.assert_close(scores, model(x).logits)
    reference = copy.deepcopy(model)
    reference.config._attn_implementation = "eager"  # attention weights come out of the attention
    blocks = list(reference.vit.layers)[1:]
    want = legrad_oracle(reference, blocks, lambda b: b.attention,
                         lambda t: reference.classifier(reference.vit.layernorm(t)),
                         x, classes, prefix=1, grid=(4, 4))
    assert_same_map(got, want)


class OwnViT(nn.Module):
    """A model of its own whose blocks follow torchvision's layout."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.patch = nn.Conv2d(3, 32, 8, stride=8)
        self.cls = nn.Parameter(torch.randn(1, 1, 32))
        self.blocks = nn.Sequential(*[EncoderBlock(2, 32, 64, 0.0, 0.0) for _ in range(2)])
        self.norm = nn.LayerNorm(32)
        self.fc = nn.Linear(32, CLASSES)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], 1)
        return self.fc(self.norm(self.blocks(tokens))[:, 0])


def test_blocks_in_torchvisions_layout_with_a_score_projection_match_torchcam():
    model = OwnViT().eval()
    x, classes = image(batch=2), [2, 5]

    def project(tokens):
        return model.fc(model.norm(tokens.mean(1)))

    got = legrad(model, x, classes, layers=["blocks.0", "blocks.1"], score_projection=project,
                 normalize=False)
    reference = copy.deepcopy(model)
    with LeGrad(reference, ["blocks.0", "blocks.1"],
                score_projection=lambda t: reference.fc(reference.norm(t.mean(1)))) as extractor:
        want = extractor(classes, reference(x), normalized=False)[0].detach()
    assert_same_map(got, want)
    with pytest.raises(TypeError, match="score_projection="):
        legrad(model, x, classes, layers=["blocks.0"])


def test_a_block_whose_recomputation_differs_is_an_error():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                              num_classes=CLASSES).eval()
    model.blocks[1].attn.fused_attn = True  # the fused path ignores .scale, which legrad reads
    model.blocks[1].attn.scale = model.blocks[1].attn.scale * 3
    with pytest.raises(ValueError, match="recomputed block 1 of this timm model.*differs"):
        legrad(model, image(batch=2), 1)


def test_a_score_projection_that_ignores_the_tokens_is_an_error():
    # torchcam raises here too; an all-zero map would say "no attention matters".
    model = OwnViT().eval()
    x = image(batch=2)
    fixed = torch.randn(2, CLASSES)
    with pytest.raises(ValueError, match="score_projection returned scores that do not depend"):
        legrad(model, x, [2, 5], layers=["blocks.0"], score_projection=lambda tokens: fixed * 1.0)


class DropsTokens(EncoderBlock):
    """A block that keeps only the first half of its tokens (token pruning)."""

    def forward(self, input):
        out = super().forward(input)
        return out[:, : out.shape[1] // 2 + 1]


def test_a_block_that_drops_tokens_is_a_clear_error():
    model = OwnViT().eval()
    model.blocks[0] = DropsTokens(2, 32, 64, 0.0, 0.0).eval()
    x = image(batch=2)
    with pytest.raises(ValueError, match=r"block 0 .* drops or merges tokens"):
        legrad(model, x, [2, 5], layers=["blocks.0"],
               score_projection=lambda t: model.fc(model.norm(t.mean(1))))
