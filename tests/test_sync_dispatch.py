"""Host-device syncs seen inside kernels, on the CPU: a dispatch mode records every aten op
that would make the host wait for a GPU.

``tests/test_no_host_sync.py`` runs every method on ``meta``, where a Python-level read
(``.item()``, ``bool(t)``, ``.tolist()``) raises. It cannot see what a kernel does with
its values: torch's SVD and ``eigh`` read their solver's error flag on the host on CUDA,
``nonzero`` and boolean-mask indexing size their output from the data, and on ``meta``
none of that raises. Here a ``TorchDispatchMode`` sees every op as it is dispatched,
on CPU tensors, and records the ones that synchronise on CUDA (``SYNCS`` below):

- reads of a value: ``_local_scalar_dense`` (what ``.item()``, ``int(t)``, ``float(t)``,
  ``bool(t)`` and ``if t:`` become), ``item``, ``is_nonzero``, ``equal``, ``allclose``;
- ops whose output's shape depends on the data: ``nonzero``, ``argwhere``,
  ``masked_select``, ``unique`` (``_unique``, ``_unique2``, ``unique_dim``,
  ``unique_consecutive``), ``bincount``, ``histc``, ``repeat_interleave`` without
  ``output_size``, and indexing (``index``, ``index_put_``) with a boolean mask;
- linear algebra that checks an error flag on the host: ``_linalg_svd`` (what
  ``torch.linalg.svd`` and ``torch.svd`` dispatch), ``_linalg_eigh`` (``eigh``,
  ``eigvalsh``), ``linalg_eig``, ``linalg_eigvals``, ``linalg_lstsq``,
  ``_linalg_check_errors`` (what ``linalg.solve``, ``inv`` and ``cholesky`` call), and
  the ``_ex`` forms (``_linalg_solve_ex``, ``linalg_solve_ex``, ``linalg_inv_ex``,
  ``linalg_cholesky_ex``, ``linalg_lu_factor_ex``, ``linalg_ldl_factor_ex``) when called
  with ``check_errors=True``. The names are the same on torch 2.4.1 and 2.14.1
  (``test_every_op_named_exists_on_this_torch``);
- copies to the host (``_to_copy`` or ``copy_`` into CPU memory from another device).

What a CPU-only machine can and cannot see:

- A CPU tensor is already on the host, so a copy to the host is not dispatched at all
  (``t.cpu()`` returns ``t``), and ``.tolist()``, ``.numpy()`` and printing read its
  memory without dispatching. Those are seen by running on ``meta`` instead: there the
  copy is a ``_to_copy`` from ``meta`` to ``cpu``, recorded here, and a read raises
  (``test_no_device_to_host_copy_on_meta``, and ``test_no_host_sync.py``).
- camfunc reads values on purpose where that is free (in host memory: the class range
  check, the non-finite warning, Score-CAM's skip of all-zero masks).
  ``camfunc._util.host.as_on_a_device()`` makes CPU tensors take the device's path
  instead, so that is what runs here: the class tensor is checked with
  ``torch._assert_async`` (asynchronous on CUDA, not a sync), as on a GPU.
- What a kernel does inside itself below the dispatcher (a CUDA kernel's own
  ``cudaStreamSynchronize``) is seen only by the op's name, hence the list above;
  host-to-device copies are not recorded. ``tests/test_cuda.py`` runs the methods under
  ``torch.cuda.set_sync_debug_mode("error")`` where there is a GPU.

The methods that sync on purpose say so, and why, in their ``syncs`` attribute (set by
``@cam_method(syncs=...)``, or ``camfunc._util.host.syncs`` on a whole-model function),
which the README's "No host-device sync" section lists too. Each method must sync exactly
when it says it does: one that stops syncing fails as well, so the list stays true.
"""

from __future__ import annotations

import pathlib
import re
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import camfunc
from camfunc._util.host import as_on_a_device
from helpers import random_inputs

pytestmark = pytest.mark.core

aten = torch.ops.aten

# Always a sync on CUDA.
SYNCS = {
    "_local_scalar_dense", "item", "is_nonzero", "equal", "allclose",
    "nonzero", "argwhere", "masked_select", "_unique", "_unique2", "unique_dim",
    "unique_consecutive", "bincount", "histc",
    "_linalg_svd", "linalg_svd", "svd", "_linalg_eigh", "linalg_eigh", "linalg_eigvalsh",
    "linalg_eig", "linalg_eigvals", "linalg_lstsq", "_linalg_check_errors",
}
# A sync when called with check_errors=True.
CHECKED = {"_linalg_solve_ex", "linalg_solve_ex", "linalg_inv_ex", "linalg_cholesky_ex",
           "linalg_lu_factor_ex", "linalg_ldl_factor_ex"}
# A sync when an index is a boolean mask (its nonzero runs inside the kernel).
MASKED = {"index", "index_put_", "_index_put_impl_", "index_put"}
# A sync without output_size.
SIZED = {"repeat_interleave"}
COPIES = {"_to_copy", "copy_"}


def _host_copy(name: str, args: tuple, kwargs: dict) -> bool:
    """A copy into host memory from another device (checked before it runs: on meta it raises)."""
    if name == "copy_":
        source, target = args[1], args[0].device
    else:
        source, target = args[0], kwargs.get("device")
    return (isinstance(source, torch.Tensor) and source.device.type != "cpu"
            and target is not None and torch.device(target).type == "cpu")


class SyncRecorder(TorchDispatchMode):
    """Records ``(op, why)`` for every dispatched op that would synchronise on CUDA; ``ops``
    holds every op's name, to show which paths ran."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[tuple[str, str]] = []
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops.add(name)
        why = None
        if name in SYNCS:
            why = "reads a value or checks an error flag"
        elif name in CHECKED and _argument(func, args, kwargs, "check_errors", False):
            why = "checks an error flag"
        elif name in SIZED and _argument(func, args, kwargs, "output_size", None) is None:
            why = "sizes its output from the data"
        elif name in MASKED and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                    for i in _indices(args, kwargs)):
            why = "indexes with a boolean mask"
        elif name in COPIES and _host_copy(name, args, kwargs):
            why = "copies to the host"
        if why is not None:
            self.syncs.append((str(func), why))
        return func(*args, **kwargs)


def _argument(func, args, kwargs, name, default):
    if name in kwargs:
        return kwargs[name]
    for i, argument in enumerate(func._schema.arguments):
        if argument.name == name:
            return args[i] if i < len(args) else default
    return default


def _indices(args, kwargs):
    indices = kwargs.get("indices", args[1] if len(args) > 1 else ())
    return indices if isinstance(indices, (list, tuple)) else ()


def syncs_of(call) -> SyncRecorder:
    """Runs ``call()`` as on a device, recording."""
    recorder = SyncRecorder()
    with as_on_a_device(), recorder:
        call()
    return recorder


# ----------------------------------------------------------------------------
# The detector itself


def test_every_op_named_exists_on_this_torch():
    for name in SYNCS | CHECKED | MASKED | SIZED | COPIES:
        assert hasattr(aten, name), name


def t(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


SEEN = {
    "item": lambda: t(3).sum().item(),
    "int": lambda: int(t(3).argmax()),
    "float": lambda: float(t(3).amax()),
    "bool": lambda: bool((t(3) > 0).all()),
    "if": lambda: 1 if t(3).amax() > 0 else 0,
    "equal": lambda: torch.equal(t(3), t(3)),
    "allclose": lambda: torch.allclose(t(3), t(3)),
    "nonzero": lambda: t(3).nonzero(),
    "where, one argument": lambda: torch.where(t(3) > 0),
    "argwhere": lambda: torch.argwhere(t(3) > 0),
    "boolean mask": lambda: t(3)[t(3) > 0],
    "boolean mask put": lambda: t(3).masked_fill(t(3) > 0, 0).index_put_((t(3) > 0,), torch.tensor(1.0)),
    "masked_select": lambda: t(3).masked_select(t(3) > 0),
    "unique": lambda: torch.unique(t(3)),
    "unique_consecutive": lambda: torch.unique_consecutive(t(3)),
    "bincount": lambda: torch.bincount(torch.tensor([0, 2])),
    "repeat_interleave": lambda: torch.tensor([1, 2]).repeat_interleave(torch.tensor([1, 2])),
    "svd": lambda: torch.linalg.svd(t(3, 3)),
    "svdvals": lambda: torch.linalg.svdvals(t(3, 3)),
    "old svd": lambda: torch.svd(t(3, 3)),
    "eigh": lambda: torch.linalg.eigh(t(3, 3) @ t(3, 3).T),
    "eigvalsh": lambda: torch.linalg.eigvalsh(t(3, 3) @ t(3, 3).T),
    "eig": lambda: torch.linalg.eig(t(3, 3)),
    "solve": lambda: torch.linalg.solve(t(3, 3), t(3)),
    "inv": lambda: torch.linalg.inv(t(3, 3)),
    "inv_ex checked": lambda: torch.linalg.inv_ex(t(3, 3), check_errors=True),
    "cholesky": lambda: torch.linalg.cholesky(t(3, 3) @ t(3, 3).T + torch.eye(3)),
    "lstsq": lambda: torch.linalg.lstsq(t(4, 3), t(4, 1)),
    "lu_factor": lambda: torch.linalg.lu_factor(t(3, 3)),
    "to the host, from meta": lambda: torch.empty(3, device="meta").to("cpu"),
    "copy_ to the host, from meta": lambda: torch.empty(3).copy_(torch.empty(3, device="meta")),
}
NOT_SEEN = {
    "assert_async": lambda: torch._assert_async(t(3).sum() != 12345),
    "nonzero_static": lambda: torch.nonzero_static(t(3) > 0, size=3),
    "repeat_interleave, sized": lambda: torch.tensor([1, 2]).repeat_interleave(torch.tensor([1, 2]),
                                                                            output_size=3),
    "integer index": lambda: t(3)[torch.tensor([0, 2])],
    "inv_ex unchecked": lambda: torch.linalg.inv_ex(t(3, 3)),
    "where, three arguments": lambda: torch.where(t(3) > 0, t(3), 0.0),
    "topk and sort": lambda: (t(5).topk(2), t(5).sort()),
    "host to host copy": lambda: t(3).to(torch.float64),
}


@pytest.mark.parametrize("read", list(SEEN))
def test_the_recorder_sees_each_kind_of_sync(read):
    recorder = SyncRecorder()
    with recorder:
        try:
            SEEN[read]()
        except (NotImplementedError, RuntimeError):
            assert "meta" in read  # a meta tensor has no data to copy; the attempt was recorded
    assert recorder.syncs, read


@pytest.mark.parametrize("op", list(NOT_SEEN))
def test_the_recorder_passes_what_does_not_sync(op):
    assert syncs_of(NOT_SEEN[op]).syncs == []


# ----------------------------------------------------------------------------
# Every method


def small_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()
    return model, camfunc.split(model, "3")


def class_forms():
    return {"tensor": torch.tensor([1, 4]), "(B, K)": torch.tensor([[0, 2], [3, 1]]),
            "topk": camfunc.topk(2), "int": 3, "callable": lambda out: out[:, 2] - out[:, 0]}


def vit():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=16, mlp_dim=32, num_classes=5).eval()


def whole_model_calls():
    """The whole-model methods and wrappers, each on a fresh model (LeGrad checks a block once)."""
    model, split = small_model()
    x, cls = torch.randn(2, 3, 12, 12), torch.tensor([1, 4])
    return {
        camfunc.fullgrad: lambda: camfunc.fullgrad(model, x, cls),
        camfunc.guided_backprop: lambda: camfunc.guided_backprop(model, x, cls),
        camfunc.guided_gradcam: lambda: camfunc.guided_gradcam(split, x, cls),
        camfunc.dff: lambda: camfunc.dff(split, x, 2, iterations=3, generator=torch.Generator().manual_seed(0)),
        camfunc.sess: lambda: camfunc.sess(split, x, cls, window_size=8, scales=[8, 12]),
        camfunc.legrad: lambda: camfunc.legrad(vit(), torch.randn(2, 3, 16, 16), cls),
        camfunc.aug_smooth(camfunc.gradcam): lambda: camfunc.aug_smooth(camfunc.gradcam)(split, x, cls),
    }


def check_says(function, recorder: SyncRecorder, what: str) -> None:
    says = getattr(function, "syncs", "missing")
    assert says != "missing", f"{what} has no syncs attribute"
    if says is None:
        assert recorder.syncs == [], f"{what} syncs but does not say so: {recorder.syncs}"
    else:
        assert recorder.syncs, f"{what} says it syncs ({says}) but made no sync"


@pytest.mark.parametrize("name", list(camfunc.METHODS))
def test_each_method_syncs_exactly_when_it_says_so(name):
    model, split = small_model()
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    x[0, :, :4] = 0  # all-zero regions: Score-CAM's masks would skip them where reads are free
    method = camfunc.METHODS[name]
    for form, cls in class_forms().items():
        if name in ("cam", "finercam") and form == "callable":
            continue  # refused: CAM reads rows of its weight, Finer-CAM contrasts classes
        draws = random_inputs(name, x, 16)
        recorder = syncs_of(lambda: method(split, x, cls, **draws))
        check_says(method, recorder, f"{name} with a {form} target")
        if form == "tensor":  # the device's range check ran (camfunc/_core/targets.py)
            assert "_assert_async" in recorder.ops


@pytest.mark.parametrize("which", range(7))
def test_each_whole_model_method_syncs_exactly_when_it_says_so(which):
    function, call = list(whole_model_calls().items())[which]
    check_says(function, syncs_of(call), getattr(function, "__name__", repr(function)))


def test_legrad_checks_a_block_once():
    model, x = vit(), torch.randn(2, 3, 16, 16)
    assert syncs_of(lambda: camfunc.legrad(model, x, 1)).syncs
    assert syncs_of(lambda: camfunc.legrad(model, x, 1)).syncs == []


def test_the_list_is_the_methods_own_and_the_readme_names_it():
    listed = {n for n, m in camfunc.METHODS.items() if m.syncs is not None}
    listed |= {f.__name__ for f in whole_model_calls() if getattr(f, "syncs", None) is not None}
    assert listed == {"cam", "eigencam", "eigengradcam", "segeigencam", "kpcacam", "legrad"}
    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### No host-device sync", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    named = set(re.findall(r"`(\w+)`", section.split("Synchronise on purpose", 1)[1].split("\n\n", 1)[0]))
    assert listed <= named, listed - named


def test_eigen_smooth_syncs_as_the_eigen_methods_do():
    _, split = small_model()
    recorder = syncs_of(lambda: camfunc.gradcam(split, torch.randn(2, 3, 12, 12), 1, eigen_smooth=True))
    assert any("svd" in op for op, _ in recorder.syncs)


def test_a_bad_class_tensor_fails_through_the_devices_check():
    _, split = small_model()
    with as_on_a_device(), pytest.raises(RuntimeError, match="class index out of range"):
        camfunc.gradcam(split, torch.randn(2, 3, 12, 12), torch.tensor([1, 5]))
    with pytest.raises(IndexError, match="class index 5 is out of range"):  # free on the host
        camfunc.gradcam(split, torch.randn(2, 3, 12, 12), torch.tensor([1, 5]))


def test_a_nonfinite_sample_gets_nan_maps_without_a_read_or_a_warning():
    _, split = small_model()
    x = torch.randn(2, 3, 12, 12)
    x[1, 0, 0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recorder = syncs_of(lambda: camfunc.gradcam(split, x, 1))
    assert recorder.syncs == []
    with pytest.warns(camfunc.NonFiniteWarning):  # on the host, where reading is free
        maps = camfunc.gradcam(split, x, 1)
    assert maps[1].isnan().all() and not maps[0].isnan().any()


@pytest.mark.parametrize("name", [n for n, m in camfunc.METHODS.items() if m.syncs is None])
def test_no_device_to_host_copy_on_meta(name):
    model, split = small_model()
    model.to("meta")
    x = torch.empty(2, 3, 12, 12, device="meta")
    draws = {k: v.to("meta") if isinstance(v, torch.Tensor) else v
             for k, v in random_inputs(name, torch.empty(2, 3, 12, 12), 16).items()}
    recorder = SyncRecorder()
    with recorder:
        camfunc.METHODS[name](split, x, torch.tensor([1, 4], device="meta"), **draws)
    assert recorder.syncs == []
