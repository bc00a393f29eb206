#!/usr/bin/env python
"""Grad-CAM cost: camfunc against a plain forward pass and three hook-based libraries.

Setup
-----
torchvision ResNet-50 with random weights (seeded, ``.eval()``), explained at
``layer4`` for 224x224 inputs, at each ``--batches`` size. Rows:

* ``forward``: ``with torch.no_grad(): model(x)``, the baseline (ratio 1.00).
* ``camfunc.gradcam``: one class per sample; with ``--classes K`` also one call
  with a ``(B, K)`` class tensor.
* torchcam ``GradCAM``: ``scores = model(x)`` then ``extractor(class_idx, scores)``;
  K classes are K extractor calls on that one forward (``retain_graph=True``
  for all but the last).
* pytorch-grad-cam ``GradCAM``: ``cam(input_tensor=x, targets=...)``; K classes
  are K calls. Each call is a forward and a full backward (``loss.backward``,
  which also fills every parameter's ``.grad``), and its time includes the
  library's CPU numpy/OpenCV post-processing and upsampling to 224x224; the
  other rows return maps at layer4's 7x7 resolution.
* captum ``LayerGradCam.attribute(x, target, relu_attributions=True)``, detached
  and min-max normalised; K classes are K calls. Detached because captum's maps
  stay attached to the autograd graph, and its backward stops at layer4, so
  whoever holds a map also holds every activation saved by layers 1-4.
* ``torch.compile`` (default inductor, ``fullgraph=True``) of the no-grad
  forward and of ``camfunc.gradcam``, classes passed as a tensor. Static shapes
  (``automatic_dynamic_shapes=False``), so each batch size is its own graph.
  Compile time is the first call; ``--no-compile`` skips both rows.

The hook-based libraries get a private deep copy of the model, so their hooks
(and pytorch-grad-cam's ``.grad`` tensors) never touch the other rows. Maps are
min-max normalised in every row. Before timing, each library's 1-class maps are
compared with camfunc's (max absolute difference, printed under the table) so
the rows are known to compute the same thing: above 1e-4 on the CPU or 1e-3 on
CUDA (where compiled code may sum in another order), the script exits non-zero
after its report.

Time
----
Median of ``--repeats`` timed calls after ``--warmup`` untimed ones, all rows
in the main process. The rows are interleaved round-robin, each repeat starting
at the next row, so machine noise (other processes, clock changes) falls on all
of them alike. On a GPU each call is bracketed by ``torch.cuda.synchronize()``.
``torch.set_num_threads(--threads)``, default all cores this process may use.

Peak extra memory
-----------------
CPU: torch keeps no CPU allocator statistics, so each row is measured in a
fresh child process (``--child``, same script): build the model, inputs and
extractor, run ``--warmup`` calls (at least one, so one-time allocations such as
thread pools and compiled code are done), reset the kernel's peak-RSS counter
(write ``5`` to ``/proc/self/clear_refs``), read ``VmRSS``, make one call and read
``VmHWM``. Peak extra = VmHWM - VmRSS. The children run with
``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc returns every freed tensor
buffer to the system and RSS follows the live tensors instead of malloc's
free lists. Memory a library holds *between* calls is in that baseline, not in
the peak: torchcam keeps the hooked layer output, and with it the activations
that layers 1-4 saved for backward (its backward stops at layer4, so they are
never freed), and pytorch-grad-cam keeps its last graph in ``cam.outputs``
(``retain_graph=True``) plus every parameter's ``.grad``. The amount held beyond
the forward's own (RSS after the warm-up minus RSS before it) is named under
the table and saved as ``held_mib`` in ``--json``.
GPU: in the main process, ``torch.cuda.max_memory_allocated()`` after
``reset_peak_memory_stats()``, minus ``memory_allocated()`` before the call.

Caveats
-------
* Random weights: the timing of ResNet-50 does not depend on the weights, but
  the maps themselves mean nothing.
* On a small shared machine, other processes disturb the times; medians of
  interleaved runs keep the ratios fair, but absolute numbers vary between
  runs. The load average before and after the run is printed.
* Compile time is a cold compile: each compiled row compiles in an empty
  inductor cache of its own (``torch._inductor.utils.fresh_cache``), so it does
  not reuse kernels that another row compiled, and its memory child then loads
  from that cache. A tiny conv net is compiled first, so inductor's one-time
  start-up is not charged to the first compiled row. The caches are deleted at
  the end.

Usage
-----
    python benchmarks/bench_gradcam.py                      # batches 8 and 16, all rows
    python benchmarks/bench_gradcam.py --batches 8 --repeats 3 --warmup 1 --json out.json
    python benchmarks/bench_gradcam.py --no-compile --no-memory --skip pytorch-grad-cam
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version

import torch
from torch._inductor.utils import fresh_cache

LAYER = "layer4"
IMAGE_SIZE = 224
NUM_CLASSES = 1000
SEED = 0
MIB = 2**20
REFERENCES = ("torchcam", "pytorch-grad-cam", "captum")
TARGETS = {  # name -> limit on the ratio
    "camfunc time / forward": 1.10,
    "camfunc peak memory / forward": 1.30,
    "camfunc K classes / 1 class": 1.50,
    "compiled camfunc / compiled forward": 1.10,
}

Call = Callable[[], object]
Build = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple[Call, Callable[[], None] | None]]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------
# The approaches: build(model, x, classes (B, K)) -> (call, close)


def _one_class_or_all(classes: torch.Tensor) -> torch.Tensor:
    """camfunc's ``cls``: ``(B,)`` for one class per sample, else ``(B, K)``."""
    return classes[:, 0] if classes.shape[1] == 1 else classes


def _columns(classes: torch.Tensor) -> list[list[int]]:
    """One list of per-sample classes for each of the K classes."""
    return [column.tolist() for column in classes.t()]


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(-2)
    low, high = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    return ((flat - low) / (high - low).clamp_min(1e-12)).reshape(maps.shape)


def build_forward(model, x, classes):
    def call():
        with torch.no_grad():
            return model(x)
    return call, None


def build_camfunc(model, x, classes):
    import camfunc

    split = camfunc.split(model, LAYER)
    cls = _one_class_or_all(classes)
    return (lambda: camfunc.gradcam(split, x, cls)), None


def build_torchcam(model, x, classes):
    from torchcam.methods import GradCAM

    model = copy.deepcopy(model)
    extractor = GradCAM(model, LAYER)
    columns = _columns(classes)
    last = len(columns) - 1

    def call():
        scores = model(x)
        return [extractor(class_idx=column, scores=scores, retain_graph=i < last)[0]
                for i, column in enumerate(columns)]
    return call, extractor.remove_hooks


def build_pytorch_grad_cam(model, x, classes):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = copy.deepcopy(model)
    cam = GradCAM(model=model, target_layers=[getattr(model, LAYER)])
    targets = [[ClassifierOutputTarget(c) for c in column] for column in _columns(classes)]

    def call():
        return [cam(input_tensor=x, targets=t) for t in targets]
    return call, cam.activations_and_grads.release


def build_captum(model, x, classes):
    from captum.attr import LayerGradCam

    method = LayerGradCam(model, getattr(model, LAYER))  # hooks only inside attribute()
    columns = _columns(classes)

    def call():  # detached: captum's maps hold the forward's autograd graph (see docstring)
        return [_minmax(method.attribute(x, target=column, relu_attributions=True)[:, 0].detach())
                for column in columns]
    return call, None


def build_compiled_forward(model, x, classes):
    compiled = torch.compile(model, fullgraph=True)

    def call():
        with torch.no_grad():
            return compiled(x)
    return call, None


def build_compiled_camfunc(model, x, classes):
    import camfunc

    split = camfunc.split(model, LAYER)
    gradcam = torch.compile(camfunc.gradcam, fullgraph=True)
    cls = _one_class_or_all(classes)
    return (lambda: gradcam(split, x, cls)), None


@dataclass(frozen=True)
class Approach:
    label: str
    build: Build
    package: str | None = None  # shown with its version in the label
    compiled: bool = False


APPROACHES = {
    "forward": Approach("forward (no_grad)", build_forward),
    "camfunc": Approach("camfunc.gradcam", build_camfunc),
    "torchcam": Approach("torchcam {} GradCAM", build_torchcam, "torchcam"),
    "pytorch-grad-cam": Approach("pytorch-grad-cam {} GradCAM ¹", build_pytorch_grad_cam, "grad-cam"),
    "captum": Approach("captum {} LayerGradCam", build_captum, "captum"),
    "forward-compiled": Approach("forward (no_grad), compiled", build_compiled_forward, compiled=True),
    "camfunc-compiled": Approach("camfunc.gradcam, compiled", build_compiled_camfunc, compiled=True),
}


@dataclass(frozen=True)
class Case:
    """One row: an approach asked for ``k`` classes per sample."""

    key: str
    k: int = 1

    @property
    def approach(self) -> Approach:
        return APPROACHES[self.key]

    def label(self) -> str:
        a = self.approach
        text = a.label.format(_version(a.package)) if a.package else a.label
        return text if self.k == 1 else f"{text}, {self.k} classes"


def plan_cases(args) -> list[Case]:
    references = [r for r in REFERENCES if r not in args.skip]
    cases = [Case("forward"), Case("camfunc"), *(Case(r) for r in references)]
    if args.classes > 1:
        cases += [Case(key, args.classes) for key in ("camfunc", *references)]
    if args.compile:
        cases += [Case("forward-compiled"), Case("camfunc-compiled")]
    return cases


# ----------------------------------------------------------------------------
# Model, inputs, settings


def make_model(device: str) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(SEED)
    return torchvision.models.resnet50(weights=None).eval().to(device)


def make_batch(batch: int, k: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(B, 3, 224, 224)`` and K distinct classes per sample ``(B, K)``."""
    gen = torch.Generator().manual_seed(SEED + batch)
    x = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    classes = torch.stack([torch.randperm(NUM_CLASSES, generator=gen)[:k] for _ in range(batch)])
    return x.to(device), classes.to(device)


def configure(threads: int) -> None:
    torch.set_num_threads(threads)
    torch._dynamo.config.automatic_dynamic_shapes = False


def warm_up_inductor(device: str) -> None:
    """Pays inductor's one-time start-up (imports, compiler checks) on a tiny conv net."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1)).eval().to(device)
    with torch.no_grad(), fresh_cache():
        torch.compile(net, fullgraph=True)(torch.ones(1, 3, 8, 8, device=device))


@contextlib.contextmanager
def cold_cache(root: str) -> Iterator[str]:
    """An empty inductor cache (on disk and in memory) under ``root``; yields its path.

    It is kept, so the memory child of the same row can compile from it.
    """
    with fresh_cache(dir=root, delete=False):
        yield os.environ["TORCHINDUCTOR_CACHE_DIR"]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------
# Timing (main process)


def timed(call: Call, device: str) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = call()
    sync(device)
    return time.perf_counter() - start, out


@dataclass
class WarmUp:
    outputs: dict[Case, object]  # each row's first output, for the agreement check
    compile_s: dict[Case, float]
    cache_dirs: dict[Case, str]  # compiled rows: the inductor cache they filled


def warm_up(calls: dict[Case, Call], device: str, warmup: int, cache_root: str) -> WarmUp:
    """First call of each row, then ``warmup - 1`` more untimed calls.

    A compiled row's first call is its compile, in a cold cache of its own, so
    kernels that another row compiled first are not reused; it gets ``warmup``
    more calls after that.
    """
    result = WarmUp({}, {}, {})
    for case, call in calls.items():
        log(f"  warm-up {case.label()}")
        if case.approach.compiled:
            with cold_cache(cache_root) as path:
                result.compile_s[case], result.outputs[case] = timed(call, device)
            result.cache_dirs[case] = path
        else:
            result.outputs[case] = timed(call, device)[1]
        for _ in range(warmup - 1 + case.approach.compiled):
            call()
    return result


def time_round_robin(calls: dict[Case, Call], device: str, repeats: int) -> dict[Case, list[float]]:
    order = list(calls)
    samples: dict[Case, list[float]] = {case: [] for case in order}
    for r in range(repeats):
        start = r % len(order)
        for case in order[start:] + order[:start]:
            samples[case].append(timed(calls[case], device)[0] * 1e3)
        log(f"  repeat {r + 1}/{repeats} done")
    return samples


# ----------------------------------------------------------------------------
# Agreement check: every row computes the same maps as eager camfunc


def as_maps(output: object) -> torch.Tensor | None:
    """``(B, 7, 7)`` maps of the first class, or None for upsampled numpy output."""
    if isinstance(output, list):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        return None
    return output[:, 0] if output.ndim == 4 else output


def agreement(outputs: dict[Case, object]) -> dict[str, float]:
    reference = as_maps(outputs.get(Case("camfunc")))
    if reference is None:
        return {}
    result = {}
    for case, output in outputs.items():
        maps = as_maps(output)
        if case == Case("camfunc") or case.key.startswith("forward") or maps is None:
            continue
        result[case.label()] = (maps.float() - reference.float()).abs().max().item()
    return result


# ----------------------------------------------------------------------------
# Peak memory: CPU in a child process per row, GPU in place


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child_main(spec: dict) -> None:
    """Runs in a fresh process: prints ``{"peak_bytes", "held_bytes"}`` as JSON."""
    configure(spec["threads"])
    case = Case(spec["key"], spec["k"])
    model = make_model("cpu")
    x, classes = make_batch(spec["batch"], spec["k"], "cpu")
    call, close = case.approach.build(model, x, classes)
    gc.collect()
    start = _status_kib("VmRSS")
    for _ in range(max(1, spec["warmup"])):
        call()
    gc.collect()
    _reset_peak_rss()
    before = _status_kib("VmRSS")
    out = call()
    peak = _status_kib("VmHWM")
    del out
    if close is not None:
        close()
    print(json.dumps({"peak_bytes": (peak - before) * 1024, "held_bytes": (before - start) * 1024}))


def cpu_peak(case: Case, batch: int, args, cache_dir: str | None) -> dict[str, int] | None:
    spec = {"key": case.key, "k": case.k, "batch": batch, "threads": args.threads,
            "warmup": args.warmup}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    if cache_dir is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        log(f"  memory child for {case.label()} failed:\n{proc.stderr[-2000:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cuda_peak(call: Call) -> dict[str, int]:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return {"peak_bytes": peak, "held_bytes": None}


def peak_rss_resettable() -> bool:
    try:
        _reset_peak_rss()
        _status_kib("VmHWM")
        return True
    except (OSError, RuntimeError):
        return False


# ----------------------------------------------------------------------------
# One device and batch size


@dataclass
class Row:
    device: str
    batch: int
    key: str
    classes: int
    label: str
    ms: float
    ms_min: float
    samples_ms: list[float]
    compile_s: float | None
    peak_mib: float | None
    held_mib: float | None


def bench_batch(model, device: str, batch: int, cases: list[Case], args,
                measure_memory: bool) -> tuple[list[Row], dict]:
    calls, closers = {}, []
    for case in cases:
        x, classes = make_batch(batch, case.k, device)
        calls[case], close = case.approach.build(model, x, classes)
        if close is not None:
            closers.append(close)
    warm = warm_up(calls, device, args.warmup, args.cache_root)
    diffs = agreement(warm.outputs)
    warm.outputs.clear()
    samples = time_round_robin(calls, device, args.repeats)

    memory = {}
    if measure_memory:
        for case in cases:
            log(f"  memory {case.label()}")
            memory[case] = (cuda_peak(calls[case]) if device == "cuda" else
                            cpu_peak(case, batch, args, warm.cache_dirs.get(case)))
    for close in closers:
        close()

    rows = []
    for case in cases:
        mem = memory.get(case) or {}
        rows.append(Row(
            device, batch, case.key, case.k, case.label(),
            statistics.median(samples[case]), min(samples[case]), samples[case],
            warm.compile_s.get(case), _mib(mem.get("peak_bytes")), _mib(mem.get("held_bytes")),
        ))
    return rows, diffs


def _mib(n: int | None) -> float | None:
    return None if n is None else n / MIB


# ----------------------------------------------------------------------------
# Report


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(args, devices: list[str]) -> dict:
    info = {
        "cpu": cpu_model(),
        "cores_visible": len(os.sched_getaffinity(0)),
        "torch_threads": args.threads,
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in
                     ("torch", "torchvision", "camfunc", "torchcam", "grad-cam", "captum")},
        "devices": devices,
        "load_average_start": os.getloadavg(),
        "command": shlex.join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
    }
    if "cuda" in devices:
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _find(rows: list[Row], like: Row, key: str, k: int = 1) -> Row | None:
    """The row of ``key`` with K = ``k`` on the same device and batch as ``like``."""
    return next((r for r in rows if (r.device, r.batch, r.key, r.classes) ==
                 (like.device, like.batch, key, k)), None)


def main_table(rows: list[Row]) -> list[str]:
    lines = ["| approach | batch | ms/call | × forward | peak extra MiB | × forward memory |",
             "|---|--:|--:|--:|--:|--:|"]
    for r in rows:
        forward = _find(rows, r, "forward")
        lines.append(
            f"| {r.label} | {r.batch} | {r.ms:.1f} | {_fmt(_ratio(r.ms, forward.ms), '.2f')} "
            f"| {_fmt(r.peak_mib, '.1f')} | {_fmt(_ratio(r.peak_mib, forward.peak_mib), '.2f')} |")
    return lines


def classes_table(rows: list[Row], k: int) -> list[str]:
    lines = [f"| approach | batch | 1 class ms | {k} classes ms | × own 1 class |", "|---|--:|--:|--:|--:|"]
    for one in rows:
        many = _find(rows, one, one.key, k) if one.classes == 1 else None
        if many is not None:
            lines.append(f"| {one.label} | {one.batch} | {one.ms:.1f} | {many.ms:.1f} "
                         f"| {many.ms / one.ms:.2f} |")
    return lines


def compile_table(rows: list[Row]) -> list[str]:
    lines = ["| compiled | batch | compile s | ms/call | × compiled forward | × eager forward |",
             "|---|--:|--:|--:|--:|--:|"]
    for r in rows:
        if APPROACHES[r.key].compiled:
            forward, compiled_forward = _find(rows, r, "forward"), _find(rows, r, "forward-compiled")
            lines.append(f"| {r.label} | {r.batch} | {_fmt(r.compile_s, '.1f')} | {r.ms:.1f} "
                         f"| {r.ms / compiled_forward.ms:.2f} | {r.ms / forward.ms:.2f} |")
    return lines


def held_note(rows: list[Row], threshold_mib: float = 10.0) -> str | None:
    """Names the rows that keep memory alive between calls (beyond the forward's own)."""
    held = []
    for r in rows:
        forward = _find(rows, r, "forward")
        if r.held_mib is None or forward.held_mib is None or APPROACHES[r.key].compiled:
            continue
        extra = r.held_mib - forward.held_mib
        if extra > threshold_mib:
            held.append(f"{r.label} (batch {r.batch}): {extra:.0f} MiB")
    if not held:
        return None
    return "Held between calls, so in the baseline rather than the peak: " + "; ".join(held) + "."


def spread_note(rows: list[Row], limit: float = 1.5) -> str | None:
    """Warns when the timed calls of a row differ a lot: the machine was busy."""
    noisy = [r for r in rows if max(r.samples_ms) > limit * min(r.samples_ms)]
    if not noisy:
        return None
    worst = max(noisy, key=lambda r: max(r.samples_ms) / min(r.samples_ms))
    return (f"Noisy timings: in {len(noisy)} of {len(rows)} rows the slowest call took over "
            f"{limit:.1f}x the fastest (worst: {worst.label}, batch {worst.batch}, "
            f"{min(worst.samples_ms):.0f} to {max(worst.samples_ms):.0f} ms). The rows are "
            "interleaved, so the ratios are fairer than the absolute times; all calls are in --json.")


def check_targets(rows: list[Row], k: int) -> list[dict]:
    """PASS/MISS for one device and batch."""
    forward = _find(rows, rows[0], "forward")
    cam = _find(rows, forward, "camfunc")
    many = _find(rows, forward, "camfunc", k) if k > 1 else None
    cforward, ccam = _find(rows, forward, "forward-compiled"), _find(rows, forward, "camfunc-compiled")
    values = {
        "camfunc time / forward": _ratio(cam.ms, forward.ms),
        "camfunc peak memory / forward": _ratio(cam.peak_mib, forward.peak_mib),
        "camfunc K classes / 1 class": _ratio(many.ms, cam.ms) if many else None,
        "compiled camfunc / compiled forward": _ratio(ccam.ms, cforward.ms) if ccam and cforward else None,
    }
    return [{"device": forward.device, "batch": forward.batch, "target": name, "value": value,
             "limit": TARGETS[name], "pass": None if value is None else value <= TARGETS[name]}
            for name, value in values.items()]


def targets_table(results: list[dict], k: int) -> list[str]:
    lines = ["| target | device | batch | value | limit | result |", "|---|---|--:|--:|--:|---|"]
    for t in results:
        verdict = "skipped" if t["pass"] is None else ("PASS" if t["pass"] else "MISS")
        name = t["target"].replace("K classes", f"{k} classes")
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}x"
        lines.append(f"| {name} | {t['device']} | {t['batch']} | {value} "
                     f"| ≤ {t['limit']:.2f}x | {verdict} |")
    return lines


def _paragraphs(*blocks: str | list[str] | None) -> list[str]:
    """Markdown blocks (a line or a list of lines) separated by blank lines; None is left out."""
    out: list[str] = []
    for block in blocks:
        if block:
            out += ["", *([block] if isinstance(block, str) else block)]
    return out


def header(machine: dict, args) -> list[str]:
    v = machine["versions"]
    return [
        "## Grad-CAM benchmark: ResNet-50 at layer4, 224x224, random weights", "",
        f"- CPU: {machine['cpu']}, {machine['cores_visible']} cores visible, "
        f"torch threads: {machine['torch_threads']}",
        f"- GPU: {machine.get('gpu', 'none')}",
        f"- Python {machine['python']}, torch {v['torch']}, torchvision {v['torchvision']}, "
        f"camfunc {v['camfunc']}, torchcam {v['torchcam']}, grad-cam {v['grad-cam']}, "
        f"captum {v['captum']}",
        f"- time: median of {args.repeats} interleaved calls after {args.warmup} warm-up; "
        f"load average {machine['load_average_start'][0]:.2f} at start, "
        f"{machine['load_average_end'][0]:.2f} at end; the run took {machine['total_s'] / 60:.1f} min",
        f"- command: `{machine['command']}`",
    ]


def device_section(rows: list[Row], device: str, args) -> list[str]:
    memory = ("the RSS high-water mark of one steady-state call above the RSS before it, "
              "in a fresh process" if device == "cpu" else
              "torch.cuda.max_memory_allocated() above memory_allocated() before the call")
    k = args.classes
    multi = [f"{k} classes per image: camfunc makes one call with a (B, {k}) class tensor; "
             f"torchcam one forward and {k} extractor calls (retain_graph); pytorch-grad-cam "
             f"and captum {k} calls.", "", *classes_table(rows, k)] if k > 1 else None
    compiled = ["torch.compile (inductor, fullgraph=True, static shapes); compile time is the "
                "first call, in a cold cache:", "", *compile_table(rows)] \
        if any(APPROACHES[r.key].compiled for r in rows) else None
    footnote = ("¹ pytorch-grad-cam's time includes its CPU numpy/OpenCV post-processing and "
                "upsampling to 224x224; the other rows return 7x7 maps."
                if any(r.key == "pytorch-grad-cam" for r in rows) else None)
    measured = any(r.peak_mib is not None for r in rows)
    return _paragraphs(
        f"### {device}", main_table(rows), footnote,
        f"Peak extra MiB: {memory}." if measured else "Peak memory was not measured.",
        held_note(rows), spread_note(rows), multi, compiled)


def agreement_section(diffs: dict) -> list[str] | None:
    if not any(diffs.values()):
        return None
    lines = ["Agreement with eager camfunc (max |difference| of the first class's maps, all "
             "normalised to [0, 1]; pytorch-grad-cam's are upsampled and not compared):", ""]
    for (device, batch), d in diffs.items():
        pairs = ", ".join(f"{name}: {value:.1e}" for name, value in d.items())
        lines.append(f"- {device}, batch {batch}: {pairs}")
    return lines


def report(machine: dict, rows: list[Row], diffs: dict, targets: list[dict], args) -> str:
    sections = [device_section([r for r in rows if r.device == d], d, args) for d in machine["devices"]]
    out = header(machine, args)
    for section in sections:
        out += section
    out += _paragraphs(agreement_section(diffs), "### Targets", targets_table(targets, args.classes))
    return "\n".join(out)


# ----------------------------------------------------------------------------
# Entry point


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[8, 16], help="batch sizes (default: 8 16)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per row (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per row first")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch.set_num_threads (default: every core this process may use)")
    p.add_argument("--classes", type=int, default=10, help="K for the K-classes rows; 1 skips them")
    p.add_argument("--skip", nargs="*", default=[], choices=REFERENCES,
                   help="reference libraries to leave out")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile rows (a cold compile of ResNet-50 took ~30 s "
                        "per row and batch size on 2 cores)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory measurements")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: the CPU, and the GPU too when there is one")
    p.add_argument("--json", metavar="PATH", help="also save the results as JSON")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def pick_devices(choice: str) -> list[str]:
    if choice == "auto":
        return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return [choice]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))
    started = time.perf_counter()
    configure(args.threads)
    cpu_memory = args.memory and peak_rss_resettable()
    if args.memory and not cpu_memory:
        log("cannot reset the peak RSS (/proc/self/clear_refs); CPU memory is not measured")
    args.cache_root = tempfile.mkdtemp(prefix="bench_gradcam_inductor_")
    devices = pick_devices(args.device)
    machine = describe_machine(args, devices)
    cases = plan_cases(args)

    rows, diffs, targets = [], {}, []
    for device in devices:
        if args.compile:
            warm_up_inductor(device)
        model = make_model(device)
        for batch in args.batches:
            log(f"{device}, batch {batch}")
            measure_memory = args.memory and (device == "cuda" or cpu_memory)
            batch_rows, diffs[(device, batch)] = bench_batch(model, device, batch, cases, args,
                                                             measure_memory)
            rows += batch_rows
            targets += check_targets(batch_rows, args.classes)

    shutil.rmtree(args.cache_root, ignore_errors=True)
    machine["load_average_end"] = os.getloadavg()
    machine["total_s"] = time.perf_counter() - started
    print(report(machine, rows, diffs, targets, args))
    if args.json:
        with open(args.json, "w") as f:
            saved_args = {k: v for k, v in vars(args).items() if k not in ("child", "cache_root")}
            json.dump({"machine": machine, "args": saved_args,
                       "rows": [asdict(r) for r in rows], "targets": targets,
                       "agreement": {f"{d}/{b}": v for (d, b), v in diffs.items()}}, f, indent=2)
    enforce_agreement(diffs)


#: Max |difference| of normalised maps from eager camfunc's on the same device. On a GPU,
#: compiled code may order float sums differently from eager kernels.
AGREE_TOL = {"cpu": 1e-4, "cuda": 1e-3}


def enforce_agreement(diffs: dict) -> None:
    """Exits non-zero when a row's maps are not camfunc's: timing different maps is no comparison."""
    misses = [f"{device}, batch {batch}, {name}: {value:.1e} > {AGREE_TOL[device]:.0e}"
              for (device, batch), d in diffs.items() for name, value in d.items()
              if value > AGREE_TOL[device]]
    if misses:
        raise SystemExit("maps disagree with camfunc's: " + "; ".join(misses))


if __name__ == "__main__":
    main()
