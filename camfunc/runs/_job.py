"""``camfunc.runs.run``: a dataset-scale, resumable, sharded, distributed run of CAM methods."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import camfunc
from camfunc import models
from camfunc.io import progress_bar, write_json
from camfunc.models import (
    LoadedModel,
    UsageError,
    input_channels,
    make_split,
    resolve_methods,
    with_normalisation,
)
from camfunc.runs import _distributed, _lock, _settings, _shards
from camfunc.runs._dataset import (
    Batch,
    ImageFolderData,
    ScenesData,
    collate,
    open_data,
    parse_scenes,
)
from camfunc.runs._decode import decoded_batch
from camfunc.runs._work import Explained, Work, explain_batch

MANIFEST = "manifest.json"
INDEX = "index.csv"
METRICS = "metrics.csv"

#: A dataset a run reads: an image folder, or generated scenes.
Data = ImageFolderData | ScenesData


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What a run did; ``str(result)`` is its summary line."""

    out: Path
    manifest: Path
    images: int            # images explained (readable), the whole dataset
    failed: int            # images that could not be read
    shards: int            # shard files in the folder
    written: int           # shards this call computed (all ranks)
    skipped: int           # shards a previous call had finished
    seconds: float         # this call's processing time (the slowest rank)
    images_per_second: float

    def __str__(self) -> str:
        # A call that found every shard done computed nothing: no rate to report.
        speed = (f"{self.seconds:.1f} s, {self.images_per_second:.3g} img/s" if self.written
                 else "nothing left to compute")
        return (f"camfunc run: {self.images} image(s) explained, {self.failed} failed, "
                f"{self.shards} shard(s) ({self.written} written, {self.skipped} already done), "
                f"{speed}; wrote {self.manifest}")


def _user_error(call: Callable[[], Any]) -> Any:
    """The command line's one-line errors, as ValueError for Python callers."""
    try:
        return call()
    except UsageError as error:
        raise ValueError(str(error)) from None


def choose_device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            # Under torchrun each rank takes its own GPU; current_device() is 0 on all of them.
            device = torch.device("cuda", _distributed.local_rank())
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", _distributed.local_rank())
    return torch.device("cpu")


def load(model: str | nn.Module, weights: str | None, layer: str | None, size: int | None,
         mean: Sequence[float] | None, std: Sequence[float] | None, seed: int,
         device: torch.device, pretrained_cfg: str | None = None) -> tuple[LoadedModel, str]:
    """The model on ``device`` and the hash of its weights; the caller's module is never moved."""
    if isinstance(model, nn.Module):
        # A training-mode model is refused by the split, with camfunc's usual message.
        side = 224 if size is None else size
        loaded = LoadedModel(model, layer, (side, side),
                             None if mean is None else tuple(mean), None if std is None else tuple(std),
                             channels=input_channels(model))
    elif isinstance(model, str):
        # Seeded, so a model with random weights is the same on every rank and restart.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            loaded = _user_error(lambda: models.load(model, weights, size, pretrained_cfg))
        loaded = with_normalisation(loaded, mean, std)
    else:
        raise TypeError(f"model must be a spec string or an nn.Module, got {type(model).__name__}")
    state = _settings.state_sha256(loaded.model)
    on_device = all(p.device == device for p in loaded.model.parameters())
    if not on_device:
        moved = copy.deepcopy(loaded.model) if isinstance(model, nn.Module) else loaded.model
        loaded = dataclasses.replace(loaded, model=moved.to(device))
    return loaded, state


def probe(split: camfunc.Split, loaded: LoadedModel, device: torch.device) -> tuple[int, int, tuple]:
    """``(channels, num_classes, layer spatial size)`` from one blank image."""
    x = loaded.normalise(torch.zeros(1, loaded.channels, *loaded.size)).to(device)
    with torch.no_grad():
        carry = split.bound(x).head(x)
        activations = carry[0] if isinstance(carry, tuple) else carry
        scores = split(x)
    if not isinstance(scores, Tensor) or scores.ndim != 2:
        raise ValueError("a run explains classifiers: the model must return (B, num_classes) "
                         f"scores, got {getattr(scores, 'shape', type(scores).__name__)}")
    return activations.shape[1], scores.shape[1], tuple(activations.shape[2:])


def label_classes(data: Data, loaded: LoadedModel, num_classes: int) -> Tensor:
    """Dataset label -> model class: by name where the model names every folder, else by order."""
    names = loaded.class_names
    if names and all(c in names for c in data.classes):
        return torch.tensor([names.index(c) for c in data.classes])
    if len(data.classes) > num_classes:
        raise ValueError(f"the data has {len(data.classes)} classes but the model {num_classes}; "
                         "true classes need matching class folders (or use classes='predicted')")
    return torch.arange(len(data.classes))


def metric_columns(metrics: bool, has_masks: bool) -> list[str]:
    if not metrics:
        return []
    return ["drop", "increase", "masked_probability"] + (
        ["pointing_game", "energy_pointing_game"] if has_masks else [])


def check_folder(out: Path, fingerprint: str, count: int) -> _shards.Survey:
    """Finished and damaged shards, or why ``out`` cannot be resumed with these settings."""
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            found = json.loads(manifest.read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            found = None
        if found != fingerprint:
            return _shards.Survey([], [], (
                f"{out} holds a run with other settings (fingerprint {str(found)[:12]}, this "
                f"run {fingerprint[:12]}); use the same arguments to resume, another --out "
                f"folder, or delete {out}"))
    return _shards.survey_shards(out, count, fingerprint)


def batch_plan(shards: list[int], num_images: int, shard_size: int,
               batch_size: int) -> list[tuple[int, list[int]]]:
    """``(shard, dataset indices)`` batches; a batch never spans two shards."""
    plan = []
    for shard in shards:
        indices = list(_shards.shard_range(shard, num_images, shard_size))
        plan += [(shard, indices[i:i + batch_size]) for i in range(0, len(indices), batch_size)]
    return plan


@dataclasses.dataclass
class ShardBuffer:
    parts: list[Explained] = dataclasses.field(default_factory=list)
    failed: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _joined(parts: list[Tensor], empty: Tensor) -> Tensor:
    return torch.cat(parts) if parts else empty


def shard_payload(shard: int, buffer: ShardBuffer, common: dict[str, Any],
                  empty: Explained) -> dict[str, Any]:
    parts = buffer.parts
    def field(name: str) -> Tensor:
        return _joined([getattr(p, name) for p in parts], getattr(empty, name))

    return {**common, "shard": shard,
            "start": common["shard_size"] * shard,
            "stop": min(common["shard_size"] * (shard + 1), common["num_images"]),
            "indices": field("indices"), "labels": field("labels"), "classes": field("classes"),
            "scores": field("scores"), "probabilities": field("probabilities"),
            "maps": {m: _joined([p.maps[m] for p in parts], e) for m, e in empty.maps.items()},
            "metrics": {m: {c: _joined([p.metrics[m][c] for p in parts], e)
                            for c, e in columns.items()}
                        for m, columns in empty.metrics.items()},
            "failed": buffer.failed}


def empty_result(methods: Sequence[str], k: int, map_size: tuple, map_dtype: str,
                 columns: list[str]) -> Explained:
    """A batch of no images, with the shapes a shard of no readable image stores."""
    none = torch.zeros(0, dtype=torch.long)
    maps = {m: _shards.encode_maps(torch.zeros(0, k, *map_size), map_dtype) for m in methods}
    table = {m: {c: torch.zeros(0, k) for c in columns} for m in methods} if columns else {}
    return Explained(none, none, torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k),
                     torch.zeros(0, k), maps, table)


def merge(out: Path, manifest: dict[str, Any], data: Data, count: int,
          class_names: Sequence[str] | None, columns: list[str]) -> dict[str, Any]:
    """Rank 0, after every shard is written: index.csv, metrics.csv, and the final manifest."""
    names = [data.name(i) for i in range(len(data))]
    labels = [int(v) for v in data.labels]
    shards, failed = [], []
    for number, shard in enumerate(_shards.shards_in_order(out, count)):
        failed += shard["failed"]
        shards.append({"shard": number, "file": _shards.shard_path(Path("."), number).as_posix(),
                       "start": shard["start"], "stop": shard["stop"],
                       "images": len(shard["indices"]), "failed": len(shard["failed"]),
                       _shards.DIGEST: shard[_shards.DIGEST]})
    _shards.write_csv(out / INDEX, ["index", "name", "label", "status", "shard", "file", "row",
                                    "reason"],
                      _shards.index_rows(out, count, names, labels))
    base = ["index", "name", "label", "method", "rank", "class", "class_name", "score",
            "probability"]
    _shards.write_csv(out / METRICS, base + columns,
                      (row for shard in _shards.shards_in_order(out, count)
                       for row in _shards.metric_rows(shard, names, class_names)))
    return {**manifest, "status": "complete", "images": sum(s["images"] for s in shards),
            "failed": failed, "shards": shards,
            "files": {"index": INDEX, "metrics": METRICS, "shards": _shards.SHARD_FOLDER}}


def run(data: str | Path, out: str | Path, *, model: str | nn.Module = "builtin",
        weights: str | None = None, layer: str | None = None, size: int | None = None,
        pretrained_cfg: str | None = None, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
        methods: Sequence[str] = ("gradcam",), classes: str = "predicted",
        metrics: bool = False, batch_size: int = 16, shard_size: int = 256,
        num_workers: int = 0, map_dtype: str = "float16", upsample: bool = False, seed: int = 0,
        device: str | torch.device | None = None, compile: bool = False,
        compile_backend: str | Callable[..., Any] = "inductor",
        progress: bool = True, exif: bool = True, decode: str = "auto") -> RunResult:
    r"""Explain a whole dataset with CAM methods, in resumable shards, on one or many processes.

    (No formula: this drives the methods of :data:`camfunc.METHODS` over a dataset.)

    **Data.** ``data`` is a folder in ImageFolder layout (``ROOT/CLASS/IMAGE``;
    classes are the sorted sub-folder names, images sorted by path within
    each) or ``"scenes:N"`` / ``"scenes:N:SEED"`` for ``camfunc.zoo.scenes(N,
    seed=SEED)`` (seed 0 by default), which adds object masks and so the pointing games.
    Images are read as they are: every Pillow mode, 16-bit and float ones
    scaled to [0, 1] by their range (never clipped), turned by their EXIF
    orientation (``exif=False`` keeps them as stored), with the channels the
    model takes (grayscale to RGB only for a three-channel model), fed as the
    model is (below) and normalised as it expects. An unreadable image is
    recorded as failed, with the reason, and the run goes on. JPEG files are
    decoded on the device (``torchvision.io.decode_jpeg``, batched; the
    loader's workers only read bytes) with ``decode="device"``, the default
    on CUDA (``"auto"``); ``decode="pillow"`` decodes everything on the CPU.
    A file the device cannot decode falls back to Pillow, alone.

    **Model.** ``model`` is a spec, as for the command line (``"builtin"``,
    ``"torchvision:NAME"``, ``"timm:NAME"`` with ``pretrained_cfg`` a JSON
    overlay, ``"hf:PATH"``, ``"package.module:factory"``, with ``weights`` a
    state-dict file; ``camfunc.models.load``). Image files go through the
    model's own transform where its library states one (timm's
    ``resolve_data_config`` and ``create_transform``, the folder's
    ``AutoImageProcessor``, torchvision weights' ``transforms()``: their
    resize, centre crop and interpolation), normalised by its mean and std;
    the maps lie on those pixels, and the manifest's ``preprocessing``
    records the transform, its resize and crop, so they can be put back on
    the original image (``camfunc.models.Geometry.from_record``,
    ``camfunc.models.on_original``; ``camfunc report`` does). Such images
    are read by Pillow in the loader's workers, never on the device, and
    generated scenes are resized whole: each said in one line on stderr and
    in the manifest's ``run.notes``. ``size`` resizes the whole image to
    ``size`` x ``size`` instead (as builtin and factory models always are),
    and ``mean``/``std`` replace the normalisation. ``model`` may also be an
    ``nn.Module`` in eval mode fed ``size`` x ``size`` (default 224) images,
    normalised by ``mean``/``std`` if given. Random initial weights
    are drawn from ``seed``, so every rank and restart builds the same model.

    **Work.** For every image, each of ``methods`` (names in
    ``camfunc.METHODS``) gives maps for ``classes``: ``"true"`` (the folder's
    class; matched to the model's class names where it has them, else by
    order), ``"predicted"``, or ``"topK"`` (e.g. ``"top3"``). With
    ``metrics=True``, per image and class: the Grad-CAM++ paper's drop
    ``max(0, Y - O) / Y`` and increase ``O > Y`` (``Y``, ``O`` the softmax
    probability of the class on ``x`` and on ``x`` times the upsampled map),
    and for scenes the pointing game (15 px tolerance) and the energy
    pointing game. Random methods (``smooth_gradcampp``, ``sscam``,
    ``randomcam``) get per-image noise from a generator seeded by ``(seed,
    method, dataset index)``, so results do not depend on batching.

    **Shards.** Shard ``j`` holds dataset indices ``[j * shard_size, (j + 1)
    * shard_size)`` whatever the number of processes, at
    ``out/shards/shard-{j:06d}.pt``: maps as ``map_dtype`` (``float16``,
    ``uint8``, ``float32``), at the layer's resolution (the input's with
    ``upsample=True``), the indices, classes, scores, probabilities, metric
    columns and failed images. Files are written to a temporary name and
    renamed, so a shard under its name is complete. At the end rank 0 writes
    ``index.csv`` (each image's shard and row, or its failure),
    ``metrics.csv`` (one row per image, method and class) and
    ``manifest.json`` (settings, fingerprint, versions, failed images, shards
    and their digests, the decoder, timing). Every shard carries a BLAKE2b
    digest of its content. Read maps back with
    ``camfunc.runs.read_maps(out, method)``, which verifies them.

    **Resume.** Run again with the same arguments: finished shards are
    verified against their digests and kept (never rewritten), damaged ones
    are recomputed (each named on stderr and in the manifest's
    ``recomputed``), and the rest are done, with results equal to an
    uninterrupted run. Temporary files a killed run left are removed. A
    folder made with other settings (the fingerprint in its manifest or
    shards differs) is refused with an error; batch size, workers, device,
    ``compile`` and the number of processes may change. One run writes a
    folder at a time: a second is refused, naming the first's process (an
    ``flock`` on ``OUT/.camfunc-run.lock``, which a killed run does not keep).

    **Distributed.** Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group
    starts from torchrun's environment, nccl on CUDA and gloo on the CPU.
    Rank 0 lists the unfinished shards and sends the list to every rank; rank
    ``r`` takes every ``world``-th one from position ``r``. No image is done
    twice and no padding reaches the results. Across nodes, give every node
    the same data path and a shared ``out`` folder. After a barrier rank 0
    merges the tables and writes the manifest.

    ``compile=True`` runs each method through ``torch.compile(fullgraph=True,
    dynamic=False, backend=compile_backend)`` and pads every batch (the short
    last one, or one with failed images) to ``batch_size``, so it compiles once.
    Batches are loaded by a ``DataLoader`` with ``num_workers`` workers
    (pinned memory on CUDA); ``progress`` shows a bar with images/s on rank 0.

    Returns a :class:`RunResult` (the same on every rank). Raises ``ValueError``
    for bad arguments, before any work.

    Example:
        >>> result = camfunc.runs.run("scenes:8", "out", methods=["gradcam"], progress=False)
        >>> indices, maps = camfunc.runs.read_maps("out", "gradcam")
        >>> indices.shape, maps.shape                     # the embedded model's 16x16 maps
        (torch.Size([8]), torch.Size([8, 1, 16, 16]))
    """
    return execute(_settings.Request(**locals()))  # every argument, as given


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A checked request with the model, split and dataset it names: what every rank starts from."""

    request: _settings.Request
    options: _settings.Options
    out: Path
    device: torch.device
    decoder: str                              # "device" or "pillow"
    loaded: LoadedModel
    split: camfunc.Split
    dataset: Data
    methods: dict[str, Callable[..., Any]]
    layer_channels: int
    layer_size: tuple[int, ...]
    class_of_label: Tensor | None             # dataset label -> model class (true class only)
    columns: list[str]                        # metric columns
    settings: dict[str, Any]                  # what the results depend on
    fingerprint: str
    count: int                                # shards
    notes: list[str] = dataclasses.field(default_factory=list)   # preprocessing departures


def execute(request: _settings.Request) -> RunResult:
    """:func:`run`'s steps: prepare, agree on the pending shards, process this rank's, merge."""
    start_time = time.perf_counter()
    prepared = prepare(request)
    group = _distributed.start(prepared.device)
    lock = _lock.FolderLock(prepared.out)
    try:
        pending, damaged = pending_shards(group, prepared.out, prepared.fingerprint,
                                          prepared.count, lock)
        manifest = begin_manifest(prepared, group, damaged)
        stats = process_mine(prepared, group, pending[group.rank::group.world])
        summary, failure = None, None
        if group.rank == 0:
            try:
                summary = finish(prepared, manifest, stats, len(pending), start_time)
            except Exception as error:
                failure = error
        shared = _distributed.broadcast(group, {"summary": summary, "error": _described(failure)})
        _raise_any(failure, [shared["error"]])
        result: RunResult = shared["summary"]
        return result
    finally:
        lock.release()
        _distributed.finish(group)


def prepare(request: _settings.Request) -> Prepared:
    """Every argument checked, the model loaded and split, the data opened: all before any work."""
    options = _settings.check_options(request)
    method_functions = _user_error(lambda: resolve_methods(list(options.methods)))
    size = request.size
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise ValueError(f"size must be a positive int or None, got {size!r}")
    device = choose_device(request.device)
    decoder = _settings.check_reading(request.exif, request.decode, device)
    loaded, state = load(request.model, request.weights, request.layer, size, request.mean,
                         request.std, options.seed, device, request.pretrained_cfg)
    loaded, decoder, notes = own_transform(request.data, loaded, decoder)
    split = _user_error(lambda: make_split(loaded, request.layer))
    dataset = open_data(request.data, loaded.size, loaded.channels, request.exif,
                        jpeg_bytes=decoder == "device", reader=loaded.reader())
    channels, num_classes, layer_size = probe(split, loaded, device)
    if options.topk is not None and options.topk > num_classes:
        raise ValueError(f"classes={options.classes!r} asks for more classes than the model's "
                         f"{num_classes}")
    class_of_label = label_classes(dataset, loaded, num_classes) if options.topk is None else None
    settings = result_settings(dataset, request.model, state, split, loaded, options)
    return Prepared(request, options, Path(request.out), device, decoder, loaded, split, dataset,
                    method_functions, channels, layer_size, class_of_label,
                    metric_columns(options.metrics, hasattr(dataset, "masks")), settings,
                    _settings.fingerprint(settings),
                    _shards.shard_count(len(dataset), options.shard_size), notes)


def own_transform(data: str | Path, loaded: LoadedModel,
                  decoder: str) -> tuple[LoadedModel, str, list[str]]:
    """The model, the JPEG decoder and notes, where the model has its own transform (timm's,
    an image processor's, torchvision weights'): image files go through it, read by Pillow in
    the loader's workers (the device decoder only resizes whole); generated scenes are resized
    whole. Each departure is a one-line note on stderr (rank 0) and in the manifest."""
    if loaded.pipeline is None:
        return loaded, decoder, []
    notes = []
    if isinstance(data, str) and parse_scenes(data) is not None:
        notes.append(f"scenes are resized whole to the model's {loaded.size[1]}x{loaded.size[0]}; "
                     f"its own ({loaded.source}) transform is for image files")
        loaded = dataclasses.replace(loaded, pipeline=None)
    elif decoder == "device":
        notes.append(f"JPEGs are decoded by Pillow, not on the device: the model's own "
                     f"({loaded.source}) transform runs in the loader's workers (give --size to "
                     "resize whole and decode on the device)")
        decoder = "pillow"
    if _distributed.rank() == 0:
        for note in notes:
            print(f"camfunc run: note: {note}", file=sys.stderr)
    return loaded, decoder, notes


def begin_manifest(prepared: Prepared, group: _distributed.Group,
                   damaged: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest of a run under way, written by rank 0; :func:`finish` completes it."""
    request, options = prepared.request, prepared.options
    manifest = {"format": _shards.FORMAT, "status": "running", "fingerprint": prepared.fingerprint,
                "settings": prepared.settings,
                "run": {"world_size": group.world, "batch_size": options.batch_size,
                        "num_workers": options.num_workers, "device": str(prepared.device),
                        "compile": bool(request.compile), "data": str(request.data),
                        "out": str(prepared.out), "decode": prepared.decoder,
                        **({"notes": prepared.notes} if prepared.notes else {})},
                "preprocessing": prepared.loaded.preprocessing(),
                "versions": _settings.versions(), "num_images": len(prepared.dataset),
                "num_shards": prepared.count, "recomputed": damaged}
    if group.rank == 0:
        write_json(prepared.out / MANIFEST, manifest)
    return manifest


def work_for(prepared: Prepared) -> Work:
    """What every batch needs: the methods (compiled when asked), classes, storage, decoding."""
    request, options, loaded = prepared.request, prepared.options, prepared.loaded
    device = prepared.device
    methods = prepared.methods
    if request.compile:
        methods = {name: torch.compile(f, fullgraph=True, dynamic=False,
                                       backend=request.compile_backend)
                   for name, f in methods.items()}
    decode = functools.partial(decoded_batch, size=loaded.size, channels=loaded.channels,
                               exif=request.exif, device=device) \
        if prepared.decoder == "device" else None
    return Work(split=prepared.split, methods=methods, normalise=loaded.normalise,
                topk=options.topk, class_of_label=prepared.class_of_label,
                metrics=options.metrics, map_dtype=options.map_dtype,
                upsample_to=loaded.size if options.upsample else None, seed=options.seed,
                device=device, pad_to=options.batch_size if request.compile else None,
                layer_channels=prepared.layer_channels, decode=decode)


def process_mine(prepared: Prepared, group: _distributed.Group,
                 mine: list[int]) -> list[dict[str, Any]]:
    """This rank's shards processed, and every rank's statistics (or everyone's same error)."""
    options = prepared.options
    work = work_for(prepared)
    map_size = prepared.loaded.size if options.upsample else None
    empty = empty_result(options.methods, options.topk or 1, map_size or prepared.layer_size,
                         options.map_dtype, prepared.columns)
    common = {"format": _shards.FORMAT, "fingerprint": prepared.fingerprint,
              "shard_size": options.shard_size, "num_images": len(prepared.dataset),
              "map_dtype": options.map_dtype}
    # A rank that fails still reaches every collective below, with its error, so the
    # others raise it too instead of waiting for it until the backend's timeout.
    failure = None
    processed, seconds = 0, 0.0
    try:
        processed, seconds = process(work, prepared.dataset, prepared.out, mine, options, common,
                                     empty, group.rank == 0 and options.progress, prepared.device)
    except Exception as error:
        failure = error
    stats = _distributed.gather(group, {"rank": group.rank, "shards": len(mine),
                                        "images": processed, "seconds": seconds,
                                        "error": _described(failure)})
    _raise_any(failure, [s.pop("error") for s in stats])
    return stats


def finish(prepared: Prepared, manifest: dict[str, Any], stats: list[dict[str, Any]],
           written: int, start_time: float) -> RunResult:
    """Rank 0: the tables and the final manifest merged from the shards, and the summary."""
    out, count = prepared.out, prepared.count
    final = merge(out, manifest, prepared.dataset, count, prepared.loaded.class_names,
                  prepared.columns)
    final["timing"] = timing(stats, time.perf_counter() - start_time)
    write_json(out / MANIFEST, final)
    return RunResult(out, out / MANIFEST, final["images"], len(final["failed"]), count, written,
                     count - written, final["timing"]["seconds"],
                     final["timing"]["images_per_second"])


def _described(error: BaseException | None) -> str | None:
    return None if error is None else f"{type(error).__name__}: {error}"


def _raise_any(own: BaseException | None, reported: list[str | None]) -> None:
    """Re-raise this rank's own error, or raise another rank's, so every rank stops together."""
    if own is not None:
        raise own
    errors = [f"rank {rank}: {e}" for rank, e in enumerate(reported) if e is not None]
    if errors:
        raise RuntimeError("the run failed on another rank: " + "; ".join(errors))


def result_settings(dataset: Data, model: str | nn.Module, state: str, split: camfunc.Split,
                    loaded: LoadedModel, options: _settings.Options) -> dict[str, Any]:
    """Everything the results depend on: what the fingerprint hashes."""
    return {"format": _shards.FORMAT, "data": dataset.identity(),
            "model": {"spec": model if isinstance(model, str) else type(model).__qualname__,
                      "weights_sha256": state, "layers": list(split.layers),
                      "size": list(loaded.size), "mean": loaded.mean, "std": loaded.std,
                      # Whose config fed the model, and its transform; left out for
                      # camfunc's own, as before.
                      **({} if loaded.source == "camfunc" else
                         {"source": loaded.source, "preprocessing": loaded.preprocessing()})},
            "methods": list(options.methods), "classes": options.classes,
            "metrics": options.metrics, "map_dtype": options.map_dtype,
            "upsample": options.upsample, "shard_size": options.shard_size, "seed": options.seed}


def pending_shards(group: _distributed.Group, out: Path, fingerprint: str, count: int,
                   lock: _lock.FolderLock) -> tuple[list[int], list[dict[str, Any]]]:
    """The unfinished shards, as rank 0 finds them, on every rank (or everyone's same error),
    and the damaged ones among them, each with why (also said on stderr). Rank 0 takes the
    folder's lock first: another job writing it is refused."""
    if len(set(_distributed.gather(group, fingerprint))) != 1:
        raise ValueError("the ranks disagree on the settings or the data (different files, "
                         "model or arguments); every rank must see the same data and model")
    verdict = None
    if group.rank == 0:
        refused = lock.acquire()
        survey = check_folder(out, fingerprint, count) if refused is None \
            else _shards.Survey([], [], refused)
        finished = set(survey.finished)
        damaged = [{"shard": j, "reason": why} for j, why in survey.damaged]
        verdict = {"pending": [j for j in range(count) if j not in finished],
                   "damaged": damaged, "error": survey.error}
        if survey.error is None:
            (out / _shards.SHARD_FOLDER).mkdir(parents=True, exist_ok=True)
            _shards.remove_partial_files(out)
            for entry in damaged:
                print(f"camfunc run: recomputing shard {entry['shard']}: {entry['reason']}",
                      file=sys.stderr)
    verdict = _distributed.broadcast(group, verdict)
    if verdict["error"]:
        raise ValueError(verdict["error"])
    return verdict["pending"], verdict["damaged"]


def timing(stats: list[dict[str, Any]], total_seconds: float) -> dict[str, Any]:
    """This call's throughput: images over the slowest rank's loop time."""
    seconds = max(s["seconds"] for s in stats)
    done = sum(s["images"] for s in stats)
    return {"seconds": seconds, "images_this_call": done,
            "images_per_second": done / seconds if seconds > 0 else 0.0,
            "total_seconds": total_seconds, "ranks": stats}


def process(work: Work, dataset: Data, out: Path, shards: list[int], options: _settings.Options,
            common: dict[str, Any], empty: Explained, show: bool,
            device: torch.device) -> tuple[int, float]:
    """This rank's shards, batch by batch; each shard written as soon as its last batch is done."""
    plan = batch_plan(shards, len(dataset), options.shard_size, options.batch_size)
    if not plan:
        return 0, 0.0
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=[b for _, b in plan],
                                         num_workers=options.num_workers, collate_fn=collate,
                                         pin_memory=device.type == "cuda")
    last_batch = {shard: i for i, (shard, _) in enumerate(plan)}
    bar = progress_bar(sum(len(b) for _, b in plan), "camfunc run", enabled=show)
    buffer, processed = ShardBuffer(), 0
    start = time.perf_counter()
    try:
        with torch.no_grad():
            for i, batch in enumerate(loader):
                shard = plan[i][0]
                add_batch(buffer, work, batch, dataset)
                processed += sum(1 for error in batch.errors if not error)  # explained, not failed
                bar.update(len(batch.errors))
                if last_batch[shard] == i:
                    _shards.write_shard(_shards.shard_path(out, shard),
                                        shard_payload(shard, buffer, common, empty))
                    buffer = ShardBuffer()
    finally:
        bar.close()
    return processed, time.perf_counter() - start


def add_batch(buffer: ShardBuffer, work: Work, batch: Batch, dataset: Data) -> None:
    if work.decode is not None:
        assert isinstance(dataset, ImageFolderData)  # decoding on the device reads files
        batch = work.decode(batch, [dataset.files[i] for i in batch.indices.tolist()])
    for index, error in zip(batch.indices.tolist(), batch.errors, strict=True):
        if error:
            buffer.failed.append({"index": index, "name": dataset.name(index), "reason": error})
    explained = explain_batch(work, batch)
    if explained is not None:
        buffer.parts.append(explained)
