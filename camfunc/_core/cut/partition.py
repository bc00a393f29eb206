"""Which stage each node runs in, and one ``GraphModule`` per stage.

Stage k holds what is computed between cut k-1 and cut k. A node goes to the
lowest stage its inputs allow, so values that do not depend on a cut (shape
arithmetic, parallel branches, skip connections) are computed once, before
it, and cross as context.

fx records no edge for an in-place write: after ``idn.add_(out)`` a reader of
``idn`` still points at ``idn``'s node. So writes are dependencies here: a
node that reads a tensor (or a view of it) runs no earlier than the last
write before it, and a write runs no earlier than the reads before it. A
stage never writes its own inputs: an input it writes in place is cloned on
entry, so re-running a stage (Score-CAM, Ablation-CAM) sees the same context.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
import threading
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from camfunc._core.cut import rows as _rows
from camfunc._core.cut.capture import Captured, CaptureError, target_name
from camfunc._core.cut.lock import TRACE_LOCK

__all__ = ["Stage", "build_stages", "levels"]

# Methods and functions whose result may share memory with their first argument.
_VIEW_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "flatten", "unflatten",
    "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "select", "t", "chunk", "split",
    "unbind", "movedim", "moveaxis", "diagonal", "contiguous", "detach", "as_strided", "unfold",
    "__getitem__", "to", "type", "float", "half", "bfloat16", "double", "swapaxes", "swapdims",
    "tensor_split", "split_with_sizes", "real", "imag", "view_as_real", "mT", "mH", "T", "H",
}
_VIEW_FUNCTIONS = {
    operator.getitem, torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze,
    torch.unsqueeze, torch.narrow, torch.select, torch.chunk, torch.split, torch.unbind,
    torch.movedim, torch.t, torch.detach, torch.swapaxes, torch.tensor_split, torch.diagonal,
    torch.unflatten,
}
_ALIAS_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                  nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_WRITE_FUNCTIONS = {operator.setitem, operator.iadd, operator.isub, operator.imul,
                    operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow,
                    operator.iand, operator.ior, operator.ixor, operator.ilshift,
                    operator.irshift, operator.imatmul}


def _is_inplace_name(name: str) -> bool:
    return name.endswith("_") and not name.startswith("_")


def _inplace_flag(fn: Any, args: tuple, kwargs: dict) -> bool:
    """``F.relu(x, inplace=True)`` and friends, positional or keyword."""
    if kwargs.get("inplace") is True:
        return True
    try:
        bound = inspect.signature(fn).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return False
    return bound.arguments.get("inplace") is True


def _schema(node: torch.fx.Node) -> Any:
    return getattr(node.target, "_schema", None) if node.op == "call_function" else None


def _tensor_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [a for a in node.args if isinstance(a, torch.fx.Node)]


def written(node: torch.fx.Node, captured: Captured) -> list[torch.fx.Node]:
    """The nodes whose tensors this node writes in place."""
    schema = _schema(node)
    if schema is not None:  # an ATen op from torch.export: its schema says
        out: list[torch.fx.Node] = []
        for i, arg in enumerate(schema.arguments):
            info = arg.alias_info
            if info is not None and info.is_write:
                value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
                out.extend(v for v in (value if isinstance(value, (list, tuple)) else [value])
                           if isinstance(v, torch.fx.Node))
        return out
    first = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
    if first is None:
        return []
    if node.op == "call_method" and _is_inplace_name(target_name(node)):
        return [first]
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if (node.target in _WRITE_FUNCTIONS or _is_inplace_name(name)
                or _inplace_flag(node.target, node.args, node.kwargs)):
            return [first]
    if node.op == "call_module" and getattr(captured.owner(node), "inplace", False) is True:
        return [first]
    return []


def aliased(node: torch.fx.Node, captured: Captured) -> torch.fx.Node | None:
    """The input this node's result may share memory with, if any."""
    schema = _schema(node)
    if schema is not None:
        if any(r.alias_info is not None for r in schema.returns):
            for arg, value in zip(schema.arguments, node.args, strict=False):
                if arg.alias_info is not None and isinstance(value, torch.fx.Node):
                    return value
        return None
    first = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
    if first is None:
        return None
    if node.op == "call_method" and (node.target in _VIEW_METHODS
                                     or _is_inplace_name(target_name(node))):
        return first
    if node.op == "call_function" and (node.target in _VIEW_FUNCTIONS or written(node, captured)):
        return first
    if node.op == "call_module" and (isinstance(captured.owner(node), _ALIAS_MODULES)
                                     or written(node, captured)):
        return first
    return None


def levels(captured: Captured, cuts: Sequence[torch.fx.Node]) -> dict[torch.fx.Node, int]:
    """The stage of every computing node, given the cuts in execution order."""
    cut_index = {node: i for i, node in enumerate(cuts)}
    root_of: dict[torch.fx.Node, torch.fx.Node] = {}
    level: dict[torch.fx.Node, int] = {}
    last_write: dict[torch.fx.Node, int] = {}
    last_read: dict[torch.fx.Node, int] = {}

    def root(node: torch.fx.Node) -> torch.fx.Node:
        return root_of.get(node, node)

    for node in captured.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        inputs = node.all_input_nodes
        lv = cut_index.get(node, 0)
        for inp in inputs:
            if inp in level:
                lv = max(lv, level[inp] + (inp in cut_index))
        read_roots = {root(inp) for inp in inputs}
        for r in read_roots:  # reads come after the writes before them
            lv = max(lv, last_write.get(r, 0))
        writes = {root(w) for w in written(node, captured)}
        for r in writes:  # a write comes after the reads before it
            lv = max(lv, last_read.get(r, 0), last_write.get(r, 0))
        level[node] = lv
        for r in read_roots:
            last_read[r] = max(last_read.get(r, 0), lv)
        for r in writes:
            last_write[r] = lv
        source = aliased(node, captured)
        if source is not None:
            root_of[node] = root(source)
    return level


_OUT_OF_PLACE_OPERATORS = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv,
    operator.imod: operator.mod, operator.ipow: operator.pow, operator.iand: operator.and_,
    operator.ior: operator.or_, operator.ixor: operator.xor, operator.imatmul: operator.matmul,
}


def _module_twin(module: nn.Module) -> tuple[Any, dict[str, Any]] | None:
    """An in-place activation module as its functional form, parameters read off it."""
    import torch.nn.functional as F
    simple = {nn.ReLU: torch.relu, nn.ReLU6: F.relu6, nn.SiLU: F.silu, nn.Hardswish: F.hardswish,
              nn.Hardsigmoid: F.hardsigmoid, nn.Mish: F.mish}
    for kind, fn in simple.items():
        if type(module) is kind:
            return fn, {}
    if type(module) is nn.LeakyReLU:
        return F.leaky_relu, {"negative_slope": module.negative_slope}
    if type(module) is nn.ELU:
        return F.elu, {"alpha": module.alpha}
    if type(module) is nn.Hardtanh:
        return F.hardtanh, {"min_val": module.min_val, "max_val": module.max_val}
    return None


def out_of_place(node: torch.fx.Node, captured: Captured) -> tuple[Any, str, tuple, dict] | None:
    """``(target, op, args, kwargs)`` computing what an in-place node writes, without writing."""
    if node.op == "call_method":
        twin = target_name(node)[:-1]
        return (twin, "call_method", node.args, node.kwargs) if hasattr(torch.Tensor, twin) else None
    if node.op == "call_module":
        found = _module_twin(captured.owner(node))
        return None if found is None else (found[0], "call_function", node.args[:1], found[1])
    if node.op != "call_function":
        return None
    target = node.target
    if isinstance(target, torch._ops.OpOverload):  # aten.add_.Tensor -> aten.add.Tensor
        functional = getattr(torch.ops.aten, target.overloadpacket.__name__[:-1], None)
        overload = None if functional is None else getattr(functional, target._overloadname, None)
        return None if overload is None else (overload, "call_function", node.args, node.kwargs)
    if target in _OUT_OF_PLACE_OPERATORS:
        return _OUT_OF_PLACE_OPERATORS[target], "call_function", node.args, node.kwargs
    name = getattr(target, "__name__", "")
    if _is_inplace_name(name) and callable(getattr(torch, name[:-1], None)):
        return getattr(torch, name[:-1]), "call_function", node.args, node.kwargs
    if isinstance(target, str):  # no signature to read
        return None
    try:
        bound = inspect.signature(target).bind_partial(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return None
    if bound.arguments.get("inplace") is True:
        bound.arguments["inplace"] = False
        return target, "call_function", bound.args, bound.kwargs
    return None


_SDPA = {torch.nn.functional.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default}


def math_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                   dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                   enable_gqa: bool = False) -> Tensor:
    """Scaled dot-product attention by its math kernel: matmuls and a softmax.

    The fused CPU and GPU kernels' backward has no batching rule, so ``vmap``
    over classes would fall back to a loop (with a warning), and forward AD
    has no formula for them. Same values up to rounding.
    """
    extra = {"enable_gqa": True} if enable_gqa else {}
    out: Tensor = torch.ops.aten._scaled_dot_product_attention_math(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **extra)[0]
    return out


def _batchable(node: torch.fx.Node, captured: Captured) -> tuple[Any, str, tuple, dict] | None:
    """The node to run instead in a differentiated stage, when its kernel does not batch."""
    if node.op == "call_function" and node.target in _SDPA:
        return math_attention, "call_function", node.args, node.kwargs
    if node.op == "call_module" and isinstance(captured.owner(node), nn.MultiheadAttention):
        return node.target, "call_module", node.args, {**node.kwargs, "need_weights": True}
    return None


def with_items(items: Any, indices: tuple[int, ...], *values: Any) -> Any:
    """``items`` (a list or tuple) with element ``indices[k]`` replaced by ``values[k]``."""
    out = list(items)
    for index, value in zip(indices, values, strict=True):
        out[index] = value
    return tuple(out) if isinstance(items, tuple) else out


def pick_item(graph: torch.fx.Graph, node: torch.fx.Node, index: int) -> torch.fx.Node:
    """A node for element ``index`` of ``node``'s list output, to cut at.

    The rest of the graph reads the list rebuilt with the picked elements, so
    that what comes after a cut depends on its element through it. One rebuild
    for all picks of a list, after them: the list itself then crosses cuts only
    as context nothing is differentiated through.
    """
    rebuilt = next((u for u in node.users if u.target is with_items), None)
    if rebuilt is None:
        with graph.inserting_after(node):
            rebuilt = graph.call_function(with_items, (node, ()))
        node.replace_all_uses_with(rebuilt, delete_user_cb=lambda user: user is not rebuilt
                                   and not user.meta.get("camfunc_pick"))
    with graph.inserting_after(node):
        picked = graph.call_function(operator.getitem, (node, index))
    picked.meta["camfunc_pick"] = True
    indices = rebuilt.args[1]
    assert isinstance(indices, tuple)
    rebuilt.args = (node, (*indices, index), *rebuilt.args[2:], picked)
    return picked


class Stage:
    """One stage of a split: a ``GraphModule`` over the model's own modules and tensors.

    Calls hold :data:`TRACE_LOCK` shared, so a trace in another thread never
    sees them. ``unflatten`` rebuilds an exported model's output structure.
    ``math_twin`` is the same stage with its attention on the math kernel, which
    ``vmap`` batches and forward AD differentiates (itself when it has none).
    """

    def __init__(self, module: torch.fx.GraphModule, unflatten: Any = None, single: bool = False,
                 prunes: bool = False):
        self.module = module
        self.unflatten = unflatten
        self.single = single
        self.math_twin: Stage = self
        # A tail computes only the token rows its output reads (camfunc._core.cut.rows),
        # rewritten once per input shape.
        self.prunes = prunes
        self._pruned: dict[Any, torch.fx.GraphModule] = {}
        # Made only where used: compiled code builds Stages (guided, FullGrad), and dynamo
        # cannot trace a lock's creation.
        self._pruning = threading.Lock() if prunes else None

    def _module_for(self, carry: tuple[Any, ...]) -> torch.fx.GraphModule:
        if not self.prunes or torch.compiler.is_dynamo_compiling():
            return self.module
        try:
            key = tuple((tuple(c.shape), c.dtype, c.device) if isinstance(c, torch.Tensor) else c
                        for c in carry)
            hash(key)
        except TypeError:
            return self.module
        assert self._pruning is not None
        with self._pruning:
            if key not in self._pruned:
                self._pruned[key] = _rows.checked_pruning(self.module, carry) or self.module
            return self._pruned[key]

    def _run(self, *carry: Any) -> Any:
        out = self._module_for(carry)(*carry)
        if self.unflatten is not None:
            return self.unflatten(out)
        return out[0] if self.single else out

    def __call__(self, *carry: Any) -> Any:
        if torch.compiler.is_dynamo_compiling():
            return self._run(*carry)
        with TRACE_LOCK.calling():
            return self._run(*carry)

    def __repr__(self) -> str:
        calls = [n.target for n in self.module.graph.nodes if n.op == "call_module"]
        ops = sum(n.op in ("call_function", "call_method", "call_module") for n in self.module.graph.nodes)
        shown = ", ".join(calls[:4]) + (", ..." if len(calls) > 4 else "")
        return f"Stage({ops} ops{': ' + shown if shown else ''})"


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A capture cut into levels: its computing nodes, output, and each view's root tensor."""

    captured: Captured
    level: dict[torch.fx.Node, int]
    nodes: list[torch.fx.Node]
    output: torch.fx.Node
    root_of: dict[torch.fx.Node, torch.fx.Node]

    def stage_of(self, node: torch.fx.Node) -> int:
        return self.level.get(node, 0)  # the input and constants belong to the head

    def root(self, node: torch.fx.Node) -> torch.fx.Node:
        return self.root_of.get(node, node)


def _plan(captured: Captured, level: dict[torch.fx.Node, int]) -> _Plan:
    graph = captured.graph
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    output = next(n for n in graph.nodes if n.op == "output")
    root_of: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in nodes:
        source = aliased(node, captured)
        if source is not None:
            root_of[node] = root_of.get(source, source)
    return _Plan(captured, level, nodes, output, root_of)


def _needed_after(plan: _Plan, k: int) -> list[torch.fx.Node]:
    """Values of stages up to ``k`` that a later stage, or the output, reads."""
    seen: dict[torch.fx.Node, None] = {}
    for user in [n for n in plan.nodes if plan.stage_of(n) > k] + [plan.output]:
        for inp in user.all_input_nodes:
            if inp.op == "get_attr" or inp in plan.captured.constants:
                continue
            if plan.stage_of(inp) <= k:
                seen[inp] = None
    return list(seen)


def _entry_writes(plan: _Plan, body: list[torch.fx.Node], inputs: list[torch.fx.Node]
                  ) -> tuple[dict[torch.fx.Node, Any], list[torch.fx.Node]]:
    """How a stage avoids writing what it was given: in-place writes rewritten out of place
    (by node), and the inputs to clone on entry instead."""
    captured = plan.captured
    written_roots = {plan.root(w) for n in body for w in written(n, captured)}
    by_root: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for value in inputs:
        by_root.setdefault(plan.root(value), []).append(value)
    rewrite: dict[torch.fx.Node, Any] = {}
    cloned = []
    for r, values in by_root.items():
        if r not in written_roots:
            continue
        if len(values) > 1:
            raise CaptureError(
                f"values {[v.name for v in values]} cross a cut, share memory, and are "
                "written in place after it; pick another layer"
            )
        # Out of place where every write is on the value itself and nothing views it (so a
        # batched value can be written under vmap); else a copy on entry.
        value = values[0]
        writes = [n for n in body if any(plan.root(w) is r for w in written(n, captured))]
        views = [n for n in body if n not in writes and plan.root_of.get(n) is r]
        twins = {w: out_of_place(w, captured) for w in writes}
        if not views and all(w.args[0] is value and twins[w] is not None for w in writes):
            rewrite.update(twins)
        else:
            cloned.append(value)
    return rewrite, cloned


def _stage_module(plan: _Plan, k: int, body: list[torch.fx.Node], inputs: list[torch.fx.Node],
                  outs: list[torch.fx.Node] | None, batched: bool) -> torch.fx.GraphModule:
    """Stage ``k``'s graph; ``batched``: its attention by the math kernel (a math twin)."""
    captured = plan.captured
    sub = torch.fx.Graph()
    env: dict[torch.fx.Node, Any] = {n: v for n, v in captured.constants.items()
                                     if not isinstance(v, torch.Tensor)}
    owners: dict[str, Any] = {}
    for value in inputs:
        placeholder = sub.placeholder(value.name if k else "x")
        placeholder.meta = dict(value.meta)
        env[value] = placeholder
    rewrite, cloned = _entry_writes(plan, body, inputs)
    for value in cloned:
        env[value] = sub.call_method("clone", (env[value],))

    def value_of(node: torch.fx.Node) -> Any:
        if node in env:
            return env[node]
        if node.op == "get_attr":
            owners[target_name(node)] = captured.root[target_name(node)]
            env[node] = sub.get_attr(target_name(node))
            return env[node]
        if node in captured.constants:  # a tensor default of the forward
            owners[f"_camfunc_default_{node.name}"] = captured.constants[node]
            env[node] = sub.get_attr(f"_camfunc_default_{node.name}")
            return env[node]
        raise CaptureError(f"stage {k} reads {node.name}, computed in a later stage")

    for node in body:
        replaced = rewrite.get(node) or (_batchable(node, captured) if batched else None)
        if replaced is None:
            env[node] = sub.node_copy(node, value_of)
            continue
        target, op, args, kwargs = replaced
        new = sub.create_node(op, target, torch.fx.node.map_arg(args, value_of),
                              torch.fx.node.map_arg(kwargs, value_of), name=node.name)
        new.meta = dict(node.meta)
        env[node] = new
        if node in rewrite:  # later readers of the written value see the new one
            written_value: Any = node.args[0]
            env[written_value] = new
    for node in body:
        if node.op == "call_module":
            owners[target_name(node)] = captured.root[target_name(node)]
    if outs is not None:
        sub.output(tuple(value_of(n) for n in outs))
    else:
        sub.output(torch.fx.node.map_arg(plan.output.args[0], value_of))
    return torch.fx.GraphModule(owners, sub, class_name=f"Stage{k}")


def _stage(plan: _Plan, k: int, body: list[torch.fx.Node], inputs: list[torch.fx.Node],
           outs: list[torch.fx.Node] | None) -> Stage:
    """Stage ``k``; a differentiated stage (after the head) that holds fused attention keeps
    a math twin beside it, for vmap and forward AD."""
    has_fused = k > 0 and any(_batchable(n, plan.captured) is not None for n in body)
    shape: dict[str, Any] = ({"single": len(outs) == 1} if outs is not None else
                             {"unflatten": plan.captured.unflatten, "prunes": True})
    stage = Stage(_stage_module(plan, k, body, inputs, outs, batched=False), **shape)
    if has_fused:
        stage.math_twin = Stage(_stage_module(plan, k, body, inputs, outs, batched=True), **shape)
    return stage


def build_stages(captured: Captured, cuts: Sequence[torch.fx.Node],
                 level: dict[torch.fx.Node, int]) -> list[Stage]:
    """Head, middles and tail: stage k takes ``(A_{k-1}, *context)``, returns ``(A_k, *context)``."""
    plan = _plan(captured, level)
    stages = []
    inputs: list[torch.fx.Node] = [captured.input]
    for k in range(len(cuts) + 1):
        body = [n for n in plan.nodes if plan.stage_of(n) == k]
        outs = ([cuts[k]] + [n for n in _needed_after(plan, k) if n is not cuts[k]]
                if k < len(cuts) else None)
        stages.append(_stage(plan, k, body, inputs, outs))
        if outs is not None:
            inputs = outs
    return stages
