"""Cut a model at a layer: ``head: x -> A`` and ``tail: A -> scores``.

A :class:`Split` is a plain immutable value holding callables. :func:`split`
builds one with ``torch.fx``: it traces the model with the target layers as
leaves, assigns every graph node to a partition (which cut it comes after) and
lets ``torch.fx.passes.split_module`` build one sub-module per partition. The
sub-modules share the model's parameters and buffers; nothing is copied and
nothing in the model is changed.
"""

from __future__ import annotations

import dataclasses
import difflib
import operator
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.fx.passes.split_module import split_module

__all__ = ["Split", "split", "check", "LayerChoiceWarning", "RepeatedLayerWarning"]


class LayerChoiceWarning(UserWarning):
    """Says which layer :func:`split` picked when no layer was given."""


class RepeatedLayerWarning(UserWarning):
    """A target layer is called more than once; the cut is at its last call."""


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """A model cut at one or more layers, as pure callables.

    ``head(x)`` returns the first layer's activations ``A``, or a tuple
    ``(A, *context)`` when values other than ``A`` cross the cut (a skip
    connection, say). ``tail(A, *context)`` returns the model's output.
    For several layers, ``middle[i](A_i, *context)`` returns
    ``(A_{i+1}, *context')``, so the model is
    ``tail(*middle[-1](*...middle[0](*head(x))))``.
    ``order`` (optional) lists, for each layer in the order the user gave, its
    position in that chain; maps are returned in the user's order.

    Build one with :func:`split`, or by hand for models that ``torch.fx``
    cannot trace. ``model`` (optional) is checked for ``training`` mode
    before each call; ``layers`` names the cuts in messages.

    Example:
        >>> head = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
        >>> tail = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
        >>> camfunc.gradcam(camfunc.Split(head, tail), x, 0).shape       # model(x) = tail(head(x))
        torch.Size([2, 62, 62])
    """

    head: Callable[..., Any]
    tail: Callable[..., Any]
    middle: tuple[Callable[..., Any], ...] = ()
    layers: tuple[str, ...] = ()
    model: nn.Module | None = None
    input_ndim: int | None = None
    order: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for field in ("head", "tail"):
            if not callable(getattr(self, field)):
                raise TypeError(
                    f"Split.{field} must be callable, got {type(getattr(self, field)).__name__}"
                )
        object.__setattr__(self, "middle", tuple(self.middle))
        object.__setattr__(self, "layers", tuple(self.layers))
        if not all(callable(m) for m in self.middle):
            raise TypeError("Split.middle must hold callables, one per extra layer")

    @property
    def num_layers(self) -> int:
        return len(self.middle) + 1

    @property
    def stages(self) -> tuple[Callable[..., Any], ...]:
        """``(head, *middle, tail)``."""
        return (self.head, *self.middle, self.tail)

    def __call__(self, x: torch.Tensor) -> Any:
        """Runs the whole model: ``tail(...head(x))``."""
        carry = self.head(x)
        for stage in (*self.middle, self.tail):
            carry = stage(*as_tuple(carry))
        return carry


def as_tuple(carry: Any) -> tuple[Any, ...]:
    return carry if isinstance(carry, tuple) else (carry,)


# ----------------------------------------------------------------------------
# Finding the model and its layers


def unwrap(model: nn.Module) -> nn.Module:
    """Strips DataParallel / DistributedDataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _layer_name(model: nn.Module, layer: str | nn.Module) -> str:
    names = dict(model.named_modules())
    if isinstance(layer, nn.Module):
        for name, module in names.items():
            if module is layer and name:
                return name
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


def _is_inside(inner: str, outer: str) -> bool:
    return inner.startswith(outer + ".")


class _CutTracer(torch.fx.Tracer):
    """Traces with the target layers as leaves and records each call's output node.

    A target that contains another target is traced through, so nested layers
    (``layer4`` and ``layer4.1``) both get a node. Recording the proxy that the
    module call returns puts the cut at the module's real output, even when its
    forward ends in functional ops such as ``F.relu(out + identity)``.
    """

    def __init__(self, targets: Sequence[str], record_all: bool = False):
        super().__init__()
        self.targets = set(targets)
        self.record_all = record_all
        self.outputs: dict[str, list[torch.fx.Node]] = {}

    def is_leaf_module(self, m: nn.Module, name: str) -> bool:
        if any(_is_inside(t, name) or (not name and t) for t in self.targets):
            return False
        if name in self.targets:
            return True
        return super().is_leaf_module(m, name)

    def call_module(self, m, forward, args, kwargs):
        out = super().call_module(m, forward, args, kwargs)
        name = self.path_of_module(m)
        if name and (self.record_all or name in self.targets):
            if isinstance(out, torch.fx.Proxy):
                self.outputs.setdefault(name, []).append(out.node)
            elif not self.record_all:
                raise TypeError(
                    f"layer {name!r} returns {type(out).__name__}, not a tensor; "
                    "pick a layer whose output is a single tensor"
                )
        return out


def _trace(model: nn.Module, tracer: _CutTracer) -> torch.fx.GraphModule:
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx raises many kinds; all mean the same to the user
        raise TypeError(
            f"torch.fx could not trace {type(model).__name__}: {type(err).__name__}: {err}. "
            "Build the split by hand instead: camfunc.Split(head, tail) with "
            "head(x) -> activations and tail(activations) -> scores"
        ) from err
    return torch.fx.GraphModule(model, graph)


# ----------------------------------------------------------------------------
# Partitioning


def _partition_of(graph: torch.fx.Graph, cuts: Sequence[torch.fx.Node]) -> dict[torch.fx.Node, int]:
    """Partition k holds what is computed between cut k-1 and cut k.

    A node goes to the lowest partition its inputs allow, so values that do not
    depend on a cut (shape arithmetic, parallel branches) stay before it and
    cross as context instead of being recomputed.
    """
    cut_index = {node: i for i, node in enumerate(cuts)}
    part: dict[torch.fx.Node, int] = {}
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        level = 0
        for inp in node.all_input_nodes:
            if inp in part:
                level = max(level, part[inp] + (inp in cut_index))
        if node in cut_index:
            level = max(level, cut_index[node])
        part[node] = level
    return part


class _Stage:
    """One segment of the split graph: takes ``(A, *context)``, returns the next carry.

    It replays the part of ``split_module``'s top-level graph that calls one
    partition: fetch the inputs (from the carry or the model's attributes), call
    the partition, and hand on the values later segments need, ``A`` first.
    """

    def __init__(self, root: torch.fx.GraphModule, nodes: list[torch.fx.Node],
                 inputs: Sequence[str], outputs: Sequence[str] | None, result: Any = None,
                 defaults: dict[str, Any] | None = None):
        self.root = root
        self.calls = [(n.target, tuple(n.args)) for n in nodes if n.op == "call_module"]
        self.items = {n.name: (n.args[0].name, n.args[1]) for n in nodes
                      if n.op == "call_function" and n.target is operator.getitem}
        self.inputs = tuple(inputs)
        self.defaults = dict(defaults or {})
        self.outputs = None if outputs is None else tuple(outputs)
        self.result = result

    def _value(self, env: dict[str, Any], node: Any) -> Any:
        if not isinstance(node, torch.fx.Node):
            return node
        if node.op == "get_attr":
            return _fetch(self.root, node.target)
        return env[node.name]

    def __call__(self, *carry: Any) -> Any:
        env = {**self.defaults, **dict(zip(self.inputs, carry))}
        for target, args in self.calls:
            out = getattr(self.root, target)(*(self._value(env, a) for a in args))
            env[target] = out
            for name, (src, index) in self.items.items():
                if src == target:
                    env[name] = out[index]
        if self.outputs is None:
            return torch.fx.node.map_aggregate(
                self.result, lambda n: self._value(env, n) if isinstance(n, torch.fx.Node) else n
            )
        values = tuple(env[name] for name in self.outputs)
        return values if len(values) > 1 else values[0]

    def __repr__(self) -> str:
        calls = ", ".join(t for t, _ in self.calls) or "passthrough"
        return f"_Stage({calls}: {len(self.inputs)} in -> {'output' if self.outputs is None else len(self.outputs)} out)"


def _fetch(root: nn.Module, qualname: str) -> Any:
    obj: Any = root
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _stages(base: torch.fx.GraphModule, cut_names: Sequence[str], num_cuts: int) -> list[_Stage]:
    """Groups the top-level graph of ``split_module`` into head, middles and tail."""
    nodes = list(base.graph.nodes)
    stage_of: dict[str, int] = {}
    groups: list[list[torch.fx.Node]] = [[] for _ in range(num_cuts + 1)]
    for node in nodes:
        if node.op == "placeholder":
            stage_of[node.name] = 0
        elif node.op == "call_module":
            k = int(node.target.rsplit("_", 1)[1])
            stage_of[node.name] = k
            groups[k].append(node)
        elif node.op == "call_function" and node.target is operator.getitem:
            stage_of[node.name] = stage_of[node.args[0].name]
            groups[stage_of[node.name]].append(node)
    output = next(n for n in nodes if n.op == "output")

    # The base node that carries each cut's value out of its partition.
    cut_value: list[str] = []
    for k, cut in enumerate(cut_names):
        call = next(n for n in groups[k] if n.op == "call_module")
        sub = getattr(base, call.target)
        out_node = next(n for n in sub.graph.nodes if n.op == "output")
        index = [a.name for a in out_node.args[0]].index(cut)
        cut_value.append(next(n.name for n in groups[k] if n.op == "call_function" and n.args[1] == index))

    def used_after(k: int) -> list[str]:
        later = [n for g in groups[k + 1:] for n in g] + [output]
        seen: dict[str, None] = {}
        for n in later:
            for inp in n.all_input_nodes:
                if inp.op != "get_attr" and stage_of.get(inp.name, k + 1) <= k:
                    seen[inp.name] = None
        return list(seen)

    stages = []
    placeholders = [n for n in nodes if n.op == "placeholder"]
    inputs = [n.name for n in placeholders]
    # Extra forward() arguments with defaults keep them; the head takes x only.
    defaults = {n.name: n.args[0] for n in placeholders[1:] if n.args}
    for k in range(num_cuts + 1):
        if k < num_cuts:
            live = used_after(k)
            outs = [cut_value[k]] + [n for n in live if n != cut_value[k]]
            stages.append(_Stage(base, groups[k], inputs, outs, defaults=defaults if k == 0 else None))
            inputs = outs
        else:
            stages.append(_Stage(base, groups[k], inputs, None, output.args[0],
                                 defaults=defaults if k == 0 else None))
    return stages


def _first_conv_ndim(model: nn.Module) -> int | None:
    for module in model.modules():
        for dims, cls in ((1, nn.Conv1d), (2, nn.Conv2d), (3, nn.Conv3d)):
            if isinstance(module, cls):
                return dims + 2
    return None


# ----------------------------------------------------------------------------
# Public entry points


def split(model: nn.Module, layer: str | nn.Module | Sequence[str | nn.Module] | None = None,
          *, example_input: torch.Tensor | None = None, layout: Any = None,
          grid: Sequence[int] | None = None, prefix_tokens: int | None = None) -> Split:
    """Cuts ``model`` at ``layer``'s output into ``head: x -> A`` and ``tail: A -> scores``.

    ``layer`` is a module name (``"layer4"``, ``"features.8"``), a module, or a
    list of them (one map per layer, in the order given; nested layers work).
    With ``layer=None``, ``example_input`` is run once and the last layer whose
    output still has spatial extent is picked (a :class:`LayerChoiceWarning`
    names it). DataParallel, DDP and ``torch.compile`` wrappers are unwrapped.

    The cut is the module's output even when its forward ends in functional
    ops. Values that cross the cut (skip connections) are passed from head to
    tail as context. A module called several times is cut at its last call, as
    hook-based libraries do (a :class:`RepeatedLayerWarning` says so). The
    split shares the model's parameters and modules; the model is not changed.

    Transformer activations are seen as a ``(B, C, *spatial)`` grid
    (:class:`camfunc.Layout`): ``layout`` is ``"tokens"`` (``(B, N, D)``; class
    and register tokens set aside, ``grid`` and ``prefix_tokens`` when they
    cannot be inferred), ``"channels_last"`` or ``"channels_first"``, one for
    all layers or a list. By default it is recognised for torchvision's
    ViT (``encoder.*``: tokens with one class token) and Swin (``features.*``:
    channels-last) and timm's ViTs (``blocks.*``: ``num_prefix_tokens``).
    Pick a ViT block before the last: only the class token of the last block
    reaches the head, so its patch tokens get zero gradient.

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
    if any(m.training for m in model.modules()):
        # Tracing bakes in ``if self.training`` branches, so the mode matters already here.
        raise ValueError(_TRAINING_MESSAGE)
    if layer is None:
        if example_input is None:
            raise ValueError(
                "split needs a layer, or example_input to pick one: "
                "camfunc.split(model, 'layer4') or camfunc.split(model, example_input=x)"
            )
        layer = _choose_layer(model, example_input, layout, grid, prefix_tokens)
        warnings.warn(f"camfunc.split picked layer {layer!r}", LayerChoiceWarning, stacklevel=2)
    layers = list(layer) if isinstance(layer, (list, tuple)) else [layer]
    if not layers:
        raise ValueError("split needs at least one layer")
    names = [_layer_name(model, item) for item in layers]
    if len(set(names)) != len(names):
        raise ValueError(f"layers must be distinct, got {names}")

    tracer = _CutTracer(names)
    gm = _trace(model, tracer)
    cuts = []
    for name in names:
        calls = tracer.outputs.get(name)
        if not calls:
            raise ValueError(
                f"layer {name!r} is never called during the forward pass (or is inside a "
                "module fx treats as a leaf); pick a module that the model calls"
            )
        if len(calls) > 1:
            warnings.warn(
                f"layer {name!r} is called {len(calls)} times; the cut is at its last call",
                RepeatedLayerWarning, stacklevel=2,
            )
        cuts.append(calls[-1])

    # Layers with the same output (layer4 and its last block) share one cut.
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    chain = sorted(set(cuts), key=position.__getitem__)
    part = _partition_of(gm.graph, chain)
    base = split_module(gm, model, lambda node: part[node], tuple_return=True,
                        keep_original_node_name=True)
    stages = _stages(base, [c.name for c in chain], len(chain))
    order = tuple(chain.index(c) for c in cuts)
    chain_names = tuple(names[cuts.index(c)] for c in chain)
    plain = Split(stages[0], stages[-1], tuple(stages[1:-1]), chain_names, model,
                  _first_conv_ndim(model), () if order == tuple(range(len(chain))) else order)
    from . import _layout  # the layout module builds on Split

    return _layout.with_layout(plain, _chain_layouts(model, names, chain_names, layout, grid,
                                                      prefix_tokens))


def _chain_layouts(model: nn.Module, names: list[str], chain_names: Sequence[str], layout: Any,
                   grid: Sequence[int] | None, prefix_tokens: int | None) -> list:
    """One Layout per chained cut, from the user's per-layer choice or the model's family."""
    from . import _layout

    def build(item: Any, name: str):
        if item is None:
            found = _layout.auto_layout(model, name)
            if found.kind == "tokens" and (grid is not None or prefix_tokens is not None):
                return _layout.Layout("tokens", prefix_tokens if prefix_tokens is not None
                                      else found.prefix_tokens, tuple(grid) if grid else None)
            return found
        if isinstance(item, _layout.Layout):
            return item
        if isinstance(item, str):
            return _layout.Layout(item, prefix_tokens, tuple(grid) if grid else None)
        raise TypeError(f"layout must be a string, a camfunc.Layout or a list of them, got {item!r}")

    if isinstance(layout, (list, tuple)):
        if len(layout) != len(names):
            raise ValueError(f"got {len(layout)} layouts for {len(names)} layers")
        per_name = dict(zip(names, layout))
        return [build(per_name[name], name) for name in chain_names]
    return [build(layout, name) for name in chain_names]


def _choose_layer(model: nn.Module, example_input: torch.Tensor, layout: Any,
                  grid: Sequence[int] | None, prefix_tokens: int | None) -> str:
    """The last module output with spatial (or token) extent whose map gets a gradient.

    A ViT's last block feeds the head through its class token only, so its
    patch tokens get exactly zero gradient: such layers are skipped.
    """
    for name in _spatial_layers(model, example_input):
        candidate = split(model, name, layout=layout, grid=grid, prefix_tokens=prefix_tokens)
        if _gets_gradient(candidate, example_input):
            return name
    raise ValueError(
        f"no layer of {type(model).__name__} outputs a map with spatial dimensions that the "
        f"output depends on, for an input of shape {tuple(example_input.shape)}; pass layer="
    )


def _spatial_layers(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Module outputs with more than one position, last first, each by its outermost module."""
    tracer = _CutTracer([], record_all=True)
    gm = _trace(model, tracer)
    with torch.no_grad():
        ShapeProp(gm).propagate(example_input)
    # Resizing pools (vgg's 7x7 avgpool), dropout and identities only pass a map
    # on; the layer worth explaining is the one that computed it.
    passive = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
               nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
               nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)
    modules = dict(model.named_modules())
    owners: dict[torch.fx.Node, list[str]] = {}
    for name, calls in tracer.outputs.items():
        if not isinstance(modules[name], passive):
            owners.setdefault(calls[-1], []).append(name)
    found = []
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if node in owners and isinstance(meta, torch.fx.passes.shape_prop.TensorMetadata):
            shape = tuple(meta.shape)
            if len(shape) >= 3 and torch.Size(shape[2:]).numel() > 1:
                found.append(min(owners[node], key=lambda n: (n.count("."), n)))
    return found[::-1]


def _gets_gradient(candidate: Split, x: torch.Tensor) -> bool:
    from . import _engine, _targets  # the engine builds on Split

    def largest_gradient(acts, grads):
        return tuple(g.abs().flatten(1).amax(1) for g in grads)

    try:
        peaks, _ = _engine.class_maps(candidate, x, _targets.TopK(1), largest_gradient)
    except (TypeError, ValueError):  # a layer whose output is not a tensor map
        return False
    return bool(peaks[0].amax() > 0)


_TRAINING_MESSAGE = (
    "the model is in training mode: batch norm would update its running statistics "
    "and dropout would make maps random. Call model.eval() first"
)


def check(split: Split, model: nn.Module, x: torch.Tensor, *, rtol: float = 1e-5,
          atol: float = 1e-5) -> Split:
    """Confirms that ``split(x)`` (tail after head) reproduces ``model(x)``.

    Raises ``ValueError`` naming the largest difference when it does not, and
    returns the split unchanged when it does, so it can wrap a construction.

    Example:
        >>> s = camfunc.check(camfunc.split(model, "layer4"), model, x)
        >>> s.layers
        ('layer4',)
    """
    with torch.no_grad():
        expected = model(x)
        got = split(x)
    exp_leaves, exp_spec = torch.utils._pytree.tree_flatten(expected)
    got_leaves, got_spec = torch.utils._pytree.tree_flatten(got)
    if exp_spec != got_spec:
        raise ValueError(f"split output structure {got_spec} differs from the model's {exp_spec}")
    for e, g in zip(exp_leaves, got_leaves):
        if isinstance(e, torch.Tensor):
            if e.shape != g.shape or not torch.allclose(e, g, rtol=rtol, atol=atol):
                diff = (e - g).abs().max().item() if e.shape == g.shape else float("nan")
                raise ValueError(
                    f"split does not reproduce the model: shapes {tuple(g.shape)} vs "
                    f"{tuple(e.shape)}, max abs difference {diff:.3g}"
                )
    return split
