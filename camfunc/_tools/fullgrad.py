"""FullGrad: input-gradient and bias-gradient maps of every biased layer, summed.

The model is traced into a copy (sharing its modules) in which a zero "probe"
tensor is added to the output of every convolution and batch norm that has a
bias. The gradient with respect to a probe is the gradient at that layer's
output, so one ``vjp`` with respect to the input and the probes gives them all,
for every class at once under ``vmap``, and never with respect to a parameter.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

from camfunc._core import engine as _engine, ops as _ops, targets as _targets, validate as _validate
from camfunc._core.cut.cache import prepared
from camfunc._core.cut.capture import traced_copy
from camfunc._core.cut.partition import Stage
from camfunc._core.split import Split
from camfunc._methods._projection import first_component
from camfunc._util.host import syncs

_BIASED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def effective_bias(layer: nn.Module) -> Tensor:
    """A conv's bias; a batch norm's ``beta - mean * gamma / sqrt(var + eps)`` (eval mode)."""
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        mean, var = layer.running_mean, layer.running_var
        if mean is None or var is None:
            raise ValueError(f"fullgrad needs the running statistics of {type(layer).__name__} "
                             "layers; this one has none (track_running_stats=False)")
        scale = layer.weight if layer.weight is not None else torch.ones_like(var)
        shift = layer.bias if layer.bias is not None else torch.zeros_like(mean)
        return shift - mean * scale / torch.sqrt(var + layer.eps)
    if not isinstance(layer.bias, Tensor):
        raise ValueError(f"{type(layer).__name__} has no bias: fullgrad probes biased layers only")
    return layer.bias


@dataclasses.dataclass(frozen=True)
class FullGradModel:
    """A model prepared for FullGrad: traced copies sharing its modules, built once.

    ``probed(x, *probes)`` adds probe i to biased layer i's output;
    ``layer_outputs(x)`` returns those outputs (only their shapes are used).
    """

    model: nn.Module
    probed: torch.fx.GraphModule
    layer_outputs: torch.fx.GraphModule
    layers: tuple[nn.Module, ...]


def _called_module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> nn.Module:
    """The module a ``call_module`` node calls."""
    assert isinstance(node.target, str)  # torch.fx names the module it calls
    return gm.get_submodule(node.target)


def _biased_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module"
            and isinstance(_called_module(gm, n), _BIASED)
            and _called_module(gm, n).bias is not None]


def _probed(model: nn.Module) -> torch.fx.GraphModule:
    """A traced copy taking ``(x, *probes)``; probe i is added to biased layer i's output."""
    gm = traced_copy(model)
    graph = gm.graph
    targets = _biased_nodes(gm)
    anchor = next(n for n in graph.nodes if n.op == "placeholder")
    probes = []
    for i in range(len(targets)):
        with graph.inserting_after(anchor):
            anchor = graph.placeholder(f"probe_{i}")
        probes.append(anchor)
    for node, probe in zip(targets, probes, strict=True):
        with graph.inserting_after(node):
            shifted = graph.call_function(operator.add, (node, probe))
        node.replace_all_uses_with(shifted, delete_user_cb=functools.partial(operator.is_not, shifted))
    gm.recompile()
    return gm


def _layer_outputs(model: nn.Module) -> torch.fx.GraphModule:
    """A traced copy ``x -> (output of each biased layer, ...)``."""
    gm = traced_copy(model)
    graph = gm.graph
    (output,) = [n for n in graph.nodes if n.op == "output"]
    output.args = (tuple(_biased_nodes(gm)),)
    graph.eliminate_dead_code()
    gm.recompile()
    return gm


def fullgrad_model(model: nn.Module | Split | FullGradModel) -> FullGradModel:
    """Prepare ``model`` for :func:`fullgrad` once; needed to compile FullGrad.

    Tracing cannot happen inside ``torch.compile``, so compile a function of the
    prepared model. The user's model is not changed; the copies share its modules.

    Example:
        >>> prepared = camfunc.fullgrad_model(model)      # trace once, outside torch.compile
        >>> camfunc.fullgrad(prepared, x, 3).shape        # this call compiles with fullgraph=True
        torch.Size([2, 64, 64])
    """
    if isinstance(model, FullGradModel):
        return model
    model = _validate.whole_model(model, "fullgrad")
    return FullGradModel(model, *prepared("fullgrad", model, _prepare))


def _prepare(model: nn.Module) -> tuple:
    """The traced copies; cached per model, so they must not hold the model itself."""
    probed = _probed(model)
    layers = tuple(_called_module(probed, n) for n in _biased_nodes(probed))
    return probed, _layer_outputs(model), layers


def _objective(cls: _targets.Target) -> Callable[[Any], Tensor]:
    """The score the vjp pulls back: a callable ``cls`` itself, else the class scores."""
    if callable(cls) and _targets.is_objective(cls):  # callable() narrows the type
        return cls
    return _targets.class_scores


def _channel_normalised_sum(m: Tensor) -> Tensor:
    """``sum_c normalize(m_c)``: each channel min-max scaled on its own, ``(B, C, *sp) -> (B, *sp)``."""
    return _ops.normalize(m, spatial_dims=m.ndim - 2).sum(1)


def _eigen_smoothed(input_terms: Tensor, layer_maps: list[Tensor], size: tuple[int, ...]) -> Tensor:
    """The maps' first principal component, as pytorch-grad-cam's FullGrad computes it: one
    map per input channel and one per biased layer, each min-max scaled and shrunk 8-fold
    (the layers are many), projected, scaled back up."""
    stacked = torch.cat([input_terms, torch.stack(layer_maps, 1)], 1)  # (B, C_in + L, *size)
    small = tuple(max(1, s // 8) for s in size)
    reduced = _ops.upsample(_ops.normalize(stacked, spatial_dims=len(size)), small)
    projected = first_component(reduced)
    return _ops.upsample(_ops.normalize(projected, spatial_dims=len(size)), size)


@syncs(None)
def fullgrad(model: nn.Module | Split | FullGradModel, x: Tensor, cls: _targets.Target, *, normalize: bool = True,
             return_scores: bool = False, chunk_size: int | None = None,
             eigen_smooth: bool = False) -> Any:
    r"""FullGrad: the input-gradient map plus every biased layer's bias-gradient map.

    .. math:: L = \psi\big(|x \odot \nabla_x S|\big) + \sum_{l}\sum_{c}
              \psi\big(|b_c^{(l)} \, \nabla_{z^{(l)}_c} S|\big)

    with :math:`\psi` per-channel min-max scaling then upsampling to the
    input's size, and :math:`b^{(l)}` the (effective) bias of each
    convolution and batch norm with one, :math:`z^{(l)}` its output; as
    pytorch-grad-cam's ``FullGrad``. Takes the model, or a split whose model
    is used whole (the cut is ignored). The model is traced once into a copy,
    cached per model (and traced again when one of its modules, parameters or
    buffers is replaced), and each call runs one extra forward pass to learn the
    probes' shapes. To compile, prepare the model once with :func:`fullgrad_model`
    and pass that: tracing cannot run inside ``torch.compile``. Only the shapes
    of the extra pass's outputs are used, so a compiler is free to drop its arithmetic.

    With ``eigen_smooth``, the terms (one map per input channel and one per
    biased layer, at the input's size) are collapsed by their first principal
    component instead of summed, as pytorch-grad-cam's option: each min-max
    scaled and shrunk 8-fold first, the projection scaled back up; camfunc's
    sign rule (largest magnitude positive) replaces the SVD's arbitrary sign.

    Srinivas & Fleuret, "Full-Gradient Representation for Neural Network
    Visualization", NeurIPS 2019.

    Example:
        >>> camfunc.fullgrad(model, x, 3).shape
        torch.Size([2, 64, 64])
        >>> camfunc.fullgrad(model, x, camfunc.topk(2)).shape
        torch.Size([2, 2, 64, 64])
    """
    prepared = fullgrad_model(model)
    model, gm = prepared.model, prepared.probed
    _validate.check_call(Split(lambda v: v, model, model=model), x)
    _targets.check_form(cls, x.shape[0])
    size = tuple(x.shape[2:])
    with torch.no_grad():
        probes = [torch.zeros_like(z) for z in Stage(prepared.layer_outputs)(x)]
        biases = [effective_bias(layer).float() for layer in prepared.layers]

    probed = Stage(gm)  # runs under the trace lock

    def tail(v: Tensor, *zs: Tensor) -> Tensor:
        return cast(Tensor, probed(v, *zs))

    def per_class(acts: tuple[Tensor, ...], grads: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        input_grad, probe_grads = grads[0], grads[1:]
        input_terms = (acts[0].float() * input_grad.float()).abs()  # (B, C_in, *size)
        input_terms = _ops.normalize(input_terms, spatial_dims=input_terms.ndim - 2)
        layer_maps = []
        for bias, g in zip(biases, probe_grads, strict=True):
            shape = (1, -1, *(1,) * (g.ndim - 2))
            layer_map = _channel_normalised_sum((bias.reshape(shape) * g.float()).abs())
            layer_maps.append(_ops.upsample(layer_map, size))
        if eigen_smooth:
            total = _eigen_smoothed(input_terms, layer_maps, size)
        else:
            total = input_terms.sum(1)
            for layer_map in layer_maps:
                total = total + layer_map
        return (_ops.normalize(total, spatial_dims=len(size)) if normalize else total,)

    # One vjp of the whole probed model, with respect to the input and every probe.
    with torch.no_grad():
        out, pull, scores = _engine.stage_vjp(
            tail, (x, *probes), context_is_constant=False,
            objective=_objective(cls))
        cotangents, keep_k = _targets.cotangents_for(cls, out, scores, x.shape[0])

        def maps_for(cotangent: Tensor, pull: Callable[..., Any] = pull) -> tuple[Tensor, ...]:
            return per_class((x,), tuple(pull(cotangent)))

        (maps,) = _engine.layer_maps(_engine.over_classes(maps_for, cotangents, chunk_size), keep_k)
    maps = _validate.nonfinite_maps(maps)
    return (maps, scores) if return_scores else maps
