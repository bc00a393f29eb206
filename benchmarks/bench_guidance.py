"""Does training with a CAM loss matter? The decoy experiment on the embedded scenes.

    python benchmarks/bench_guidance.py [--steps 2500] [--batch 64] [--fraction 0.1] [--json out.json]

Training scenes carry a decoy: a small patch in a random corner whose colour is tied to
the class (``camfunc.zoo.scenes(..., decoy="class")``), as in the "decoy MNIST" of Ross
et al., "Right for the Right Reasons", IJCAI 2017. Two ShapesNets start from the same
seed and see the same scenes:

- plain: cross-entropy alone;
- guided: cross-entropy plus ``weight`` x ``camfunc.losses.energy_outside`` of Grad-CAM
  maps (``differentiable=True``, at ``block3``) against the object's mask, on the first
  ``fraction`` of each batch only: the other images have no annotation. One forward
  serves both terms (``return_scores=True``). The maps explain the true class's
  log-probability, as Ross et al. constrain the gradients of log-probabilities: a
  logit's map shows only the evidence *for* its class, so a model can keep using the
  decoy as evidence *against* the other classes, where the logit's ReLU'd map never
  looks (with the logit as target, the guided model still fell for the decoy).

Both are then tested on scenes whose decoy colour is drawn independently of the class
(``decoy="random"``): accuracy, and the pointing game on the object (Grad-CAM's maximum
inside the object's mask, tolerance 1 px). The step times are medians of steps timed
side by side (plain and guided alternating) after training, in this process. Everything
is seeded; on a CPU, the default run takes 12 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import camfunc  # noqa: E402
from camfunc.zoo import LAYER, ShapesNet, scenes  # noqa: E402

TRAIN_SEED_BASE = 3_000_000
TEST_SEED = 20_261_127


def make_step(guided: bool, fraction: float, weight: float):
    """One training step's loss for a model, its split and a batch of decoy scenes."""
    def loss_of(model: nn.Module, split: camfunc.Split, images, labels, masks) -> torch.Tensor:
        if not guided:
            return nn.functional.cross_entropy(model(images), labels)
        def log_probability(out: torch.Tensor) -> torch.Tensor:
            return out.log_softmax(1).gather(1, labels[:, None])[:, 0]

        maps, scores = camfunc.gradcam(split, images, log_probability, differentiable=True,
                                       return_scores=True, normalize=False)
        annotated = max(1, round(fraction * images.shape[0]))
        outside = camfunc.losses.energy_outside(maps[:annotated], masks[:annotated])
        return nn.functional.cross_entropy(scores, labels) + weight * outside
    return loss_of


def train(guided: bool, steps: int, batch: int, fraction: float, weight: float, lr: float,
          seed: int) -> tuple[ShapesNet, list[float]]:
    torch.manual_seed(seed)
    model = ShapesNet().train()
    split = camfunc.split(model, LAYER)  # traced in training mode, which the loop keeps
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    loss_of = make_step(guided, fraction, weight)
    losses = []
    for step in range(steps):
        data = scenes(batch, seed=TRAIN_SEED_BASE + step, decoy="class")
        loss = loss_of(model, split, data.images, data.labels, data.masks)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            print(f"  {'guided' if guided else 'plain'} step {step + 1}/{steps}: loss {loss.item():.3f}",
                  flush=True)
    return model.eval(), losses


def evaluate(model: ShapesNet, n: int, decoy: str | None) -> dict[str, float]:
    data = scenes(n, seed=TEST_SEED, decoy=decoy)
    split = camfunc.split(model, LAYER)
    correct, hits = 0, 0
    for i in range(0, n, 250):
        images, labels, masks = data.images[i:i + 250], data.labels[i:i + 250], data.masks[i:i + 250]
        maps, scores = camfunc.gradcam(split, images, labels, return_scores=True)
        correct += int((scores.argmax(1) == labels).sum())
        hits += int(camfunc.metrics.pointing_game(maps, masks, tolerance=1.0).hits.sum())
    return {"accuracy": correct / n, "pointing": hits / n}


def time_steps(batch: int, fraction: float, weight: float, repeats: int) -> dict[str, float]:
    """Median seconds per step, plain and guided alternating on fresh models."""
    models = {name: ShapesNet().train() for name in ("plain", "guided")}
    splits = {name: camfunc.split(m, LAYER) for name, m in models.items()}
    steps = {"plain": make_step(False, fraction, weight), "guided": make_step(True, fraction, weight)}
    data = scenes(batch, seed=TRAIN_SEED_BASE, decoy="class")
    times: dict[str, list[float]] = {"plain": [], "guided": []}
    for repeat in range(repeats + 2):
        for name in ("plain", "guided"):
            start = time.perf_counter()
            loss = steps[name](models[name], splits[name], data.images, data.labels, data.masks)
            loss.backward()
            elapsed = time.perf_counter() - start
            if repeat >= 2:  # two warm-up rounds
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--fraction", type=float, default=0.1, help="share of each batch with masks")
    parser.add_argument("--weight", type=float, default=1.0, help="weight of the CAM loss")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test", type=int, default=1000, help="test scenes")
    parser.add_argument("--timing-repeats", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    started = time.time()
    results: dict[str, dict[str, float]] = {}
    for guided in (False, True):
        name = "guided" if guided else "plain"
        model, _ = train(guided, args.steps, args.batch, args.fraction, args.weight, args.lr, args.seed)
        results[name] = {f"{key} ({decoy or 'no decoy'})": value
                         for decoy in ("random", "class", None)
                         for key, value in evaluate(model, args.test, decoy).items()}
    timing = time_steps(args.batch, args.fraction, args.weight, args.timing_repeats)
    ratio = timing["guided"] / timing["plain"]

    print(f"\n## Decoy scenes: ShapesNet, {args.steps} steps of {args.batch}, CAM loss on "
          f"{args.fraction:.0%} of each batch (weight {args.weight})")
    print(f"- torch {torch.__version__}, {torch.get_num_threads()} threads; seed {args.seed}; "
          f"the run took {(time.time() - started) / 60:.1f} min")
    print(f"- command: `python benchmarks/bench_guidance.py {' '.join(sys.argv[1:])}`\n")
    columns = list(results["plain"])
    print("| model | " + " | ".join(columns) + " |")
    print("|---|" + "--:|" * len(columns))
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    print("\naccuracy: top-1 on test scenes; pointing: Grad-CAM's maximum on the object (1 px). "
          "The decoy's colour is random on the 'random' test scenes, the class's on 'class'.\n")
    print("| step | median s | x plain |")
    print("|---|--:|--:|")
    print(f"| plain (cross-entropy) | {timing['plain']:.4f} | 1.00 |")
    print(f"| guided (+ Grad-CAM energy loss) | {timing['guided']:.4f} | {ratio:.2f} |")
    targets = [("guided accuracy on decorrelated scenes", results["guided"]["accuracy (random)"], ">= 0.90",
                results["guided"]["accuracy (random)"] >= 0.9),
               ("guided beats plain on decorrelated scenes",
                results["guided"]["accuracy (random)"] - results["plain"]["accuracy (random)"], "> 0",
                results["guided"]["accuracy (random)"] > results["plain"]["accuracy (random)"]),
               ("guided step / plain step", ratio, "<= 2.50", ratio <= 2.5)]
    print("\n| target | value | limit | result |\n|---|--:|--:|---|")
    for name, value, limit, ok in targets:
        print(f"| {name} | {value:.3f} | {limit} | {'PASS' if ok else 'MISS'} |")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results,
                                         "step_seconds": timing, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
