"""``camfunc.split``: cut a model at a layer, and ``camfunc.check`` that the cut is exact.

The model is captured as one graph (``torch.fx``, or ``torch.export`` when fx
cannot trace it), every node is assigned to the stage it runs in, and each
stage becomes a ``GraphModule`` over the model's own modules and tensors
(``camfunc._core.cut``). Each cut's activations are then seen as a grid
(``camfunc._core.layout``), decided on each call from the shapes.
"""

from __future__ import annotations

import difflib
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, overload

import torch
import torch.fx
from torch import Tensor, nn

from camfunc._core import engine as _engine, layout as _layout, targets as _targets
from camfunc._core.cut import evidence as _evidence
from camfunc._core.cut.capture import (
    Captured,
    CaptureError,
    example_for,
    export_graph,
    target_name,
    trace_fx,
)
from camfunc._core.cut.captures import Capture, Captures
from camfunc._core.cut.lock import TRACE_LOCK
from camfunc._core.cut.partition import build_stages, levels, pick_item
from camfunc._core.detection import detector_split, is_detector
from camfunc._core.split import Split, math_twin, modes_of, unwrap

__all__ = ["LayerChoiceWarning", "RepeatedLayerWarning", "check", "split"]


class LayerChoiceWarning(UserWarning):
    """Says which layer :func:`split` picked when no layer was given."""


class RepeatedLayerWarning(UserWarning):
    """A target layer is called more than once; the cut is at its last call."""


def layer_name(model: nn.Module, layer: str | nn.Module) -> str:
    names = dict(model.named_modules())
    if isinstance(layer, nn.Module):
        for name, module in names.items():
            if module is layer and name:
                return str(name)
        raise ValueError(
            f"layer {type(layer).__name__} is not a submodule of {type(model).__name__}; "
            "pass one of its modules or its name (see model.named_modules())"
        )
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a module name or a module, got {type(layer).__name__}")
    if layer not in names or not layer:
        close = difflib.get_close_matches(layer, [n for n in names if n], n=5, cutoff=0.5)
        hint = f"; closest names: {', '.join(repr(c) for c in close)}" if close else ""
        raise ValueError(
            f"unknown layer {layer!r} in {type(model).__name__}{hint}. "
            "Valid names are those of model.named_modules()"
        )
    return layer


_ITEM = re.compile(r"^(.*)\[(-?\d+)\]$")


def parse_item(name: str) -> tuple[str, int | None]:
    """``"stage3[0]"`` -> ``("stage3", 0)``: a module and an element of its list output."""
    found = _ITEM.match(name)
    return (found.group(1), int(found.group(2))) if found else (name, None)


def cut_name(model: nn.Module, layer: str | nn.Module) -> str:
    """:func:`layer_name`, also for ``"module[i]"`` (element ``i`` of a list or tuple output)."""
    if isinstance(layer, str):
        module, index = parse_item(layer)
        if index is not None:
            return f"{layer_name(model, module)}[{index}]"
    return layer_name(model, layer)


# ----------------------------------------------------------------------------
# Capture: fx, else torch.export


def _capture(model: nn.Module, names: Sequence[str], example: Tensor | None, *,
             record_all: bool = False, spatial: bool = False,
             forward_kwargs: Mapping[str, Any] | None = None) -> Captured:
    try:
        return trace_fx(model, names, record_all=record_all, forward_kwargs=forward_kwargs)
    except CaptureError as err:
        if not str(err).startswith("torch.fx could not trace"):
            raise  # a definite answer (a required argument, a layer returning a tuple)
        fx_error = err
    example = example if example is not None else example_for(model)
    if example is None:
        raise CaptureError(
            f"{fx_error}. camfunc can capture it with torch.export instead, which needs an "
            "example input: camfunc.split(model, layer, example_input=x). Or build the split "
            "by hand: camfunc.Split(head, tail) with head(x) -> activations and "
            "tail(activations) -> scores"
        ) from fx_error
    if any(modes_of(model)):  # export functionalises batch norm's updates into its graph
        raise CaptureError(
            f"{fx_error}. A model in training mode can be split only by torch.fx tracing here; "
            "split it in eval mode, or build the split by hand: camfunc.Split(head, tail)"
        ) from fx_error
    try:
        return export_graph(model, example, names, record_all=record_all, spatial=spatial,
                            forward_kwargs=forward_kwargs)
    except CaptureError as err:
        raise CaptureError(
            f"{fx_error}; and {err}. Build the split by hand instead: camfunc.Split(head, tail) "
            "with head(x) -> activations and tail(activations) -> scores"
        ) from err


def _checkpointed(model: nn.Module) -> bool:
    """Whether timm's gradient checkpointing is on (its stages then call their blocks one by one)."""
    return any(getattr(m, "grad_checkpointing", False) is True for m in model.modules())


def _never_called(model: nn.Module, name: str) -> ValueError:
    children = [n for n, _ in model.get_submodule(name).named_children()]
    block = f", or cut at a block such as '{name}.{children[-1]}'" if children else ""
    return ValueError(
        f"layer {name!r} is never called: {type(model).__name__} has gradient checkpointing on, "
        f"which calls the blocks inside its stages one by one; call "
        f"model.set_grad_checkpointing(False) and split again{block}")


def _cuts(model: nn.Module, captured: Captured, names: Sequence[str]) -> list[torch.fx.Node]:
    cuts = []
    for name in names:
        module, index = parse_item(name)
        calls = captured.calls.get(module)
        if not calls and module in captured.in_regions:
            raise ValueError(
                f"layer {module!r} runs inside a torch.autocast or torch.no_grad region, which "
                "torch.export keeps as one call that camfunc cannot cut; pick a layer outside it")
        if not calls and _checkpointed(model):
            raise _never_called(model, module)
        if not calls:
            raise ValueError(
                f"layer {name!r} is never called during the forward pass (or is inside a "
                "module the capture treats as a leaf); pick a module that the model calls"
            )
        if len(calls) > 1:
            warnings.warn(
                f"layer {name!r} is called {len(calls)} times; the cut is at its last call",
                RepeatedLayerWarning, stacklevel=3,
            )
        cuts.append(calls[-1] if index is None else _picked(captured, calls[-1], name, index))
    return cuts


def _picked(captured: Captured, node: torch.fx.Node, name: str, index: int) -> torch.fx.Node:
    if captured.method != "fx":
        raise CaptureError(
            f"layer {name!r} picks an element of a module's output, which camfunc can do on "
            "models torch.fx traces only; pick a module inside it whose output is one tensor"
        )
    return pick_item(captured.graph, node, index)


def _feature_axes(model: nn.Module, captured: Captured, names: Sequence[str],
                  cuts: Sequence[torch.fx.Node],
                  forward_kwargs: Mapping[str, Any] | None = None) -> dict[str, str | None]:
    """The graph's evidence for each layer's feature axis, read inside the layer too."""
    if captured.method == "export":  # already op by op
        return {name: _evidence.feature_axis(captured, cut) for name, cut in zip(names, cuts, strict=True)}
    try:
        fine: Captured | None = trace_fx(model, [], record_all=True, forward_kwargs=forward_kwargs)
    except CaptureError:  # traceable only with the layers as leaves (TinyViT's stages): no say
        fine = None
    found: dict[str, str | None] = {}
    for name, cut in zip(names, cuts, strict=True):
        module, item = parse_item(name)
        if fine is None:
            found[name] = None
            continue
        if item is None:
            calls = fine.calls.get(module) or []
            index = captured.calls[module].index(cut)
        else:  # the element's node where the module is traced through
            calls = [elements[item] for elements in fine.items.get(module, [])
                     if -len(elements) <= item < len(elements)]
            base = cut.args[0]  # the module's call, which the pick reads
            assert isinstance(base, torch.fx.Node)
            index = captured.calls[module].index(base)
        found[name] = _evidence.feature_axis(fine, calls[index]) if index < len(calls) else None
    return found


def _select(output: str | int | Callable[[Any], Any]) -> Callable[[Any], Any]:
    if callable(output):
        return output
    if not isinstance(output, (str, int)) or isinstance(output, bool):
        raise TypeError(f"output must be a key, an attribute name, an index or a callable, got {output!r}")

    def pick(out: Any) -> Any:
        if isinstance(output, int):
            return out[output]
        if isinstance(out, Mapping) and output in out:
            return out[output]
        if hasattr(out, output):
            return getattr(out, output)
        keys = list(out) if isinstance(out, Mapping) else []
        raise KeyError(f"the model's output ({type(out).__name__}) has no field {output!r}"
                       + (f"; its keys are {keys}" if keys else ""))
    return pick


class _Selected:
    """The tail followed by picking one field of the model's output."""

    def __init__(self, tail: Callable[..., Any], pick: Callable[[Any], Any]):
        self.tail, self.pick = tail, pick

    def __call__(self, *carry: Any) -> Any:
        return self.pick(self.tail(*carry))

    @property
    def math_twin(self) -> _Selected:
        twin = math_twin(self.tail)
        return self if twin is self.tail else _Selected(twin, self.pick)

    def __repr__(self) -> str:
        return f"_Selected({self.tail!r})"


# ----------------------------------------------------------------------------
# Public entry points


Layer = str | nn.Module  # a module's name in model.named_modules(), or the module


@overload
def split(model: nn.Module, layer: Layer | None = None, *, example_input: Tensor | None = None,
          layout: Any = None, grid: Sequence[int] | None = None, prefix_tokens: int | None = None,
          output: str | int | Callable[[Any], Any] | None = None,
          forward_kwargs: Mapping[str, Any] | None = None) -> Split[Tensor]: ...


@overload
def split(model: nn.Module, layer: list[Layer] | tuple[Layer, ...], *,
          example_input: Tensor | None = None, layout: Any = None,
          grid: Sequence[int] | None = None, prefix_tokens: int | None = None,
          output: str | int | Callable[[Any], Any] | None = None,
          forward_kwargs: Mapping[str, Any] | None = None) -> Split[list[Tensor]]: ...


def split(model: nn.Module, layer: Layer | list[Layer] | tuple[Layer, ...] | None = None,
          *, example_input: Tensor | None = None, layout: Any = None,
          grid: Sequence[int] | None = None, prefix_tokens: int | None = None,
          output: str | int | Callable[[Any], Any] | None = None,
          forward_kwargs: Mapping[str, Any] | None = None) -> Split[Any]:
    """Cuts ``model`` at ``layer``'s output into ``head: x -> A`` and ``tail: A -> scores``.

    ``layer`` is a module name (``"layer4"``, ``"vit.layers.10"``), a module,
    or a list of them (methods then return a list of maps, one per layer in the
    order given, even for a list of one; nested layers work). A module whose
    output is a list or tuple (HRNet's ``"stage3"``) is cut at one element with
    ``"stage3[0]"`` (fx-traced models); without an index there is no default,
    and the call raises an error naming the syntax. With ``layer=None``,
    ``example_input`` is run once and the last layer whose output still has
    spatial extent and gets a gradient is picked (a :class:`LayerChoiceWarning`
    names it); a later layer whose tokens fit no grid is an error, not passed
    over in silence. DataParallel, DDP and ``torch.compile`` wrappers are
    unwrapped; TorchScript modules are refused (pass the original module).
    Under timm's gradient checkpointing a stage's blocks are called one by one,
    so the stage itself cannot be cut: ``model.set_grad_checkpointing(False)``.

    The model is captured with ``torch.fx``; when fx cannot trace it (Hugging
    Face models, say), with ``torch.export`` (non-strict, dynamic batch), which
    needs ``example_input`` unless the model's config gives its input size. An
    exported graph holds for the input sizes torch's guards admit; a call at
    another size captures the model again (with dynamic spatial sizes first),
    and so does a call after a module, parameter, buffer or forward hook of the
    model was replaced, added or removed (see :meth:`Split.bound`). Forward
    arguments after the input keep their defaults, or take ``forward_kwargs``
    (constants such as ``{"interpolate_pos_encoding": True}``). The cut is the
    module's output even when its forward ends in functional ops. Values that
    cross the cut (skip connections) pass from head to tail as context; an
    in-place write after the cut is ordered as the model orders it, and a
    stage never writes what it is given. A module called several times is cut
    at its last call (a :class:`RepeatedLayerWarning` says so). The split
    shares the model's parameters and modules; the model is not changed.

    Activations are seen as a ``(B, C, *spatial)`` grid (:class:`camfunc.Layout`),
    decided on each call from their shape against the input's: channels-first,
    channels-last (Swin) or tokens (ViT; class and register tokens set aside),
    with the ops that produced them deciding where shapes cannot. Pass
    ``layout`` (``"channels_first"``, ``"channels_last"``, ``"tokens"``, a
    ``Layout``, or a list, one per layer) and, for tokens, ``grid`` and
    ``prefix_tokens`` to say it yourself.

    A model returning a dict or a ``ModelOutput`` gives class indices on its
    ``logits``; ``output`` (a key, attribute, index or callable) makes the tail
    return another field instead.

    Example:
        >>> s = camfunc.split(model, "layer4")
        >>> s.head(x).shape                                   # the activations A
        torch.Size([2, 16, 4, 4])
        >>> torch.allclose(s.tail(s.head(x)), model(x))
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap(model)
    if isinstance(model, torch.jit.ScriptModule):  # neither fx nor torch.export reads TorchScript
        raise CaptureError(
            f"model is a TorchScript module ({type(model).__name__}), which camfunc cannot capture; "
            "pass the original nn.Module, or build the split by hand: camfunc.Split(head, tail)")
    if example_input is not None and not isinstance(example_input, Tensor):
        raise TypeError(f"example_input must be a tensor batch, got {type(example_input).__name__}")
    kwargs = _checked_forward_kwargs(forward_kwargs)
    if is_detector(model):
        return _detector(model, layer, layout=layout, grid=grid, prefix_tokens=prefix_tokens,
                         output=output, forward_kwargs=kwargs)
    if layer is None:
        if example_input is None:
            raise ValueError(
                "split needs a layer, or example_input to pick one: "
                "camfunc.split(model, 'layer4') or camfunc.split(model, example_input=x)"
            )
        layer = _choose_layer(model, example_input, layout, grid, prefix_tokens, output, kwargs)
        warnings.warn(f"camfunc.split picked layer {layer!r}", LayerChoiceWarning, stacklevel=2)
    layers = list(layer) if isinstance(layer, (list, tuple)) else [layer]
    if not layers:
        raise ValueError("split needs at least one layer")
    names = [cut_name(model, item) for item in layers]
    if len(set(names)) != len(names):
        raise ValueError(f"layers must be distinct, got {names}")
    pick = None if output is None else _select(output)  # checks the argument before any work
    listed = isinstance(layer, (list, tuple))

    def build(example: Tensor | None, spatial: bool) -> Capture:
        captured = _capture(model, [parse_item(n)[0] for n in names],
                            example_input if example is None else example,
                            spatial=spatial, forward_kwargs=kwargs)
        built = _split_captured(model, captured, names, layout, grid, prefix_tokens, pick,
                                listed=listed, forward_kwargs=kwargs)
        return Capture(built, captured.admits, captured.example_shape)

    return Captures(model, build).first


def _detector(model: nn.Module, layer: Layer | list[Layer] | tuple[Layer, ...] | None,
              **options: Any) -> Split[Any]:
    """A torchvision detector's split, built from its modules (neither capture can take it)."""
    given = sorted(key for key, value in options.items() if value not in (None, {}))
    if given:
        raise ValueError(f"a {type(model).__name__} is split from its own modules, which takes no "
                         f"{', '.join(given)}; pass the layer only")
    if layer is None or isinstance(layer, (list, tuple)):
        raise ValueError(f"a {type(model).__name__} is split at one named layer of its backbone's "
                         f"body, e.g. camfunc.split(model, 'backbone.body.layer3'); got {layer!r}")
    return detector_split(model, cut_name(model, layer))


def _checked_forward_kwargs(forward_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    if forward_kwargs is None:
        return {}
    if not isinstance(forward_kwargs, Mapping) or not all(isinstance(k, str) for k in forward_kwargs):
        raise TypeError(f"forward_kwargs must be a dict of argument names to values, got {forward_kwargs!r}")
    tensors = [k for k, v in forward_kwargs.items() if isinstance(v, Tensor)]
    if tensors:
        raise TypeError(
            f"forward_kwargs[{tensors[0]!r}] is a tensor; the capture would fix its values for every "
            "call. Pass constants (bools, numbers, strings), or wrap the model in a module whose "
            "forward(x) builds the tensor"
        )
    return dict(forward_kwargs)


def _split_captured(model: nn.Module, captured: Captured, names: list[str], layout: Any,
                    grid: Sequence[int] | None, prefix_tokens: int | None,
                    pick: Callable[[Any], Any] | None, *, listed: bool = False,
                    forward_kwargs: Mapping[str, Any] | None = None) -> Split[Any]:
    cuts = _cuts(model, captured, names)
    # Layers with the same output (layer4 and its last block) share one cut.
    position = {node: i for i, node in enumerate(captured.graph.nodes)}
    chain = sorted(set(cuts), key=position.__getitem__)
    stages = build_stages(captured, chain, levels(captured, chain))
    order = tuple(chain.index(c) for c in cuts)
    chain_names = tuple(names[cuts.index(c)] for c in chain)
    tail = stages[-1] if pick is None else _Selected(stages[-1], pick)
    plain = Split(head=stages[0], tail=tail, middle=tuple(stages[1:-1]), layers=chain_names,
                  model=model, input_ndim=captured.input_ndim,
                  order=() if order == tuple(range(len(chain))) else order, listed=listed,
                  traced_modes=modes_of(model), forward_kwargs=dict(forward_kwargs or {}))
    axes = _feature_axes(model, captured, names, cuts, forward_kwargs)
    rules = _layout_rules(model, names, chain_names, axes, layout, grid, prefix_tokens)
    return _layout.build_layouts(plain, rules)


def _layout_rules(model: nn.Module, names: list[str], chain_names: Sequence[str],
                  axes: dict[str, str | None], layout: Any, grid: Sequence[int] | None,
                  prefix_tokens: int | None) -> list[_layout.LayoutRule]:
    """One rule per chained cut: the user's choice, the graph's evidence, the model's tokens."""
    hint = _evidence.prefix_tokens_hint(model)
    if grid is not None:
        grid = tuple(int(g) for g in grid)

    def build(item: Any, name: str) -> _layout.LayoutRule:
        base = _layout.LayoutRule(name, None, prefix_tokens, grid, axes.get(name), hint)
        if item is None:
            return base
        if isinstance(item, _layout.Layout):
            return base._replace(kind=item.kind, prefix_tokens=item.prefix_tokens, grid=item.grid)
        if isinstance(item, str):
            return base._replace(kind=_layout.checked_kind(item))
        raise TypeError(f"layout must be a string, a camfunc.Layout or a list of them, got {item!r}")

    if isinstance(layout, (list, tuple)):
        if len(layout) != len(names):
            raise ValueError(f"got {len(layout)} layouts for {len(names)} layers")
        per_name = dict(zip(names, layout, strict=True))
        return [build(per_name[name], name) for name in chain_names]
    return [build(layout, name) for name in chain_names]


# ----------------------------------------------------------------------------
# Choosing a layer


_PASSIVE = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
            nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
            nn.Dropout3d, nn.Identity)


def _choose_layer(model: nn.Module, example_input: Tensor, layout: Any,
                  grid: Sequence[int] | None, prefix_tokens: int | None, output: Any,
                  forward_kwargs: dict[str, Any]) -> str:
    """The last module output with spatial (or token) extent whose map gets a gradient.

    A ViT's last block feeds the head through its class token only, so its
    patch tokens get exactly zero gradient: such layers are skipped.
    """
    captured, names = _spatial_layers(model, example_input, forward_kwargs)
    pick = None if output is None else _select(output)
    unread: tuple[str, _layout.TokenGridError] | None = None  # a later layer, not read as a map
    for name in names:
        try:
            if captured.method == "export":  # one capture serves every candidate
                candidate = _split_captured(model, captured, [name], layout, grid, prefix_tokens,
                                            pick, forward_kwargs=forward_kwargs)
            else:  # fx traces are cheap, and a traced-through layer may not trace as a leaf
                candidate = split(model, name, layout=layout, grid=grid,
                                  prefix_tokens=prefix_tokens, output=output,
                                  forward_kwargs=forward_kwargs)
        except (TypeError, ValueError):
            continue
        try:
            found = _gets_gradient(candidate, example_input)
        except _layout.TokenGridError as err:
            unread = unread or (name, err)
            continue
        if found and unread is not None:  # never an earlier map in silence (the patch embedding)
            raise ValueError(f"camfunc.split would pick layer {name!r}, earlier than {unread[0]!r}, "
                             f"whose output it cannot read as a map: {unread[1]}")
        if found:
            return name
    raise ValueError(
        f"no layer of {type(model).__name__} outputs a map with spatial dimensions that the "
        f"output depends on, for an input of shape {tuple(example_input.shape)}; pass layer="
    )


def _shapes(captured: Captured, example: Tensor) -> dict[torch.fx.Node, tuple[int, ...]]:
    """Each node's tensor shape for ``example``: from export's metadata, or one run of the graph."""
    if captured.method == "export":
        return {n: tuple(n.meta["val"].shape) for n in captured.graph.nodes
                if isinstance(n.meta.get("val"), Tensor)}
    found: dict[torch.fx.Node, tuple[int, ...]] = {}
    env: dict[torch.fx.Node, Any] = {captured.input: example, **captured.constants}

    def value(node: torch.fx.Node) -> Any:
        return captured.root[target_name(node)] if node.op == "get_attr" else env[node]

    with TRACE_LOCK.calling(), torch.no_grad():
        for node in captured.graph.nodes:
            if node.op in ("placeholder", "get_attr", "output"):
                continue
            args = torch.fx.node.map_arg(node.args, value)
            kwargs = torch.fx.node.map_arg(node.kwargs, value)
            if node.op == "call_module":
                out = captured.root[node.target](*args, **kwargs)
            elif node.op == "call_method":
                out = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                out = node.target(*args, **kwargs)
            env[node] = out
            if isinstance(out, Tensor):
                found[node] = tuple(out.shape)
    return found


def _spatial_layers(model: nn.Module, example_input: Tensor,
                    forward_kwargs: dict[str, Any]) -> tuple[Captured, list[str]]:
    """Module outputs with more than one position, last first, each by its outermost module."""
    captured = _capture(model, [], example_input, record_all=True, forward_kwargs=forward_kwargs)
    shapes = _shapes(captured, example_input)
    modules = dict(model.named_modules())
    owners: dict[torch.fx.Node, list[str]] = {}
    for name, calls in captured.calls.items():
        if name in modules and not isinstance(modules[name], _PASSIVE):
            owners.setdefault(calls[-1], []).append(name)
    found = []
    for node in captured.graph.nodes:
        shape = shapes.get(node)
        # More than one position in some layout: (B, C, H, W), (B, H, W, C) or (B, N, D).
        if node in owners and shape is not None and len(shape) >= 3 and (
                math.prod(shape[2:]) > 1 or math.prod(shape[1:-1]) > 1):
            found.append(min(owners[node], key=lambda n: (n.count("."), n)))
    return captured, found[::-1]


def _gets_gradient(candidate: Split, x: Tensor) -> bool:
    def largest_gradient(acts: tuple[Tensor, ...], grads: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        # a map needs more than one position
        return tuple(g.abs().flatten(1).amax(1) * (math.prod(g.shape[2:]) > 1) for g in grads)

    def top_score(out: Any) -> Tensor:
        return _targets.any_scores(out).flatten(1).amax(1)

    try:
        peaks, _ = _engine.class_maps(candidate, x, top_score, largest_gradient)
    except _layout.TokenGridError:
        raise
    except (TypeError, ValueError, KeyError):  # a layer whose output is not a tensor map
        return False
    return bool(peaks[0].amax() > 0)


# ----------------------------------------------------------------------------
# Checking a split


def _compare(expected: Any, got: Any, rtol: float, atol: float, where: str = "output") -> None:
    if isinstance(expected, Tensor):
        if not isinstance(got, Tensor):
            raise ValueError(f"split returns {type(got).__name__} at {where}, the model a tensor")
        if expected.shape != got.shape or not torch.allclose(expected, got, rtol=rtol, atol=atol,
                                                             equal_nan=True):
            diff = (expected - got).abs().max().item() if expected.shape == got.shape else float("nan")
            raise ValueError(
                f"split does not reproduce the model at {where}: shapes {tuple(got.shape)} vs "
                f"{tuple(expected.shape)}, max abs difference {diff:.3g}"
            )
    elif isinstance(expected, Mapping):
        if not isinstance(got, Mapping) or list(expected.keys()) != list(got.keys()):
            keys = list(got.keys()) if isinstance(got, Mapping) else type(got).__name__
            raise ValueError(f"split output at {where} has keys {keys}, the model's {list(expected)}")
        for key in expected:
            _compare(expected[key], got[key], rtol, atol, f"{where}[{key!r}]")
    elif isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(expected) != len(got):
            raise ValueError(f"split output at {where} differs in structure from the model's")
        for i, (e, g) in enumerate(zip(expected, got, strict=True)):
            _compare(e, g, rtol, atol, f"{where}[{i}]")


def check(split: Split, model: nn.Module, x: Tensor, *, rtol: float = 1e-5,
          atol: float = 1e-5) -> Split:
    """Confirms that ``split(x)`` (tail after head) reproduces ``model(x)``.

    Raises ``ValueError`` naming the largest difference when it does not, and
    returns the split unchanged when it does, so it can wrap a construction.
    Dicts of any kind (``OrderedDict``, ``ModelOutput``) compare by keys and
    values. For a split built with ``output=``, pass a model returning that field;
    the model is called with the split's ``forward_kwargs``.

    Example:
        >>> s = camfunc.check(camfunc.split(model, "layer4"), model, x)
        >>> s.layers
        ('layer4',)
    """
    with torch.no_grad():
        with TRACE_LOCK.calling():
            expected = model(x, **split.forward_kwargs)
        got = split(x)
    if isinstance(split.tail, _Selected):
        expected = split.tail.pick(expected)
    _compare(expected, got, rtol, atol)
    return split


def module_inputs(model: nn.Module, names: Sequence[str], x: Tensor) -> tuple[list[Tensor], Any]:
    """The tensors entering modules ``names`` (at their last call) for ``x``, and the model's
    output: one pass, no graph, no hooks. The cut is put before each module instead of after."""
    captured = trace_fx(model, list(names))
    entering = []
    for name in names:
        calls = captured.calls.get(name)
        if not calls or not calls[-1].args or not isinstance(calls[-1].args[0], torch.fx.Node):
            raise ValueError(f"module {name!r} is not called on a tensor in the model's forward")
        entering.append(calls[-1].args[0])
    position = {node: i for i, node in enumerate(captured.graph.nodes)}
    chain = sorted(set(entering), key=position.__getitem__)
    stages = build_stages(captured, chain, levels(captured, chain))
    split = Split(head=stages[0], tail=stages[-1], middle=tuple(stages[1:-1]), model=model)
    found, out = _engine.carries(split, x)
    return [found[chain.index(node)][0] for node in entering], out
