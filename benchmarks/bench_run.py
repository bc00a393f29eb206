#!/usr/bin/env python
"""Throughput of ``camfunc.runs.run`` (Grad-CAM) against a plain forward over the same loader.

Setup
-----
A synthetic ImageFolder (``--images`` JPEGs, 256x256 smooth random pictures in
4 class folders) is written to a temporary folder. torchvision ResNet-50 with
random weights (seeded, eval mode), ``layer4``, 224x224, ImageNet
normalisation. Rows, measured in this one process, interleaved:

* ``forward``: a ``DataLoader`` over the run's own dataset class, batch
  sampler and collate function (``--workers`` workers), images normalised,
  then ``with torch.no_grad(): model(x)``. The baseline.
* ``camfunc.runs.run``: ``camfunc.runs.run(folder, tmp, methods=["gradcam"])`` with
  predicted classes, float16 maps, one shard per ``--shard-size`` images,
  into a fresh folder each time. Its time is the run loop the manifest
  reports (loader start to last shard written), so model loading, the
  weights hash and the final merge of the tables are not in it; they are
  printed separately as the call's total.

Images per second, the best of ``--repeats`` (after one untimed warm-up of
each row); ratio = run / forward, target >= 0.9. On CUDA each row ends with
``torch.cuda.synchronize()``.
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


def forward_throughput(model, loaded, folder: Path, args, device) -> float:
    from camfunc.runs._dataset import ImageFolderData, collate

    data = ImageFolderData(folder, loaded.size)
    batches = [list(range(i, min(i + args.batch_size, len(data))))
               for i in range(0, len(data), args.batch_size)]
    loader = torch.utils.data.DataLoader(data, batch_sampler=batches, num_workers=args.workers,
                                         collate_fn=collate, pin_memory=device.type == "cuda")
    start = time.perf_counter()
    with torch.no_grad():
        for batch in loader:
            model(loaded.normalise(batch.images).to(device, non_blocking=True))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(data) / (time.perf_counter() - start)


def run_throughput(model, folder: Path, args, device) -> tuple[float, float]:
    from camfunc.runs._loading import IMAGENET_MEAN, IMAGENET_STD
    from camfunc.runs import run

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = run(folder, Path(out) / "run", model=model, layer="layer4", size=args.size,
                     mean=IMAGENET_MEAN, std=IMAGENET_STD, methods=["gradcam"],
                     batch_size=args.batch_size, shard_size=args.shard_size,
                     num_workers=args.workers, device=device, progress=False)
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
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import torchvision

    from camfunc.runs._loading import IMAGENET_MEAN, IMAGENET_STD, LoadedModel

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval().to(device)
    loaded = LoadedModel(model, "layer4", (args.size, args.size), IMAGENET_MEAN, IMAGENET_STD)
    rows: dict[str, list[float]] = {"forward": [], "camfunc.runs.run": []}
    totals: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_folder(Path(tmp) / "images", args.images)
        forward_throughput(model, loaded, folder, args, device)  # warm-up
        run_throughput(model, folder, args, device)
        for _ in range(args.repeats):
            rows["forward"].append(forward_throughput(model, loaded, folder, args, device))
            speed, total = run_throughput(model, folder, args, device)
            rows["camfunc.runs.run"].append(speed)
            totals.append(total)
    best = {name: max(values) for name, values in rows.items()}
    ratio = best["camfunc.runs.run"] / best["forward"]
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"{args.images} images {args.size}x{args.size}, batch {args.batch_size}, "
          f"workers {args.workers}, shard {args.shard_size}")
    print(f"{'row':<14}{'img/s (best)':>14}{'all repeats':>36}")
    for name, values in rows.items():
        print(f"{name:<14}{best[name]:>14.2f}{'  '.join(f'{v:.2f}' for v in values):>36}")
    print(f"ratio run / forward: {ratio:.2f} (target >= 0.90: {'PASS' if ratio >= 0.9 else 'FAIL'})")
    print(f"camfunc.runs.run whole call (model hash, folder check, merge included): "
          f"{min(totals):.2f} s for {args.images} images")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "best": best, "ratio": ratio,
                                               "totals": totals, "args": vars(args)}, indent=2))
    return 0 if math.isfinite(ratio) else 1


if __name__ == "__main__":
    sys.exit(main())
