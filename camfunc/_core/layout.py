"""Activation layouts: transformer tokens and channels-last maps seen as (B, C, *spatial) grids.

CAM math works on ``(B, C, *spatial)``. A layout turns a layer's native
activations into that grid and back, and :func:`with_layout` builds the
conversion into the split's cut: the head returns the grid, and the tail
starts by restoring the native tensor. Every method then works unchanged, and
gradients are taken with respect to the grid. Tokens before the patches
(class and register tokens) are set aside as context: the tail still sees
them, but they get no map.

Which layout a layer has is decided from geometry, on each call, from the
activation's shape against the input's (:func:`resolve`): the spatial axes of
a map are the input's, scaled by one common stride; tokens fill a grid of that
kind after the model's prefix tokens. Where the shapes leave it open (a
``(B, 16, 16, 16)`` map of a 64x64 image, any 1-D model), the ops that
produced the activation decide (convolutions and pooling: channels first;
linear layers and layer norm: features last). If they say nothing either,
it is an error that asks for ``layout=``: a map over the channel axis is
never returned.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor
from typing_extensions import TypeIs

from camfunc._core.split import Split, as_tuple, math_twin

__all__ = ["Layout", "LayoutRule", "LayoutTag", "TokenGridError", "resolve", "with_layout"]

Kind = Literal["channels_first", "channels_last", "tokens"]
_KINDS = ("channels_first", "channels_last", "tokens")
_KIND_OF_FEATURE_AXIS: dict[str, Kind] = {"first": "channels_first", "last": "channels_last"}


def _is_kind(name: str) -> TypeIs[Kind]:
    return name in _KINDS


def checked_kind(name: str) -> Kind:
    """``name`` as a layout kind, or a ValueError that lists the kinds."""
    if not _is_kind(name):
        raise ValueError(
            f"layout must be 'channels_first', 'channels_last' or 'tokens', got {name!r}")
    return name


class TokenGridError(ValueError):
    """A layer's tokens fit no patch grid (miscounted class tokens, or not patches at all)."""


#: At most this many class, distillation and register tokens are guessed when
#: the model does not say how many it has.
MAX_PREFIX_TOKENS = 8


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a layer's activations map to a ``(B, C, *spatial)`` grid.

    ``kind`` is ``"channels_first"`` (already a grid), ``"channels_last"``
    (``(B, *spatial, C)``, e.g. Swin's blocks) or ``"tokens"`` (``(B, N, D)``).
    For tokens, ``prefix_tokens`` leading tokens are not patches and ``grid`` is
    the patch grid; either left None is inferred from the input's shape (the
    grid is the input's spatial size scaled by one stride, and a model's own
    class and register tokens are counted).

    Example:
        >>> layout = camfunc.Layout("tokens", prefix_tokens=1)   # 17 tokens: 1 class token, 4x4 patches
        >>> grid, aside = layout.to_grid(torch.randn(2, 17, 32))
        >>> grid.shape, aside.shape
        (torch.Size([2, 32, 4, 4]), torch.Size([2, 1, 32]))
    """

    kind: Kind = "channels_first"
    prefix_tokens: int | None = None
    grid: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        checked_kind(self.kind)
        if self.grid is not None:
            object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))

    def to_grid(self, a: Tensor) -> tuple[Tensor, Tensor | None]:
        """Native activations -> ``(grid, set-aside tokens or None)``."""
        if self.kind == "channels_first":
            return a, None
        if self.kind == "channels_last":
            return a.movedim(-1, 1), None
        if a.ndim != 3:
            raise ValueError(f"layout 'tokens' expects (B, N, D) activations, got {tuple(a.shape)}")
        prefix, grid = _fixed_tokens(self, a.shape[1])
        patches = a[:, prefix:].transpose(1, 2)
        return patches.reshape(a.shape[0], a.shape[2], *grid), a[:, :prefix]

    def from_grid(self, grid: Tensor, aside: Tensor | None) -> Tensor:
        """The inverse of :meth:`to_grid`."""
        return from_grid(self.kind, grid, aside)


def from_grid(kind: str, grid: Tensor, aside: Tensor | None) -> Tensor:
    if kind == "channels_first":
        return grid
    if kind == "channels_last":
        return grid.movedim(1, -1)
    tokens = grid.flatten(2).transpose(1, 2)
    return tokens if aside is None or aside.shape[1] == 0 else torch.cat([aside, tokens], 1)


def _no_grid(n: int, prefix: int | None, grid: Sequence[int] | None, spatial: Sequence[int] | None) -> TokenGridError:
    counted = f"with {prefix} class/register token(s) there are {n - prefix} patches" if prefix is not None \
        else "no number of class/register tokens leaves patches"
    fit = f"not {'x'.join(map(str, grid))}" if grid else (
        f"that tile a grid matching the {'x'.join(map(str, spatial))} input" if spatial else "that tile a grid")
    return TokenGridError(
        f"{n} tokens fit no grid: {counted} {fit}. Pass grid=(h, w) and prefix_tokens= "
        "to camfunc.split (or a camfunc.Layout)"
    )


def _fixed_tokens(layout: Layout, n: int) -> tuple[int, tuple[int, ...]]:
    """Prefix and grid when the layout pins them (or a square grid fits); no input geometry."""
    prefix, grid = layout.prefix_tokens, layout.grid
    if prefix is None and grid is not None:
        prefix = n - math.prod(grid)
    elif prefix is None:
        prefix = next((p for p in range(MAX_PREFIX_TOKENS + 1) if p < n and math.isqrt(n - p) ** 2 == n - p), 0)
    if grid is None:
        side = math.isqrt(max(n - prefix, 0))
        grid = (side, side)
    if prefix < 0 or n - prefix <= 0 or math.prod(grid) != n - prefix:
        raise _no_grid(n, prefix, grid, None)
    return prefix, tuple(grid)


# ----------------------------------------------------------------------------
# Geometry


def _scaled(sizes: Sequence[int], spatial: Sequence[int]) -> bool:
    """Whether ``sizes`` is ``spatial`` divided by one common stride, rounded one way.

    Each ``a = floor(s / f)`` needs ``s/(a+1) < f <= s/a``; each ``a = ceil(s / f)``
    needs ``s/a <= f < s/(a-1)``. Rounding is the same on every axis (padding
    does not round some axes up and others down).
    """
    if len(sizes) != len(spatial) or not sizes or any(a < 1 for a in sizes):
        return False
    floor_lo, floor_hi = max(s / (a + 1) for a, s in zip(sizes, spatial, strict=True)), min(s / a for a, s in zip(sizes, spatial, strict=True))
    ceil_lo = max(s / a for a, s in zip(sizes, spatial, strict=True))
    ceil_hi = min(s / (a - 1) if a > 1 else math.inf for a, s in zip(sizes, spatial, strict=True))
    return floor_lo < floor_hi or ceil_lo < ceil_hi


def _grids(count: int, dims: int) -> list[tuple[int, ...]]:
    """Every way to write ``count`` as an ordered product of ``dims`` factors."""
    if dims == 1:
        return [(count,)]
    return [(a, *rest) for a in range(1, count + 1) if count % a == 0 for rest in _grids(count // a, dims - 1)]


class LayoutRule(NamedTuple):
    """What :func:`resolve` knows about one cut before it sees shapes.

    ``kind``, ``prefix_tokens`` and ``grid`` are the user's (None: infer);
    ``feature_axis`` is the graph's evidence (``"first"``, ``"last"`` or None);
    ``prefix_hint`` the model's own prefix token count, or ``(width, count)`` pairs: the
    model's prefix tokens of each token width (None: unknown).
    """

    layer: str = ""
    kind: Kind | None = None
    prefix_tokens: int | None = None
    grid: tuple[int, ...] | None = None
    feature_axis: str | None = None
    prefix_hint: int | tuple[tuple[int, int], ...] | None = None


_SAY_LAYOUT = "camfunc.split(..., layout='channels_first'), 'channels_last' or 'tokens'"


def _ambiguous(rule: LayoutRule, act: Sequence[int], spatial: Sequence[int], why: str,
               fix: str = _SAY_LAYOUT) -> ValueError:
    name = f"layer {rule.layer!r}" if rule.layer else "the layer"
    return ValueError(
        f"{name} outputs (B, {', '.join(map(str, act))}) for an input with spatial size "
        f"{tuple(spatial)}: {why}. Say which with {fix}"
    )


def _resolve(rule: LayoutRule, input_shape: tuple[int, ...], act_shape: tuple[int, ...]) -> Layout:
    act = act_shape
    spatial_in = input_shape[1:] if len(input_shape) >= 2 else input_shape
    kind = rule.kind
    if kind is None and len(act) == 2 and len(input_shape) >= 3:
        kind = "tokens"  # (B, N, D) from an image or a volume
    if kind is None:
        if len(act) < 2:  # no map to explain; the methods say so, and the split still runs
            return Layout("channels_first")
        dims = len(act) - 1
        reference = input_shape[-dims:] if len(input_shape) >= dims else None
        first = reference is not None and _scaled(act[1:], reference)
        last = reference is not None and _scaled(act[:-1], reference)
        evidence = _KIND_OF_FEATURE_AXIS.get(rule.feature_axis or "")
        if evidence is not None:
            other = "channels_last" if evidence == "channels_first" else "channels_first"
            if (first and not last and other == "channels_first") or (last and not first and other == "channels_last"):
                raise _ambiguous(rule, act, spatial_in, f"its shape reads as {other.replace('_', '-')}, "
                                 f"but the ops that produce it treat the {rule.feature_axis} axis as features")
            kind = evidence
        elif first != last:
            kind = "channels_first" if first else "channels_last"
        else:
            raise _ambiguous(rule, act, spatial_in, "both channels-first and channels-last fit its shape"
                             if first else "its shape fits neither channels-first nor channels-last")
        return Layout(kind)
    if kind != "tokens":
        return Layout(kind)
    return _resolve_tokens(rule, act, spatial_in)


def _resolve_tokens(rule: LayoutRule, act: Sequence[int], spatial: Sequence[int]) -> Layout:
    if len(act) != 2:
        raise ValueError(f"layout 'tokens' expects (B, N, D) activations, got (B, {', '.join(map(str, act))})")
    if rule.feature_axis == "first" and rule.kind is None:
        raise _ambiguous(rule, act, spatial, "three axes read as tokens, but the ops that produce it "
                         "treat axis 1 as channels")
    n = act[0]
    if rule.grid is not None:
        prefix = rule.prefix_tokens if rule.prefix_tokens is not None else n - math.prod(rule.grid)
        return Layout("tokens", prefix, rule.grid) if prefix >= 0 and math.prod(rule.grid) == n - prefix \
            else _raise(_no_grid(n, prefix, rule.grid, None))
    if len(spatial) < 2:  # no image geometry to hold the tokens against
        return Layout("tokens", *_fixed_tokens(Layout("tokens", rule.prefix_tokens), n))
    if rule.prefix_tokens is not None:
        prefixes = [rule.prefix_tokens]
    elif rule.prefix_hint is not None:
        prefixes = list(dict.fromkeys([*_prefix_counts(rule.prefix_hint, act[1]), 0]))  # CaiT-like: tokens join late
    else:
        prefixes = list(range(MAX_PREFIX_TOKENS + 1))
    found: list[tuple[int, tuple[int, ...]]] = []
    for p in prefixes:  # the model's own count first; then none; the fewest that fit
        found = [(p, g) for g in _grids(n - p, len(spatial)) if _scaled(g, spatial)] if 0 <= p < n else []
        if found:
            break
    if len(found) != 1:
        if not found:
            raise _no_grid(n, prefixes[0] if len(prefixes) == 1 else None, None, spatial)
        options = ", ".join(f"{'x'.join(map(str, g))} + {p}" for p, g in found)
        raise _ambiguous(rule, act, spatial, f"its {n} tokens fit several grids ({options})",
                         f"camfunc.split(..., grid={found[0][1]}, prefix_tokens={found[0][0]})")
    prefix, grid = found[0]
    return Layout("tokens", prefix, grid)


def _prefix_counts(hint: int | tuple[tuple[int, int], ...], width: int) -> list[int]:
    """Prefix token counts to try for tokens of ``width``: the count of that width's tokens;
    for another width (inside attention, an MLP), one width's count, then all of them."""
    if isinstance(hint, int):
        return [hint]
    counts = dict(hint)
    if width in counts:
        return [counts[width]]
    return [*sorted(set(counts.values())), sum(counts.values())]


def _raise(err: Exception) -> Any:
    raise err


_resolve_cached = functools.lru_cache(maxsize=1024)(_resolve)


def resolve(rule: LayoutRule, input_shape: Sequence[int], act_shape: Sequence[int]) -> Layout:
    """The concrete layout of one cut, from the input's and the activation's shapes (no batch axis)."""
    if torch.compiler.is_dynamo_compiling():
        return _resolve(rule, tuple(input_shape), tuple(act_shape))
    return _resolve_cached(rule, tuple(int(s) for s in input_shape), tuple(int(s) for s in act_shape))


# ----------------------------------------------------------------------------
# Layouts built into a split's stages


class LayoutTag(NamedTuple):
    """Travels in the carry after a grid: how to restore the native tensor, and the input's shape."""

    kind: str
    input_shape: tuple[int, ...]


def _tagged(carry: tuple[Any, ...]) -> bool:
    return len(carry) >= 3 and isinstance(carry[2], LayoutTag)


def _list_output(layer: str, items: Sequence[Any]) -> ValueError:
    name = layer or "the layer"
    return ValueError(
        f"layer {name!r} outputs a {type(items).__name__} of {len(items)}, not one tensor; "
        f"pick an element with camfunc.split(model, '{name}[0]') (0 to {len(items) - 1})")


class _GridStage:
    """A stage whose input and/or output is a grid.

    The carry between stages is ``(grid, aside, LayoutTag, *context)``, or the
    plain ``(A, *context)`` when a single cut is channels-first.
    """

    def __init__(self, stage: Callable[..., Any], before: bool, after: LayoutRule | None,
                 always_tag: bool):
        self.stage, self.before, self.after, self.always_tag = stage, before, after, always_tag

    def __call__(self, *carry: Any) -> Any:
        if self.before and _tagged(carry):
            grid, aside, tag, *context = carry
            input_shape = tag.input_shape
            carry = (from_grid(tag.kind, grid, aside), *context)
        else:
            input_shape = tuple(carry[0].shape[1:]) if not self.before else ()
        out = self.stage(*carry)
        if self.after is None:
            return out
        out = as_tuple(out)
        if isinstance(out[0], (list, tuple)):
            raise _list_output(self.after.layer, out[0])
        layout = resolve(self.after, input_shape, tuple(out[0].shape[1:]))
        if layout.kind == "channels_first" and not self.always_tag:
            return out if len(out) > 1 else out[0]
        grid, aside = layout.to_grid(out[0])
        return (grid, aside, LayoutTag(layout.kind, input_shape), *out[1:])

    @property
    def math_twin(self) -> _GridStage:
        twin = math_twin(self.stage)
        return self if twin is self.stage else _GridStage(twin, self.before, self.after, self.always_tag)

    def __repr__(self) -> str:
        return f"_GridStage({self.stage!r}, {self.after})"


def _as_rule(item: Layout | str | LayoutRule, layer: str = "") -> LayoutRule:
    if isinstance(item, LayoutRule):
        return item
    if isinstance(item, str):
        item = Layout(checked_kind(item))
    if not isinstance(item, Layout):
        raise TypeError(f"layout must be a string, a camfunc.Layout or a list of them, got {item!r}")
    return LayoutRule(layer, item.kind, item.prefix_tokens, item.grid)


def build_layouts(split: Split, rules: Sequence[LayoutRule]) -> Split:
    """The split with each cut's activations seen as a grid under ``rules`` (one per cut)."""
    if len(rules) != split.num_layers:
        raise ValueError(f"got {len(rules)} layouts for a split with {split.num_layers} layers")
    if all(r.kind == "channels_first" for r in rules):
        return split
    stages = list(split.stages)
    always_tag = split.num_layers > 1
    wrapped = [
        _GridStage(stage, i > 0, rules[i] if i < len(rules) else None, always_tag)
        for i, stage in enumerate(stages)
    ]
    return dataclasses.replace(split, head=wrapped[0], middle=tuple(wrapped[1:-1]), tail=wrapped[-1])


def with_layout(split: Split, layout: Layout | str | Sequence[Layout | str]) -> Split:
    """The same split, with each layer's activations seen as a ``(B, C, *spatial)`` grid.

    ``layout`` is one :class:`Layout` (or its kind as a string) for every layer,
    or one per layer in the split's chain order. Use it for splits built by
    hand; :func:`camfunc.split` does it itself. A token layout's grid and
    prefix tokens, when not given, are read off the input's shape on each call.

    Example:
        >>> tokens = camfunc.split(vit, "encoder.layers.encoder_layer_0", layout="channels_first")
        >>> s = camfunc.with_layout(tokens, camfunc.Layout("tokens", prefix_tokens=1))
        >>> tokens.head(x).shape, s.head(x)[0].shape
        (torch.Size([2, 17, 32]), torch.Size([2, 32, 4, 4]))
        >>> camfunc.gradcam(s, x, 3).shape
        torch.Size([2, 4, 4])
    """
    items = [layout] * split.num_layers if isinstance(layout, (Layout, str)) else list(layout)
    names = list(split.layers) + [""] * (len(items) - len(split.layers))
    return build_layouts(split, [_as_rule(item, name) for item, name in zip(items, names, strict=True)])
