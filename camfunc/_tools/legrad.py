"""LeGrad: gradients of each block's class score with respect to its attention probabilities.

Vision transformers compute attention with a fused kernel, so the
probabilities never exist as a tensor. They are recomputed here from each
chosen block's input (its norm, the Q/K/V projection, ``softmax(Q K^T / sqrt(d))``),
and the rest of the block is written as a function of them. That recomputation
is model code, so it is done for the families whose blocks camfunc knows by
their exact forward: torchvision's ``VisionTransformer``, timm's
``VisionTransformer`` (DeiT included) and Hugging Face's
``ViTForImageClassification``, and for blocks of any model that follow
torchvision's layout (``ln_1``, a batch-first ``nn.MultiheadAttention`` as
``self_attention``, ``ln_2``, ``mlp``), given the model's ``score_projection``.
Each recomputed block is checked against the block's own output (eagerly), so
a library change cannot give a silent wrong map.

The model runs once with no graph; one ``vjp`` of all chosen blocks' scores with
respect to all their probabilities, pulled back for every class under ``vmap``,
gives every map. Nothing touches the model.
"""

from __future__ import annotations

import dataclasses
import numbers
import sys
import weakref
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camfunc._core import (
    engine as _engine,
    layout as _layout,
    ops as _ops,
    targets as _targets,
    validate as _validate,
)
from camfunc._core.cut.lock import holding_calls
from camfunc._core.split import Split
from camfunc._core.splitter import layer_name
from camfunc._util.host import syncs

_UNSUPPORTED = (
    "legrad supports torchvision's VisionTransformer (torchvision.models.vit_b_16 and "
    "friends: encoder.layers of EncoderBlocks with ln_1, self_attention, ln_2, mlp), timm's "
    "VisionTransformer (blocks of timm Blocks) and Hugging Face's ViTForImageClassification; for "
    "other models give layers= (blocks in torchvision's layout) and score_projection="
)

Layers = int | str | nn.Module | Sequence[int | str | nn.Module] | None
#: ``(block, z) -> (P, V)``: attention probabilities ``(B, heads, N, N)`` and values.
Attention = Callable[[nn.Module, Tensor], tuple[Tensor, Tensor]]
#: ``(block, z, V, P) -> y``: the block's output tokens as a function of ``P``.
Rest = Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor]


def _runs(module: Any, source: str, name: str) -> bool:
    """Whether ``module``'s forward is ``source.name.forward`` (subclasses that keep it count)."""
    # A model running that library's code has imported it; camfunc never needs it otherwise.
    expected = getattr(getattr(sys.modules.get(source), name, None), "forward", None)
    return (isinstance(module, nn.Module) and expected is not None
            and getattr(type(module), "forward", None) is expected)


@dataclasses.dataclass(frozen=True)
class _Family:
    """What LeGrad needs of a model: its blocks, and how to read and recompute them."""

    name: str
    blocks: list[nn.Module]
    #: ``(x, chosen) -> ({i: block i's input tokens}, the model's class scores)``
    inputs: Callable[[Tensor, list[int]], tuple[dict[int, Tensor], Tensor]]
    attention: Attention
    rest: Rest
    #: block output tokens -> class scores :math:`s^l` (final norm and head on the tokens' mean)
    project: Callable[[Tensor], Tensor]
    prefix_tokens: int


def _split_heads(t: Tensor, heads: int) -> Tensor:
    return cast(Tensor, t.unflatten(-1, (heads, -1)).transpose(1, 2))


def _sequential_inputs(embed: Callable[[Tensor], Tensor], blocks: list[nn.Module],
                       final: Callable[[Tensor], Tensor]
                       ) -> Callable[[Tensor, list[int]], tuple[dict[int, Tensor], Tensor]]:
    def inputs(x: Tensor, chosen: list[int]) -> tuple[dict[int, Tensor], Tensor]:
        tokens, found = embed(x), {}
        for i, block in enumerate(blocks):
            if i in chosen:
                found[i] = tokens
            tokens = block(tokens)
        return found, final(tokens)
    return inputs


# ----------------------------------------------------------------------------
# torchvision
#
# Models and blocks are typed Any below: each family's are duck-typed by their
# library's attributes (checked with _runs, or with hasattr for the torchvision layout).


def attention_probabilities(block: Any, z: Tensor) -> tuple[Tensor, Tensor]:
    r"""A torchvision-layout block's attention probabilities and values from its input tokens ``z``.

    :math:`P = \mathrm{softmax}(Q K^\top / \sqrt{d})`, with :math:`Q, K, V` the
    shared in-projection of ``ln_1(z)`` split into heads. Returns ``P``
    ``(B, heads, N, N)`` and ``V`` ``(B, heads, N, d)``.
    """
    attention = block.self_attention
    q, k, v = F.linear(block.ln_1(z), attention.in_proj_weight, attention.in_proj_bias).chunk(3, -1)
    q, k, v = (_split_heads(t, attention.num_heads) for t in (q, k, v))
    scaled = q * attention.head_dim ** -0.5
    return (scaled @ k.transpose(-2, -1)).softmax(-1), v


def _torchvision_rest(block: Any, z: Tensor, v: Tensor, p: Tensor) -> Tensor:
    mixed = (p @ v).transpose(1, 2).flatten(2)
    x = block.dropout(block.self_attention.out_proj(mixed)) + z
    return cast(Tensor, x + block.mlp(block.ln_2(x)))


def _check_attention(attention: Any, name: str) -> None:
    if not isinstance(attention, nn.MultiheadAttention):
        raise TypeError(f"{_UNSUPPORTED}; block {name!r} has no nn.MultiheadAttention")
    if (not attention.batch_first or not attention._qkv_same_embed_dim
            or attention.bias_k is not None or attention.add_zero_attn):
        raise ValueError(
            f"block {name!r}: legrad needs batch-first attention with one shared Q/K/V "
            "projection and no added key/value tokens, as torchvision builds it"
        )


def _torchvision(model: Any) -> _Family:
    source = "torchvision.models.vision_transformer"
    for name, block in model.encoder.layers.named_children():
        if not _runs(block, source, "EncoderBlock"):
            raise TypeError(f"{_UNSUPPORTED}; block {name!r} is a {type(block).__name__}")
        _check_attention(block.self_attention, name)
    blocks = list(model.encoder.layers)

    def embed(x: Tensor) -> Tensor:
        size = model.image_size
        if tuple(x.shape[1:]) != (3, size, size):
            raise ValueError(
                f"the model takes (B, 3, {size}, {size}) images, got shape {tuple(x.shape)}; resize "
                f"them to {size}x{size} (and add the batch axis with x.unsqueeze(0) for one image)")
        patches = model._process_input(x)
        tokens = torch.cat([model.class_token.expand(x.shape[0], -1, -1), patches], dim=1)
        return cast(Tensor, model.encoder.dropout(tokens + model.encoder.pos_embedding))

    return _Family("torchvision", blocks,
                   _sequential_inputs(embed, blocks, lambda t: model.heads(model.encoder.ln(t)[:, 0])),
                   attention_probabilities, _torchvision_rest,
                   lambda y: model.heads(model.encoder.ln(y.mean(1))), 1)


# ----------------------------------------------------------------------------
# timm


def _timm_attention(block: Any, z: Tensor) -> tuple[Tensor, Tensor]:
    attn = block.attn
    x = block.norm1(z)
    batch, count, _ = x.shape
    q, k, v = attn.qkv(x).reshape(batch, count, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1), v


def _timm_rest(block: Any, z: Tensor, v: Tensor, p: Tensor) -> Tensor:
    attn = block.attn
    mixed = attn.norm((attn.attn_drop(p) @ v).transpose(1, 2).flatten(2))
    if attn.gate is not None:
        mixed = mixed * attn.gate(block.norm1(z)).sigmoid()
    x = z + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(mixed))))
    return cast(Tensor, x + block.drop_path2(block.ls2(block.mlp(block.norm2(x)))))


def _timm(model: Any) -> _Family:
    for i, block in enumerate(model.blocks):
        if not (_runs(block, "timm.models.vision_transformer", "Block")
                and _runs(getattr(block, "attn", None), "timm.layers.attention", "Attention")):
            raise TypeError(f"{_UNSUPPORTED}; block {i} is a {type(block).__name__}")
    blocks = list(model.blocks)

    def embed(x: Tensor) -> Tensor:
        return cast(Tensor, model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x)))))

    def project(y: Tensor) -> Tensor:
        return cast(Tensor, model.head(model.fc_norm(model.norm(y.mean(1)))))

    return _Family("timm", blocks,
                   _sequential_inputs(embed, blocks, lambda t: model.forward_head(model.norm(t))),
                   _timm_attention, _timm_rest, project, model.num_prefix_tokens)


# ----------------------------------------------------------------------------
# Hugging Face


def _hf_attention(block: Any, z: Tensor) -> tuple[Tensor, Tensor]:
    attn = block.attention
    x = block.layernorm_before(z)
    q, k, v = (_split_heads(proj(x), x.shape[-1] // attn.head_dim)
               for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    return ((q @ k.transpose(-2, -1)) * attn.scaling).softmax(-1), v


def _hf_rest(block: Any, z: Tensor, v: Tensor, p: Tensor) -> Tensor:
    mixed = block.attention.o_proj((p @ v).transpose(1, 2).flatten(2))
    x = block.dropout(mixed) + z
    return cast(Tensor, block.dropout(block.mlp(block.layernorm_after(x))) + x)


def _hugging_face(model: Any) -> _Family:
    vit = model.vit
    layers = getattr(vit, "layers", None)
    if layers is None:
        raise TypeError(f"{_UNSUPPORTED}; this ViTForImageClassification has no vit.layers "
                        "(transformers before 5 keeps them elsewhere)")
    source = "transformers.models.vit.modeling_vit"
    for i, block in enumerate(layers):
        if not (_runs(block, source, "ViTLayer") and _runs(block.attention, source, "ViTAttention")):
            raise TypeError(f"{_UNSUPPORTED}; block {i} is a {type(block).__name__}")
    blocks = list(layers)
    return _Family("hugging face", blocks,
                   _sequential_inputs(vit.embeddings, blocks,
                                      lambda t: model.classifier(vit.layernorm(t)[:, 0])),
                   _hf_attention, _hf_rest, lambda y: model.classifier(vit.layernorm(y.mean(1))), 1)


# ----------------------------------------------------------------------------
# Any model with torchvision-layout blocks


def _block_name(model: nn.Module, item: int | str | nn.Module) -> str:
    """The name of a block given as a module or a name (no indices on this path)."""
    if not isinstance(item, (str, nn.Module)):  # as layer_name refuses it
        raise TypeError(f"layer must be a module name or a module, got {type(item).__name__}")
    return layer_name(model, item)


def _torchvision_layout(model: nn.Module, layers: Layers,
                        score_projection: Callable[[Tensor], Tensor] | None,
                        prefix_tokens: int | None) -> tuple[_Family, list[str]]:
    if layers is None or score_projection is None:
        raise TypeError(f"{_UNSUPPORTED}; got {type(model).__name__}")
    items = list(layers) if isinstance(layers, Sequence) and not isinstance(layers, str) else [layers]
    if not items:
        raise ValueError("layers is empty; give at least one block, or None for all of them")
    names = [_block_name(model, item) for item in items]
    for name in names:
        block = model.get_submodule(name)
        if not all(hasattr(block, part) for part in ("ln_1", "self_attention", "ln_2", "mlp")):
            raise TypeError(f"{_UNSUPPORTED}; block {name!r} is a {type(block).__name__} without "
                            "ln_1, self_attention, ln_2 and mlp")
        _check_attention(block.self_attention, name)
    blocks = [model.get_submodule(name) for name in names]

    def inputs(x: Tensor, chosen: list[int]) -> tuple[dict[int, Tensor], Tensor]:
        from camfunc._core.splitter import (
            module_inputs,  # the blocks' inputs, read off camfunc's own graph
        )

        found, out = module_inputs(model, [names[i] for i in chosen], x)
        return dict(zip(chosen, found, strict=True)), _targets.class_scores(out)

    def rest(block: Any, z: Tensor, v: Tensor, p: Tensor) -> Tensor:
        mixed = (p @ v).transpose(1, 2).flatten(2)
        x = getattr(block, "dropout", nn.Identity())(block.self_attention.out_proj(mixed)) + z
        return cast(Tensor, x + block.mlp(block.ln_2(x)))

    return _Family("torchvision layout", blocks, inputs, attention_probabilities, rest,
                   score_projection, 1 if prefix_tokens is None else prefix_tokens), names


def _family(model: nn.Module, layers: Layers, score_projection: Callable[[Tensor], Tensor] | None,
            prefix_tokens: int | None) -> tuple[_Family, Layers]:
    if _runs(model, "torchvision.models.vision_transformer", "VisionTransformer") and _runs(
            getattr(model, "encoder", None), "torchvision.models.vision_transformer", "Encoder"):
        family = _torchvision(model)
    elif _runs(model, "timm.models.vision_transformer", "VisionTransformer") or _runs(
            model, "timm.models.deit", "VisionTransformerDistilled"):
        family = _timm(model)
    elif _runs(model, "transformers.models.vit.modeling_vit", "ViTForImageClassification"):
        family = _hugging_face(model)
    else:
        family, names = _torchvision_layout(model, layers, score_projection, prefix_tokens)
        return family, list(range(len(names)))
    if score_projection is not None:
        family = dataclasses.replace(family, project=score_projection)
    if prefix_tokens is not None:
        family = dataclasses.replace(family, prefix_tokens=prefix_tokens)
    return family, layers


def _block_indices(model: nn.Module, blocks: list[nn.Module], layers: Layers) -> list[int]:
    """Positions in ``blocks`` of the blocks named by ``layers`` (None: all)."""
    if layers is None:
        return list(range(len(blocks)))
    items = list(layers) if isinstance(layers, Sequence) and not isinstance(layers, str) else [layers]
    if not items:
        raise ValueError("layers is empty; give at least one block, or None for all of them")
    found = []
    for item in items:
        if isinstance(item, numbers.Integral) and not isinstance(item, bool):
            index = int(item)
            if not -len(blocks) <= index < len(blocks):
                raise IndexError(
                    f"block index {item} is out of range: the model has {len(blocks)} blocks")
            found.append(index % len(blocks))
            continue
        if not isinstance(item, (str, nn.Module)):
            raise TypeError(
                f"layers holds block indices, names or modules, got {type(item).__name__}")
        block = model.get_submodule(layer_name(model, item)) if isinstance(item, str) else item
        position = next((i for i, b in enumerate(blocks) if b is block), None)
        if position is None:
            raise ValueError(
                f"{item if isinstance(item, str) else type(item).__name__} is not one of the "
                f"model's {len(blocks)} transformer blocks (model.encoder.layers for torchvision); "
                "give a block, its name or its index")
        found.append(position)
    if len(set(found)) != len(found):
        raise ValueError(f"layers must name distinct blocks, got positions {found}")
    return found


def _relevance(gradient: Tensor) -> Tensor:
    """:math:`\\frac{1}{H N}\\sum_{h,i} \\mathrm{ReLU}(\\partial s / \\partial P_{h,i,j})`: one value per key ``j``."""
    return gradient.float().clamp_min(0).mean((1, 2))


_VERIFIED: weakref.WeakSet = weakref.WeakSet()  # blocks whose recomputation was checked once


def _check_recomputed(family: _Family, i: int, z: Tensor, values: Tensor, probabilities: Tensor) -> None:
    """The recomputed block must be the block (eagerly, once per block: it depends on the
    block's code, not on the input; a library change must not pass silently)."""
    block = family.blocks[i]
    if torch.compiler.is_dynamo_compiling() or block in _VERIFIED:
        return
    recomputed, actual = family.rest(block, z, values, probabilities), block(z)
    if recomputed.shape != actual.shape:
        raise ValueError(
            f"legrad recomputed block {i} of this {family.name} model as giving shape "
            f"{tuple(recomputed.shape)}, but the block gives {tuple(actual.shape)}: a block that "
            "drops or merges tokens is not one legrad can read. Explain it with a gradient "
            "method instead, or give layers= blocks that keep every token")
    # Fused and math attention differ by rounding: allow 100 ulps of the output's scale.
    tolerance = 100 * torch.finfo(actual.dtype).eps * float(actual.abs().amax()) + 1e-12
    if not torch.allclose(recomputed.float(), actual.float(), rtol=0, atol=tolerance):
        raise ValueError(
            f"legrad recomputed block {i} of this {family.name} model from its attention, and the "
            f"result differs from the block's own output by {float((recomputed - actual).abs().amax()):.3g}: "
            "its forward is not the one legrad knows. Explain it with a gradient method instead"
        )
    _VERIFIED.add(block)


def _check_reads_the_tokens(scores: list[Tensor]) -> None:
    """Inside vjp, scores computed from the blocks' tokens require grad; scores that do not
    would give an all-zero map, so they are an error (as a disconnected target is elsewhere)."""
    if not torch.compiler.is_dynamo_compiling() and not all(s.requires_grad for s in scores):
        raise ValueError(
            "legrad's score_projection returned scores that do not depend on the tokens it is "
            "given, so no block's attention can matter; it must map the tokens (B, N, D) to "
            "class scores, e.g. lambda y: head(norm(y[:, 0]))")


@syncs("on its first call for each block, checks on the host that the block it recomputes from "
       "its attention gives the block's own output (a library change must not pass silently)")
@holding_calls
def legrad(model: nn.Module | Split, x: Tensor, cls: _targets.Target, *, layers: Layers = None,
           normalize: bool = True, return_scores: bool = False, chunk_size: int | None = None,
           score_projection: Callable[[Tensor], Tensor] | None = None,
           prefix_tokens: int | None = None) -> Any:
    r"""LeGrad: how each block's class score reacts to its attention, averaged over blocks.

    .. math:: E = \frac{1}{|\mathcal{L}|}\sum_{l\in\mathcal{L}} \frac{1}{H N}\sum_{h,i}
              \mathrm{ReLU}\Big(\frac{\partial s^l_c}{\partial P^l_{h,i,j}}\Big), \qquad
              s^l = \mathrm{head}\Big(\mathrm{LN}\Big(\frac{1}{N}\sum_t y^l_t\Big)\Big)

    :math:`P^l` the post-softmax attention of block :math:`l` (heads :math:`h`,
    queries :math:`i`, keys :math:`j`), :math:`y^l` its output tokens, LN and
    head the model's final norm and classifier. The prefix keys (class,
    distillation, register tokens) are dropped and the rest put on the patch
    grid (read off the input's shape), then min-max normalised. As torchcam
    0.5.0's ``LeGrad`` (mean over tokens and over layers; the authors' code sums
    layers, equal after normalising).

    Models: torchvision's ``VisionTransformer``, timm's ``VisionTransformer``
    (and DeiT; :math:`s^l` uses ``norm``, ``fc_norm`` and ``head``), Hugging
    Face's ``ViTForImageClassification`` (``vit.layernorm`` and ``classifier``),
    or a split of one (its model is used whole). For other models, blocks in
    torchvision's layout (``ln_1``, a batch-first ``nn.MultiheadAttention`` as
    ``self_attention``, ``ln_2``, ``mlp``) given by ``layers``, with
    ``score_projection`` (tokens ``(B, N, D)`` -> class scores, as torchcam
    asks) and ``prefix_tokens`` (default 1). ``layers``: block indices, names or
    modules (None: every block); ``chunk_size``: classes per ``vmap`` chunk.

    Bousselham et al., "LeGrad: An Explainability Method for Vision
    Transformers via Feature Formation Sensitivity", arXiv:2404.03214.

    Example:
        >>> camfunc.legrad(vit, x, 3).shape                # vit: a torchvision VisionTransformer
        torch.Size([2, 4, 4])
        >>> camfunc.legrad(vit, x, camfunc.topk(2), layers=[-1]).shape
        torch.Size([2, 2, 4, 4])
    """
    model = _validate.whole_model(model, "legrad")
    family, layers = _family(model, layers, score_projection, prefix_tokens)
    _validate.check_call(Split(lambda v: v, model, model=model), x)
    _targets.check_form(cls, x.shape[0])
    if _targets.is_objective(cls):
        raise TypeError("legrad explains class logits: give class indices or camfunc.topk, not a callable")
    chosen = _block_indices(model, family.blocks, layers)

    with torch.no_grad():
        inputs, scores = family.inputs(x, chosen)
        index, keep_k = _targets.class_indices(cls, scores)
        parts = {i: family.attention(family.blocks[i], inputs[i]) for i in chosen}
        for i in chosen:
            _check_recomputed(family, i, inputs[i], parts[i][1], parts[i][0])

        def every_block_scores(*probabilities: Tensor) -> Tensor:
            # Block l's score depends on its own P only: one vjp serves every block.
            scores = [family.project(family.rest(family.blocks[i], inputs[i], parts[i][1], p))
                      for i, p in zip(chosen, probabilities, strict=True)]
            _check_reads_the_tokens(scores)
            return torch.stack(scores)

        # Without has_aux, vjp gives (outputs, pullback); its annotation also allows a triple.
        scores_and_pull = torch.func.vjp(every_block_scores, *(parts[i][0] for i in chosen))
        layer_scores, pull = scores_and_pull[0], scores_and_pull[1]
        cotangents = _targets.one_hot_rows(index, layer_scores[0])  # (K, B, classes)

        def relevance(cotangent: Tensor, pull: Callable[..., Any] = pull) -> Tensor:  # a default: see _engine.class_maps
            gradients = pull(cotangent.expand_as(layer_scores))
            return torch.stack([_relevance(g) for g in gradients]).mean(0)

        per_key = _engine.over_classes(relevance, cotangents, chunk_size)  # (K, B, N)
        tokens = per_key.shape[-1]
        layout = _layout.resolve(_layout.LayoutRule("legrad", "tokens", family.prefix_tokens),
                                 tuple(x.shape[1:]), (tokens, 1))
        grid = layout.grid
        assert grid is not None  # resolve always fills a tokens layout's grid
        maps = per_key[..., layout.prefix_tokens:].unflatten(-1, grid).movedim(0, 1)
        maps = maps if keep_k else maps.squeeze(1)
        if normalize:
            maps = _ops.normalize(maps, spatial_dims=len(grid))
    maps = _validate.nonfinite_maps(maps)
    return (maps, scores) if return_scores else maps
