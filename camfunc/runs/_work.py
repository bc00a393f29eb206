"""One batch of a run: the methods' maps, the classes explained, and per-image metrics.

Randomness never depends on the batch: a random method's noise (or random
weights) for image ``i`` is drawn on the CPU from a generator seeded by
``(seed, method, i)``, then the batch's draws are stacked and passed to the
method, so maps are the same for any batch size and any number of ranks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

import camfunc
from camfunc import METHODS
from camfunc.io import unit_float
from camfunc.runs._dataset import Batch
from camfunc.runs._shards import encode_maps

POINTING_TOLERANCE = 15.0  # pixels, the pointing game's usual tolerance

@dataclasses.dataclass(frozen=True)
class Work:
    """Everything fixed for the run that a batch needs."""

    split: camfunc.Split
    methods: dict[str, Callable[..., Any]]   # name -> method (compiled or not)
    normalise: Callable[[Tensor], Tensor]    # images in [0, 1] -> model input, on their device
    topk: int | None                         # None: each image's true class
    class_of_label: Tensor | None            # dataset label -> model class (true class only)
    metrics: bool
    map_dtype: str
    upsample_to: tuple[int, int] | None
    seed: int
    device: torch.device
    pad_to: int | None                       # pad every batch to this size (compiled methods)
    layer_channels: int
    decode: Callable[[Batch, list[Any]], Batch] | None = None   # JPEG bytes -> images, on device


class Explained(NamedTuple):
    """A batch's readable images, on the CPU."""

    indices: Tensor                            # (n,)
    labels: Tensor                             # (n,)
    classes: Tensor                            # (n, K) classes explained
    scores: Tensor                             # (n, K) their logits
    probabilities: Tensor                      # (n, K) their softmax probabilities
    maps: dict[str, Tensor]                    # method -> (n, K, h, w), stored dtype
    metrics: dict[str, dict[str, Tensor]]      # method -> column -> (n, K)


def image_generator(seed: int, method: str, index: int) -> torch.Generator:
    """A CPU generator that depends only on the run's seed, the method and the image."""
    digest = hashlib.sha256(f"{seed}/{method}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def default_samples(method: Callable[..., Any]) -> int:
    return int(inspect.signature(method).parameters["num_samples"].default)


def padded(values: Tensor, size: int, dim: int) -> Tensor:
    """``values`` with zero rows appended along ``dim`` up to ``size``."""
    missing = size - values.shape[dim]
    if missing <= 0:
        return values
    shape = list(values.shape)
    shape[dim] = missing
    return torch.cat([values, values.new_zeros(shape)], dim)


def random_inputs(work: Work, name: str, method: Callable[..., Any], indices: list[int],
                  image_shape: tuple[int, ...], batch: int) -> dict[str, Tensor]:
    """The keyword argument carrying a random method's per-image draws, stacked; {} otherwise.

    What a method draws is recorded on it (``METHODS[name].draws``): "input", standard
    normal (num_samples, C, H, W) per image; "layer_noise", standard normal
    (num_samples, channels, H, W); "channel_weights", U(-1, 1) (channels,).
    """
    draws = getattr(METHODS.get(name), "draws", None)
    if draws is None:
        return {}
    samples = default_samples(METHODS[name]) if draws.counted else 0
    per_image = [draws.sample((1, *image_shape), work.layer_channels, samples,
                              image_generator(work.seed, name, i)) for i in indices]
    stacked = padded(torch.cat(per_image, draws.batch_axis), batch, draws.batch_axis)
    return {draws.keyword: stacked.to(work.device)}


# Methods whose full noise tensor is too large to stack (SS-CAM's is (samples, C, H, W) per
# image at the input's size): eagerly they draw it themselves, chunk by chunk, from the
# image's own generator, one image per call. Compiled runs still pass the stacked noise.
DRAWN_PER_IMAGE = {"sscam"}


def drawn_per_image(work: Work, name: str, method: Callable[..., Any], x: Tensor, cls: Any,
                    indices: list[int]) -> tuple[Tensor, Tensor]:
    """``method`` on each image alone, with ``generator=`` that image's generator."""
    results, scores = [], []
    for row, index in enumerate(indices):
        one_cls = cls[row:row + 1] if isinstance(cls, Tensor) else cls
        generator = image_generator(work.seed, name, index)
        result, score = method(work.split, x[row:row + 1], one_cls, return_scores=True,
                               generator=generator)
        results.append(result)
        scores.append(score)
    return torch.cat(results), torch.cat(scores)


def targets(work: Work, labels: Tensor) -> Any:
    """The ``cls`` for the methods: ``(B, 1)`` true classes, or ``camfunc.topk(k)``."""
    if work.topk is not None:
        return camfunc.topk(work.topk)
    classes = labels if work.class_of_label is None else work.class_of_label[labels]
    return classes.unsqueeze(1).to(work.device)


def map_metrics(work: Work, x: Tensor, maps: Tensor, classes: Tensor,
                masks: Tensor | None) -> dict[str, Tensor]:
    """Per-image metrics of ``maps`` (n, K, h, w) for ``classes`` (n, K): each (n, K)."""
    from camfunc import metrics

    columns: dict[str, list[Tensor]] = {}
    for k in range(classes.shape[1]):
        change = metrics.confidence_change(work.split, x, maps[:, k], classes[:, k])
        values = {"drop": change.drop, "increase": change.increase.float(),
                  "masked_probability": change.masked_score}
        if masks is not None:
            values["pointing_game"] = metrics.pointing_game(
                maps[:, k], masks, tolerance=POINTING_TOLERANCE).hits.float()
            values["energy_pointing_game"] = metrics.energy_pointing_game(maps[:, k],
                                                                          masks).proportions
        for column, value in values.items():
            columns.setdefault(column, []).append(value.float().cpu())
    return {column: torch.stack(parts, 1) for column, parts in columns.items()}


def explain_batch(work: Work, batch: Batch) -> Explained | None:
    """Maps, classes and metrics of the batch's readable images; None if none was readable."""
    keep = [row for row, error in enumerate(batch.errors) if not error]
    if not keep:
        return None
    rows = torch.tensor(keep, dtype=torch.long)
    n = len(keep)
    indices, labels = batch.indices[rows], batch.labels[rows]
    images = batch.images if n == len(batch.errors) else batch.images[rows]  # keeps it pinned
    size = max(work.pad_to or n, n)
    x = work.normalise(unit_float(padded(images, size, 0).to(work.device, non_blocking=True)))
    cls = targets(work, padded(labels, size, 0))
    maps: dict[str, Tensor] = {}
    scores: Tensor | None = None
    for name, method in work.methods.items():
        if name in DRAWN_PER_IMAGE and work.pad_to is None:
            result, scores = drawn_per_image(work, name, method, x, cls, indices.tolist())
        else:
            extra = random_inputs(work, name, method, indices.tolist(), tuple(images.shape[1:]),
                                  size)
            result, scores = method(work.split, x, cls, return_scores=True, **extra)
        result = result if result.ndim == x.ndim else result.unsqueeze(1)  # (B, K, h, w)
        maps[name] = result[:n]
    if scores is None:
        raise ValueError("the run has no methods to explain the batch with")
    scores = scores[:n].float()
    classes = cls[:n] if work.topk is None else scores.topk(work.topk, dim=1).indices
    probabilities = scores.softmax(1).gather(1, classes)
    masks = batch.masks[rows].to(work.device) if batch.masks is not None else None
    table = {name: map_metrics(work, x[:n], m, classes, masks) for name, m in maps.items()} \
        if work.metrics else {}
    stored = {name: encode_maps(camfunc.upsample(m, work.upsample_to) if work.upsample_to else m,
                                work.map_dtype).cpu()
              for name, m in maps.items()}
    return Explained(indices, labels, classes.cpu(), scores.gather(1, classes).cpu(),
                     probabilities.cpu(), stored, table)
