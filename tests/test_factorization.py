"""Deep feature factorisation: randomly initialised, so tested by its properties."""

from __future__ import annotations

import pytest
import torch
import torchvision
from hypothesis import example, given
from hypothesis import strategies as st

import camfunc
from camfunc._tools.factorization import nmf

pytestmark = pytest.mark.core


def identity(v):
    return v


@given(seed=st.integers(0, 10_000), k=st.integers(1, 4))
def test_factors_are_non_negative_and_error_never_increases(seed, k):
    g = torch.Generator().manual_seed(seed)
    v = torch.rand((6, 30), generator=g)
    w0, h0 = torch.rand((6, k), generator=g), torch.rand((k, 30), generator=g)
    errors = []
    for steps in (0, 5, 20, 80):
        w, h = nmf(v, w0, h0, steps)
        assert (w >= 0).all() and (h >= 0).all()
        errors.append(float((v - w @ h).norm()))
    assert all(later <= earlier * (1 + 1e-5) + 1e-6 for earlier, later in zip(errors, errors[1:]))


@given(seed=st.integers(0, 10_000))
@example(seed=2327)  # subtracting a non-zero minimum once made this rank 3
def test_exactly_low_rank_activations_are_recovered(seed):
    g = torch.Generator().manual_seed(seed)
    w_true = torch.rand((5, 2), generator=g)
    h_true = torch.rand((2, 2 * 16), generator=g)
    # dff factorises A minus its per-channel minimum. A position where both concepts are
    # absent makes that minimum zero, so the matrix it factorises is exactly rank 2
    # (subtracting a non-zero minimum would add a rank).
    h_true[:, 0] = 0
    a = (w_true @ h_true).reshape(5, 2, 4, 4).transpose(0, 1)  # (B=2, C=5, 4, 4)
    assert torch.linalg.matrix_rank(a.transpose(0, 1).reshape(5, -1) - a.transpose(0, 1).reshape(5, -1).amin(1, keepdim=True)) == 2
    s = camfunc.Split(identity, lambda v: v.mean((2, 3)))
    concepts, maps, _ = camfunc.dff(s, a, 2, iterations=2000, normalize=False,
                                    generator=torch.Generator().manual_seed(seed))
    rebuilt = torch.einsum("kc,bkhw->bchw", concepts, maps)
    assert (rebuilt - a).norm() / a.norm() < 0.05


def test_fixed_generator_gives_fixed_result_and_scores_are_the_classifier_on_concepts():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn((2, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    s = camfunc.split(model, "layer4")
    first = camfunc.dff(s, x, 3, iterations=50, generator=torch.Generator().manual_seed(4))
    again = camfunc.dff(s, x, 3, iterations=50, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first.maps, again.maps) and torch.equal(first.concepts, again.concepts)
    assert first.maps.shape == (2, 3, 2, 2) and first.concepts.shape == (3, 512)
    assert first.maps.min() >= 0 and first.maps.max() <= 1
    with torch.no_grad():
        torch.testing.assert_close(first.concept_scores, model.fc(first.concepts), atol=1e-5, rtol=1e-5)
