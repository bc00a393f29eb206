#!/usr/bin/env python
"""Score-CAM, Ablation-CAM, Smooth Grad-CAM++ and ViT Grad-CAM: camfunc against the reference libraries.

Setup
-----
Four comparisons, each on one torchvision model with random weights (seeded,
``.eval()``) and one seeded random input batch; every class is the model's own
top class for its image. Each comparison has its own baseline row,
``with torch.no_grad(): model(x)`` on the same model and batch (ratio 1.00):

* ``scorecam``: ResNet-18 at ``layer4``, 224x224, batch 1 (512 masked forwards
  per image). ``camfunc.scorecam(split, x, cls, batch_size=32)``; torchcam
  ``ScoreCAM(batch_size=32)``: ``model(x)`` under ``no_grad``, then
  ``extractor(class_idx, scores)``; pytorch-grad-cam ``ScoreCAM`` with
  ``batch_size = 32``: ``cam(input_tensor=x, targets=...)``.
* ``ablationcam``: ResNet-50 at ``layer4``, 224x224, batch 1.
  ``camfunc.ablationcam`` (re-runs only the tail: pool + fc) against
  pytorch-grad-cam ``AblationCAM`` (batch_size 32: it swaps ``layer4`` for a
  layer that replays the ablated activations and re-runs everything else,
  stem to fc, for every channel: 64 batches of 32 for 2048 channels).
  ``--pgc-ablation-batches N`` times only N of those 64 batches and
  extrapolates (see below).
* ``smooth``: ResNet-50 at ``layer4``, 224x224, batch 2, 8 noisy samples with
  std 0.3. ``camfunc.smooth_gradcampp(num_samples=8)`` against torchcam
  ``SmoothGradCAMpp(num_samples=8)``: ``model(x)`` then ``extractor(class_idx)``,
  which runs 8 more forwards and backwards. (pytorch-grad-cam has no Smooth
  Grad-CAM++.)
* ``vit``: ViT-B/16 (the zero-initialised head re-drawn with std 0.02) at
  ``encoder.layers.encoder_layer_10``, 224x224, batch 4. ``camfunc.gradcam`` on
  ``camfunc.split(..., layout="tokens")`` (the class token set aside, the 196
  patch tokens seen as a 768x14x14 grid); torchcam ``GradCAM`` and
  pytorch-grad-cam ``GradCAM`` with a ``reshape_transform`` that drops the
  class token and reshapes the patches to that grid; captum ``LayerGradCam``,
  which has no such option and averages gradients over every axis after the
  second, so on ``(B, 197, 768)`` tokens it would treat the 197 tokens as
  channels and the 768 features as positions: it gets a deep copy of the
  model whose block 10 also passes its patch tokens through a module that
  returns them as that grid (and flattens them back), and is pointed at it.
* ``hf-vit-long``, ``timm-vit-long``: long sequences, where attention's
  N x N matrices dominate: a ViT of 6 blocks, width 192, 3 heads, patch 14 at
  448x448 (1,025 tokens), batch 2, cut at block 4 (Hugging Face's
  ``vit.layers.4``, timm's ``blocks.4``); rows as in ``hf-vit`` and ``vit``.
  Their targets: camfunc's peak extra memory at most 0.5x and its time at
  most 0.9x each reference's.
* ``hf-vit-long-10``: the same Hugging Face ViT, ten classes per image (each
  image's top ten): ``camfunc.gradcam`` with a ``(B, 10)`` class tensor, one
  call; torchcam and pytorch-grad-cam one call per class, torchcam's with
  ``retain_graph=True`` after one forward (its documented use for several
  classes); maps compared as ``(B, 10, h, w)``.
* ``hf-vit``: Hugging Face's ``ViTForImageClassification`` from its default
  config (ViT-B/16, random weights) at ``vit.layers.10``, 224x224, batch 4.
  torch.fx cannot trace it, so ``camfunc.split(model, "vit.layers.10")`` with
  default arguments captures it with ``torch.export`` (the layout read from
  geometry); torchcam ``GradCAM`` with the same ``reshape_transform`` as ``vit``,
  fed the output's ``.logits``.

Hook-based libraries get a private deep copy of the model. Maps are min-max
normalised in every row (camfunc's ``normalize=True``, torchcam's default,
pytorch-grad-cam's own scaling, captum's by hand). Batch sizes and input
sizes can be changed with ``--batch NAME=B`` and ``--size NAME=S`` (ViT-B/16
needs 224).

Agreement
---------
Each reference's maps from its first call are compared with camfunc's first
call: max |difference|. At the layer's resolution for torchcam and captum;
pytorch-grad-cam returns maps resized to the input, so camfunc's maps go
through pytorch-grad-cam's own ``scale_cam_image`` first, as its forward
applies it: min-max and OpenCV resize, then min-max again. PASS when it is at most 1e-4 where the reference follows camfunc's
convention (a MISS makes the script exit non-zero, after its report: timing
different maps is no comparison); "differs" with the reason where it does not on purpose
(pytorch-grad-cam's Score-CAM upsamples masks with ``align_corners=True``;
torchcam's Smooth Grad-CAM++ keeps the last noisy sample's gradients and
activations). With ``--pgc-ablation-batches``, pytorch-grad-cam ablates only
the first 32 N channels; camfunc's map for that same problem (a hand-built
split whose ``A`` is those channels and whose tail gets the rest as context)
is the one compared.

Time
----
Median of the timed calls, all rows of a comparison in the main process,
interleaved round-robin (each round starts at the next row), so machine noise
falls on all of them alike. Rows marked slow (every Score-CAM row, and
pytorch-grad-cam's Ablation-CAM) get ``--slow-warmup`` (default 0; at least 1 on
CUDA, where a first call pays for cuDNN's algorithm search) untimed and
``--slow-repeats`` (default 1) timed calls, the others ``--warmup`` and
``--repeats``. ``torch.set_num_threads(--threads)``.

Extrapolated pytorch-grad-cam Ablation-CAM: its batches of ablated copies all
have the same size and cost, so with ``--pgc-ablation-batches N`` two
variants are timed side by side: one ablating the first ``M = 32 N`` channels
(N batches; a subclass of its ``AblationLayer`` that picks those channels, as
its ``ratio_channels_to_ablate`` hook would) and one ablating none (the fixed
part: its hooked forward, its cached forward, post-processing). The full call
is ``T_0 + (C / M) (T_M - T_0)`` for ``C`` channels. Its peak memory is the
N-batch call's (every batch allocates the same).

Peak extra memory
-----------------
As in ``bench_gradcam.py``: one fresh child process per row (``--child``),
``MALLOC_MMAP_THRESHOLD_=65536``, the kernel's peak-RSS counter reset
(``/proc/self/clear_refs``) after warm-up, then one call; peak extra = VmHWM
minus VmRSS before the call. Warm-up is ``--warmup`` calls (at least one),
except for slow rows, where it is one no-grad forward of the model at the
input's batch and one at the method's inner batch (32), which set up the
thread pool and the convolution kernels for those shapes; the measured call
is then the row's first. Memory held *between* calls (torchcam's hooked
activations, pytorch-grad-cam's graph) is in the baseline, not the peak; for
rows warmed up by their own calls it is named under the tables (``held_mib``
in ``--json``). On a GPU
(``--device cuda``) ``torch.cuda.max_memory_allocated()`` in place.

Usage
-----
    python benchmarks/bench_methods.py --json methods.json
    python benchmarks/bench_methods.py --pgc-ablation-batches 8     # pgc Ablation-CAM extrapolated
    python benchmarks/bench_methods.py --repeats 1 --warmup 0 --only smooth vit --batch vit=1
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam's progress bars, read at tqdm's import

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gradcam import (  # noqa: E402  the shared timing, memory and Markdown helpers
    _fmt,
    _minmax,
    _paragraphs,
    _ratio,
    _reset_peak_rss,
    _status_kib,
    _version,
    cpu_model,
    cuda_peak,
    log,
    peak_rss_resettable,
    timed,
)

SEED = 0
MIB = 2**20
INNER_BATCH = 32  # masked inputs / ablated copies per forward, in every library
AGREE_TOL = 1e-4
FASTER_LIMIT = 50.0  # camfunc Ablation-CAM must be at least this many times faster than pgc's
REFERENCES = ("torchcam", "pytorch-grad-cam", "captum")

Call = Callable[[], object]
Close = Callable[[], None] | None


@dataclass
class Setup:
    """One comparison's model, input and classes, and the options its rows read."""

    model: nn.Module
    x: torch.Tensor
    classes: list[int]
    layer: str
    ablate_channels: int | None = None  # pytorch-grad-cam Ablation-CAM: the first M channels only
    boxes: tuple = ()  # detectors: each image's (reference boxes, their labels)


def _module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _pgc_targets(classes: list[int]) -> list:
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    return [ClassifierOutputTarget(c) for c in classes]


# ----------------------------------------------------------------------------
# The rows: build(setup) -> (call, close)


def build_forward(s: Setup):
    def call():
        with torch.no_grad():
            return s.model(s.x)
    return call, None


def build_camfunc_scorecam(s: Setup):
    import camfunc

    split = camfunc.split(s.model, s.layer)
    return (lambda: camfunc.scorecam(split, s.x, s.classes, batch_size=INNER_BATCH)), None


def build_torchcam_scorecam(s: Setup):
    from torchcam.methods import ScoreCAM

    model = copy.deepcopy(s.model)
    extractor = ScoreCAM(model, s.layer, batch_size=INNER_BATCH, input_shape=tuple(s.x.shape[1:]))

    def call():
        with torch.no_grad():
            scores = model(s.x)
        return extractor(class_idx=s.classes, scores=scores)[0]
    return call, extractor.remove_hooks


def build_pgc_scorecam(s: Setup):
    from pytorch_grad_cam import ScoreCAM

    model = copy.deepcopy(s.model)
    cam = ScoreCAM(model=model, target_layers=[_module(model, s.layer)])
    cam.batch_size = INNER_BATCH  # read by its get_cam_weights (default 16)
    targets = _pgc_targets(s.classes)
    return (lambda: cam(input_tensor=s.x, targets=targets)), cam.activations_and_grads.release


def build_camfunc_ablationcam(s: Setup):
    import camfunc

    split = camfunc.split(s.model, s.layer)
    return (lambda: camfunc.ablationcam(split, s.x, s.classes, batch_size=INNER_BATCH)), None


def _first_channels_layer(count: int):
    """pytorch-grad-cam's ablation layer, told to ablate channels 0 .. count-1 only."""
    import numpy as np
    from pytorch_grad_cam.ablation_layer import AblationLayer

    class FirstChannels(AblationLayer):
        def activations_to_be_ablated(self, activations, ratio_channels_to_ablate=1.0):
            self.indices = np.arange(min(count, activations.shape[0]), dtype=np.int32)
            return self.indices

    return FirstChannels()


def build_pgc_ablationcam(s: Setup, channels: int | None = None):
    from pytorch_grad_cam import AblationCAM

    channels = s.ablate_channels if channels is None else channels
    model = copy.deepcopy(s.model)
    layer = [_module(model, s.layer)]
    cam = (AblationCAM(model=model, target_layers=layer) if channels is None else
           AblationCAM(model=model, target_layers=layer, ablation_layer=_first_channels_layer(channels)))
    targets = _pgc_targets(s.classes)
    return (lambda: cam(input_tensor=s.x, targets=targets)), cam.activations_and_grads.release


def build_pgc_ablationcam_fixed(s: Setup):
    return build_pgc_ablationcam(s, channels=0)


SMOOTH_SAMPLES = 8
SMOOTH_STD = 0.3


def build_camfunc_smooth(s: Setup):
    import camfunc

    split = camfunc.split(s.model, s.layer)
    return (lambda: camfunc.smooth_gradcampp(split, s.x, s.classes, num_samples=SMOOTH_SAMPLES,
                                             std=SMOOTH_STD)), None


def build_torchcam_smooth(s: Setup):
    from torchcam.methods import SmoothGradCAMpp

    model = copy.deepcopy(s.model)
    extractor = SmoothGradCAMpp(model, s.layer, num_samples=SMOOTH_SAMPLES, std=SMOOTH_STD,
                                input_shape=tuple(s.x.shape[1:]))

    def call():
        model(s.x)  # its documented use: a forward (it stores the input), then the extractor
        return extractor(class_idx=s.classes)[0]
    return call, extractor.remove_hooks


def patch_grid(tokens: torch.Tensor) -> torch.Tensor:
    """ViT tokens ``(B, 1 + h*w, D)`` -> the patches as a ``(B, D, h, w)`` grid (square)."""
    patches = tokens[:, 1:]
    side = int(patches.shape[1] ** 0.5)
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def build_camfunc_vit(s: Setup):
    import camfunc

    split = camfunc.split(s.model, s.layer, layout="tokens")
    return (lambda: camfunc.gradcam(split, s.x, s.classes)), None


def build_torchcam_vit(s: Setup):
    from torchcam.methods import GradCAM

    model = copy.deepcopy(s.model)
    extractor = GradCAM(model, s.layer, input_shape=tuple(s.x.shape[1:]), reshape_transform=patch_grid)

    def call():
        return extractor(class_idx=s.classes, scores=model(s.x))[0]
    return call, extractor.remove_hooks


def build_pgc_vit(s: Setup):
    from pytorch_grad_cam import GradCAM

    model = copy.deepcopy(s.model)
    cam = GradCAM(model=model, target_layers=[_module(model, s.layer)], reshape_transform=patch_grid)
    targets = _pgc_targets(s.classes)
    return (lambda: cam(input_tensor=s.x, targets=targets)), cam.activations_and_grads.release


def build_camfunc_detector(s: Setup):
    import camfunc

    split = camfunc.split(s.model, s.layer)  # built from the detector's own modules
    target = camfunc.targets.box_score([b for b, _ in s.boxes], [lab for _, lab in s.boxes])
    return (lambda: camfunc.gradcam(split, s.x, target)), None


def build_pgc_detector(s: Setup):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    model = copy.deepcopy(s.model)
    cam = GradCAM(model=model, target_layers=[_module(model, s.layer)])
    targets = [FasterRCNNBoxScoreTarget(lab.tolist(), b.numpy()) for b, lab in s.boxes]
    return (lambda: cam(input_tensor=s.x, targets=targets)), cam.activations_and_grads.release


def build_camfunc_hf_vit(s: Setup):
    import camfunc

    split = camfunc.split(s.model, s.layer)  # default arguments: torch.export, layout from geometry
    return (lambda: camfunc.gradcam(split, s.x, s.classes)), None


def build_torchcam_hf_vit(s: Setup):
    from torchcam.methods import GradCAM

    model = copy.deepcopy(s.model)
    extractor = GradCAM(model, s.layer, input_shape=tuple(s.x.shape[1:]), reshape_transform=patch_grid)

    def call():
        scores = model(s.x).logits
        if not isinstance(s.classes[0], list):
            return extractor(class_idx=s.classes, scores=scores)[0]
        per_class = [extractor(class_idx=list(c), scores=scores, retain_graph=True)[0]
                     for c in zip(*s.classes)]
        return torch.stack(per_class, 1)
    return call, extractor.remove_hooks


def build_camfunc_classes(s: Setup):
    import camfunc

    split = camfunc.split(s.model, s.layer)  # default arguments
    classes = torch.tensor(s.classes, device=s.x.device)
    return (lambda: camfunc.gradcam(split, s.x, classes)), None


def build_pgc_hf_vit(s: Setup):
    from pytorch_grad_cam import GradCAM

    class Logits(nn.Module):  # pytorch-grad-cam needs a tensor output
        def __init__(self, model: nn.Module):
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x).logits

    model = Logits(copy.deepcopy(s.model))
    cam = GradCAM(model=model, target_layers=[_module(model.model, s.layer)],
                  reshape_transform=patch_grid)
    if not isinstance(s.classes[0], list):
        targets = _pgc_targets(s.classes)
        return (lambda: cam(input_tensor=s.x, targets=targets)), cam.activations_and_grads.release
    per_class = [_pgc_targets(list(c)) for c in zip(*s.classes)]

    def call():
        import numpy as np
        return np.stack([cam(input_tensor=s.x, targets=t) for t in per_class], 1)
    return call, cam.activations_and_grads.release


class PatchGrid(nn.Module):
    """The patch tokens as a grid: a module whose output a hook-based library can be pointed at."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return patch_grid(tokens)


class GridExposingBlock(nn.Module):
    """A ViT block whose patch tokens pass through ``grid`` (a ``PatchGrid``) and back, unchanged."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.grid = PatchGrid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.block(x)
        grid = self.grid(tokens)
        return torch.cat([tokens[:, :1], grid.flatten(2).transpose(1, 2)], 1)


def build_captum_vit(s: Setup):
    from captum.attr import LayerGradCam

    model = copy.deepcopy(s.model)
    parent, name = s.layer.rsplit(".", 1)
    block = GridExposingBlock(_module(model, s.layer))
    setattr(_module(model, parent), name, block)
    method = LayerGradCam(model, block.grid)  # hooks only inside attribute()

    def call():  # detached: captum's maps hold the forward's autograd graph
        maps = method.attribute(s.x, target=s.classes, relu_attributions=True)[:, 0].detach()
        return _minmax(maps)
    return call, None


# ----------------------------------------------------------------------------
# Comparisons


@dataclass(frozen=True)
class Row:
    """One approach in a comparison."""

    key: str
    label: str  # "{}" is the package's version
    build: Callable[[Setup], tuple[Call, Close]]
    package: str | None = None
    slow: bool = False
    differs: str | None = None  # why its maps differ from camfunc's on purpose, if they do

    @property
    def library(self) -> str:
        return self.key.split(":")[0]

    def text(self) -> str:
        return self.label.format(_version(self.package)) if self.package else self.label


@dataclass(frozen=True)
class Comparison:
    key: str
    title: str
    model: str
    layer: str
    batch: int
    size: int
    rows: tuple[Row, ...]
    top: int = 1             # classes per image: its top ones
    time_limit: float = 1.0  # camfunc's time / each reference's, at most
    memory_limit: float = 1.0


LONG_VIT = "6 blocks, width 192, patch 14, 448x448: 1,025 tokens"
FORWARD = Row("forward", "forward (no_grad)", build_forward)
COMPARISONS = {c.key: c for c in (
    Comparison("scorecam", "Score-CAM", "resnet18", "layer4", 1, 224, (
        FORWARD,
        Row("camfunc", "camfunc.scorecam", build_camfunc_scorecam, slow=True),
        Row("torchcam", "torchcam {} ScoreCAM", build_torchcam_scorecam, "torchcam", slow=True),
        Row("pytorch-grad-cam", "pytorch-grad-cam {} ScoreCAM ¹", build_pgc_scorecam, "grad-cam",
            slow=True, differs="it upsamples the masks with align_corners=True"),
    )),
    Comparison("ablationcam", "Ablation-CAM", "resnet50", "layer4", 1, 224, (
        FORWARD,
        Row("camfunc", "camfunc.ablationcam", build_camfunc_ablationcam),
        Row("pytorch-grad-cam", "pytorch-grad-cam {} AblationCAM ¹", build_pgc_ablationcam, "grad-cam",
            slow=True),
        Row("pytorch-grad-cam:fixed", "pytorch-grad-cam {} AblationCAM, no channel ablated",
            build_pgc_ablationcam_fixed, "grad-cam"),
    )),
    Comparison("smooth", f"Smooth Grad-CAM++, {SMOOTH_SAMPLES} samples", "resnet50", "layer4", 2, 224, (
        FORWARD,
        Row("camfunc", "camfunc.smooth_gradcampp", build_camfunc_smooth),
        Row("torchcam", "torchcam {} SmoothGradCAMpp", build_torchcam_smooth, "torchcam",
            differs="it keeps the last noisy sample's gradients and activations"),
    )),
    Comparison("vit", "Grad-CAM on ViT tokens", "vit_b_16", "encoder.layers.encoder_layer_10", 4, 224, (
        FORWARD,
        Row("camfunc", "camfunc.gradcam, layout=\"tokens\"", build_camfunc_vit),
        Row("torchcam", "torchcam {} GradCAM, reshape_transform", build_torchcam_vit, "torchcam"),
        Row("pytorch-grad-cam", "pytorch-grad-cam {} GradCAM ¹, reshape_transform", build_pgc_vit,
            "grad-cam"),
        Row("captum", "captum {} LayerGradCam ², grid module", build_captum_vit, "captum"),
    )),
    Comparison("hf-vit", "Grad-CAM on a Hugging Face ViT (captured with torch.export)",
               "hf_vit_b_16", "vit.layers.10", 4, 224, (
        FORWARD,
        Row("camfunc", "camfunc.gradcam, default split", build_camfunc_hf_vit),
        Row("torchcam", "torchcam {} GradCAM, reshape_transform", build_torchcam_hf_vit, "torchcam"),
    )),
    Comparison("hf-vit-long", f"Grad-CAM on a long-sequence Hugging Face ViT ({LONG_VIT})",
               "hf_vit_long", "vit.layers.4", 2, 448, (
        FORWARD,
        Row("camfunc", "camfunc.gradcam, default split", build_camfunc_hf_vit),
        Row("torchcam", "torchcam {} GradCAM, reshape_transform", build_torchcam_hf_vit, "torchcam"),
        Row("pytorch-grad-cam", "pytorch-grad-cam {} GradCAM ¹, reshape_transform", build_pgc_hf_vit,
            "grad-cam"),
    ), time_limit=0.9, memory_limit=0.5),
    Comparison("timm-vit-long", f"Grad-CAM on a long-sequence timm ViT ({LONG_VIT})",
               "timm_vit_long", "blocks.4", 2, 448, (
        FORWARD,
        Row("camfunc", "camfunc.gradcam, layout=\"tokens\"", build_camfunc_vit),
        Row("torchcam", "torchcam {} GradCAM, reshape_transform", build_torchcam_vit, "torchcam"),
        Row("pytorch-grad-cam", "pytorch-grad-cam {} GradCAM ¹, reshape_transform", build_pgc_vit,
            "grad-cam"),
    ), time_limit=0.9, memory_limit=0.5),
    Comparison("hf-vit-long-10", f"Grad-CAM for ten classes per image, long-sequence Hugging Face ViT "
               f"({LONG_VIT})", "hf_vit_long", "vit.layers.4", 2, 448, (
        FORWARD,
        Row("camfunc", "camfunc.gradcam, (B, 10) classes", build_camfunc_classes),
        Row("torchcam", "torchcam {} GradCAM, a call per class", build_torchcam_hf_vit, "torchcam"),
        Row("pytorch-grad-cam", "pytorch-grad-cam {} GradCAM ¹, a call per class", build_pgc_hf_vit,
            "grad-cam"),
    ), top=10),
    Comparison("detector", "Grad-CAM with a box-score target on Faster R-CNN (MobileNetV3-Large FPN, "
               "320 px, 3 boxes per image)", "fasterrcnn_320", "backbone.body.13", 2, 320, (
        FORWARD,
        Row("camfunc", "camfunc.gradcam, targets.box_score", build_camfunc_detector),
        Row("pytorch-grad-cam", "pytorch-grad-cam {} GradCAM ¹, FasterRCNNBoxScoreTarget",
            build_pgc_detector, "grad-cam",
            differs="random weights give maps of about 1e-12, where its min-max scaling's 1e-7 "
                    "epsilon decides the values; raw maps agree (tests/test_detection.py)"),
    ), memory_limit=0.5),
)}


@dataclass(frozen=True)
class Plan:
    """A comparison as run: its batch, size and rows after ``--skip``."""

    comparison: Comparison
    batch: int
    size: int
    rows: tuple[Row, ...]
    ablate_channels: int | None  # see Setup

    @property
    def key(self) -> str:
        return self.comparison.key


LAYER_CHANNELS = {"resnet18": 512, "resnet50": 2048, "vit_b_16": 768,
                  "hf_vit_b_16": 768, "hf_vit_long": 192, "timm_vit_long": 192}  # at the layers


def plan_comparisons(args) -> list[Plan]:
    plans = []
    for key in args.only:
        comparison = COMPARISONS[key]
        channels = None
        if key == "ablationcam" and args.pgc_ablation_batches is not None:
            channels = args.pgc_ablation_batches * INNER_BATCH
            channels = None if channels >= LAYER_CHANNELS[comparison.model] else channels
        rows = tuple(r for r in comparison.rows
                     if r.library not in args.skip
                     and (r.key != "pytorch-grad-cam:fixed" or channels is not None))
        plans.append(Plan(comparison, args.batch.get(key, comparison.batch),
                          args.size.get(key, comparison.size), rows, channels))
    return plans


def make_setup(plan: Plan, device: str) -> Setup:
    import torchvision

    c = plan.comparison
    torch.manual_seed(SEED)
    if c.model == "hf_vit_b_16":  # Hugging Face's ViT-B/16 from its default config
        from transformers import ViTConfig, ViTForImageClassification

        model = ViTForImageClassification(ViTConfig(image_size=plan.size, num_labels=1000))
    elif c.model == "hf_vit_long":
        from transformers import ViTConfig, ViTForImageClassification

        model = ViTForImageClassification(ViTConfig(
            image_size=plan.size, patch_size=14, hidden_size=192, num_hidden_layers=6,
            num_attention_heads=3, intermediate_size=768, num_labels=1000))
    elif c.model == "fasterrcnn_320":
        return _detector_setup(plan, device)
    elif c.model == "timm_vit_long":
        import timm

        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=plan.size,
                                  patch_size=14, depth=6)
    else:
        model = getattr(torchvision.models, c.model)(weights=None)
    if c.model.startswith("vit"):
        nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initialises it
    model = model.eval().to(device)
    gen = torch.Generator().manual_seed(SEED + plan.batch)
    x = torch.randn(plan.batch, 3, plan.size, plan.size, generator=gen).to(device)
    with torch.no_grad():
        out = model(x)
        scores = out.logits if hasattr(out, "logits") else out
        top = scores.topk(c.top, 1).indices
        classes = top[:, 0].tolist() if c.top == 1 else top.tolist()
    return Setup(model, x, classes, c.layer, plan.ablate_channels)


def _detector_setup(plan: Plan, device: str) -> Setup:
    """Random-weight Faster R-CNN on [0, 1] images; each image's first three detections (the
    label each box-score rule finds first) are the boxes to explain."""
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn
    from torchvision.ops import box_iou

    model = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None,
                                                  box_score_thresh=0.0).eval().to(device)
    gen = torch.Generator().manual_seed(SEED + plan.batch)
    x = torch.rand(plan.batch, 3, plan.size, plan.size, generator=gen).to(device)
    with torch.no_grad():
        found = model(list(x))
    boxes = []
    for f in found:
        kept = f["boxes"][(f["boxes"][:, 2:] - f["boxes"][:, :2]).prod(1) > 1][:3]
        boxes.append((kept.cpu(), f["labels"][box_iou(kept, f["boxes"]).argmax(1)].cpu()))
    return Setup(model, x, [], plan.comparison.layer, None, tuple(boxes))


# ----------------------------------------------------------------------------
# Agreement


def as_maps(output: object) -> torch.Tensor:
    """A row's maps as a float CPU tensor: ``(B, h, w)``, or ``(B, H, W)`` for pytorch-grad-cam."""
    if isinstance(output, torch.Tensor):
        return output.detach().float().cpu()
    return torch.from_numpy(output).float()


def restricted_ablation_maps(s: Setup, channels: int) -> torch.Tensor:
    """camfunc's Ablation-CAM when only channels 0 .. channels-1 of ``A`` may be ablated.

    The split's ``A`` is those channels; the others reach the tail as context.
    """
    import camfunc

    full = camfunc.split(s.model, s.layer)

    def head(x):
        a = full.head(x)
        return a[:, :channels], a[:, channels:]

    def tail(first, rest):
        return full.tail(torch.cat([first, rest], 1))

    return camfunc.ablationcam(camfunc.Split(head, tail), s.x, s.classes, batch_size=INNER_BATCH)


def camfunc_reference(plan: Plan, setup: Setup, row: Row, camfunc_maps: torch.Tensor) -> torch.Tensor:
    """camfunc's maps in the form ``row`` returns them."""
    if plan.key == "ablationcam" and setup.ablate_channels is not None:
        camfunc_maps = restricted_ablation_maps(setup, setup.ablate_channels).cpu()
    if row.library == "pytorch-grad-cam":
        from pytorch_grad_cam.utils.image import scale_cam_image

        size = tuple(setup.x.shape[-1:-3:-1])  # (W, H), OpenCV's order
        flat = camfunc_maps.reshape(-1, *camfunc_maps.shape[-2:]).numpy()  # (B, K) classes: B K maps
        # As its forward does: min-max and resize per layer, then min-max the mean over layers.
        scaled = torch.from_numpy(scale_cam_image(scale_cam_image(flat, size)))
        return scaled.reshape(*camfunc_maps.shape[:-2], *scaled.shape[-2:])
    return camfunc_maps


def agreement(plan: Plan, setup: Setup, outputs: dict[str, object]) -> dict[str, dict]:
    """Per reference row: max |difference| from camfunc and PASS / MISS / differs."""
    if "camfunc" not in outputs:
        return {}
    ours = as_maps(outputs["camfunc"])
    result = {}
    for row in plan.rows:
        if row.key in ("forward", "camfunc", "pytorch-grad-cam:fixed") or row.key not in outputs:
            continue
        diff = (as_maps(outputs[row.key]) - camfunc_reference(plan, setup, row, ours)).abs().max().item()
        verdict = "differs" if row.differs else ("PASS" if diff <= AGREE_TOL else "MISS")
        result[row.key] = {"max_abs_diff": diff, "verdict": verdict, "why": row.differs}
    return result


# ----------------------------------------------------------------------------
# Timing


def _counts(row: Row, args, device: str) -> tuple[int, int]:
    """(untimed warm-up calls, timed calls) for a row. On a GPU every row, slow ones too, gets
    a warm-up call: the first pays for cuDNN's algorithm search, and would time that."""
    warm, timed = (args.slow_warmup, args.slow_repeats) if row.slow else (args.warmup, args.repeats)
    return (max(1, warm) if device == "cuda" else warm), timed


def time_rows(calls: dict[str, Call], rows: tuple[Row, ...], device: str, args):
    """Warm-up, then interleaved timed calls; returns (ms samples, each row's first output)."""
    first: dict[str, object] = {}
    for row in rows:
        for _ in range(_counts(row, args, device)[0]):
            log(f"  warm-up {row.text()}")
            out = calls[row.key]()
            first.setdefault(row.key, out)
    samples: dict[str, list[float]] = {row.key: [] for row in rows}
    wanted = {row.key: _counts(row, args, device)[1] for row in rows}
    order = [row.key for row in rows]
    for r in range(max(wanted.values())):
        start = r % len(order)
        for key in order[start:] + order[:start]:
            if len(samples[key]) < wanted[key]:
                seconds, out = timed(calls[key], device)
                samples[key].append(seconds * 1e3)
                first.setdefault(key, out)
                del out
        log(f"  round {r + 1}/{max(wanted.values())} done")
    return samples, first


# ----------------------------------------------------------------------------
# Peak memory (CPU: one child process per row)


def rss_peak(call: Call) -> tuple[int, int]:
    """(bytes above the RSS before it at the RSS high-water mark of one call, that RSS in KiB)."""
    gc.collect()
    _reset_peak_rss()
    before_kib = _status_kib("VmRSS")
    call()  # its output is dropped at once; the high-water mark remembers it
    return (_status_kib("VmHWM") - before_kib) * 1024, before_kib


def prime(setup: Setup) -> None:
    """Thread pool and convolution kernels for the input's batch and the inner batch (slow rows)."""
    with torch.no_grad():
        setup.model(setup.x)
        setup.model(setup.x[:1].expand(INNER_BATCH, *setup.x.shape[1:]).contiguous())


def child_main(spec: dict) -> None:
    """Runs in a fresh process: prints ``{"peak_bytes", "held_bytes"}`` as JSON."""
    torch.set_num_threads(spec["threads"])
    plan = next(p for p in plan_comparisons(parse_args(spec["argv"])) if p.key == spec["comparison"])
    row = next(r for r in plan.rows if r.key == spec["row"])
    setup = make_setup(plan, "cpu")
    call, close = row.build(setup)
    gc.collect()
    start_kib = _status_kib("VmRSS")
    warm_ups = [lambda: prime(setup)] if row.slow else [call] * max(1, spec["warmup"])
    for warm_up in warm_ups:
        warm_up()
    peak_bytes, before_kib = rss_peak(call)
    if close is not None:
        close()
    held = None if row.slow else (before_kib - start_kib) * 1024  # only its own calls came before
    print(json.dumps({"peak_bytes": peak_bytes, "held_bytes": held}))


def child_peak(plan: Plan, row: Row, args) -> dict | None:
    spec = {"comparison": plan.key, "row": row.key, "threads": args.threads,
            "warmup": args.warmup, "argv": args.argv}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        log(f"  memory child for {row.text()} failed:\n{proc.stderr[-2000:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------
# One comparison


@dataclass
class Result:
    comparison: str
    key: str
    label: str
    ms: float
    samples_ms: list[float]
    peak_mib: float | None
    held_mib: float | None
    agreement: dict | None = None
    extrapolated_from: dict | None = field(default=None)


def _mib(n: int | None) -> float | None:
    return None if n is None else n / MIB


def run_comparison(plan: Plan, device: str, args, measure_memory: bool) -> list[Result]:
    setup = make_setup(plan, device)
    log(f"{plan.comparison.title}: {plan.comparison.model}, batch {plan.batch}, "
        f"{plan.size}x{plan.size}, classes {setup.classes}")
    calls, closers = {}, []
    for row in plan.rows:
        calls[row.key], close = row.build(setup)
        if close is not None:
            closers.append(close)
    samples, first = time_rows(calls, plan.rows, device, args)
    agrees = agreement(plan, setup, first)
    first.clear()

    memory = {}
    if measure_memory:
        for row in plan.rows:
            log(f"  memory {row.text()}")
            memory[row.key] = cuda_peak(calls[row.key]) if device == "cuda" else child_peak(plan, row, args)
    for close in closers:
        close()
    results = []
    for row in plan.rows:
        mem = memory.get(row.key) or {}
        results.append(Result(plan.key, row.key, row.text(), statistics.median(samples[row.key]),
                              samples[row.key], _mib(mem.get("peak_bytes")),
                              _mib(mem.get("held_bytes")), agrees.get(row.key)))
    if plan.ablate_channels is not None:
        extrapolate(results, plan)
    return results


def extrapolate(results: list[Result], plan: Plan) -> None:
    """pytorch-grad-cam's full Ablation-CAM time from its M-channel and 0-channel calls."""
    partial = next((r for r in results if r.key == "pytorch-grad-cam"), None)
    fixed = next((r for r in results if r.key == "pytorch-grad-cam:fixed"), None)
    if partial is None or fixed is None:
        return
    channels, total = plan.ablate_channels, LAYER_CHANNELS[plan.comparison.model]
    partial.extrapolated_from = {"ablated_channels": channels, "channels": total,
                                 "partial_ms": partial.ms, "fixed_ms": fixed.ms}
    partial.ms = fixed.ms + total / channels * (partial.ms - fixed.ms)
    partial.label += " ³"


# ----------------------------------------------------------------------------
# Report


def _get(results: list[Result], comparison: str, key: str) -> Result | None:
    return next((r for r in results if (r.comparison, r.key) == (comparison, key)), None)


def _agree_cell(r: Result) -> str:
    if r.agreement is None:
        return ""
    return f"{r.agreement['verdict']} ({r.agreement['max_abs_diff']:.1e})"


def comparison_table(results: list[Result]) -> list[str]:
    lines = ["| approach | ms/call | × forward | × camfunc | peak extra MiB | × forward memory "
             "| maps vs camfunc |", "|---|--:|--:|--:|--:|--:|---|"]
    forward = _get(results, results[0].comparison, "forward")
    ours = _get(results, results[0].comparison, "camfunc")
    for r in results:
        if r.key == "pytorch-grad-cam:fixed":
            continue
        lines.append(
            f"| {r.label} | {r.ms:.1f} | {_fmt(_ratio(r.ms, forward.ms), '.2f')} "
            f"| {_fmt(_ratio(r.ms, ours.ms) if ours else None, '.2f')} | {_fmt(r.peak_mib, '.1f')} "
            f"| {_fmt(_ratio(r.peak_mib, forward.peak_mib), '.2f')} | {_agree_cell(r)} |")
    return lines


def notes(results: list[Result], plan: Plan, args) -> list[str]:
    out = []
    forward = _get(results, plan.key, "forward")
    slow = [r.label for r, row in zip(results, plan.rows) if row.slow]
    if slow:
        out.append(f"Slow rows ({', '.join(slow)}): {args.slow_repeats} timed call(s) after "
                   f"{args.slow_warmup} warm-up; the others {args.repeats} after {args.warmup}.")
    for r in results:
        if r.agreement and r.agreement["why"]:
            out.append(f"{r.label}: maps differ from camfunc's on purpose: {r.agreement['why']}.")
        if r.extrapolated_from:
            e = r.extrapolated_from
            out.append(
                f"³ extrapolated: pytorch-grad-cam's call ablating the first {e['ablated_channels']} "
                f"of {e['channels']} channels took {e['partial_ms']:.0f} ms and with none ablated "
                f"{e['fixed_ms']:.0f} ms; all {e['channels']} = {e['fixed_ms']:.0f} + "
                f"{e['channels']}/{e['ablated_channels']} × ({e['partial_ms']:.0f} − {e['fixed_ms']:.0f}) "
                f"= {r.ms:.0f} ms. Its batches of {INNER_BATCH} ablated copies all cost the same; "
                f"peak memory is the partial call's, maps are compared on those channels.")
        if forward and r.held_mib is not None and forward.held_mib is not None \
                and r.held_mib - forward.held_mib > 10:
            out.append(f"{r.label} holds {r.held_mib - forward.held_mib:.0f} MiB between calls "
                       "(in the baseline, not the peak).")
        if max(r.samples_ms) > 1.5 * min(r.samples_ms):
            out.append(f"Noisy: {r.label} took {min(r.samples_ms):.0f} to {max(r.samples_ms):.0f} ms.")
    return out


def check_targets(results: list[Result]) -> list[dict]:
    """camfunc at least as fast and as lean as each reference; Ablation-CAM 50x faster than pgc's."""
    targets = []
    for comparison in dict.fromkeys(r.comparison for r in results):
        ours = _get(results, comparison, "camfunc")
        if ours is None:
            continue
        for ref in (r for r in results if r.comparison == comparison and r.key in REFERENCES):
            limits = COMPARISONS[comparison]
            targets.append({"comparison": comparison, "target": f"camfunc time / {ref.label}",
                            "value": _ratio(ours.ms, ref.ms), "limit": limits.time_limit, "at_most": True})
            targets.append({"comparison": comparison, "target": f"camfunc peak memory / {ref.label}",
                            "value": _ratio(ours.peak_mib, ref.peak_mib), "limit": limits.memory_limit,
                            "at_most": True})
            if comparison == "ablationcam" and ref.key == "pytorch-grad-cam":
                targets.append({"comparison": comparison, "target": f"{ref.label} time / camfunc",
                                "value": _ratio(ref.ms, ours.ms), "limit": FASTER_LIMIT,
                                "at_most": False})
    for t in targets:
        v = t["value"]
        t["pass"] = None if v is None else (v <= t["limit"] if t["at_most"] else v >= t["limit"])
    return targets


def targets_table(targets: list[dict]) -> list[str]:
    lines = ["| comparison | target | value | limit | result |", "|---|---|--:|--:|---|"]
    for t in targets:
        verdict = "n/a" if t["pass"] is None else ("PASS" if t["pass"] else "MISS")
        limit = f"{'≤' if t['at_most'] else '≥'} {t['limit']:.2f}x"
        value = "n/a" if t["value"] is None else f"{t['value']:.3g}x"
        lines.append(f"| {t['comparison']} | {t['target']} | {value} "
                     f"| {limit} | {verdict} |")
    return lines


def header(machine: dict) -> list[str]:
    v = machine["versions"]
    return [
        "## Method benchmarks: Score-CAM, Ablation-CAM, Smooth Grad-CAM++, ViT Grad-CAM "
        "(random weights)", "",
        f"- CPU: {machine['cpu']}, {machine['cores_visible']} cores visible, "
        f"torch threads: {machine['torch_threads']}; device: {machine['device']}",
        f"- Python {machine['python']}, " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- load average {machine['load_average_start'][0]:.2f} at start, "
        f"{machine['load_average_end'][0]:.2f} at end; the run took {machine['total_s'] / 60:.1f} min; "
        f"{machine['date']}",
        f"- command: `{machine['command']}`",
    ]


FOOTNOTES = ("¹ pytorch-grad-cam's time includes its numpy/OpenCV post-processing and resizing to "
             "the input's size; its maps are compared with camfunc's after its own scaling. "
             "² captum gets a model copy whose block 10 passes its patch tokens through a grid "
             "module (captum has no reshape option). Peak extra MiB: the RSS high-water mark of "
             "one call above the RSS before it, in a fresh process (GPU: max_memory_allocated).")


def report(machine: dict, plans: list[Plan], results: list[Result], targets: list[dict], args) -> str:
    out = header(machine)
    for plan in plans:
        rows = [r for r in results if r.comparison == plan.key]
        c = plan.comparison
        out += _paragraphs(f"### {c.title}: {c.model} at {c.layer}, {plan.size}x{plan.size}, "
                           f"batch {plan.batch}", comparison_table(rows), notes(rows, plan, args))
    out += _paragraphs(FOOTNOTES, "### Targets", targets_table(targets))
    return "\n".join(out)


# ----------------------------------------------------------------------------
# Entry point


def _assignments(values: list[str]) -> dict[str, int]:
    out = {}
    for item in values:
        name, _, number = item.partition("=")
        if name not in COMPARISONS or not number.isdigit() or int(number) < 1:
            raise SystemExit(f"expected NAME=N with NAME one of {sorted(COMPARISONS)} and N >= 1, "
                             f"got {item!r}")
        out[name] = int(number)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", default=list(COMPARISONS), choices=list(COMPARISONS),
                   help="comparisons to run (default: all)")
    p.add_argument("--skip", nargs="*", default=[], choices=REFERENCES,
                   help="reference libraries to leave out")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per row (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per row first")
    p.add_argument("--slow-repeats", type=int, default=1, help="timed calls of a slow row")
    p.add_argument("--slow-warmup", type=int, default=0, help="untimed calls of a slow row")
    p.add_argument("--batch", nargs="*", default=[], metavar="NAME=B", help="batch size per comparison")
    p.add_argument("--size", nargs="*", default=[], metavar="NAME=S", help="input size per comparison")
    p.add_argument("--pgc-ablation-batches", type=int, metavar="N",
                   help="time N of pytorch-grad-cam Ablation-CAM's batches of 32 and extrapolate")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch.set_num_threads (default: every core this process may use)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip peak memory")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--json", metavar="PATH", help="also save the results as JSON")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.batch, args.size = _assignments(args.batch), _assignments(args.size)
    if min(args.repeats, args.slow_repeats) < 1 or min(args.warmup, args.slow_warmup) < 0:
        p.error("repeats must be >= 1 and warm-ups >= 0")
    if args.pgc_ablation_batches is not None and args.pgc_ablation_batches < 1:
        p.error("--pgc-ablation-batches must be >= 1")
    return args


def describe_machine(args) -> dict:
    import platform

    return {
        "cpu": cpu_model(), "cores_visible": len(os.sched_getaffinity(0)),
        "torch_threads": args.threads, "device": (torch.cuda.get_device_name()
                                                  if args.device == "cuda" else "cpu"),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in
                     ("torch", "torchvision", "camfunc", "torchcam", "grad-cam", "captum")},
        "load_average_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "command": shlex.join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    measure_memory = args.memory and (args.device == "cuda" or peak_rss_resettable())
    if args.memory and not measure_memory:
        log("cannot reset the peak RSS (/proc/self/clear_refs); memory is not measured")
    machine = describe_machine(args)
    plans = plan_comparisons(args)
    results = []
    for plan in plans:
        results += run_comparison(plan, args.device, args, measure_memory)
    targets = check_targets(results)
    machine["load_average_end"] = os.getloadavg()
    machine["total_s"] = time.perf_counter() - started
    print(report(machine, plans, results, targets, args))
    if args.json:
        with open(args.json, "w") as f:
            saved = {k: v for k, v in vars(args).items() if k != "child"}
            json.dump({"machine": machine, "args": saved, "results": [asdict(r) for r in results],
                       "targets": targets}, f, indent=2)
    misses = [f"{r.comparison}/{r.label}: {r.agreement['max_abs_diff']:.1e}" for r in results
              if r.agreement and r.agreement["verdict"] == "MISS"]
    if misses:  # timing different maps is no comparison
        raise SystemExit(f"maps disagree with camfunc's (> {AGREE_TOL:.0e}): " + "; ".join(misses))


if __name__ == "__main__":
    main()
