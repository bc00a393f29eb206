#!/usr/bin/env python
"""What a shard's digest costs: hashing its content against writing it, and verifying on read.

A shard as ``camfunc.runs.run`` writes it (``--shard-size`` images, one method,
``--classes`` maps each, float16): at the layer's 7x7 and at the input's 224x224
(``--upsample``). Rows, each the median of ``--repeats`` interleaved calls:

* ``digest``: ``content_digest(payload)`` (BLAKE2b-128 over every tensor's bytes);
* ``write``: ``write_shard`` (digest, ``torch.save`` to a temporary file, fsync, rename);
* ``read`` / ``read + verify``: ``read_shard(path, verify=False)`` and ``verify=True``.

The verdict is digest / write: the share of a shard's write the digest takes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from camfunc.runs._shards import content_digest, read_shard, write_shard


def payload(images: int, classes: int, side: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {"format": "camfunc-run/2", "fingerprint": "0" * 64, "shard": 0, "start": 0,
            "stop": images, "indices": torch.arange(images), "labels": torch.zeros(images, dtype=torch.long),
            "classes": torch.zeros(images, classes, dtype=torch.long),
            "scores": torch.randn(images, classes, generator=generator),
            "probabilities": torch.rand(images, classes, generator=generator),
            "maps": {"gradcam": torch.rand(images, classes, side, side, generator=generator).half()},
            "metrics": {}, "failed": []}


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--classes", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, shard of {args.shard_size} images, {args.classes} class(es), "
          "float16 maps; median of interleaved calls")
    print(f"{'maps':<10}{'MiB':>8}{'digest ms':>11}{'write ms':>10}{'read ms':>9}"
          f"{'read+verify ms':>16}{'digest/write':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        for side in (7, 224):
            shard = payload(args.shard_size, args.classes, side)
            path = Path(tmp) / f"shard-{side}.pt"
            rows: dict[str, list[float]] = {"digest": [], "write": [], "read": [], "verify": []}
            for _ in range(args.repeats):
                rows["digest"].append(timed(lambda: content_digest(shard)))
                rows["write"].append(timed(lambda: write_shard(path, shard)))
                rows["read"].append(timed(lambda: read_shard(path, verify=False)))
                rows["verify"].append(timed(lambda: read_shard(path)))
            ms = {k: 1e3 * statistics.median(v) for k, v in rows.items()}
            size = path.stat().st_size / 2**20
            print(f"{f'{side}x{side}':<10}{size:>8.2f}{ms['digest']:>11.2f}{ms['write']:>10.2f}"
                  f"{ms['read']:>9.2f}{ms['verify']:>16.2f}{ms['digest'] / ms['write']:>14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
