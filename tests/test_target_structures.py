"""Every method takes a callable target on any output structure, read by the input's batch.

A model's output may be a tensor, a dict, a tuple, or a list of per-sample dicts (as
detectors return). The same target written for each structure must give the map it
gives on the plain tensor, for every registered method (Finer-CAM, whose contrast needs
class indices, refuses any callable and says so).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import camfunc
import helpers
from helpers import small_cnn

pytestmark = pytest.mark.core

STRUCTURES = ["tensor", "dict", "tuple", "per-sample dicts"]


class Structured(nn.Module):
    """``small_cnn`` whose scores come back in the given structure."""

    def __init__(self, structure: str):
        super().__init__()
        self.net = small_cnn()
        self.structure = structure

    def forward(self, x):
        y = self.net(x)
        if self.structure == "dict":
            return {"scores": y, "doubled": 2 * y}
        if self.structure == "tuple":
            return (y, y.sum(1))
        if self.structure == "per-sample dicts":
            return [{"scores": row, "label": row.argmax()} for row in y]
        return y


def contrast(structure: str):
    """Class 1's score minus class 3's, read from each structure."""
    def scores(out):
        if structure == "dict":
            return out["scores"]
        if structure == "tuple":
            return out[0]
        if structure == "per-sample dicts":
            return torch.stack([item["scores"] for item in out])
        return out
    return lambda out: scores(out)[:, 1] - scores(out)[:, 3]


def split_of(structure: str):
    model = Structured(structure).eval()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    # A list of dicts cannot be traced by fx: torch.export captures it.
    example = {"example_input": x} if structure == "per-sample dicts" else {}
    return camfunc.split(model, "net.4", **example), x


@pytest.mark.parametrize("name", sorted(set(camfunc.METHODS) - {"finercam"}))
def test_a_callable_target_gives_the_same_map_on_every_output_structure(name):
    maps = {}
    for structure in STRUCTURES:
        s, x = split_of(structure)
        extra = helpers.random_inputs(name, x, 6)
        maps[structure] = camfunc.METHODS[name](s, x, contrast(structure), normalize=False, **extra)
    for structure in STRUCTURES[1:]:
        torch.testing.assert_close(maps[structure], maps["tensor"], atol=1e-6, rtol=1e-5,
                                   msg=f"{name} on {structure}")
    assert maps["tensor"].abs().amax() > 0


def test_finer_cam_refuses_a_callable_on_any_structure():
    for structure in STRUCTURES:
        s, x = split_of(structure)
        with pytest.raises(TypeError, match="finer's cls must be class indices"):
            camfunc.finercam(s, x, contrast(structure))
