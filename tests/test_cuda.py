"""camfunc on a CUDA device: the same maps as on the CPU, no host sync, devices' generators,
half precision, pinned memory, a one-rank NCCL run.

Skipped where no CUDA device is present (the reason says so); ``benchmarks/gpu.sh`` runs
this module with the GPU benchmarks. Without a GPU, ``tests/test_no_host_sync.py`` checks
the absence of host reads on the ``meta`` device.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import camfunc
from helpers import random_inputs

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="no CUDA device here; run it on a GPU machine (benchmarks/gpu.sh)"),
]

# CAM checks its tail's form: one sync, for a clear error. The eigen methods' SVD and eigh
# synchronise on CUDA: torch reads the solver's convergence flag on the host.
READS_ON_PURPOSE = {"cam", "eigencam", "eigengradcam", "segeigencam", "kpcacam"}


@pytest.fixture
def exact_cuda():
    """TF32 off, so that CUDA's float32 is comparable with the CPU's."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()


def image(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def on(device, draws: dict) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in draws.items()}


@pytest.mark.parametrize("name", sorted(camfunc.METHODS))
def test_maps_equal_the_cpus(name, exact_cuda):
    model = cnn()
    x = image()
    cls = torch.tensor([1, 4])
    draws = random_inputs(name, x, 16)
    on_cpu = camfunc.METHODS[name](camfunc.split(model, "3"), x, cls, **draws)
    gpu_model = cnn().cuda()
    on_gpu = camfunc.METHODS[name](camfunc.split(gpu_model, "3"), x.cuda(), cls.cuda(),
                                   **on("cuda", draws))
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:Synchronization debug mode is a prototype feature:UserWarning")
@pytest.mark.parametrize("name", sorted(set(camfunc.METHODS) - READS_ON_PURPOSE))
def test_no_host_sync_with_a_class_tensor_on_the_device(name):
    model = cnn().cuda()
    split = camfunc.split(model, "3")
    x, cls = image().cuda(), torch.tensor([1, 4], device="cuda")
    draws = on("cuda", random_inputs(name, image(), 16))
    camfunc.METHODS[name](split, x, cls, **draws)  # warm-up: cuDNN's algorithm search
    torch.cuda.synchronize()
    try:  # set inside: torch warns as it sets the mode, and the warnings are errors here
        torch.cuda.set_sync_debug_mode("error")
        camfunc.METHODS[name](split, x, cls, **draws)
        camfunc.METHODS[name](split, x, camfunc.topk(2), **draws)
        camfunc.METHODS[name](split, x, 3, **draws)
    finally:
        torch.cuda.set_sync_debug_mode("default")


OUT_OF_RANGE = """
import torch, camfunc
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(8, 5)).eval().cuda()
split = camfunc.split(model, "1")
try:
    camfunc.gradcam(split, torch.randn(2, 3, 8, 8, device="cuda"), torch.tensor([1, 9], device="cuda"))
    torch.cuda.synchronize()  # the device-side assertion surfaces here
except RuntimeError as error:
    print("refused:", type(error).__name__)
"""


def test_an_out_of_range_class_on_the_device_is_still_refused():
    # A device-side assertion leaves the process's CUDA context unusable: its own process.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", OUT_OF_RANGE], env=env, capture_output=True,
                          text=True, timeout=300)
    assert "refused:" in done.stdout, done.stderr[-2000:]


def test_generators_and_noise_on_the_device():
    split = camfunc.split(cnn().cuda(), "3")
    x = image().cuda()

    def generator(seed: int) -> torch.Generator:
        return torch.Generator(device="cuda").manual_seed(seed)

    for method in (camfunc.smooth_gradcampp, camfunc.sscam, camfunc.randomcam):
        first = method(split, x, 1, generator=generator(3))
        again = method(split, x, 1, generator=generator(3))
        assert first.device.type == "cuda" and torch.equal(first, again)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype, exact_cuda):
    reference = camfunc.gradcam(camfunc.split(cnn(), "3"), image(), 1)
    low = cnn().cuda().to(dtype)
    cams = camfunc.gradcam(camfunc.split(low, "3"), image().cuda().to(dtype), 1)
    assert cams.dtype == torch.float32 and torch.isfinite(cams).all()
    assert (cams.cpu() - reference).abs().max() < (0.05 if dtype == torch.bfloat16 else 0.01)


def test_a_dataset_run_on_the_device_with_pinned_memory(tmp_path):
    result = camfunc.runs.run("scenes:16", tmp_path / "run", methods=["gradcam"], batch_size=8,
                              device="cuda", progress=False)
    indices, maps = camfunc.runs.read_maps(tmp_path / "run", "gradcam")
    assert (result.images, result.failed, result.written) == (16, 0, result.shards)  # written: shards
    assert len(indices) == 16 and torch.isfinite(maps.float()).all()


def test_a_one_rank_nccl_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
                           "-m", "camfunc", "run", "scenes:32", "--out", str(tmp_path / "run"),
                           "--method", "gradcam", "--device", "cuda", "--batch-size", "8"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    indices, _ = camfunc.runs.read_maps(tmp_path / "run", "gradcam")
    assert len(indices) == 32


def test_differentiable_maps_and_their_parameter_gradients_equal_the_cpus(exact_cuda):
    def grads(device):
        model = cnn().to(device).train()
        maps = camfunc.gradcam(camfunc.split(model, "2"), image().to(device),
                               torch.tensor([1, 4], device=device), differentiable=True, normalize=False)
        maps.square().sum().backward()
        return maps.detach().cpu(), [torch.zeros_like(p).cpu() if p.grad is None else p.grad.cpu()
                                     for p in model.parameters()]  # the bias after the cut: none

    cpu_maps, cpu_grads = grads("cpu")
    gpu_maps, gpu_grads = grads("cuda")
    torch.testing.assert_close(gpu_maps, cpu_maps, rtol=1e-4, atol=1e-5)
    for g, c in zip(gpu_grads, cpu_grads):
        torch.testing.assert_close(g, c, rtol=1e-3, atol=1e-5 * float(c.abs().max()))
