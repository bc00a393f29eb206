"""Attention masks that mask nothing, dropped from an exported graph.

Under ``torch.export``, Hugging Face models build their attention mask from
index comparisons instead of passing None as they do eagerly: a ``(B, 1, N, N)``
mask that lets every query see every key. Attention with a mask is slower
(it is turned into an additive bias) and keeps the ``N x N`` mask alive across
stages. A mask computed from the input's *shape* alone, and true everywhere at
two batch sizes and at twice the spatial size, is replaced by None: the same
attention, the model's own eager path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

__all__ = ["drop_full_masks"]

_SDPA = {torch.nn.functional.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default}
_SHAPE_READS = {torch.ops.aten.sym_size.int, torch.ops.aten.sym_size.default}


def _ancestors(node: torch.fx.Node) -> list[torch.fx.Node]:
    """``node`` and everything it is computed from, in graph order."""
    seen: dict[torch.fx.Node, None] = {}
    stack = [node]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen[current] = None
            stack.extend(current.all_input_nodes)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def _from_shape_only(nodes: list[torch.fx.Node], x: torch.fx.Node) -> bool:
    """Whether ``nodes`` read nothing but ``x``'s sizes: no other input, no tensor of the model."""
    for node in nodes:
        if node.op in ("get_attr", "call_module") or (node.op == "placeholder" and node is not x):
            return False
        if x in node.all_input_nodes and node.target not in _SHAPE_READS:
            return False
    return True


def _masks_nothing(nodes: list[torch.fx.Node], x: torch.fx.Node, example: torch.Tensor) -> bool:
    """Evaluates the mask for ``example``'s shape, at one more sample, and at twice its
    spatial sizes (a graph exported with dynamic sizes may mask at other sizes only)."""
    sub = torch.fx.Graph()
    env: dict[torch.fx.Node, Any] = {}
    for node in nodes:
        env[node] = sub.placeholder("x") if node is x else sub.node_copy(node, env.__getitem__)
    sub.output(env[nodes[-1]])
    run = torch.fx.GraphModule(torch.nn.Module(), sub)
    shape = tuple(example.shape)
    doubled = (*shape[:2], *(2 * size for size in shape[2:]))
    for size in (shape, (shape[0] + 1, *shape[1:]), doubled):
        shaped = torch.empty(size, device="meta")
        try:
            with torch.no_grad():
                mask = run(shaped) if x in env else run()
        except Exception:  # not computable from the shape alone: keep the mask
            return False
        if not isinstance(mask, torch.Tensor) or mask.device.type == "meta":
            return False
        if not bool(mask.all() if mask.dtype == torch.bool else (mask == 0).all()):
            return False
    return True


def drop_full_masks(graph: torch.fx.Graph, x: torch.fx.Node, example: torch.Tensor) -> int:
    """Replaces with None each attention mask of ``graph`` that masks nothing (see the
    module's docstring); returns how many attention calls lost one."""
    dropped = 0
    verdicts: dict[torch.fx.Node, bool] = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _SDPA:
            continue
        positional = len(node.args) > 3
        mask = node.args[3] if positional else node.kwargs.get("attn_mask")
        if not isinstance(mask, torch.fx.Node):
            continue
        if mask not in verdicts:
            nodes = _ancestors(mask)
            verdicts[mask] = _from_shape_only(nodes, x) and _masks_nothing(nodes, x, example)
        if not verdicts[mask]:
            continue
        if positional:
            node.args = (*node.args[:3], None, *node.args[4:])
        else:
            node.kwargs = {**node.kwargs, "attn_mask": None}
        dropped += 1
    for mask in verdicts:  # the masks' own computation, where nothing else reads it
        for node in reversed(_ancestors(mask)):
            if node.op != "placeholder" and not node.users:
                graph.erase_node(node)
    return dropped
