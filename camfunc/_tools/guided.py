"""Guided backpropagation and Guided Grad-CAM, batched and hook-free.

The model is traced with ``torch.fx`` into a copy that shares its modules and
parameters, and every ReLU call in the copy's graph (``nn.ReLU`` modules,
``F.relu``, ``torch.relu``, ``Tensor.relu``, in-place or not) is replaced by a
guided ReLU whose backward passes only positive gradients through positive
inputs. The user's model is never modified.
"""

from __future__ import annotations

import weakref
from typing import Any, TypeGuard

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camfunc._core import engine as _engine, ops as _ops, targets as _targets, validate as _validate
from camfunc._core.cut.cache import prepared
from camfunc._core.cut.capture import traced_copy
from camfunc._core.cut.partition import Stage
from camfunc._core.split import Split, unwrap
from camfunc._methods import gradcam
from camfunc._util.host import syncs


class _GuidedReLU(torch.autograd.Function):
    """ReLU forward; backward ``relu(grad) * [x > 0]`` (Springenberg et al., 2015)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x.clamp_min(0)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        x: Tensor = ctx.saved_tensors[0]
        return grad.clamp_min(0) * (x > 0).to(grad.dtype)


def guided_relu(x: Tensor, inplace: bool = False) -> Tensor:
    out: Tensor = _GuidedReLU.apply(x)
    return out


_RELU_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_}


_GUIDED_MARK = "camfunc_guided"


def _guided_source(model: nn.Module) -> nn.Module | None:
    """The model a guided copy was traced from (its modes are checked); None for other models."""
    meta = getattr(model, "meta", None)
    if not isinstance(model, torch.fx.GraphModule) or not isinstance(meta, dict) or _GUIDED_MARK not in meta:
        return None
    return meta[_GUIDED_MARK]() or model  # the source, or the copy itself once the source is gone


def _is_guided(model: nn.Module) -> TypeGuard[torch.fx.GraphModule]:
    return isinstance(model, torch.fx.GraphModule) and _GUIDED_MARK in getattr(model, "meta", {})


def guided_model(model: nn.Module) -> torch.fx.GraphModule:
    """A traced copy of ``model`` whose ReLUs backpropagate as guided ReLUs.

    The copy is cached per model (traced again when one of its modules,
    parameters or buffers is replaced), so :func:`guided_backprop` traces once.
    Pass the copy to :func:`guided_backprop` (or ``guided=`` of
    :func:`guided_gradcam`) to compile them: tracing cannot run inside ``torch.compile``.

    Example:
        >>> guided = camfunc.guided_model(model)          # a traced copy; model is untouched
        >>> torch.equal(guided(x), model(x))
        True
        >>> camfunc.guided_backprop(guided, x, 3).shape   # also inside torch.compile(fullgraph=True)
        torch.Size([2, 3, 64, 64])
    """
    if _is_guided(model):
        return model
    _validate.refuse_while_compiling(
        "the guided copy of the model cannot be traced inside torch.compile; prepare it outside: "
        "guided = camfunc.guided_model(model), then pass guided to guided_backprop, or "
        "guided=guided to guided_gradcam")
    return prepared("guided", unwrap(model), _rewrite)


def _rewrite(model: nn.Module) -> torch.fx.GraphModule:
    gm = traced_copy(model)
    for node in gm.graph.nodes:
        is_module = node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.ReLU)
        is_function = node.op == "call_function" and node.target in _RELU_FUNCTIONS
        is_method = node.op == "call_method" and node.target in ("relu", "relu_")
        if is_module or is_function or is_method:
            node.op, node.target = "call_function", guided_relu
            node.args, node.kwargs = node.args[:1], {}
    gm.recompile()
    # Our own copy: noting its source in its meta changes nothing of the user's. The
    # copy is cached per model, so it holds its source weakly.
    gm.meta[_GUIDED_MARK] = weakref.ref(model)
    return gm


# An autograd.Function under functorch transforms compiles only on recent torch.
_GUIDED_SINCE = (2, 11)


@_validate.compiles_since(_GUIDED_SINCE)
@syncs(None)
def guided_backprop(model: nn.Module, x: Tensor, cls: _targets.Target, *,
                    chunk_size: int | None = None, return_scores: bool = False) -> Any:
    r"""Guided backpropagation: input gradients through ReLUs that pass only positive signal.

    .. math:: \frac{\partial S}{\partial x} \text{ with each ReLU's backward }
              R^{(l)} = \mathrm{ReLU}(R^{(l+1)}) \odot [f^{(l)} > 0]

    The whole batch and every requested class in one vjp (``vmap`` over
    classes), unlike pytorch-grad-cam's, which takes one image and swaps the
    model's ReLU modules while it runs. Returns signed gradients ``(B, *x.shape[1:])``
    or ``(B, K, *x.shape[1:])``; not normalised.

    Springenberg et al., "Striving for Simplicity: The All Convolutional Net",
    ICLR Workshop 2015.

    Example:
        >>> camfunc.guided_backprop(model, x, 3).shape
        torch.Size([2, 3, 64, 64])
        >>> camfunc.guided_backprop(model, x, camfunc.topk(2)).shape
        torch.Size([2, 2, 3, 64, 64])
    """
    _validate.check_compilable("guided_backprop", _GUIDED_SINCE)
    if not isinstance(model, nn.Module):
        raise TypeError(f"guided_backprop takes the model, got {type(model).__name__}")
    guided = guided_model(model)
    split = Split(lambda v: v, Stage(guided), model=_guided_source(guided))
    split = _validate.check_call(split, x)
    _targets.check_form(cls, x.shape[0])

    def gradients(acts: tuple[Tensor, ...], grads: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return grads

    (maps,), scores = _engine.class_maps(split, x, cls, gradients, chunk_size=chunk_size)
    maps = _validate.nonfinite_maps(maps, x)  # guided ReLUs turn a NaN gradient into 0
    return (maps, scores) if return_scores else maps


@_validate.compiles_since(_GUIDED_SINCE)  # it calls guided_backprop
@syncs(None)
def guided_gradcam(split: Split, x: Tensor, cls: _targets.Target, *,
                   guided: torch.fx.GraphModule | None = None, chunk_size: int | None = None,
                   return_scores: bool = False) -> Any:
    r"""Guided Grad-CAM: guided backpropagation weighted by the upsampled Grad-CAM.

    .. math:: G = \frac{\partial^{\text{guided}} S}{\partial x} \odot \mathrm{up}(L_{\text{Grad-CAM}})

    The guided part needs the whole model, taken from ``split.model`` (set by
    :func:`camfunc.split`). Grad-CAM is normalised before weighting, as usual.
    With several layers, their Grad-CAMs are fused by the mean.

    Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via
    Gradient-based Localization", ICCV 2017.

    Example:
        >>> s = camfunc.split(model, "layer4")            # the guided part runs s.model whole
        >>> camfunc.guided_gradcam(s, x, 3).shape
        torch.Size([2, 3, 64, 64])
    """
    whole = split.model if isinstance(split, Split) and guided is None else guided
    if not isinstance(split, Split) or whole is None:
        raise ValueError("guided_gradcam needs split.model: build the split with camfunc.split, "
                         "or pass model= to camfunc.Split")
    gradients, scores = guided_backprop(whole, x, cls, chunk_size=chunk_size, return_scores=True)
    maps = gradcam(split, x, cls, chunk_size=chunk_size)
    cams = maps if isinstance(maps, list) else [maps]
    size = tuple(x.shape[2:])
    heat = torch.stack([_ops.upsample(c, size) for c in cams]).mean(0)
    weighted = gradients * heat.unsqueeze(-len(size) - 1)
    return (weighted, scores) if return_scores else weighted
