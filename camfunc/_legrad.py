"""LeGrad: gradients of each block's class score with respect to its attention probabilities.

torchvision's ``EncoderBlock`` calls ``nn.MultiheadAttention`` with
``need_weights=False``, so the probabilities never exist as a tensor. They are
recomputed here from each chosen block's input (``ln_1``, the shared ``Q/K/V``
projection, ``softmax(Q K^T / sqrt(d))``), and the rest of the block is written
as a function of them. The encoder runs once with no graph; one ``vjp`` of all
chosen blocks' scores with respect to all their probabilities, pulled back for
every class under ``vmap``, gives every map. Nothing touches the model.
"""

from __future__ import annotations

import numbers
import sys
from collections.abc import Sequence
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _engine, _ops, _targets, _validate
from ._layout import Layout, _fixed_tokens
from ._split import Split
from ._splitter import _layer_name

_TORCHVISION_VIT = "torchvision.models.vision_transformer"
_UNSUPPORTED = (
    "legrad supports torchvision's VisionTransformer (torchvision.models.vit_b_16 and "
    "friends: encoder.layers of EncoderBlocks with ln_1, self_attention, ln_2, mlp)"
)
#: torchvision's ViT puts one class token before the patch tokens.
_TOKENS = Layout("tokens", prefix_tokens=1)

Layers = Union[int, str, nn.Module, Sequence[Union[int, str, nn.Module]], None]


def _runs_torchvision(module: Any, name: str) -> bool:
    """Whether ``module``'s forward is torchvision's ``name.forward`` (subclasses that keep it count)."""
    # A model running torchvision's ViT has imported it; camfunc itself never needs torchvision.
    source = sys.modules.get(_TORCHVISION_VIT)
    expected = getattr(getattr(source, name, None), "forward", None)
    return (isinstance(module, nn.Module) and expected is not None
            and getattr(type(module), "forward", None) is expected)


def _vit(model: Any) -> nn.Module:
    """The torchvision ViT behind ``model`` (a model, a wrapped one, or a split's), checked."""
    model = _validate.whole_model(model, "legrad")
    # The attention is recomputed from the blocks' parts, so their forward must be the known one.
    if not (_runs_torchvision(model, "VisionTransformer")
            and _runs_torchvision(getattr(model, "encoder", None), "Encoder")):
        raise TypeError(f"{_UNSUPPORTED}; got {type(model).__name__}")
    for name, block in model.encoder.layers.named_children():
        if not _runs_torchvision(block, "EncoderBlock"):
            raise TypeError(f"{_UNSUPPORTED}; block {name!r} is a {type(block).__name__}")
        _check_attention(block.self_attention, name)
    return model


def _check_attention(attention: Any, name: str) -> None:
    if not isinstance(attention, nn.MultiheadAttention):
        raise TypeError(f"{_UNSUPPORTED}; block {name!r} has no nn.MultiheadAttention")
    if (not attention.batch_first or not attention._qkv_same_embed_dim
            or attention.bias_k is not None or attention.add_zero_attn):
        raise ValueError(
            f"block {name!r}: legrad needs batch-first attention with one shared Q/K/V "
            "projection and no added key/value tokens, as torchvision builds it"
        )


def _block_indices(model: nn.Module, layers: Layers) -> list[int]:
    """Positions in ``model.encoder.layers`` of the blocks named by ``layers`` (None: all)."""
    blocks = list(model.encoder.layers)
    if layers is None:
        return list(range(len(blocks)))
    items = list(layers) if isinstance(layers, Sequence) and not isinstance(layers, str) else [layers]
    if not items:
        raise ValueError("layers is empty; give at least one block, or None for all of them")
    found = []
    for item in items:
        if isinstance(item, numbers.Integral) and not isinstance(item, bool):
            if not -len(blocks) <= item < len(blocks):
                raise IndexError(
                    f"block index {item} is out of range: the model has {len(blocks)} blocks")
            found.append(int(item) % len(blocks))
            continue
        if not isinstance(item, (str, nn.Module)):
            raise TypeError(
                f"layers holds block indices, names or modules, got {type(item).__name__}")
        block = model.get_submodule(_layer_name(model, item)) if isinstance(item, str) else item
        position = next((i for i, b in enumerate(blocks) if b is block), None)
        if position is None:
            raise ValueError(
                f"{item if isinstance(item, str) else type(item).__name__} is not one of "
                f"model.encoder.layers' {len(blocks)} blocks; give a block, its name or its index")
        found.append(position)
    if len(set(found)) != len(found):
        raise ValueError(f"layers must name distinct blocks, got positions {found}")
    return found


def _check_image(model: nn.Module, x: Tensor) -> None:
    size = model.image_size
    if tuple(x.shape[1:]) != (3, size, size):
        raise ValueError(
            f"the model takes (B, 3, {size}, {size}) images, got shape {tuple(x.shape)}; "
            f"resize them to {size}x{size} (and add the batch axis with x.unsqueeze(0) for one image)"
        )


def _embed(model: nn.Module, x: Tensor) -> Tensor:
    """The tokens entering the first block: class token, patches, position embedding."""
    patches = model._process_input(x)
    tokens = torch.cat([model.class_token.expand(x.shape[0], -1, -1), patches], dim=1)
    return model.encoder.dropout(tokens + model.encoder.pos_embedding)


def _split_heads(t: Tensor, heads: int) -> Tensor:
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def attention_probabilities(block: nn.Module, z: Tensor) -> tuple[Tensor, Tensor]:
    r"""A block's attention probabilities and values from its input tokens ``z``.

    :math:`P = \mathrm{softmax}(Q K^\top / \sqrt{d})`, with :math:`Q, K, V` the
    shared in-projection of ``ln_1(z)`` split into heads. Returns ``P``
    ``(B, heads, N, N)`` and ``V`` ``(B, heads, N, d)``.
    """
    attention = block.self_attention
    q, k, v = F.linear(block.ln_1(z), attention.in_proj_weight, attention.in_proj_bias).chunk(3, -1)
    q, k, v = (_split_heads(t, attention.num_heads) for t in (q, k, v))
    scaled = q * attention.head_dim ** -0.5
    return (scaled @ k.transpose(-2, -1)).softmax(-1), v


def block_scores(model: nn.Module, block: nn.Module, z: Tensor, v: Tensor, p: Tensor) -> Tensor:
    r"""The class scores :math:`s^l` the model would give block ``l``'s tokens, as a function of ``P``.

    The block's output :math:`y` from its input ``z``, values ``V`` and
    probabilities ``P``, then torchcam's projection :math:`s^l = \mathrm{head}(\mathrm{LN}(\frac{1}{N}\sum_t y_t))`
    (the final norm and head on the tokens' mean).
    """
    mixed = (p @ v).transpose(1, 2).flatten(2)
    x = block.dropout(block.self_attention.out_proj(mixed)) + z
    y = x + block.mlp(block.ln_2(x))
    return model.heads(model.encoder.ln(y.mean(1)))


def _relevance(gradient: Tensor) -> Tensor:
    """:math:`\\frac{1}{H N}\\sum_{h,i} \\mathrm{ReLU}(\\partial s / \\partial P_{h,i,j})`: one value per key ``j``."""
    return gradient.float().clamp_min(0).mean((1, 2))


def legrad(model: nn.Module | Split, x: Tensor, cls: _targets.Target, *, layers: Layers = None,
           normalize: bool = True, return_scores: bool = False,
           chunk_size: int | None = None) -> Any:
    r"""LeGrad: how each block's class score reacts to its attention, averaged over blocks.

    .. math:: E = \frac{1}{|\mathcal{L}|}\sum_{l\in\mathcal{L}} \frac{1}{H N}\sum_{h,i}
              \mathrm{ReLU}\Big(\frac{\partial s^l_c}{\partial P^l_{h,i,j}}\Big), \qquad
              s^l = \mathrm{head}\Big(\mathrm{LN}\Big(\frac{1}{N}\sum_t y^l_t\Big)\Big)

    :math:`P^l` the post-softmax attention of block :math:`l` (heads :math:`h`,
    queries :math:`i`, keys :math:`j`), :math:`y^l` its output tokens, LN and
    head the model's final norm and classifier. The class-token key is dropped
    and the rest reshaped to the patch grid, then min-max normalised. As
    torchcam 0.5.0's ``LeGrad`` (mean over tokens and over layers; the authors'
    code sums layers, equal after normalising). For torchvision's
    ``VisionTransformer`` only (or a split of one: its model is used whole).
    ``layers``: block indices, names or modules (None: every block);
    ``chunk_size``: classes per ``vmap`` chunk, which bounds memory for large K.

    Bousselham et al., "LeGrad: An Explainability Method for Vision
    Transformers via Feature Formation Sensitivity", arXiv:2404.03214.

    Example:
        >>> camfunc.legrad(vit, x, 3).shape                # vit: a torchvision VisionTransformer
        torch.Size([2, 4, 4])
        >>> camfunc.legrad(vit, x, camfunc.topk(2), layers=[-1]).shape
        torch.Size([2, 2, 4, 4])
    """
    model = _vit(model)
    _validate.check_call(Split(lambda v: v, model, model=model), x)
    _check_image(model, x)
    _targets.check_form(cls, x.shape[0])
    if _targets.is_objective(cls):
        raise TypeError("legrad explains class logits: give class indices or camfunc.topk, not a callable")
    chosen = _block_indices(model, layers)
    blocks = list(model.encoder.layers)

    with torch.no_grad():
        tokens = _embed(model, x)
        inputs: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        for i, block in enumerate(blocks):
            if i in chosen:
                inputs[i] = (tokens, *attention_probabilities(block, tokens))
            tokens = block(tokens)
        scores = model.heads(model.encoder.ln(tokens)[:, 0])
        index, keep_k = _targets.class_indices(cls, scores)

        def every_block_scores(*probabilities: Tensor) -> Tensor:
            # Block l's score depends on its own P only: one vjp serves every block.
            return torch.stack([block_scores(model, blocks[i], inputs[i][0], inputs[i][2], p)
                                for i, p in zip(chosen, probabilities)])

        layer_scores, pull = torch.func.vjp(every_block_scores, *(inputs[i][1] for i in chosen))
        cotangents = _targets.one_hot_rows(index, layer_scores[0])  # (K, B, classes)

        def relevance(cotangent: Tensor, pull=pull) -> Tensor:  # a default: see _engine.class_maps
            gradients = pull(cotangent.expand_as(layer_scores))
            return torch.stack([_relevance(g) for g in gradients]).mean(0)

        per_key = _engine.over_classes(relevance, cotangents, chunk_size)  # (K, B, N)
        prefix, grid = _fixed_tokens(_TOKENS, per_key.shape[-1])
        maps = per_key[..., prefix:].unflatten(-1, grid).movedim(0, 1)
        maps = maps if keep_k else maps.squeeze(1)
        if normalize:
            maps = _ops.normalize(maps, spatial_dims=len(grid))
    maps = _validate.nonfinite_maps(maps)
    return (maps, scores) if return_scores else maps
