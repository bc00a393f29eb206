#!/usr/bin/env python
"""What it costs a split to check, on every call, that its capture still holds.

Every camfunc method binds the split to its input first (``Split.bound``): it
compares the model's structure with a snapshot taken at capture time (every
module's children, parameters, buffers and forward hooks, by identity) and, for
an exported split, looks up whether torch's guards admit the input's shape.
This script times that, side by side with a no-grad forward of the same model
at batch 1 (the smallest forward, so the largest ratio), interleaved, median of
``--repeats`` rounds of ``--calls`` calls each:

* torchvision ResNet-18, 224x224, split at ``layer4`` (torch.fx);
* Hugging Face ViT-B/16 (default config, random weights), split at
  ``vit.layers.10`` (torch.export).

The target (issue 19) is under 1% of the ResNet-18 forward. Prints Markdown.

    python benchmarks/bench_staleness.py --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def per_call(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def rows(name, model, split, x, repeats, calls):
    with torch.no_grad():
        model(x)  # warm
    split.bound(x)
    forward, check = [], []
    for _ in range(repeats):  # interleaved, so machine noise falls on both alike
        with torch.no_grad():
            forward.append(per_call(lambda: model(x), max(1, calls // 100)))
        check.append(per_call(lambda: split.bound(x), calls))
    f, c = statistics.median(forward), statistics.median(check)
    return f"| {name} | {f * 1e3:.2f} | {c * 1e6:.1f} | {100 * c / f:.3f}% |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import torchvision
    from transformers import ViTConfig, ViTForImageClassification

    import camfunc

    torch.manual_seed(0)
    out = ["| model (split) | forward ms, batch 1 | check µs | check / forward |", "|---|--:|--:|--:|"]
    resnet = torchvision.models.resnet18().eval()
    out.append(rows("torchvision ResNet-18, 224 px (`layer4`, torch.fx)", resnet,
                    camfunc.split(resnet, "layer4"), torch.randn(1, 3, 224, 224), args.repeats,
                    args.calls))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vit = ViTForImageClassification(ViTConfig()).eval()
    out.append(rows("HF ViT-B/16, 224 px (`vit.layers.10`, torch.export)", vit,
                    camfunc.split(vit, "vit.layers.10"), torch.randn(1, 3, 224, 224),
                    args.repeats, args.calls))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
