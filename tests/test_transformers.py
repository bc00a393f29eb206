"""Vision transformers: token and channels-last layouts seen as grids."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from pytorch_grad_cam import GradCAM as PgcGradCAM
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import camfunc
from helpers import hook_gradcam, logit, pytorch_grad_cam_raw, tokens_to_grid

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


def _first_component(terms: torch.Tensor) -> torch.Tensor:
    """(C, h, w) -> (h, w): centred projection on the first right singular vector,
    signed so that its largest magnitude is positive (Eigen-CAM's sign rule)."""
    x = terms.flatten(1).T
    x = x - x.mean(0)
    _, sv, vh = torch.linalg.svd(x, full_matrices=False)
    assert sv[0] - sv[1] > 1e-3 * sv[0]  # a well-defined direction on this model
    projection = x @ vh[0]
    lean = projection.max() + projection.min()
    assert lean.abs() > 1e-3 * projection.abs().max()  # no tie: the sign rule decides
    return (projection if lean > 0 else -projection).reshape(terms.shape[1:])


def _gradcampp(a, g):
    """Chattopadhyay et al. Eq. 19 (exponential of the score). The docstring's rule for
    negative activations: alpha = 0 where the denominator is not positive."""
    den = 2 * g ** 2 + a.sum((2, 3), keepdim=True) * g ** 3
    alpha = torch.where(den > 0, g ** 2 / torch.where(den > 0, den, 1), 0)
    return ((alpha * g.clamp_min(0)).sum((2, 3), keepdim=True) * a).sum(1).clamp_min(0)


VIT_FORMULAS = {  # (a, g) -> map, a and g as (B, C, h, w) grids in float64
    "gradcam": lambda a, g: (g.mean((2, 3), keepdim=True) * a).sum(1).clamp_min(0),
    "gradcampp": _gradcampp,
    "xgradcam": lambda a, g: (((a * g).sum((2, 3), keepdim=True) / a.sum((2, 3), keepdim=True)) * a
                              ).sum(1).clamp_min(0),
    "layercam": lambda a, g: (g.clamp_min(0) * a).sum(1).clamp_min(0),
    "hirescam": lambda a, g: (g * a).sum(1).clamp_min(0),
    "gradcam_elementwise": lambda a, g: (g * a).clamp_min(0).sum(1),
    "eigengradcam": lambda a, g: torch.stack([_first_component(t) for t in g * a]).clamp_min(0),
}


def _finer_score(out, classes, gamma=0.6, references=3):
    """Finer-CAM's target: y_c - gamma * mean of the nearest logits, chosen on the clean output."""
    rows = []
    for b, c in enumerate(classes):
        gaps = (out[b] - out[b, c]).abs().detach()
        gaps[c] = float("inf")
        rows.append(out[b, c] - gamma * out[b, gaps.topk(references, largest=False).indices].mean())
    return torch.stack(rows)


def _shapley_weights(a, out, classes):
    """Shapley-CAM: mean over positions of g - H a / 2 for the ReST target, logit - cross entropy."""
    target = out.gather(1, classes[:, None]).squeeze(1) - nn.functional.cross_entropy(out, classes, reduction="none")
    (g,) = torch.autograd.grad(target.sum(), a, create_graph=True)
    (hvp,) = torch.autograd.grad(g, a, grad_outputs=a.detach())
    assert (hvp.abs() > 0).any()  # the second-order term is really there
    return g - 0.5 * hvp


def test_every_gradient_method_on_vit_has_its_formulas_raw_values():
    # Block 0, not the last-but-one: there patch tokens reach the class token only through
    # LayerNorm, which is scale invariant, so sum_k g_k a_k (HiResCAM) is rounding noise.
    model, x, classes = tiny_vit(), image(), torch.tensor([1, 3])
    layer = model.encoder.layers.encoder_layer_0
    kept = {}
    handle = layer.register_forward_hook(lambda m, i, o: kept.__setitem__("a", o))
    # The math kernel: CPU's flash attention has no double backward, which Shapley-CAM needs.
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        out = model(x)
        tokens = kept["a"]
        (g,) = torch.autograd.grad(out.gather(1, classes[:, None]).sum(), tokens, retain_graph=True)
        (g_finer,) = torch.autograd.grad(_finer_score(out, classes.tolist()).sum(), tokens, retain_graph=True)
        w_shapley = _shapley_weights(tokens, out, classes)
    handle.remove()
    to_grid = tokens_to_grid(1, (4, 4))
    a = to_grid(tokens.detach()).double()
    want = {name: formula(a, to_grid(g).double()) for name, formula in VIT_FORMULAS.items()}
    want["finercam"] = VIT_FORMULAS["gradcam"](a, to_grid(g_finer).double())
    want["shapleycam"] = VIT_FORMULAS["gradcam"](a, to_grid(w_shapley.detach()).double())
    assert set(want) == set(GRADIENT_METHODS)
    s = camfunc.split(model, "encoder.layers.encoder_layer_0")
    for name in GRADIENT_METHODS:
        got = camfunc.METHODS[name](s, x, classes, normalize=False)
        assert want[name].amax() > 0, name
        torch.testing.assert_close(got.double(), want[name], rtol=1e-4,
                                   atol=1e-5 * float(want[name].abs().max()), msg=name)


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
        want = hook_gradcam(model, model.blocks[0], x, logit([1, 1]), tokens_to_grid(2, (4, 4)))
        assert want.amax() > 0
        torch.testing.assert_close(camfunc.gradcam(s, x, 1, normalize=False), want,
                                   atol=1e-5, rtol=1e-4)


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


def test_a_callable_target_reads_a_model_output_as_it_reads_a_tensor():
    # Hugging Face's ModelOutput, through the methods that re-run the tail on many inputs.
    from transformers.modeling_outputs import ImageClassifierOutput

    from helpers import small_cnn

    class HFStyle(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = small_cnn()

        def forward(self, x):
            return ImageClassifierOutput(logits=self.net(x))

    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = small_cnn()
    wrapped = HFStyle().eval()
    for name in ("scorecam", "ablationcam", "smooth_gradcampp", "gradcam"):
        want = camfunc.METHODS[name](camfunc.split(plain, "4"), x, lambda out: out[:, 2],
                                     normalize=False)
        # A split hands the tail's output back as a dict of the ModelOutput's fields.
        got = camfunc.METHODS[name](camfunc.split(wrapped, "net.4", example_input=x), x,
                                    lambda out: out["logits"][:, 2], normalize=False)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=name)
