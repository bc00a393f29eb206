"""What a captured graph says about a layer output's feature axis.

Walking back from the output through element-wise ops, the nearest
producers on each path are either channels-first ops (convolutions, batch
and group norm, pooling) or feature-last ops (linear layers, layer norm).
A reshape, permute or unknown op ends a path with no say. When every path
that says anything agrees, that is the evidence; otherwise there is none.

Used only where the activation's shape against the input's leaves the layout
open (see ``camfunc._core.layout``), for instance a ``(B, 16, 16, 16)`` map of a
64x64 image, or any 1-D model.
"""

from __future__ import annotations

import operator
from typing import Literal

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from camfunc._core.cut.capture import Captured

__all__ = ["feature_axis", "prefix_tokens_hint"]

Axis = Literal["first", "last"]
Role = Literal["first", "last", "pass", "stop"]  # a producer's say: an axis, look through, or none

_FIRST_MODULES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm,
    nn.LocalResponseNorm, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
    nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle,
)
_LAST_MODULES = (nn.Linear, nn.Bilinear, nn.LayerNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Threshold, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.Identity,
)
_FIRST_FUNCTIONS = {
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    torch.conv1d, torch.conv2d, torch.conv3d, F.batch_norm, F.instance_norm, F.group_norm,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.pixel_shuffle,
}
_LAST_FUNCTIONS = {F.linear, F.layer_norm} | ({F.rms_norm} if hasattr(F, "rms_norm") else set())
_PASS_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd,
    operator.imul, torch.add, torch.sub, torch.mul, torch.div, torch.relu, torch.relu_,
    torch.sigmoid, torch.tanh, torch.clamp, F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.leaky_relu, F.elu, F.selu, F.sigmoid, F.tanh, F.dropout,
    F.dropout1d, F.dropout2d, F.dropout3d,
}
_PASS_METHODS = {"relu", "relu_", "add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_",
                 "sigmoid", "tanh", "clamp", "clamp_", "clamp_min", "clamp_min_", "contiguous",
                 "clone", "float", "half", "to", "type_as", "neg", "sigmoid_"}
# ATen op names (torch.export graphs).
_FIRST_OPS = {
    "convolution", "_convolution", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
    "conv_transpose2d", "conv_transpose3d", "cudnn_convolution", "batch_norm", "native_batch_norm",
    "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
    "_native_batch_norm_legit_functional", "instance_norm", "group_norm", "native_group_norm",
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices",
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "upsample_nearest1d", "upsample_nearest2d",
    "upsample_nearest3d", "upsample_bilinear2d", "upsample_bicubic2d", "upsample_linear1d",
    "upsample_trilinear3d", "pixel_shuffle",
}
_LAST_OPS = {"linear", "layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm"}
_PASS_OPS = {"add", "add_", "sub", "mul", "mul_", "div", "relu", "relu_", "gelu", "silu", "silu_",
             "sigmoid", "tanh", "hardswish", "hardswish_", "hardtanh", "hardtanh_", "leaky_relu",
             "elu", "dropout", "native_dropout", "clone", "_to_copy", "alias", "clamp", "clamp_min",
             "neg", "mish", "hardsigmoid", "relu6"}


def _classify(node: torch.fx.Node, captured: Captured) -> Role:
    """``first``, ``last``, ``pass`` (look through) or ``stop``."""
    if node.op == "call_module":
        module = captured.owner(node)
        if isinstance(module, _FIRST_MODULES):
            return "first"
        if isinstance(module, _LAST_MODULES):
            return "last"
        return "pass" if isinstance(module, _PASS_MODULES) else "stop"
    if node.op == "call_method":
        return "pass" if node.target in _PASS_METHODS else "stop"
    if node.op != "call_function":
        return "stop"
    packet = getattr(node.target, "overloadpacket", None)
    if packet is not None:
        name = packet.__name__
        return ("first" if name in _FIRST_OPS else "last" if name in _LAST_OPS
                else "pass" if name in _PASS_OPS else "stop")
    if node.target is operator.getitem:  # one output of a multi-output op (batch norm's)
        source = node.args[0]
        return "pass" if isinstance(source, torch.fx.Node) and isinstance(
            source.meta.get("val"), (tuple, list)) else "stop"
    if node.target in _FIRST_FUNCTIONS:
        return "first"
    if node.target in _LAST_FUNCTIONS:
        return "last"
    return "pass" if node.target in _PASS_FUNCTIONS else "stop"


def feature_axis(captured: Captured, output: torch.fx.Node, limit: int = 200) -> Axis | None:
    """``"first"`` or ``"last"`` when the producers of ``output`` agree, else None."""
    found: set[Axis] = set()
    stack = [output]
    seen: set[torch.fx.Node] = set()
    while stack and len(seen) < limit:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        kind = _classify(node, captured)
        if kind in ("first", "last"):
            found.add(kind)
        elif kind == "pass":
            stack.extend(n for n in node.all_input_nodes if n.op not in ("get_attr", "placeholder"))
    return found.pop() if len(found) == 1 else None


_CLASS_EMBEDDINGS = ("class_embedding", "cls_embedding")  # Hugging Face CLIP and kin


def _is_prefix_token(name: str) -> bool:
    """``cls_token``, ``reg_token``, ``cls_token_0``, ``cls_token.0`` (a ParameterList),
    CLIP's ``class_embedding``; not mask tokens."""
    parts = name.lower().split(".")
    last = parts[-2] if parts[-1].isdigit() and len(parts) > 1 else parts[-1]
    return ("token" in last and "mask" not in last) or last in _CLASS_EMBEDDINGS


def prefix_tokens_hint(model: nn.Module) -> int | tuple[tuple[int, int], ...]:
    """How many class, distillation and register tokens the model puts before its patches.

    timm's ``num_prefix_tokens`` when present. Else, per token width, the
    tokens of the token parameters the model owns (``cls_token``, ``dist_token``,
    ``reg_token``, CLIP's ``class_embedding``...; not mask tokens): a sequence
    holds the tokens of its own width, so a model with a class token per stage
    or branch (CoaT, CrossViT) counts one per sequence. Learned prefix tokens
    are parameters in every architecture known here, so a model with none has 0.
    """
    count = getattr(model, "num_prefix_tokens", None)
    if isinstance(count, int) and not isinstance(count, bool):
        return count
    by_width: dict[int, int] = {}
    for name, p in model.named_parameters():
        if _is_prefix_token(name):
            width = int(p.shape[-1]) if p.ndim else 1
            by_width[width] = by_width.get(width, 0) + (int(p.shape[-2]) if p.ndim >= 2 else 1)
    return tuple(sorted(by_width.items())) if by_width else 0
