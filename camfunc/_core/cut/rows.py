"""Row pruning: a tail that reads only some tokens computes only those tokens' rows.

A ViT's classifier reads the class token, ``x[:, 0]``, of the last block's output.
That block's MLP, attention output and queries are then needed for that one row;
only its keys and values need every token. Rows are independent through row-wise
ops (element-wise maths, layer norm and linear layers over the features, views
that keep the token axis, attention along its query axis), so the tail computes
the same scores, exactly, from ``narrow``-ed inputs: the attention of one query
instead of an ``N x N`` matrix, in the forward and in the vjp.

:func:`prune_rows` rewrites a stage's graph for the shapes it was shown. Nothing
that it does not recognise is pruned: any other user of a value (an op not listed
here, the output, a user reading other rows) keeps it whole.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

__all__ = ["checked_pruning", "prune_rows"]

Rows = tuple[int, int, int]  # (axis, start, stop) of a value that is needed

_ELEMENTWISE = {
    "gelu", "relu", "silu", "tanh", "sigmoid", "neg", "exp", "abs", "clone", "contiguous",
    "add", "sub", "mul", "div", "rsqrt", "sqrt", "pow", "_to_copy", "to", "type_as", "float",
    "dropout", "alias", "detach", "hardswish", "hardsigmoid", "erf", "square",
}
_ELEMENTWISE_MODULES = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Hardswish,
                        nn.Dropout)
_SDPA = {"scaled_dot_product_attention", "math_attention"}
_VIEWS = {"view", "reshape", "_unsafe_view", "transpose", "swapaxes", "permute", "unsqueeze", "slice"}
_OPERATORS = {operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.truediv: "div",
              operator.getitem: "getitem"}


def _name(node: torch.fx.Node, gm: torch.fx.GraphModule) -> str:
    """The op a node runs, by one name across fx and export graphs (``""``: unknown)."""
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, _ELEMENTWISE_MODULES) and not module.training:
            return "identity_module"
        if type(module) is nn.Linear:
            return "linear"
        if type(module) is nn.LayerNorm:
            return "layer_norm_module"
        return ""
    if node.op != "call_function":
        return ""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return str(target.overloadpacket.__name__)
    if target in _OPERATORS:
        return _OPERATORS[target]
    return getattr(target, "__name__", "")


def _shape(node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, torch.fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return None if shape is None else tuple(int(s) for s in shape)


def _origin(node: torch.fx.Node, name: str) -> tuple[Any, Rows] | None:
    """``(source, rows)`` when ``node`` reads some rows of one value along one axis
    (``x[:, 0]``, ``x.select(1, 0)``, ``x[:, :k]``): a place where demand starts."""
    args: Any = node.args  # fx types them as any argument
    source = args[0] if args else None
    shape = _shape(source)
    if shape is None or len(shape) < 2:
        return None
    if name == "select" and len(args) == 3 and all(isinstance(v, int) for v in args[1:]):
        axis, index = args[1] % len(shape), args[2] % shape[args[1]]
        return (source, (axis, index, index + 1)) if axis > 0 else None
    if name == "getitem" and isinstance(args[1], tuple):
        key = args[1]
        if len(key) >= 2 and all(k == slice(None) for k in key[:-1]) and isinstance(key[-1], int):
            axis = len(key) - 1
            index = key[-1] % shape[axis]
            return source, (axis, index, index + 1)
    return None


def _rebuilt_shape(args: list[Any], axis: int, size: int) -> list[Any] | None:
    """A ``view``/``reshape`` size list with entry ``axis`` set to ``size``."""
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        sizes = list(args[0])
        if axis >= len(sizes):
            return None
        sizes[axis] = size
        return [sizes]
    if axis >= len(args):
        return None
    sizes = list(args)
    sizes[axis] = size
    return sizes


def _dropout_is_off(node: torch.fx.Node) -> bool:
    """``dropout(x, p, train)``: off when ``p`` is 0 or ``train`` is False (F.dropout's
    default is True)."""
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", node.kwargs.get("training", True))
    return bool(p == 0) or train is False


class _Plan:
    """For one pruned node: the axis of each tensor input to narrow (None: keep it whole)."""

    def __init__(self, rows: Rows, inputs: dict[int, int | None]):
        self.rows, self.inputs = rows, inputs


def _plan(node: torch.fx.Node, name: str, rows: Rows, gm: torch.fx.GraphModule) -> _Plan | None:
    """How ``node`` computes only ``rows`` of its output, or None when it cannot."""
    args: Any = node.args  # fx types them as any argument
    axis = rows[0]
    out = _shape(node)
    if out is None or axis >= len(out) or axis == 0:
        return None
    tensors = {i: a for i, a in enumerate(args) if isinstance(a, torch.fx.Node)}
    # Keyword tensors are kept whole: fine for weights, not for an element-wise operand.
    keyword_tensors = any(isinstance(v, torch.fx.Node) for v in node.kwargs.values())

    def broadcast(i: int) -> int | bool | None:
        shape = _shape(tensors[i])
        if shape is None:
            return False
        aligned = axis - (len(out) - len(shape))
        if aligned < 0 or shape[aligned] == 1:
            return None
        return aligned if shape[aligned] == out[axis] else False

    if name in _ELEMENTWISE or name == "identity_module":
        if keyword_tensors:
            return None
        if name == "dropout" and not _dropout_is_off(node):
            return None
        axes = {i: broadcast(i) for i in tensors}
        if any(v is False for v in axes.values()):
            return None
        return _Plan(rows, {i: v for i, v in axes.items() if not isinstance(v, bool)})
    if name in ("layer_norm", "layer_norm_module", "linear"):
        source = _shape(args[0])
        kept = 1 if name != "layer_norm" else len(args[1])
        if name == "layer_norm_module":
            norm = gm.get_submodule(str(node.target))
            assert isinstance(norm, nn.LayerNorm)  # by _name
            kept = len(norm.normalized_shape)
        if source is None or axis >= len(source) - kept:
            return None
        return _Plan(rows, {i: (axis if i == 0 else None) for i in tensors})
    if name in _VIEWS and keyword_tensors:
        return None
    if name in ("view", "reshape", "_unsafe_view"):
        source = _shape(args[0])
        if source is None or source[:axis + 1] != out[:axis + 1]:
            return None  # the other arguments are sizes
        return _Plan(rows, {0: axis})
    if name in ("transpose", "swapaxes"):
        d0, d1 = (d % len(out) for d in args[1:3])
        return _Plan(rows, {0: d1 if axis == d0 else d0 if axis == d1 else axis})
    if name == "permute":
        dims = args[1] if isinstance(args[1], (list, tuple)) else args[1:]
        return _Plan(rows, {0: int(dims[axis]) % len(out)})
    if name == "unsqueeze":
        dim = args[1] % len(out)
        return None if dim == axis else _Plan(rows, {0: axis if axis < dim else axis - 1})
    if name == "slice" and len(args) > 1 and isinstance(args[1], int) \
            and args[1] % len(out) != axis:
        return _Plan(rows, {0: axis})
    if name in _SDPA:
        dropout = args[4] if len(args) > 4 else node.kwargs.get("dropout_p", 0.0)
        causal = args[5] if len(args) > 5 else node.kwargs.get("is_causal", False)
        if axis != len(out) - 2 or dropout != 0.0 or causal is not False:
            return None
        attention: dict[int, int | None] = {0: axis, 1: None, 2: None}
        mask = args[3] if len(args) > 3 else node.kwargs.get("attn_mask")
        if isinstance(mask, torch.fx.Node):
            shape = _shape(mask)
            if shape is None:
                return None
            aligned = len(shape) - 2
            narrowed = None if shape[aligned] == 1 else aligned
            attention[3 if len(args) > 3 else -1] = narrowed  # -1: the attn_mask keyword
        return _Plan(rows, attention)
    return None


def _demands(gm: torch.fx.GraphModule) -> tuple[dict[torch.fx.Node, _Plan], dict[torch.fx.Node, Rows]]:
    """The nodes to prune (with their plans) and the origins reading them."""
    plans: dict[torch.fx.Node, _Plan] = {}
    origins: dict[torch.fx.Node, Rows] = {}
    wanted: dict[torch.fx.Node, list[Rows | None]] = {}  # per node, each use's rows (None: all)
    for node in reversed(list(gm.graph.nodes)):
        name = _name(node, gm)
        uses = wanted.get(node, [])
        wanted_rows = uses[0] if uses and len(set(uses)) == 1 else None
        if node.op in ("call_function", "call_method", "call_module") and wanted_rows is not None:
            plan = _plan(node, name, wanted_rows, gm)
            if plan is not None:
                plans[node] = plan
        if node not in plans:
            origin = _origin(node, name)
            if origin is not None:
                origins[node] = origin[1]
        # What this node needs of each input: some rows (a plan's axis, an origin's
        # rows), or all of it (any other use, nested arguments, the output).
        needs: dict[torch.fx.Node, list[Rows | None]] = {n: [] for n in node.all_input_nodes}
        direct = [*enumerate(node.args), (-1, node.kwargs.get("attn_mask"))]
        covered: set[torch.fx.Node] = set()
        for index, arg in direct:
            if not isinstance(arg, torch.fx.Node):
                continue
            covered.add(arg)
            narrowed = plans[node].inputs.get(index) if node in plans else None
            if node in plans and narrowed is not None:
                needs[arg].append((narrowed, *plans[node].rows[1:]))
            elif node in origins and index == 0:
                needs[arg].append(origins[node])
            else:
                needs[arg].append(None)
        for arg in node.all_input_nodes:
            if arg not in covered:
                needs[arg].append(None)
        for arg, rows in needs.items():
            wanted.setdefault(arg, []).extend(rows)
    return plans, {o: r for o, r in origins.items() if o.args[0] in plans}


def _rewrite(gm: torch.fx.GraphModule, plans: dict[torch.fx.Node, _Plan],
             origins: dict[torch.fx.Node, Rows]) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, Any] = {}
    for node in gm.graph.nodes:
        if node in plans:
            plan = plans[node]
            axis, start, stop = plan.rows

            def narrowed(i: int, value: Any, plan: _Plan = plan, start: int = start, stop: int = stop) -> Any:
                along = plan.inputs.get(i)
                if along is None or not isinstance(value, torch.fx.Node):
                    return torch.fx.node.map_arg(value, lambda n: env[n])
                if value in plans:
                    return env[value]
                return graph.call_function(torch.narrow, (env[value], along, start, stop - start))

            args = [narrowed(i, a) for i, a in enumerate(node.args)]
            kwargs = {k: (narrowed(-1, v) if k == "attn_mask" else
                          torch.fx.node.map_arg(v, lambda n: env[n])) for k, v in node.kwargs.items()}
            name = _name(node, gm)
            if name in ("view", "reshape", "_unsafe_view"):
                args = [args[0], *(_rebuilt_shape(args[1:], axis, stop - start) or args[1:])]
            if node.op == "call_function":
                new = graph.call_function(node.target, tuple(args), kwargs)
            elif node.op == "call_method":
                new = graph.call_method(str(node.target), tuple(args), kwargs)
            else:
                new = graph.call_module(str(node.target), tuple(args), kwargs)
            env[node] = new
        elif node in origins:  # its source now holds just the rows it reads: index 0
            source = env[node.args[0]]
            if _name(node, gm) == "select":
                env[node] = graph.call_function(node.target, (source, node.args[1], 0), dict(node.kwargs))
            else:  # getitem(x, (:, ..., index))
                env[node] = graph.call_function(operator.getitem, (source, (*node.args[1][:-1], 0)))
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    return torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)


def prune_rows(gm: torch.fx.GraphModule, *example: Any) -> torch.fx.GraphModule | None:
    """``gm`` computing, for inputs shaped like ``example``, only the rows its output reads;
    None when there is nothing to prune. ``example`` runs once through a copy of ``gm``
    (no graph) to learn every value's shape."""
    probe = torch.fx.GraphModule(gm, _copied(gm.graph))
    with torch.no_grad():
        ShapeProp(probe).propagate(*example)
    plans, origins = _demands(probe)
    if not origins:
        return None
    return _rewrite(probe, plans, origins)


def _copied(graph: torch.fx.Graph) -> torch.fx.Graph:
    copy = torch.fx.Graph()
    output = copy.graph_copy(graph, {})
    copy.output(output)
    return copy


_DRAWS = ("rand", "bernoulli", "normal", "uniform", "multinomial")


def _probe_is_pure(gm: torch.fx.GraphModule) -> bool:
    """Whether running ``gm`` on a made-up input changes nothing: no module in training mode
    (batch norm's statistics), no random draw (the global generator), no in-place write."""
    called = [gm.get_submodule(str(n.target)) for n in gm.graph.nodes if n.op == "call_module"]
    if any(m.training for module in called for m in module.modules()):
        return False
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        name = _name(node, gm)
        if name.endswith("_") and not name.startswith("_"):
            return False
        if any(word in name for word in _DRAWS):
            return False
        if "dropout" in name and not (name == "dropout" and _dropout_is_off(node)):
            return False
        if "batch_norm" in name and name != "_native_batch_norm_legit_no_training":
            return False
    return True


def checked_pruning(gm: torch.fx.GraphModule, carry: tuple[Any, ...]) -> torch.fx.GraphModule | None:
    """:func:`prune_rows` for inputs shaped like ``carry``, kept only if it gives ``gm``'s
    output on a random input of those shapes (else None: ``gm`` runs whole).

    Float tensors are drawn from a fixed seed (the global generator is left alone);
    other tensors (masks, indices) are used as given, unless a transform wraps them.
    """
    if not _probe_is_pure(gm):
        return None
    generator = torch.Generator().manual_seed(0)
    example = []
    for value in carry:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                drawn = torch.randn(tuple(value.shape), generator=generator, dtype=torch.float32)
                value = drawn.to(dtype=value.dtype, device=value.device)
            elif torch._C._functorch.is_functorch_wrapped_tensor(value):
                return None
        example.append(value)
    try:
        pruned = prune_rows(gm, *example)
        if pruned is None:
            return None
        with torch.no_grad():
            whole, rows = gm(*example), pruned(*example)
    except Exception:  # an optimisation only: anything unforeseen runs the stage whole
        return None
    same = [torch.allclose(a, b, rtol=1e-4, atol=1e-5)
            for a, b in zip(torch.utils._pytree.tree_leaves(whole), torch.utils._pytree.tree_leaves(rows), strict=False)
            if isinstance(a, torch.Tensor) and a.is_floating_point()]
    return pruned if same and all(same) else None
