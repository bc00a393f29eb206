"""No host-device sync in the eager hot path, checked without a GPU.

On a GPU, reading a device tensor on the host (``.item()``, ``int(t)``, ``bool(t)``,
``.tolist()``, ``nonzero``) stalls the host until the device catches up, so the tail's
kernel launches stop hiding behind the head's work. Tensors on the ``meta`` device have
shapes but no values: every such read raises there. So a method that runs to the end on
``meta`` makes no host read, on any device that is not the CPU (where camfunc reads values
on purpose, for free: the range check of a class tensor, the non-finite warning). The
same check on CUDA, with ``torch.cuda.set_sync_debug_mode("error")``, is in
``tests/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import camfunc
from helpers import random_inputs

pytestmark = pytest.mark.core

# Reads values on purpose, once per call: CAM checks that the tail is a pooled linear map
# (a silent wrong map otherwise); a clear error is worth one sync.
READS_ON_PURPOSE = {"cam"}
NAMES = [n for n in camfunc.METHODS if n not in READS_ON_PURPOSE]


def model_on_meta():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()
    split = camfunc.split(model, "3")
    return model.to("meta"), split


def targets(batch):
    return [torch.tensor([1, 4], device="meta")[:batch], torch.tensor([[0, 2], [3, 1]], device="meta"),
            camfunc.topk(2), 3]


@pytest.mark.parametrize("name", NAMES)
def test_methods_read_no_device_value(name):
    model, split = model_on_meta()
    x = torch.empty(2, 3, 12, 12, device="meta")
    for cls in targets(2):
        draws = random_inputs(name, torch.empty(2, 3, 12, 12), 16)
        draws = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in draws.items()}
        maps, scores = camfunc.METHODS[name](split, x, cls, return_scores=True, **draws)
        assert maps.device.type == "meta" and scores.shape == (2, 5)


def test_whole_model_methods_read_no_device_value():
    model, split = model_on_meta()
    x = torch.empty(2, 3, 12, 12, device="meta")
    cls = torch.tensor([1, 4], device="meta")
    assert camfunc.fullgrad(model, x, cls).device.type == "meta"
    assert camfunc.guided_backprop(model, x, cls).device.type == "meta"
    assert camfunc.aug_smooth(camfunc.gradcam)(split, x, cls).device.type == "meta"
    assert camfunc.sess(split, x, cls, window_size=8, scales=[8, 12]).device.type == "meta"


def test_the_detector_catches_a_host_read():
    # What makes the tests above mean something: each kind of value read raises on meta.
    model, split = model_on_meta()
    scores = split(torch.empty(2, 3, 12, 12, device="meta"))
    for read in (lambda t: t.amax().item(), lambda t: int(t.argmax()), lambda t: bool((t > 0).all()),
                 lambda t: t.tolist(), lambda t: t.nonzero()):
        with pytest.raises((RuntimeError, NotImplementedError)):
            read(scores)
    with pytest.raises(RuntimeError):  # the method that reads on purpose
        camfunc.cam(split, torch.empty(2, 3, 12, 12, device="meta"), 1)


def test_a_class_tensor_on_the_host_is_still_range_checked_before_any_work():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 5)).eval()
    split = camfunc.split(model, "1")
    with pytest.raises(IndexError, match="class index 5 is out of range.*0 to 4"):
        camfunc.gradcam(split, torch.randn(2, 3, 8, 8), torch.tensor([1, 5]))
    with pytest.raises(IndexError, match="class index -1 is out of range"):
        camfunc.gradcam(split, torch.randn(2, 3, 8, 8), torch.tensor([[0, -1], [1, 2]]))
