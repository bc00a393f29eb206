"""Hook-free means hook-free: no hooks, no parameter graph, nothing mutated."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest
import torch

import camfunc
from helpers import random_inputs, small_cnn

pytestmark = pytest.mark.core

PACKAGE = pathlib.Path(camfunc.__file__).parent
FORBIDDEN = [
    r"register_forward_hook", r"register_forward_pre_hook", r"register_full_backward_hook",
    r"register_full_backward_pre_hook", r"register_backward_hook", r"register_hook",
    r"register_module_forward", r"register_module_full_backward", r"functional_call",
    r"requires_grad_", r"\.backward\(", r"retain_graph",
]


# Training the embedded model's own fresh copy is the one place a backward pass
# belongs; it never sees a user's model. Hooks stay forbidden even there.
TRAINING_SCRIPT = PACKAGE / "zoo" / "train.py"
TRAINING_ALLOWED = {r"\.backward\("}

# Detectors' tails run torchvision ops (roi_align) that torch.func cannot transform, so
# their gradients come from torch.autograd.grad on camfunc's own detached copy of A,
# with the tail's graph kept across the K classes. Only that one function may do so.
ENGINE = PACKAGE / "_core" / "engine.py"
EAGER_PULLBACK = "_autograd_pullback"
EAGER_ALLOWED = {r"requires_grad_", r"retain_graph"}


def _function_source(path: pathlib.Path, name: str) -> str:
    text = path.read_text()
    found = [node for node in ast.walk(ast.parse(text))
             if isinstance(node, ast.FunctionDef) and node.name == name]
    assert len(found) == 1, f"{path.name} should define {name} once"
    return ast.get_source_segment(text, found[0]) or ""


def test_package_source_registers_no_hooks_and_swaps_no_parameters():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if path == ENGINE:
            text = text.replace(_function_source(ENGINE, EAGER_PULLBACK), "")
        for pattern in FORBIDDEN:
            if path == TRAINING_SCRIPT and pattern in TRAINING_ALLOWED:
                continue
            assert not re.search(pattern, text), f"{path.name} uses {pattern}"


def test_the_eager_pullback_uses_only_its_exemption_and_only_on_a_detached_copy():
    body = _function_source(ENGINE, EAGER_PULLBACK)
    assert all(re.search(p, body) for p in EAGER_ALLOWED)  # the exemption is needed
    assert not any(re.search(p, body) for p in FORBIDDEN if p not in EAGER_ALLOWED)
    assert re.findall(r"\w[\w\]\[.()]*requires_grad_", body) == ["carry[0].detach().requires_grad_"]


def test_the_training_script_is_the_only_exemption_and_still_has_no_hooks():
    text = TRAINING_SCRIPT.read_text()
    assert re.search(r"\.backward\(", text)  # the exemption is needed, so it is kept honest
    assert not any(re.search(p, text) for p in FORBIDDEN if p not in TRAINING_ALLOWED)


def test_no_graph_to_parameters_or_input():
    model = small_cnn()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    x_before = x.detach().clone()
    for name, method in camfunc.METHODS.items():
        extra = random_inputs(name, x, 6)
        cams, scores = method(camfunc.split(model, "4"), x, 1, return_scores=True, **extra)
        assert cams.grad_fn is None and not cams.requires_grad, name
        assert scores.grad_fn is None and not scores.requires_grad, name
    assert all(p.grad is None for p in model.parameters())
    assert x.grad is None and torch.equal(x.detach(), x_before)


def test_no_graph_is_kept_even_with_grad_mode_on():
    model = small_cnn()
    assert torch.is_grad_enabled()
    cams = camfunc.gradcam(camfunc.split(model, "3"), torch.randn(2, 3, 8, 8), 0)
    assert cams.grad_fn is None
    assert torch.is_grad_enabled()  # the caller's grad mode is restored
