"""The gradient engine: ``(split, x, cls) -> maps``, one vjp for every class.

1. The head runs with no autograd graph.
2. Each later stage runs under ``torch.func.vjp`` with respect to the
   activations entering it (cloned inside, so in-place ops cannot touch them).
3. Cotangents for all requested classes are built from the scores of that one
   forward pass, and ``torch.func.vmap`` pulls them back through the chain of
   vjps, so K classes cost one forward and one batched backward.
4. A method's ``per_class(acts, grads)`` turns each class's gradients into
   maps *inside* the vmap, so the (K, B, C, *spatial) gradients are never all
   alive at once when ``chunk_size`` is set.

Each entry point that takes ``x`` runs the split bound to it (:meth:`Split.bound`:
a capture that holds for ``x``'s size); ``run_from`` takes the carry of the split it
is given. Everything runs under ``torch.no_grad()``: ``vjp`` still differentiates inside,
and no graph to the model's parameters is built. With ``differentiable=True`` the
same steps run with grad enabled, so the maps carry a graph to the parameters (and
to ``x``); eagerly, the tail then runs as an ordinary forward and ``G`` comes from
``torch.autograd.grad(..., create_graph=True)``, class by class, because layers that
update state in training mode (batch norm's running statistics) cannot run inside
``torch.func.vjp``. Compiled, the ``vjp`` path runs with grad enabled.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor

from camfunc._core import targets as _targets
from camfunc._core.cut.lock import holding_calls
from camfunc._core.layout import LayoutTag
from camfunc._core.split import Split, as_tuple, math_twin, run_chain, run_stage

# PyTorch's forward-AD levels are process-wide, not per thread: two threads in
# ``jvp`` at once corrupt each other's level. Eager calls take turns there.
_FORWARD_AD_LOCK = threading.Lock()


@contextlib.contextmanager
def _forward_ad_turn() -> Iterator[None]:
    # The fused CPU attention kernels have no forward-AD formula; the math one has.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with _FORWARD_AD_LOCK, sdpa_kernel([SDPBackend.MATH]):
        yield


PerClass = Callable[[tuple[Tensor, ...], tuple[Tensor, ...]], tuple[Tensor, ...]]


def _is_float_tensor(value: Any) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point()


def stage_vjp(stage: Callable[..., Any], carry: tuple[Any, ...], *, context_is_constant: bool,
               objective: Callable[[Any], Any] | None = None
               ) -> tuple[Any, Callable[..., tuple[Tensor, ...]], Any]:
    """vjp of one stage with respect to ``A`` (and floating context that depends on it).

    Context computed by the head does not depend on the first ``A``, so it is
    held constant there. The full outputs travel as aux: their tensors through
    the vjp, everything else (shapes, layout tags, None) beside it.
    Returns ``(differentiable outputs, vjp_fn, full outputs)``.
    """
    a, context = carry[0], carry[1:]
    varying = () if context_is_constant else tuple(
        i for i, c in enumerate(context) if _is_float_tensor(c))
    structure: dict[str, Any] = {}

    def stage_fn(a: Tensor, *varying_values: Tensor) -> tuple[Any, tuple[Tensor, ...]]:
        full = list(context)
        for i, value in zip(varying, varying_values, strict=True):
            full[i] = value.clone()
        out = stage(a.clone(), *full)
        leaves, structure["spec"] = torch.utils._pytree.tree_flatten(out)
        # Only the non-tensor part leaves the transform (torch 2.4 cannot compile otherwise).
        structure["template"] = [None if isinstance(v, Tensor) else (v,) for v in leaves]
        tensors = tuple(v for v in leaves if isinstance(v, Tensor))
        if objective is not None:
            value = objective(out)
            if not isinstance(value, Tensor):
                _targets.objective_rows(value)  # raises the callable cls's type error
            _check_depends(value)
            return value, tensors
        return tuple(o for o in as_tuple(out) if _is_float_tensor(o)), tensors

    primals = (a, *(context[i] for i in varying))
    vjp_result = torch.func.vjp(stage_fn, *primals, has_aux=True)
    assert len(vjp_result) == 3  # has_aux=True: (outputs, pullback, aux)
    differentiable, pullback, tensors = vjp_result
    unwrapped = iter(tensors)
    leaves = [next(unwrapped) if v is None else v[0] for v in structure["template"]]
    return differentiable, pullback, torch.utils._pytree.tree_unflatten(leaves, structure["spec"])


def _check_depends(value: Tensor) -> None:
    """The target must depend on the activations, or the map is silently all zeros.

    Inside the function ``vjp`` differentiates, a value that depends on its
    input requires grad. Checked eagerly only, as the class range check is.
    """
    if torch.compiler.is_dynamo_compiling():
        return
    if not value.requires_grad:
        raise ValueError(
            "the target scores do not depend on the layer's activations (a detached tensor, "
            "or scores from something else than the output given to cls), so no gradient can "
            "reach the layer; compute the scores from the model's output, and pick a layer the "
            "output depends on"
        )


# torch.compile of vmap over a vjp's pullback fails before torch 2.5
# ("Cannot access storage of TensorWrapper"); there, compiled code loops over classes.
_VMAP_PULLBACK_COMPILES = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def over_classes(fn: Callable[[Tensor], Any], cotangents: Tensor, chunk_size: int | None, *,
                 loop: bool = False) -> Any:
    """``fn`` of each class's cotangent, stacked on a new leading axis: one ``vmap``
    (a loop when ``loop``: ``torch.autograd.grad`` cannot run under ``vmap``)."""
    if loop or cotangents.shape[0] == 1 or (torch.compiler.is_dynamo_compiling() and not _VMAP_PULLBACK_COMPILES):
        outs = []
        for cotangent in cotangents.unbind(0):  # a plain loop: torch 2.4 cannot compile a
            outs.append(fn(cotangent))          # pullback called from a comprehension
        if isinstance(outs[0], Tensor):
            return torch.stack(outs)
        return tuple(torch.stack(parts) for parts in zip(*outs, strict=True))
    return torch.func.vmap(fn, chunk_size=chunk_size)(cotangents)


@holding_calls
def head(split: Split, x: Tensor) -> tuple[Any, ...]:
    """What the head hands on, ``(A, *context)``, with no graph."""
    split = split.bound(x, check_model=False)
    with torch.no_grad():
        return as_tuple(split.head(x))


@holding_calls
def forward(split: Split, x: Tensor, *, differentiable: bool = False) -> tuple[tuple[Tensor, ...], Any]:
    """Activations at every cut and the model's output, with no graph unless ``differentiable``."""
    found, out = carries(split, x, differentiable=differentiable)
    return tuple(carry[0] for carry in found), out


class Pulled(NamedTuple):
    """One forward pass, ready to be pulled back: what :func:`pullback` returns."""

    acts: tuple[Tensor, ...]                        # A at every cut, chain order
    out: Tensor                                     # the differentiated value: scores or objective
    scores: Any                                     # the model's output
    pull: Callable[[Tensor], tuple[Tensor, ...]]    # cotangent of ``out`` -> G at every cut
    batches: bool = True                            # ``vmap`` may batch ``pull`` over classes


Stages = tuple[tuple[Callable[..., Any], ...], Callable[..., Any]]


def differentiated(split: Split, *, twins: bool) -> Stages:
    """``(middle, tail)``: the stages a vjp differentiates, with their attention on the math
    kernel when ``twins`` (for ``vmap`` and forward AD), else as the model runs it (fused)."""
    if not twins:
        return split.middle, split.tail
    return tuple(math_twin(stage) for stage in split.middle), math_twin(split.tail)


def keeps_fused(split: Split) -> bool:
    """Whether a differentiated stage runs fused attention, whose backward ``vmap`` cannot batch."""
    return any(math_twin(stage) is not stage for stage in (*split.middle, split.tail))


def autograd_path(differentiable: bool) -> bool:
    """Whether a call pulls back with ``torch.autograd.grad`` (differentiable maps, eagerly)."""
    return differentiable and not torch.compiler.is_dynamo_compiling()


def _autograd_pullback(split: Split, x: Tensor, objective: Callable[[Any], Tensor] | None,
                       *, differentiable: bool = True) -> Pulled:
    """:func:`pullback` as one ordinary forward, with ``G`` from ``torch.autograd.grad``
    (``create_graph=True`` when ``differentiable``): batch norm in training mode updates its
    statistics once, as in the forward, and dropout's masks are the forward's. Not
    ``differentiable`` (a split whose stages ``torch.func`` cannot transform): the head runs
    without a graph and the backward starts at ``A``."""
    # Double backward (a loss on the maps) needs attention's math kernel.
    middle, tail = differentiated(split, twins=differentiable)
    if not differentiable:
        with torch.no_grad():
            carry = as_tuple(split.head(x))
        carry = (carry[0].detach().requires_grad_(), *carry[1:])
    else:
        carry = as_tuple(split.head(x))
    if not carry[0].requires_grad:  # no graph to keep (frozen head, x without grad): the vjp
        return _vjp_pullback((middle, tail), carry, objective)
    found = [carry, *run_chain(middle, carry)]
    acts = [c[0] for c in found]
    scores = run_stage(tail, found[-1])
    out = (objective if objective is not None else _targets.class_scores)(scores)
    if not isinstance(out, Tensor):
        _targets.objective_rows(out)  # raises the callable cls's type error
    _check_depends(out)

    # The graph is kept for the next class (and, create_graph, for the loss's own backward).
    def pull(cotangent: Tensor, out: Tensor = out, acts: tuple[Tensor, ...] = tuple(acts)) -> tuple[Tensor, ...]:
        grads = torch.autograd.grad(out, acts, cotangent, create_graph=differentiable,
                                    retain_graph=True)
        return grads if differentiable else tuple(g.detach() for g in grads)

    if not differentiable:  # the caller sees the output as the vjp path gives it: no graph
        scores = torch.utils._pytree.tree_map(
            lambda t: t.detach() if isinstance(t, Tensor) else t, scores)
    return Pulled(tuple(acts), out, scores, pull, batches=False)


def _vjp_pullback(stages: Stages, carry: tuple[Any, ...], objective: Callable[[Any], Tensor] | None,
                  *, batches: bool = True) -> Pulled:
    """:func:`pullback` from the head's output: each later stage under ``vjp``."""
    middle, tail = stages
    acts = [carry[0]]
    pullbacks = []
    for i, stage in enumerate(middle):
        _, stage_pullback, carry = stage_vjp(stage, carry, context_is_constant=(i == 0))
        pullbacks.append(stage_pullback)
        acts.append(carry[0])
    out, pull_tail, scores = stage_vjp(
        tail, carry, context_is_constant=len(middle) == 0,
        objective=objective if objective is not None else _targets.class_scores)

    # Pullbacks come in as defaults, not closure cells: torch 2.4's compiler
    # cannot call a pullback held in a closure cell.
    def pull(cotangent: Tensor, pull_tail: Callable[..., tuple[Tensor, ...]] = pull_tail,
             pullbacks: tuple[Callable[..., tuple[Tensor, ...]], ...] = tuple(pullbacks)
             ) -> tuple[Tensor, ...]:
        grads = pull_tail(cotangent)
        layer_grads = [grads[0]]
        for stage_pullback in reversed(pullbacks):
            grads = stage_pullback(grads)
            layer_grads.append(grads[0])
        return tuple(reversed(layer_grads))

    return Pulled(tuple(acts), out, scores, pull, batches)


@holding_calls
def pullback(split: Split, x: Tensor, objective: Callable[[Any], Tensor] | None = None, *,
             differentiable: bool = False) -> Pulled:
    """The model's forward with each stage under ``vjp``: ``vjp`` of ``(split, x)``.

    ``out`` is the model's class scores ``(B, classes)``, or ``objective(output)``
    when given; ``pull(cotangent)`` returns the gradient of ``<cotangent, out>``
    with respect to the activations at every cut. The head runs without a graph,
    unless ``differentiable`` (see the module's docstring).

    The stages run the model's own attention, fused kernels included, so one class
    costs what the model's own backward does; ``batches`` is then False and callers
    pull classes back one at a time (a fused kernel's backward has no ``vmap`` rule).
    Differentiable maps run attention by its math kernel, which has a double backward.
    """
    split = split.bound(x, check_model=False)
    if autograd_path(differentiable) or not split.functional:
        with torch.enable_grad():
            return _autograd_pullback(split, x, objective, differentiable=differentiable)
    with torch.set_grad_enabled(differentiable):
        twins = differentiable  # compiled differentiable maps: a double backward too
        return _vjp_pullback(differentiated(split, twins=twins), as_tuple(split.head(x)), objective,
                             batches=twins or not keeps_fused(split))


def layer_maps(maps: tuple[Tensor, ...], keep_k: bool) -> tuple[Tensor, ...]:
    """:func:`over_classes`' ``(K, B, *sp)`` maps, one per layer, as ``(B, K, *sp)``, or
    ``(B, *sp)`` when the caller asked for one class per sample."""
    maps = tuple(m.movedim(0, 1) for m in maps)
    return maps if keep_k else tuple(m.squeeze(1) for m in maps)


@holding_calls
def class_maps(split: Split, x: Tensor, cls: _targets.Target,
               per_class: PerClass, *, chunk_size: int | None = None,
               differentiable: bool = False) -> tuple[tuple[Tensor, ...], Any]:
    """Maps for every requested class, one tuple entry per layer, and the scores.

    :func:`pullback`, the cotangents ``cls`` asks for, and ``per_class(acts, grads)``
    of each class's gradients under :func:`over_classes`. Each map is
    ``(B, K, *spatial)`` when ``cls`` asked for K classes per sample (a ``(B, K)``
    tensor, ``topk``, or a callable returning ``(B, K)``), else ``(B, *spatial)``.
    """
    split = split.bound(x, check_model=False)
    with torch.set_grad_enabled(differentiable):
        pulled = pullback(split, x, cls if _targets.is_objective(cls) else None,
                          differentiable=differentiable)
        cotangents, keep_k = _targets.cotangents_for(cls, pulled.out, pulled.scores, x.shape[0])

        def maps_for(cotangent: Tensor, pull: Callable[[Tensor], tuple[Tensor, ...]] = pulled.pull,
                     acts: tuple[Tensor, ...] = pulled.acts) -> tuple[Tensor, ...]:
            return per_class(acts, pull(cotangent))

        maps = over_classes(maps_for, cotangents, chunk_size, loop=not pulled.batches)
        return layer_maps(maps, keep_k), pulled.scores


@holding_calls
def smoothed_class_maps(split: Split, noisy: Tensor, copies: int, batch: int, cls: _targets.Target,
                        scores: Any, per_class: Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]],
                        *, chunk_size: int | None = None,
                        differentiable: bool = False) -> tuple[Tensor, ...]:
    """:func:`class_maps` of ``copies`` noisy copies of a ``batch`` of samples stacked in
    ``noisy``, the classes fixed on the clean batch's ``scores``: ``per_class(grads)`` gets
    each class's gradients at every copy."""
    if _targets.is_objective(cls):  # read block by block on the noisy batch
        objective = _targets.tiled_objective(cls, copies, lambda: scores, batch)
        pulled = pullback(split, noisy, objective, differentiable=differentiable)
        cotangents, keep_k = _targets.objective_rows(pulled.out, noisy.shape[0])
    else:
        pulled = pullback(split, noisy, differentiable=differentiable)
        index, keep_k = _targets.class_indices(cls, scores)
        cotangents = _targets.one_hot_rows(index.repeat(copies, 1), pulled.out)

    def maps_for(cotangent: Tensor, pull: Callable[[Tensor], tuple[Tensor, ...]] = pulled.pull) -> tuple[Tensor, ...]:
        return per_class(pull(cotangent))

    with torch.set_grad_enabled(differentiable):
        maps = over_classes(maps_for, cotangents, chunk_size, loop=not pulled.batches)
    return layer_maps(maps, keep_k)


@holding_calls
def carries(split: Split, x: Tensor, *, differentiable: bool = False) -> tuple[list[tuple[Any, ...]], Any]:
    """What enters the stage after each cut, ``(A_i, *context)``, and the output; no graph
    unless ``differentiable``."""
    split = split.bound(x, check_model=False)
    with torch.set_grad_enabled(differentiable):
        carry = as_tuple(split.head(x))
        found = [carry, *run_chain(split.middle, carry)]
        return found, run_stage(split.tail, found[-1])


@holding_calls
def run_from(split: Split, layer: int, carry: tuple[Any, ...]) -> Any:
    """The model from cut ``layer`` on: later middles, then the tail."""
    return _run_stages((split.middle, split.tail), layer, carry)


def _run_stages(stages: Stages, layer: int, carry: tuple[Any, ...]) -> Any:
    middle, tail = stages
    return run_stage(tail, [carry, *run_chain(middle[layer:], carry)][-1])


@holding_calls
def curvature_maps(split: Split, x: Tensor, objective_for: Callable[[Any], Callable[[Any], Tensor]],
                   per_class: Callable[[Tensor, Tensor, Tensor], Tensor], *,
                   chunk_size: int | None = None,
                   differentiable: bool = False) -> tuple[tuple[Tensor, ...], Any]:
    """Maps from ``(A, G, H A)``, with ``H`` the Hessian of the objective at ``A``.

    ``G`` comes from ``vjp`` and ``H A`` from ``jvp`` of that vjp along ``A``
    (forward-over-reverse), per class under ``vmap``; never a double backward.
    Tokens a layout set aside from the grid are part of ``A`` in ``H A``.
    ``objective_for(scores)`` builds the objective from the clean forward's
    scores (so classes such as topk are fixed once, without a second forward);
    ``objective(output)`` returns ``(B,)`` or ``(B, K)``. Each layer is
    differentiated from its own cut to the output. Forward AD is not thread-safe
    in PyTorch, so concurrent eager calls take turns inside this function. With
    ``differentiable``, the same transforms run with grad enabled.
    """
    split = split.bound(x, check_model=False)
    found, scores = carries(split, x, differentiable=differentiable)
    objective = objective_for(scores)
    with torch.set_grad_enabled(differentiable):
        if torch.compiler.is_dynamo_compiling():  # torch 2.4 cannot compile the context manager
            return _curvature_layers(split, found, objective, per_class, chunk_size, x.shape[0]), scores
        with _forward_ad_turn():
            return _curvature_layers(split, found, objective, per_class, chunk_size, x.shape[0]), scores


def _sets_tokens_aside(context: tuple[Any, ...]) -> bool:
    """A grid's carry: ``(aside, LayoutTag, ...)`` follows it; ``aside`` may hold no tokens."""
    return len(context) >= 2 and isinstance(context[1], LayoutTag) and isinstance(context[0], Tensor) \
        and context[0].numel() > 0


def _curvature_layers(split: Split, found: list[tuple[Any, ...]], objective: Callable[[Any], Tensor],
                      per_class: Callable[[Tensor, Tensor, Tensor], Tensor], chunk_size: int | None,
                      batch: int) -> tuple[Tensor, ...]:
    stages = differentiated(split, twins=True)  # forward AD: the math kernel has its formula
    maps: list[Tensor] = []
    for layer, carry in enumerate(found):
        a, context = carry[0], carry[1:]
        # Tokens set aside from the grid (a class token) are activations of the layer
        # too: H A moves them along with the grid, as the layer's whole output would.
        aside = context[0] if _sets_tokens_aside(context) else None
        rest = context[1:] if aside is not None else context

        def objective_at(v: Tensor, w: Tensor | None, layer: int = layer, rest: tuple = rest) -> Tensor:
            return objective(_run_stages(stages, layer, (v, *((w,) if w is not None else ()), *rest)))

        cotangents, keep_k = _targets.objective_rows(objective_at(a, aside), batch)

        def maps_for(cotangent: Tensor, a: Tensor = a, aside: Tensor | None = aside,
                     objective_at: Callable[[Tensor, Tensor | None], Tensor] = objective_at
                     ) -> Tensor:
            def gradient(v: Tensor, w: Tensor | None) -> Tensor:
                grad: Tensor = torch.func.vjp(lambda u: objective_at(u, w), v)[1](cotangent)[0]
                return grad
            if aside is None:
                g_and_hvp = torch.func.jvp(lambda v: gradient(v, None), (a,), (a,))
            else:
                g_and_hvp = torch.func.jvp(gradient, (a, aside), (a, aside))
            return per_class(a, g_and_hvp[0], g_and_hvp[1])

        maps.extend(layer_maps((over_classes(maps_for, cotangents, chunk_size),), keep_k))
    return tuple(maps)
