"""inductor, the compiler users reach for: one real compile per method family, equal to eager.

Each family's code path is different under the compiler (vmap'd vjp, forward-over-reverse,
SVD, kernel PCA, batched perturbations, patch windows), so each gets its own compile.
Models are tiny so that a compile takes seconds on two cores; still, these are the slowest
tests, marked ``slow`` (CI runs them; ``-m "not slow"`` leaves them out locally).
Families that a torch version cannot compile must say so, not return a wrong map.
"""

from __future__ import annotations

import pytest
import torch

import camfunc
from camfunc._core.validate import TORCH_VERSION
from helpers import random_inputs, small_cnn

pytestmark = [pytest.mark.core, pytest.mark.slow]

# One method per family, named for the code path it compiles.
FAMILIES = {
    "channel weights from vjp under vmap": ("xgradcam", {}),
    "gradients of noisy copies": ("smooth_gradcampp", {}),
    "per-sample SVD": ("eigengradcam", {}),
    "kernel PCA in float64": ("kpcacam", {}),
    "classifier weights": ("cam", {}),
    "masked forward passes": ("scorecam", {"batch_size": 3}),
    "channel ablation": ("ablationcam", {"batch_size": 4}),
    "Hessian-vector products": ("shapleycam", {}),
    "targets built from the scores": ("finercam", {}),
    "activation statistics": ("fem", {}),
    "products across layers": ("refinecam", {}),
}


def problem():
    model = small_cnn(channels=4)
    x = torch.randn((2, 3, 6, 6), generator=torch.Generator().manual_seed(0))
    return model, x, torch.tensor([[1, 3], [4, 0]])


@pytest.mark.parametrize("family", FAMILIES)
def test_inductor_equals_eager(family):
    name, options = FAMILIES[family]
    model, x, classes = problem()
    layers = ["4", "2"] if name == "refinecam" else "4"
    s = camfunc.split(model, layers)
    options = {**options, **random_inputs(name, x, 4, seed=1)}
    if name == "smooth_gradcampp":  # the noise of the input, not of the activations
        options["noise"] = torch.randn((2, *x.shape), generator=torch.Generator().manual_seed(1))
    method = camfunc.METHODS[name]
    torch._dynamo.reset()
    compiled = torch.compile(method, fullgraph=True, backend="inductor")
    if TORCH_VERSION < camfunc.METHODS[name].compiles_since:
        with pytest.raises(Exception, match="cannot be compiled before torch"):
            compiled(s, x, classes, normalize=False, **options)
        return
    want = method(s, x, classes, normalize=False, **options)
    assert want.amax() > 0
    torch.testing.assert_close(compiled(s, x, classes, normalize=False, **options), want,
                               atol=1e-5 * float(want.abs().max()), rtol=1e-4)


def test_inductor_sess_equals_eager():
    model, x, classes = problem()
    s = camfunc.split(model, "4")
    options = {"scales": [6, 8], "step_size": 2, "pool": "max", "normalize": False}
    torch._dynamo.reset()
    compiled = torch.compile(camfunc.sess, fullgraph=True, backend="inductor")
    want = camfunc.sess(s, x, classes, **options)
    assert want.amax() > 0
    torch.testing.assert_close(compiled(s, x, classes, **options), want,
                               atol=1e-5 * float(want.abs().max()), rtol=1e-4)


def test_inductor_guided_gradcam_equals_eager_or_says_it_cannot():
    model, x, classes = problem()
    s = camfunc.split(model, "4")
    torch._dynamo.reset()
    compiled = torch.compile(camfunc.guided_gradcam, fullgraph=True, backend="inductor")
    if TORCH_VERSION < camfunc.guided_backprop.compiles_since:
        with pytest.raises(Exception, match="cannot be compiled before torch"):
            compiled(s, x, classes)
        return
    # The guided copy is traced outside the compiler, as documented; without it, a clear refusal.
    with pytest.raises(Exception, match=r"prepare it outside: guided = camfunc.guided_model\(model\)"):
        compiled(s, x, classes)
    guided = camfunc.guided_model(model)
    want = camfunc.guided_gradcam(s, x, classes)
    assert want.abs().amax() > 0
    torch.testing.assert_close(compiled(s, x, classes, guided=guided), want,
                               atol=1e-5 * float(want.abs().max()), rtol=1e-4)
