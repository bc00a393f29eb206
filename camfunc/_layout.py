"""Activation layouts: transformer tokens and channels-last maps seen as (B, C, *spatial) grids.

CAM math works on ``(B, C, *spatial)``. A layout turns a layer's native
activations into that grid and back, and :func:`with_layout` builds the
conversion into the split's cut: the head returns the grid, and the tail
starts by restoring the native tensor. Every method then works unchanged, and
gradients are taken with respect to the grid. Tokens before the patches
(class and register tokens) are set aside as context: the tail still sees
them, but they get no map.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._split import Split, as_tuple

__all__ = ["Layout", "with_layout"]

Kind = Literal["channels_first", "channels_last", "tokens"]


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a layer's activations map to a ``(B, C, *spatial)`` grid.

    ``kind`` is ``"channels_first"`` (already a grid), ``"channels_last"``
    (``(B, *spatial, C)``, e.g. swin_t's blocks) or ``"tokens"`` (``(B, N, D)``).
    For tokens, ``prefix_tokens`` leading tokens are not patches (None: 0 when N
    is a square, else 1 when N - 1 is), and ``grid`` is the patch grid (None:
    square).

    Example:
        >>> layout = camfunc.Layout("tokens")                 # 17 tokens: 1 class token, 4x4 patches
        >>> grid, aside = layout.to_grid(torch.randn(2, 17, 32))
        >>> grid.shape, aside.shape
        (torch.Size([2, 32, 4, 4]), torch.Size([2, 1, 32]))
    """

    kind: Kind = "channels_first"
    prefix_tokens: int | None = None
    grid: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("channels_first", "channels_last", "tokens"):
            raise ValueError(
                f"layout must be 'channels_first', 'channels_last' or 'tokens', got {self.kind!r}")

    def _token_split(self, n: int) -> tuple[int, tuple[int, ...]]:
        prefix = self.prefix_tokens
        if prefix is None and self.grid is not None:
            prefix = n - math.prod(self.grid)
        elif prefix is None:
            prefix = 0 if math.isqrt(n) ** 2 == n else 1
        grid = self.grid
        if grid is None:
            side = math.isqrt(max(n - prefix, 0))
            grid = (side, side)
        if prefix < 0 or n - prefix <= 0 or math.prod(grid) != n - prefix:
            raise ValueError(
                f"{n} tokens fit no grid: with {prefix} class/register token(s) there are "
                f"{n - prefix} patches, not {'x'.join(map(str, grid))}. Pass grid=(h, w) and "
                "prefix_tokens= to camfunc.split"
            )
        return prefix, tuple(grid)

    def to_grid(self, a: Tensor) -> tuple[Tensor, Tensor | None]:
        """Native activations -> ``(grid, set-aside tokens or None)``."""
        if self.kind == "channels_first":
            return a, None
        if self.kind == "channels_last":
            return a.movedim(-1, 1), None
        if a.ndim != 3:
            raise ValueError(f"layout 'tokens' expects (B, N, D) activations, got {tuple(a.shape)}")
        prefix, grid = self._token_split(a.shape[1])
        patches = a[:, prefix:].transpose(1, 2)
        return patches.reshape(a.shape[0], a.shape[2], *grid), a[:, :prefix]

    def from_grid(self, grid: Tensor, aside: Tensor | None) -> Tensor:
        """The inverse of :meth:`to_grid`."""
        if self.kind == "channels_first":
            return grid
        if self.kind == "channels_last":
            return grid.movedim(1, -1)
        tokens = grid.flatten(2).transpose(1, 2)
        return tokens if aside is None or aside.shape[1] == 0 else torch.cat([aside, tokens], 1)


class _GridStage:
    """A stage that takes ``(grid, aside, *context)`` and/or returns one."""

    def __init__(self, stage: Callable[..., Any], before: Layout | None, after: Layout | None):
        self.stage, self.before, self.after = stage, before, after

    def __call__(self, *carry: Any) -> Any:
        if self.before is not None:
            grid, aside, *context = carry
            carry = (self.before.from_grid(grid, aside), *context)
        out = self.stage(*carry)
        if self.after is None:
            return out
        out = as_tuple(out)
        grid, aside = self.after.to_grid(out[0])
        return (grid, aside, *out[1:])

    def __repr__(self) -> str:
        return f"_GridStage({self.stage!r}, {self.before}, {self.after})"


def _as_layout(layout: Layout | str) -> Layout:
    return layout if isinstance(layout, Layout) else Layout(layout)


def with_layout(split: Split, layout: Layout | str | Sequence[Layout | str]) -> Split:
    """The same split, with each layer's activations seen as a ``(B, C, *spatial)`` grid.

    ``layout`` is one :class:`Layout` (or its kind as a string) for every layer,
    or one per layer in the split's chain order. Use it for splits built by
    hand; :func:`camfunc.split` does it itself.

    Example:
        >>> tokens = camfunc.split(vit, "encoder.layers.encoder_layer_0", layout="channels_first")
        >>> s = camfunc.with_layout(tokens, camfunc.Layout("tokens", prefix_tokens=1))
        >>> tokens.head(x).shape, s.head(x)[0].shape
        (torch.Size([2, 17, 32]), torch.Size([2, 32, 4, 4]))
        >>> camfunc.gradcam(s, x, 3).shape
        torch.Size([2, 4, 4])
    """
    layouts = ([_as_layout(layout)] * split.num_layers if isinstance(layout, (Layout, str))
               else [_as_layout(item) for item in layout])
    if len(layouts) != split.num_layers:
        raise ValueError(f"got {len(layouts)} layouts for a split with {split.num_layers} layers")
    if all(item.kind == "channels_first" for item in layouts):
        return split
    stages = list(split.stages)
    wrapped = [
        _GridStage(stage, layouts[i - 1] if i > 0 else None, layouts[i] if i < len(layouts) else None)
        for i, stage in enumerate(stages)
    ]
    return dataclasses.replace(split, head=wrapped[0], middle=tuple(wrapped[1:-1]), tail=wrapped[-1])


def auto_layout(model: nn.Module, layer: str) -> Layout:
    """The layout of ``layer``'s output for the transformer families camfunc knows."""
    kind = type(model).__name__
    if kind == "VisionTransformer" and hasattr(model, "class_token") and layer.startswith("encoder"):
        return Layout("tokens", prefix_tokens=1)
    prefix = getattr(model, "num_prefix_tokens", None)  # timm's ViT family
    if isinstance(prefix, int) and (layer.startswith("blocks") or layer == "norm"):
        return Layout("tokens", prefix_tokens=prefix)
    if kind == "SwinTransformer" and (layer.startswith("features") or layer == "norm"):
        return Layout("channels_last")
    return Layout("channels_first")
