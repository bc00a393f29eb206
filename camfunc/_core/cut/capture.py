"""A model as one ``torch.fx`` graph, with each target layer's outputs marked.

Two ways in, one result (:class:`Captured`):

- :func:`trace_fx`: symbolic tracing with the targets as leaves. Forward
  arguments after the input keep their defaults (traced as constants, so
  ``if side is not None`` takes the branch a plain call takes).
- :func:`export_graph`: ``torch.export`` in non-strict mode, for models fx
  cannot trace (Hugging Face's, among others). It needs an example input; the
  batch is exported dynamic, and the spatial sizes too when asked. The graph
  holds only for the inputs torch's guards admit (``Captured.admits``). A
  layer's output is read from the ``nn_module_stack`` metadata: the value its
  call hands to the rest of the graph.

Forward hooks are part of the model: fx traces those of the modules it traces
through, a leaf's run when the stage calls it, and torch.export traces them all.
fx does not run the model's own hooks, so such a model goes to torch.export.

Both read the model's own parameters and buffers (no copies) and leave the
model as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from camfunc._core.cut.lock import TRACE_LOCK
from camfunc._core.cut.masks import drop_full_masks

__all__ = [
    "CaptureError",
    "Captured",
    "example_for",
    "export_graph",
    "target_name",
    "trace_fx",
    "traced_copy",
]


class CaptureError(TypeError):
    """The model could not be captured as a graph (the message says why and what to do)."""


def target_name(node: torch.fx.Node) -> str:
    """The name a ``call_module``, ``call_method`` or ``get_attr`` node's target is."""
    if not isinstance(node.target, str):
        raise CaptureError(f"{node.op} node {node.name} targets {node.target!r}, not a name")
    return node.target


@dataclasses.dataclass
class Captured:
    """A captured model: its graph, the objects the graph refers to, and marked layer outputs.

    ``root`` maps ``call_module`` and ``get_attr`` targets to the model's own
    modules and tensors. ``constants`` gives the value of every placeholder
    but the input. ``calls[name]`` lists the output node of each call of layer
    ``name``, in call order. ``unflatten`` rebuilds the model's output structure
    from the graph's output (export flattens it). ``items[name]`` lists, per call, the element nodes of a
    list or tuple output (fx, traced through). ``input_ndim`` is the input
    rank the model needs, when the graph shows it. ``admits(x)`` says whether the
    graph holds for input ``x`` (None: for any input, as a traced Python forward does).
    """

    graph: torch.fx.Graph
    root: dict[str, Any]
    input: torch.fx.Node
    constants: dict[torch.fx.Node, Any]
    calls: dict[str, list[torch.fx.Node]]
    unflatten: Callable[[Any], Any] | None = None
    input_ndim: int | None = None
    method: str = "fx"
    admits: Callable[[Tensor], bool] | None = None
    example_shape: tuple[int, ...] | None = None  # what torch.export was shown
    items: dict[str, list[list[torch.fx.Node]]] = dataclasses.field(default_factory=dict)
    in_regions: set[str] = dataclasses.field(default_factory=set)  # modules inside wrapper regions

    def owner(self, node: torch.fx.Node) -> Any:
        """The module or tensor a ``call_module``/``get_attr`` node refers to."""
        return self.root[target_name(node)]


def _is_inside(inner: str, outer: str) -> bool:
    return inner.startswith(outer + ".")


class _CutTracer(torch.fx.Tracer):
    """Traces with the target layers as leaves and records each call's output node.

    A target that contains another target is traced through, so nested layers
    both get a node. Recording the proxy that the module call returns puts the
    cut at the module's real output, even when its forward ends in functional
    ops such as ``F.relu(out + identity)``. Tensor constants the model makes
    while tracing are kept here, not stored on the model as fx would.
    """

    def __init__(self, targets: Sequence[str], record_all: bool = False):
        super().__init__()
        self.targets = set(targets)
        self.record_all = record_all
        self.outputs: dict[str, list[torch.fx.Node]] = {}
        self.items: dict[str, list[list[torch.fx.Node]]] = {}
        self.constants: dict[str, Tensor] = {}

    def is_leaf_module(self, m: nn.Module, name: str) -> bool:
        if any(_is_inside(t, name) or (not name and t) for t in self.targets):
            return False
        if name in self.targets:
            return True
        return super().is_leaf_module(m, name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        out = super().call_module(m, forward, args, kwargs)
        name = self.path_of_module(m)
        if name and (self.record_all or name in self.targets):
            if isinstance(out, torch.fx.Proxy):
                self.outputs.setdefault(name, []).append(out.node)
            elif isinstance(out, (list, tuple)) and all(isinstance(o, torch.fx.Proxy) for o in out):
                self.items.setdefault(name, []).append([o.node for o in out])
            elif not self.record_all:
                raise CaptureError(
                    f"layer {name!r} returns {type(out).__name__}, not a tensor; "
                    "pick a layer whose output is a single tensor"
                )
        return out

    def create_arg(self, a: Any) -> Any:
        if (isinstance(a, Tensor) and not isinstance(a, nn.Parameter) and a not in self.tensor_attrs
                and not any(a is b for b in self.root.buffers())):
            name = f"_camfunc_constant{len(self.constants)}"
            self.constants[name] = a
            self.tensor_attrs[a] = name  # fx then emits get_attr without setattr on the model
        return super().create_arg(a)


_CONTAINERS = (dict, list, set)


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Undoes what tracing changes in the model's Python state.

    A model's forward may cache values on itself (timm's LeViT keeps attention
    biases in a dict keyed by device); traced, it would keep proxies or fake
    tensors there. Every module's attributes, and the contents of its dicts,
    lists and sets, are put back as they were.
    """
    saved = []
    for module in model.modules():
        attrs = dict(module.__dict__)
        contents = {k: (v.copy() if not isinstance(v, list) else list(v))
                    for k, v in attrs.items() if type(v) in _CONTAINERS or isinstance(v, dict)}
        saved.append((module, attrs, contents))
    try:
        yield
    finally:
        for module, attrs, contents in saved:
            current = module.__dict__
            for key in [k for k in current if k not in attrs]:
                del current[key]
            for key, value in attrs.items():
                if current.get(key) is not value:
                    current[key] = value
                if key in contents:
                    if isinstance(value, list):
                        value[:] = contents[key]
                    else:
                        value.clear()
                        value.update(contents[key])


def forward_arguments(model: nn.Module, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Forward arguments after the input: ``given`` ones, else their defaults; a clear error
    for a required one not given, or a given one ``forward`` does not take."""
    given = dict(given or {})
    params = list(inspect.signature(model.forward).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not positional:
        raise CaptureError(
            f"{type(model).__name__}.forward takes no positional input; camfunc calls model(x)"
        )
    rest = params[params.index(positional[0]) + 1:]
    named = {p.name for p in rest if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    unknown = sorted(set(given) - named)
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in rest):
        raise CaptureError(f"{type(model).__name__}.forward takes no argument {unknown[0]!r}; "
                           f"forward_kwargs must name its arguments ({', '.join(sorted(named)) or 'none'})")
    arguments = {}
    for p in rest:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name not in given and p.default is p.empty:
            raise CaptureError(
                f"{type(model).__name__}.forward needs the argument {p.name!r} besides the input; "
                f"pass it to camfunc.split(..., forward_kwargs={{{p.name!r}: ...}}), wrap the model "
                f"in a module whose forward(x) calls it with {p.name}=..., or build a camfunc.Split by hand"
            )
        arguments[p.name] = given.pop(p.name) if p.name in given else p.default
    return {**arguments, **given}


_CONV_FUNCTIONS: dict[torch.fx.node.Target, int] = {
    torch.nn.functional.conv1d: 1, torch.nn.functional.conv2d: 2, torch.nn.functional.conv3d: 3,
    torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


def _input_ndim(graph: torch.fx.Graph, x: torch.fx.Node, root: dict[str, Any]) -> int | None:
    """The input rank, when the input goes straight into a convolution (batched: dims + 2)."""
    for user in x.users:
        if user.op == "call_module" and user.args and user.args[0] is x:
            dims = _CONVS.get(type(root[target_name(user)]))
        elif user.op == "call_function" and user.args and user.args[0] is x:
            dims = _CONV_FUNCTIONS.get(user.target)
        else:
            dims = None
        if dims is not None:
            return dims + 2
    return None


def _graph_root(model: nn.Module, graph: torch.fx.Graph, extra: dict[str, Any]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            root[target_name(node)] = model.get_submodule(target_name(node))
        elif node.op == "get_attr":
            name = target_name(node)
            root[name] = extra[name] if name in extra else _fetch(model, name)
    return root


def _fetch(obj: Any, qualname: str) -> Any:
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward hooks or forward pre-hooks of its own."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def trace_fx(model: nn.Module, targets: Sequence[str], *, record_all: bool = False,
             forward_kwargs: Mapping[str, Any] | None = None) -> Captured:
    """Symbolic tracing; raises :class:`CaptureError` when fx cannot trace the model.
    ``forward_kwargs`` are passed to ``forward`` as constants."""
    if has_forward_hooks(model):
        raise CaptureError(f"torch.fx could not trace {type(model).__name__}: the model has forward "
                           "hooks of its own, and fx does not run them")
    defaults = forward_arguments(model, forward_kwargs)
    tracer = _CutTracer(targets, record_all=record_all)
    with TRACE_LOCK.tracing(), preserved(model), warnings.catch_warnings():
        # A tensor default cannot be asserted on; camfunc never passes another value.
        warnings.filterwarnings("ignore", "Was not able to add assertion", UserWarning)
        try:
            graph = tracer.trace(model, concrete_args=defaults or None)
        except CaptureError:
            raise
        except Exception as err:  # fx raises many kinds; all mean "cannot trace"
            raise CaptureError(f"torch.fx could not trace {type(model).__name__}: "
                               f"{type(err).__name__}: {err}") from err
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    x = placeholders[0]
    root = _graph_root(model, graph, tracer.constants)
    constants = {}
    # Placeholders follow forward's arguments; each holds the value fx traced with (and asserts).
    for node, name in zip(placeholders[1:], defaults, strict=False):
        value = node.args[0] if node.args else None
        value = root[target_name(value)] if isinstance(value, torch.fx.Node) else value
        constants[node] = value if isinstance(defaults[name], Tensor) else defaults[name]
    return Captured(graph, root, x, constants, tracer.outputs,
                    input_ndim=_input_ndim(graph, x, root), method="fx", items=tracer.items)


# ----------------------------------------------------------------------------
# torch.export


def example_for(model: nn.Module) -> Tensor | None:
    """An example input from the model's own metadata (Hugging Face config, the size a timm
    model was built for, timm cfg), if any."""
    shape = None
    config = getattr(model, "config", None)
    size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
    if isinstance(size, int) and isinstance(channels, int):
        shape = (channels, size, size)
    elif isinstance(size, (tuple, list)) and isinstance(channels, int):
        shape = (channels, *size)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    cfg_shape = tuple(cfg["input_size"]) if isinstance(cfg, dict) and isinstance(
        cfg.get("input_size"), (tuple, list)) else None
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)  # timm, as built
    if isinstance(built, int):
        built = (built, built)
    if shape is None and isinstance(built, (tuple, list)) and len(built) == 2 and all(
            isinstance(b, int) for b in built):
        shape = (cfg_shape[0] if cfg_shape else 3, *built)  # img_size= overrides the cfg's size
    if shape is None:
        shape = cfg_shape
    if shape is None:
        return None
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    return torch.randn((2, *shape), generator=g).to(device=device, dtype=dtype)


def _module_path(path: str, names: set[str]) -> str:
    """``nn_module_stack`` paths: plain names on recent torch, ``L['self'].a[0]`` on older."""
    if path in names:
        return path
    cleaned = re.sub(r"^L\['self'\]\.?", "", path)
    cleaned = re.sub(r"\[(\d+)\]", r".\1", cleaned).replace("['", ".").replace("']", "")
    cleaned = cleaned.strip(".")
    return cleaned


def _dynamic_shapes(example: Tensor, spatial: bool, kwargs: Mapping[str, Any]) -> list[Any]:
    """Export's ``dynamic_shapes`` to try, most general first: the batch and, when asked and
    torch can (``Dim.AUTO``: dimensions it must fix are fixed, not refused), the spatial sizes."""
    dim = torch.export.Dim
    auto = getattr(dim, "AUTO", None)
    batch = {0: auto if auto is not None else dim("batch")}
    tries = []
    if spatial and auto is not None and example.ndim > 2:
        tries.append({**batch, **{i: auto for i in range(2, example.ndim)}})
    tries.append(batch)
    # Some models specialise the batch; then the capture takes that batch only.
    return [(shapes, *[None] * len(kwargs)) for shapes in tries] + [None]


def _export(model: nn.Module, example: Tensor, kwargs: Mapping[str, Any],
            spatial: bool) -> torch.export.ExportedProgram:
    error: Exception | None = None
    for shapes in _dynamic_shapes(example, spatial, kwargs):
        try:
            return torch.export.export(model, (example,), dict(kwargs), strict=False,
                                       dynamic_shapes=shapes)
        except Exception as err:  # export raises many kinds; the last try's error is reported
            error = err
    assert error is not None
    raise error


def _guard_function(ep: Any) -> Callable[..., Any] | None:
    """torch's own check of an exported program's inputs: its guards on their sizes, as
    ``ExportedProgram.module()`` runs them (torch 2.9 and newer), or None."""
    try:
        return getattr(ep.module(), "_guards_fn", None)
    except Exception:  # an older torch, or a program it cannot unlift: no function
        return None


def _admits(ep: Any, example: Tensor) -> Callable[[Tensor], bool]:
    """Whether the exported graph holds for an input: the dtype and device it was captured
    with, and sizes torch's guards admit. Where torch gives no guard function, only the
    example's sizes (any batch when the batch was exported dynamic). Verdicts are kept per shape."""
    dtype, device, shape = example.dtype, example.device, tuple(example.shape)
    guards = _guard_function(ep)
    leaves = torch.utils._pytree.tree_leaves(getattr(ep, "example_inputs", None) or ((), {}))
    placeholder = next(n for n in ep.graph.nodes if n.op == "placeholder"
                       and n.name in ep.graph_signature.user_inputs)
    dynamic_batch = not isinstance(placeholder.meta["val"].shape[0], int)

    def sizes_fit(size: tuple[int, ...]) -> bool:
        if guards is not None and leaves and isinstance(leaves[0], Tensor):
            try:
                guards(torch.empty(size, device="meta", dtype=dtype), *leaves[1:])
                return True
            except Exception:  # AssertionError: "Guard failed: ..."
                return False
        return len(size) == len(shape) and size[1:] == shape[1:] and (
            dynamic_batch or size[0] == shape[0])

    verdicts: dict[tuple[int, ...], bool] = {}

    def admits(x: Tensor) -> bool:
        if x.dtype != dtype or x.device != device:
            return False
        size = tuple(int(s) for s in x.shape)
        verdict = verdicts.get(size)
        if verdict is None:
            if torch.compiler.is_dynamo_compiling():  # guards run eagerly: a size not seen is not known
                return False
            verdict = verdicts[size] = sizes_fit(size)
        return verdict

    verdicts[shape] = True  # exported at this size
    return admits


def export_graph(model: nn.Module, example: Tensor, targets: Sequence[str], *,
                 record_all: bool = False, spatial: bool = False,
                 forward_kwargs: Mapping[str, Any] | None = None) -> Captured:
    """``torch.export`` (non-strict) into a graph that reads the model's own tensors.

    The batch is exported dynamic; with ``spatial``, the spatial sizes too where torch can.
    ``Captured.admits`` tells the inputs the graph holds for."""
    if example.shape[0] == 1:  # a batch of 1 would be specialised; export sees 2
        example = torch.cat([example, example])
    kwargs = dict(forward_kwargs or {})
    # In grad mode, so that the model's own no_grad regions are recorded (under no_grad
    # they are no-ops, and gradients would flow through them).
    with TRACE_LOCK.tracing(), preserved(model), torch.enable_grad(), warnings.catch_warnings():
        # A cache the forward fills (timm's attention_bias_cache) is undone by preserved().
        warnings.filterwarnings("ignore", "The tensor attributes .* were assigned during export")
        try:
            ep = _export(model, example, kwargs, spatial)
        except Exception as err:
            raise CaptureError(f"torch.export could not capture {type(model).__name__}: "
                               f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                               ) from err
    signature = ep.graph_signature
    bad = [s for s in signature.output_specs if s.kind.name != "USER_OUTPUT"]
    if bad:
        raise CaptureError(
            f"{type(model).__name__} changes its own state in forward ({bad[0].kind.name.lower()} "
            f"of {bad[0].target!r}); call model.eval() and split again"
        )
    tensors = {**dict(model.named_parameters(remove_duplicate=False)),
               **dict(model.named_buffers(remove_duplicate=False))}
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, Any] = {}
    root: dict[str, Any] = {}
    user_inputs = []
    in_regions: set[str] = set()
    specs = {s.arg.name: s for s in signature.input_specs if hasattr(s.arg, "name")}
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            spec = specs.get(node.name)
            if spec is not None and spec.kind.name == "USER_INPUT" and hasattr(spec.arg, "value"):
                env[node] = spec.arg.value  # a constant forward argument, fixed in the graph
                continue
            if spec is None or spec.kind.name == "USER_INPUT":
                env[node] = graph.placeholder(node.name)
                env[node].meta = dict(node.meta)
                user_inputs.append(env[node])
                continue
            kind = spec.kind.name
            if kind in ("PARAMETER", "BUFFER") and spec.target in tensors:
                value = tensors[spec.target]
            elif spec.target in ep.constants:
                value = ep.constants[spec.target]
            else:
                raise CaptureError(f"torch.export lifted {kind.lower()} {spec.target!r}, which "
                                   f"camfunc cannot find in {type(model).__name__}")
            name = f"_camfunc_{kind.lower()}_{len(root)}"
            root[name] = value
            env[node] = graph.get_attr(name)
            env[node].meta = dict(node.meta)
        elif node.op == "output":
            graph.output(torch.fx.node.map_arg(node.args[0], env.__getitem__))
        elif node.op == "get_attr":  # a higher-order op's body (an autocast region): the op
            # (torch.ops.higher_order.wrap_with_autocast...) runs it, in stages and under torch.func
            name = f"_camfunc_region_{len(root)}"
            root[name] = _fetch(ep.graph_module, target_name(node))
            in_regions |= _stack_paths(root[name].graph, model)
            env[node] = graph.get_attr(name)
            env[node].meta = dict(node.meta)
        else:
            env[node] = graph.node_copy(node, env.__getitem__)
    if len(user_inputs) != 1:
        raise CaptureError(f"the exported graph takes {len(user_inputs)} inputs; camfunc needs model(x)")
    drop_full_masks(graph, user_inputs[0], example)
    out_spec = ep.call_spec.out_spec

    def unflatten(leaves: Any) -> Any:
        return torch.utils._pytree.tree_unflatten(list(leaves), out_spec)

    calls = _calls_from_stack(graph, model, targets, record_all)
    return Captured(graph, root, user_inputs[0], {}, calls, unflatten=unflatten,
                    input_ndim=example.ndim, method="export",
                    admits=_admits(ep, example), example_shape=tuple(example.shape),
                    in_regions=in_regions)


def _stack_paths(graph: torch.fx.Graph, model: nn.Module) -> set[str]:
    """The module paths a graph's nodes run in (their ``nn_module_stack``)."""
    names = {n for n, _ in model.named_modules() if n}
    return {_module_path(value[0] if isinstance(value, tuple) else str(value), names)
            for node in graph.nodes for value in (node.meta.get("nn_module_stack") or {}).values()}


def _calls_from_stack(graph: torch.fx.Graph, model: nn.Module, targets: Sequence[str],
                      record_all: bool) -> dict[str, list[torch.fx.Node]]:
    """Each module call's output: the tensor its scope hands to nodes outside it."""
    names = {n for n, _ in model.named_modules() if n}
    scopes: dict[str, tuple[str, list[torch.fx.Node]]] = {}  # call key -> (module path, nodes)
    for node in graph.nodes:
        for key, value in (node.meta.get("nn_module_stack") or {}).items():
            path = _module_path(value[0] if isinstance(value, tuple) else str(value), names)
            if path and (record_all or path in targets):
                scopes.setdefault(key, (path, []))[1].append(node)
    position = {node: i for i, node in enumerate(graph.nodes)}
    calls: dict[str, list[tuple[int, torch.fx.Node]]] = {}
    for path, nodes in scopes.values():
        inside = set(nodes)
        outs = [n for n in nodes if isinstance(n.meta.get("val"), Tensor)
                and any(u not in inside for u in n.users)]
        if len(outs) != 1:
            if record_all:
                continue
            raise CaptureError(
                f"layer {path!r} hands {len(outs)} tensors to the rest of the exported graph; "
                "pick a layer whose output is a single tensor (an element of a list output, "
                "'layer[i]', is cut only in models torch.fx traces)"
            )
        calls.setdefault(path, []).append((position[nodes[0]], outs[0]))
    return {path: [n for _, n in sorted(found, key=lambda t: t[0])] for path, found in calls.items()}


def traced_copy(model: nn.Module) -> torch.fx.GraphModule:
    """The whole model as a ``GraphModule`` over its own modules (for rewriting a copy)."""
    captured = trace_fx(model, [])
    return torch.fx.GraphModule(captured.root, captured.graph, class_name=type(model).__name__)
