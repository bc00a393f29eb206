"""The gradient values of every differentiable method (``differentiable=True``), against
finite differences.

``tests/test_differentiable.py`` pins Grad-CAM's and Layer-CAM's gradients to a hooked
double-backward reference; for the others it checks only that a gradient exists. Here
``torch.autograd.gradcheck`` compares, in float64, the Jacobian that autograd gives for
every map entry (the backward of a graph that already holds a backward: ``G`` is
``dS/dA``) with central finite differences of the method's own forward, with respect to
the input, a parameter before the cut (in the head) and one after it (in the tail). A
term that the backward misses (something detached, a weight computed without a graph)
changes the analytic Jacobian but not the finite differences, so gradcheck fails.

The net is smooth (softplus, a tanh-free 1x1 tail conv, average pooling) so that every
method's map is differentiable at the drawn point: no ReLU inside the model, and the
maps are raw (``normalize=False``, min-max normalisation has kinks where the extreme
position changes). The map's own final ReLU is smooth away from zero; each case asserts
that its map has positive entries and a gradient that is not zero, so that no check
passes vacuously.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import camfunc

pytestmark = pytest.mark.core


def smooth_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Softplus(), nn.Conv2d(3, 3, 3, padding=1),
                         nn.Softplus(), nn.Conv2d(3, 3, 1), nn.Softplus(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(3, 4)).double().eval()


NOISE = torch.randn(2, 2, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
# Options beyond differentiable=True and normalize=False, per case.
CASES = {
    "gradcam": {}, "gradcampp": {}, "xgradcam": {}, "layercam": {}, "hirescam": {},
    "gradcam_elementwise": {}, "eigengradcam": {}, "segeigencam": {},
    "smooth_gradcampp": {"noise": NOISE, "num_samples": 2, "std": 0.3},
    "shapleycam": {},
    "finercam": {"references": [0, 3]},
    "gradcam, eigen_smooth": {"eigen_smooth": True},
    "layercam, eigen_smooth": {"eigen_smooth": True},
}


def differentiable_methods():
    """Every registered method that takes ``differentiable``, itself or through ``method``."""
    names = set()
    for name, method in camfunc.METHODS.items():
        parameters = inspect.signature(method).parameters
        if "differentiable" in parameters:
            names.add(name)
        elif "method" in parameters:
            inner = parameters["method"].default
            if "differentiable" in inspect.signature(inner).parameters:
                names.add(name)
    return names


def test_every_differentiable_method_has_a_case():
    # refinecam multiplies normalised maps (kinks everywhere); its wrapped method's own
    # path is checked here.
    assert differentiable_methods() - {"refinecam"} == {c.split(",")[0] for c in CASES}


class Explained(nn.Module):
    """The map as a function of the input and the model's parameters (for functional_call)."""

    def __init__(self, model, name, options):
        super().__init__()
        self.model, self.name, self.options = model, name.split(",")[0], options
        self.split = camfunc.split(model, "3")

    def forward(self, x):
        return camfunc.METHODS[self.name](self.split, x, torch.tensor([1, 2]), differentiable=True,
                                          normalize=False, **self.options)


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_of_the_map_equal_finite_differences(case):
    explained = Explained(smooth_model(), case, CASES[case])
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    head_bias = explained.model[0].bias.detach().clone()
    tail_weight = explained.model[4].weight.detach().clone()

    def maps(x, head_bias, tail_weight):
        return torch.func.functional_call(explained, {"model.0.bias": head_bias, "model.4.weight": tail_weight},
                                          (x,))

    inputs = tuple(t.requires_grad_() for t in (x, head_bias, tail_weight))
    value = maps(*inputs)
    assert value.requires_grad and (value > 1e-3).any()
    gradients = torch.autograd.grad((value * torch.linspace(1, 2, value.numel()).view_as(value)).sum(), inputs)
    assert all(g.abs().sum() > 0 for g in gradients)  # each of the three paths carries gradient
    assert torch.autograd.gradcheck(maps, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dead", [0, 2, 3])
def test_the_principal_directions_gradient_with_repeated_lower_singular_values(dead):
    # torch's SVD backward divides by sigma_i^2 - sigma_j^2 for every pair: two dead channels
    # (two zero singular values) made every gradient of Eigen-Grad-CAM, Seg-Eigen-CAM and
    # eigen_smooth NaN, though v_1 does not depend on them (found by the Layer-CAM
    # eigen_smooth case above). Two positions rows fewer than channels also repeat zeros.
    from camfunc._methods._projection import first_component

    features = torch.randn(2, 5, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(dead))
    features[:, 5 - dead:] = 0
    features[1, :, 0, 0] = features[1, :, 0, 1]  # repeated positions too
    features.requires_grad_()
    assert torch.autograd.gradcheck(first_component, (features,))
