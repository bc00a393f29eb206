#!/usr/bin/env python
"""Throughput of ``camfunc.runs.run`` (Grad-CAM) against a plain forward over the same loader.

Setup
-----
A synthetic ImageFolder (``--images`` JPEGs, 256x256 smooth random pictures in
4 class folders) is written to a temporary folder. torchvision ResNet-50 with
random weights (seeded, eval mode), ``layer4``, 224x224, ImageNet
normalisation. Rows, measured in this one process, interleaved:

* ``loader``: the run's own ``DataLoader`` (dataset class, batch sampler,
  collate function, ``--workers`` workers, pinned memory on CUDA), images
  moved to the device, nothing computed: what the input pipeline can feed.
* ``limit``: ``camfunc.gradcam`` with predicted classes on the same batches,
  already normalised and on the device: the model-bound limit of a run.
* ``forward``: the loader, then the run's device-side normalisation and
  ``with torch.no_grad(): model(x)``. A run does a forward and a pull-back, so
  this bounds it from above too.
* ``camfunc.runs.run``: ``camfunc.runs.run(folder, tmp, methods=["gradcam"])`` with
  predicted classes, float16 maps, one shard per ``--shard-size`` images,
  into a fresh folder each time. Its time is the run loop the manifest
  reports (loader start to last shard written), so model loading, the
  weights hash and the final merge of the tables are not in it; they are
  printed separately as the call's total. JPEGs are decoded as ``--decode``
  says: on the device (``auto`` on CUDA: ``torchvision.io.decode_jpeg``,
  batched, the workers only read bytes) or by Pillow in the workers.
* ``run, Pillow decoding`` (CUDA only): the same run with ``decode="pillow"``,
  what the run did before it decoded on the device.

Images per second, the best of ``--repeats`` (after one untimed warm-up of
each row). The verdict is run / limit, target >= 0.8, where the loader can
feed the limit; otherwise the loader is the bottleneck, and run / loader is
reported with it. On CUDA each row ends with ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_folder(root: Path, count: int, size: int = 256, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
        picture = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        picture.save(folder / f"img-{i:04d}.jpg", quality=90)
    return root


from camfunc._util.images import unit_float  # noqa: E402  (the run's own uint8 -> [0, 1])


def make_loader(loaded, folder: Path, args, device):
    from camfunc.runs._dataset import ImageFolderData, collate

    data = ImageFolderData(folder, loaded.size)
    batches = [list(range(i, min(i + args.batch_size, len(data))))
               for i in range(0, len(data), args.batch_size)]
    loader = torch.utils.data.DataLoader(data, batch_sampler=batches, num_workers=args.workers,
                                         collate_fn=collate, pin_memory=device.type == "cuda")
    return data, loader


def finish(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def loader_throughput(loaded, folder: Path, args, device) -> float:
    data, loader = make_loader(loaded, folder, args, device)
    start = time.perf_counter()
    for batch in loader:
        batch.images.to(device, non_blocking=True)
    finish(device)
    return len(data) / (time.perf_counter() - start)


def forward_throughput(model, loaded, folder: Path, args, device) -> float:
    data, loader = make_loader(loaded, folder, args, device)
    start = time.perf_counter()
    with torch.no_grad():
        for batch in loader:  # normalised on the device, as the run does
            model(loaded.normalise(unit_float(batch.images.to(device, non_blocking=True))))
    finish(device)
    return len(data) / (time.perf_counter() - start)


def device_batches(loaded, folder: Path, args, device) -> list[torch.Tensor]:
    _, loader = make_loader(loaded, folder, args, device)
    return [loaded.normalise(unit_float(batch.images.to(device))) for batch in loader]


def limit_throughput(split, batches: list[torch.Tensor], device) -> float:
    import camfunc

    start = time.perf_counter()
    for x in batches:
        camfunc.gradcam(split, x, camfunc.topk(1))
    finish(device)
    return sum(len(x) for x in batches) / (time.perf_counter() - start)


def run_throughput(model, folder: Path, args, device, decode: str) -> tuple[float, float]:
    from camfunc.models._loading import IMAGENET_MEAN, IMAGENET_STD
    from camfunc.runs import run

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = run(folder, Path(out) / "run", model=model, layer="layer4", size=args.size,
                     mean=IMAGENET_MEAN, std=IMAGENET_STD, methods=["gradcam"],
                     batch_size=args.batch_size, shard_size=args.shard_size,
                     num_workers=args.workers, device=device, progress=False, decode=decode)
        total = time.perf_counter() - start
    return result.images_per_second, total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--decode", default="auto", choices=["auto", "pillow", "device"])
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import torchvision

    from camfunc.models._loading import IMAGENET_MEAN, IMAGENET_STD, LoadedModel

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval().to(device)
    loaded = LoadedModel(model, "layer4", (args.size, args.size), IMAGENET_MEAN, IMAGENET_STD)
    import camfunc

    split = camfunc.split(model, "layer4")
    rows: dict[str, list[float]] = {"loader": [], "limit": [], "forward": [], "camfunc.runs.run": []}
    totals: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_folder(Path(tmp) / "images", args.images)
        batches = device_batches(loaded, folder, args, device)
        calls = {
            "loader": lambda: loader_throughput(loaded, folder, args, device),
            "limit": lambda: limit_throughput(split, batches, device),
            "forward": lambda: forward_throughput(model, loaded, folder, args, device),
            "camfunc.runs.run": lambda: run_throughput(model, folder, args, device, args.decode),
        }
        if device.type == "cuda":
            rows["run, Pillow decoding"] = []
            calls["run, Pillow decoding"] = lambda: run_throughput(model, folder, args, device,
                                                                   "pillow")
        for call in calls.values():  # warm-up
            call()
        for _ in range(args.repeats):  # interleaved, so machine noise falls on every row
            for name, call in calls.items():
                value = call()
                if name.startswith("camfunc.runs.run") or name.startswith("run,"):
                    value, total = value
                    if name == "camfunc.runs.run":
                        totals.append(total)
                rows[name].append(value)
    best = {name: max(values) for name, values in rows.items()}
    feedable = min(best["loader"], best["limit"])
    ratio = best["camfunc.runs.run"] / best["limit"]
    bound = "the model (limit)" if best["limit"] <= best["loader"] else "the input pipeline (loader)"
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"{args.images} images {args.size}x{args.size}, batch {args.batch_size}, "
          f"workers {args.workers}, shard {args.shard_size}")
    print(f"{'row':<18}{'img/s (best)':>14}{'all repeats':>36}")
    for name, values in rows.items():
        print(f"{name:<18}{best[name]:>14.2f}{'  '.join(f'{v:.2f}' for v in values):>36}")
    print(f"bottleneck: {bound}; run / limit {ratio:.2f}, run / min(loader, limit) "
          f"{best['camfunc.runs.run'] / feedable:.2f} (target >= 0.80 of what can be fed: "
          f"{'PASS' if best['camfunc.runs.run'] >= 0.8 * feedable else 'MISS'})")
    print(f"run / forward {best['camfunc.runs.run'] / best['forward']:.2f} (the forward bounds the run: "
          f"{'yes' if best['forward'] >= best['camfunc.runs.run'] else 'NO'})")
    print(f"camfunc.runs.run whole call (model hash, folder check, merge included): "
          f"{min(totals):.2f} s for {args.images} images")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "best": best, "run_over_limit": ratio,
                                               "bottleneck": bound, "totals": totals,
                                               "device": str(device), "torch": torch.__version__,
                                               "args": vars(args)}, indent=2))
    return 0 if math.isfinite(ratio) else 1


if __name__ == "__main__":
    sys.exit(main())
