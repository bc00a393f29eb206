"""A run's settings: checked before any work, and fingerprinted for resuming.

The fingerprint covers everything that changes the results (data listing,
model weights, layer, methods, classes, metrics, storage, shard size, seed)
and nothing that does not (batch size, workers, device, compile, number of
ranks), so a run may be resumed with another batch size or on more ranks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from camfunc.runs._shards import FORMAT, MAP_DTYPES


@dataclasses.dataclass(frozen=True)
class Request:
    """What :func:`camfunc.runs.run` was asked: its arguments as given, one value (checked
    later, by :func:`check_options` and the steps of the run)."""

    data: str | Path
    out: str | Path
    model: str | nn.Module
    weights: str | None
    layer: str | None
    size: int | None
    pretrained_cfg: str | None
    mean: Sequence[float] | None
    std: Sequence[float] | None
    methods: Sequence[str]
    classes: str
    metrics: bool
    batch_size: int
    shard_size: int
    num_workers: int
    map_dtype: str
    upsample: bool
    seed: int
    device: str | torch.device | None
    compile: bool
    compile_backend: str | Callable[..., Any]
    progress: bool
    exif: bool
    decode: str


@dataclasses.dataclass(frozen=True)
class Options:
    """The checked arguments of :func:`camfunc.runs.run`."""

    methods: tuple[str, ...]
    topk: int | None            # None: the true class
    classes: str
    metrics: bool
    batch_size: int
    shard_size: int
    num_workers: int
    map_dtype: str
    upsample: bool
    seed: int
    progress: bool


def parse_classes(classes: Any) -> int | None:
    """``"true"`` -> None; ``"predicted"`` -> 1; ``"topK"`` -> K."""
    if classes == "true":
        return None
    if classes == "predicted":
        return 1
    if isinstance(classes, str) and classes.startswith("top") and classes[3:].isdigit() \
            and int(classes[3:]) >= 1:
        return int(classes[3:])
    raise ValueError(f"classes must be 'true', 'predicted' or 'topK' (e.g. 'top3'), got {classes!r}")


def check_options(request: Request) -> Options:
    """The request's work and storage options, checked."""
    methods, classes, metrics = request.methods, request.classes, request.metrics
    batch_size, shard_size, num_workers = (request.batch_size, request.shard_size,
                                           request.num_workers)
    map_dtype, upsample, seed, progress = (request.map_dtype, request.upsample, request.seed,
                                           request.progress)
    if isinstance(methods, str):
        methods = [methods]
    if not isinstance(methods, Sequence) or not methods or \
            not all(isinstance(m, str) for m in methods):
        raise ValueError(f"methods must be a non-empty list of method names, got {methods!r}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods {list(methods)} name a method twice")
    if map_dtype not in MAP_DTYPES:
        raise ValueError(f"map_dtype must be one of {', '.join(MAP_DTYPES)}, got {map_dtype!r}")
    for name, flag in (("metrics", metrics), ("upsample", upsample), ("progress", progress)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    for name, count, least in (("batch_size", batch_size, 1), ("shard_size", shard_size, 1),
                               ("num_workers", num_workers, 0)):
        if isinstance(count, bool) or not isinstance(count, int) or count < least:
            wanted = "a positive int" if least == 1 else f"an int >= {least}"
            raise ValueError(f"{name} must be {wanted}, got {count!r}")
    return Options(tuple(methods), parse_classes(classes), classes, metrics, batch_size, shard_size,
                   num_workers, map_dtype, upsample, seed, progress)


DECODERS = ("auto", "pillow", "device")


def check_reading(exif: Any, decode: Any, device: torch.device) -> str:
    """The JPEG decoder to use: "device" (auto on CUDA, with torchvision) or "pillow"."""
    if not isinstance(exif, bool):
        raise ValueError(f"exif must be True or False, got {exif!r}")
    if decode not in DECODERS:
        raise ValueError(f"decode must be one of {', '.join(DECODERS)}, got {decode!r}")
    if decode != "pillow":
        try:
            import torchvision.io  # noqa: F401
        except ImportError:
            if decode == "device":
                raise ValueError("decode='device' needs torchvision: pip install torchvision; "
                                 "or use decode='pillow'") from None
            return "pillow"
    if decode == "auto":
        return "device" if device.type == "cuda" else "pillow"
    return str(decode)


def state_sha256(model: nn.Module) -> str:
    """A hash of the model's class and every parameter and buffer, bit for bit."""
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for name, value in model.state_dict().items():
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}".encode())
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    from camfunc import __version__

    return {"camfunc": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "torchvision": _version("torchvision"), "pillow": _version("pillow"),
            "numpy": _version("numpy"), "format": FORMAT}
