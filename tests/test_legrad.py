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
from camfunc._legrad import attention_probabilities, legrad
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
    (image(), 0, {"layers": ["encoder.ln"]}, ValueError, r"not one of model.encoder.layers"),
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
