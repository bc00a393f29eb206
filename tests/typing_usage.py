"""What a type checker sees of camfunc's public API: CI runs ``mypy camfunc tests/typing_usage.py``.

Not a pytest module (its name does not start with ``test_``): each ``assert_type`` is
checked statically, and the file also runs (``python tests/typing_usage.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from typing_extensions import assert_type

import camfunc

model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(4, 5)).eval()
x = torch.randn(2, 3, 8, 8)

one = camfunc.split(model, "1")
several = camfunc.split(model, ["0", "1"])
by_hand = camfunc.Split(model[:2], model[2:])
assert_type(one, camfunc.Split[Tensor])
assert_type(several, camfunc.Split[list[Tensor]])
assert_type(by_hand, camfunc.Split[Tensor])

# One layer: a tensor; several: a list; return_scores=True: with the scores.
assert_type(camfunc.gradcam(one, x, 0), Tensor)
assert_type(camfunc.gradcam(several, x, 0), list[Tensor])
assert_type(camfunc.scorecam(one, x, 0, return_scores=True), tuple[Tensor, Tensor])
assert_type(camfunc.layercam(several, x, camfunc.topk(2), return_scores=True),
            tuple[list[Tensor], Tensor])
assert_type(camfunc.METHODS["eigencam"](one, x, 0), Tensor)

if __name__ == "__main__":
    assert isinstance(camfunc.gradcam(one, x, 0), Tensor)
    assert isinstance(camfunc.gradcam(several, x, 0), list)
    maps, scores = camfunc.scorecam(one, x, 0, return_scores=True)
    assert maps.shape == (2, 6, 6) and scores.shape == (2, 5)
    print("ok")
