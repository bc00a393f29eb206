"""Attention in the differentiated stages: the model's own kernels, the rows the tail reads,
and masks that mask nothing.

- With one class per sample, and with K classes (pulled back one at a time), the
  stages after the cut run the attention kernels the model's own forward runs with
  autograd on: the ops are recorded with a dispatch mode and compared.
- Differentiable maps (a double backward) and forward-AD methods (Shapley-CAM) use
  the math kernel, the fused one's definition: gradcheck, and equality with a call
  where torch itself is told to use the math kernel.
- A tail that reads the class token computes that row only: its last attention sees
  one query; ``rows.prune_rows`` unguarded gives the whole tail's output on drawn
  tiny ViTs (pooling, causal attention, masks, sizes drawn), and every map equals a
  hook-and-autograd oracle.
- Under torch.export, a mask computed from shapes alone that masks nothing is
  dropped; one that masks something is kept, and the maps equal the oracle.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import camfunc
from camfunc._core.cut import rows
from helpers import hook_gradcam, logit, tokens_to_grid

pytestmark = pytest.mark.core


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """One class token, patch 4. ``pool``: which rows the classifier reads; ``mask``: None,
    "full" (masks nothing), "band" (each token sees its neighbours within 2) or "first7"
    (every query sees the first 7 tokens only); ``export``:
    a branch on the input's size that torch.fx cannot trace, so the split uses torch.export."""

    def __init__(self, depth: int = 3, dim: int = 16, heads: int = 2, pool: str = "token",
                 mask: str | None = None, causal: bool = False, export: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.token = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.blocks = nn.ModuleList(Block(dim, heads, causal) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 5)
        self.pool, self.mask, self.export = pool, mask, export

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        if self.export and x.shape[-1] % 2 == 0:  # fx cannot branch on a traced size
            t = t * 1.0
        t = torch.cat([self.token.expand(t.shape[0], -1, -1), t], 1)
        n = t.shape[1]
        mask = None
        if self.mask == "full":
            mask = torch.ones(n, n, dtype=torch.bool, device=x.device)
        elif self.mask == "band":
            index = torch.arange(n, device=x.device)
            mask = (index[:, None] - index[None, :]).abs() <= 2
        elif self.mask == "first7":  # masks nothing at 7 tokens, something at more
            mask = (torch.arange(n, device=x.device) < 7)[None, :].expand(n, n)
        for block in self.blocks:
            t = block(t, mask)
        t = self.norm(t)
        pooled = {"token": lambda: t[:, 0], "mean": lambda: t[:, 1:].mean(1),
                  "two": lambda: (t[:, 0] + t[:, 1]) / 2, "last": lambda: t[:, -1]}[self.pool]()
        return self.head(pooled)


def image(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def oracle(model, layer, x, cls):
    grid = (x.shape[2] // 4, x.shape[3] // 4)
    return hook_gradcam(model, model.get_submodule(layer), x, logit(cls), tokens_to_grid(1, grid))


def stage_modules(split) -> list[torch.fx.GraphModule]:
    """The GraphModules of a split's stages (under their layout and output wrappers)."""
    found = []
    for stage in split.stages:
        while not hasattr(stage, "module"):
            stage = next(getattr(stage, name) for name in ("stage", "tail", "head") if hasattr(stage, name))
        found.append(stage)
    return found


class Ops(TorchDispatchMode):
    """Records every aten op's name, and the shapes of attention's queries."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []
        self.queries: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.names.append(name)
        if "attention" in name and not name.endswith("backward"):
            self.queries.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def attention_kernels(names: list[str]) -> set[str]:
    return {n for n in names if "attention" in n and n != "scaled_dot_product_attention"}


def own_kernels(model, x) -> set[str]:
    """The attention kernels the model's own forward and backward run, autograd on."""
    with Ops() as ops, torch.enable_grad():
        model(x.requires_grad_()).sum().backward()
    model.zero_grad(set_to_none=True)
    return attention_kernels(ops.names)


@pytest.mark.parametrize("export", [False, True], ids=["fx", "export"])
def test_one_class_and_k_classes_run_the_models_own_attention_kernels(export):
    model = TinyViT(export=export).eval()
    x = image((2, 3, 16, 20))
    split = camfunc.split(model, "blocks.0", example_input=x)
    assert [s.module is not s.math_twin.module for s in stage_modules(split.bound(x))[1:]] == [True]
    wanted = own_kernels(model, x.clone())
    assert "_scaled_dot_product_attention_math" not in wanted  # the test means something
    classes = torch.tensor([[1, 3, 4], [0, 2, 4]])
    with Ops() as one, warnings.catch_warnings():
        warnings.simplefilter("error")  # vmap over a fused backward would warn and loop
        maps = camfunc.gradcam(split, x, classes, normalize=False)
    assert attention_kernels(one.names) <= wanted
    for k in range(3):
        torch.testing.assert_close(maps[:, k], oracle(model, "blocks.0", x, classes[:, k]),
                                   rtol=1e-4, atol=1e-6)
    with Ops() as single:
        first = camfunc.gradcam(split, x, classes[:, 0], normalize=False)
    assert attention_kernels(single.names) <= wanted
    torch.testing.assert_close(first, maps[:, 0], rtol=0, atol=1e-7)


def test_differentiable_maps_take_the_math_kernel_which_has_second_derivatives():
    model = TinyViT(depth=2, dim=8).double().eval()
    x = image((1, 3, 8, 8)).double().requires_grad_()
    split = camfunc.split(model, "blocks.0")

    def maps(v):
        return camfunc.gradcam(split, v, 1, normalize=False, differentiable=True)

    assert torch.autograd.gradcheck(maps, (x,), eps=1e-6, atol=1e-5)


def test_forward_ad_methods_equal_torchs_own_math_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = TinyViT().eval()
    x = image((2, 3, 16, 16))
    split = camfunc.split(model, "blocks.1")
    got = camfunc.shapleycam(split, x, [1, 2], normalize=False)
    with sdpa_kernel([SDPBackend.MATH]):
        want = camfunc.shapleycam(camfunc.split(model, "blocks.1"), x, [1, 2], normalize=False)
    assert got.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("export", [False, True], ids=["fx", "export"])
def test_a_tail_that_reads_the_class_token_computes_one_query(export):
    model = TinyViT(depth=3, export=export).eval()
    x = image((2, 3, 12, 16))
    split = camfunc.split(model, "blocks.1", example_input=x)
    camfunc.gradcam(split, x, [0, 4])  # the first call at a shape probes the tail once
    with Ops() as ops:
        maps, scores = camfunc.gradcam(split, x, [0, 4], normalize=False, return_scores=True)
    # Three attentions: two in the head with every query, the tail's with one.
    assert [q[2] for q in ops.queries] == [13, 13, 1]
    torch.testing.assert_close(scores, model(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps, oracle(model, "blocks.1", x, [0, 4]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pool, causal", [("mean", False), ("two", False), ("token", True)])
def test_tails_that_read_every_row_are_not_pruned(pool, causal):
    model = TinyViT(depth=2, pool=pool, causal=causal).eval()
    x = image((2, 3, 8, 12))
    split = camfunc.split(model, "blocks.0")
    camfunc.gradcam(split, x, [3, 1])
    with Ops() as ops:
        maps = camfunc.gradcam(split, x, [3, 1], normalize=False)
    assert [q[2] for q in ops.queries] == [7, 7]
    torch.testing.assert_close(maps, oracle(model, "blocks.0", x, [3, 1]), rtol=1e-4, atol=1e-6)


@settings(max_examples=12)  # examples: each captures a model, most with torch.export (seconds each)
@given(depth=st.integers(1, 3), heads=st.sampled_from([1, 2, 4]),
       pool=st.sampled_from(["token", "mean", "two", "last"]), causal=st.booleans(),
       mask=st.sampled_from([None, "full", "band"]), rows_=st.integers(1, 3), cols=st.integers(1, 4),
       batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_pruned_tails_give_the_whole_tails_output(depth, heads, pool, causal, mask, rows_, cols, batch, seed):
    # Unguarded: prune_rows itself, not the checked version that falls back when it differs.
    # torch.fx cannot trace a mask made from a traced size: masks go through torch.export.
    model = TinyViT(depth=depth, dim=8, heads=heads, pool=pool, causal=causal and mask is None,
                    mask=mask, export=mask is not None, seed=seed).eval()
    x = image((batch, 3, 4 * rows_, 4 * cols), seed)
    bound = camfunc.split(model, f"blocks.{depth - 1}", layout="channels_first", example_input=x).bound(x)
    tail = stage_modules(bound)[-1].module
    carry = bound.head(x)
    carry = carry if isinstance(carry, tuple) else (carry,)
    pruned = rows.prune_rows(tail, *carry)
    if pool in ("token", "last"):  # one row read (causal: pruned up to the attention)
        assert pruned is not None
    if pool == "mean":  # every patch row read
        assert pruned is None
    if pruned is not None:
        with torch.no_grad():
            torch.testing.assert_close(pruned(*carry), tail(*carry), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask, kept", [("full", False), ("band", True)])
def test_export_drops_masks_that_mask_nothing_and_keeps_the_others(mask, kept):
    model = TinyViT(depth=2, mask=mask, export=True).eval()
    x = image((2, 3, 8, 16))
    split = camfunc.split(model, "blocks.0", example_input=x).bound(x)
    attentions = [n for gm in stage_modules(split) for n in gm.module.graph.nodes
                  if "scaled_dot_product_attention" in str(n.target)]
    assert len(attentions) == 2
    assert all((len(n.args) > 3 and n.args[3] is not None) == kept for n in attentions)
    torch.testing.assert_close(split(x), model(x), rtol=1e-5, atol=1e-6)
    for size in [(8, 16), (12, 8)]:
        x = image((2, 3, *size), 1)
        torch.testing.assert_close(camfunc.gradcam(split, x, [2, 0], normalize=False),
                                   oracle(model, "blocks.0", x, [2, 0]), rtol=1e-4, atol=1e-6)


def test_a_mask_that_masks_nothing_at_one_size_only_is_kept_in_a_capture_for_every_size():
    from camfunc._core.cut.capture import export_graph

    model = TinyViT(depth=2, mask="first7").eval()
    x = image((2, 3, 8, 12))  # 1 + 2 x 3 = 7 tokens: the mask is all true here
    fixed = export_graph(model, x, ["blocks.0"])
    dynamic = export_graph(model, x, ["blocks.0"], spatial=True)
    # An older torch (2.4) has no Dim.AUTO: there a "dynamic" capture is fixed-size too.
    sizes_vary = hasattr(torch.export.Dim, "AUTO")
    assert not fixed.admits(image((2, 3, 16, 24)))
    assert dynamic.admits(image((2, 3, 16, 24))) == sizes_vary

    def masks(captured):
        return [n.args[3] is not None for n in captured.graph.nodes
                if "scaled_dot_product_attention" in str(n.target)]

    assert masks(fixed) == [False, False]  # fixed at 7 tokens: dropped
    # Where the capture holds at 25 tokens too, where the mask masks, it is kept.
    assert masks(dynamic) == [sizes_vary] * 2
