"""Regenerate the embedded model's weights: ``python -m camfunc.zoo.train``.

Trains ShapesNet on fresh procedural scenes at every step (scene seeds
``TRAIN_SEED_BASE + step``; the held-out set uses ``HELD_OUT_SEED``, which no
training step draws), with AdamW and a cosine learning rate. Everything is
seeded and deterministic algorithms are enforced, so the same torch build on
the same CPU and thread count gives the same weights bit for bit; other
machines agree up to floating-point rounding and the same accuracy.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import nn

from camfunc.zoo._net import WEIGHTS_FILE, ShapesNet
from camfunc.zoo._scenes import scenes

TRAIN_SEED_BASE = 1_000_000
HELD_OUT_SEED = 20_261_126
STEPS = 1500
BATCH = 64


def accuracy(model: nn.Module, n: int = 1000, seed: int = HELD_OUT_SEED, batch: int = 250) -> float:
    """Top-1 accuracy on ``n`` held-out scenes."""
    data = scenes(n, seed=seed)
    with torch.no_grad():
        predictions = torch.cat([model(data.images[i:i + batch]).argmax(1)
                                 for i in range(0, n, batch)])
    return (predictions == data.labels).float().mean().item()


def train(steps: int = STEPS, batch: int = BATCH, lr: float = 3e-3, seed: int = 0,
          log_every: int = 100) -> ShapesNet:
    """Train a fresh ShapesNet and return it in eval mode.

    The global RNG state and the deterministic-algorithms flag are restored afterwards.
    """
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            torch.use_deterministic_algorithms(True)
            return _train(steps, batch, lr, log_every)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train(steps: int, batch: int, lr: float, log_every: int) -> ShapesNet:
    model = ShapesNet()
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for step in range(steps):
        data = scenes(batch, seed=TRAIN_SEED_BASE + step)
        loss = loss_fn(model(data.images), data.labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}  loss {loss.item():.4f}", flush=True)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_FILE, help="where to write the state dict")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model = train(args.steps, args.batch, seed=args.seed)
    print(f"held-out accuracy: {accuracy(model):.3f}")
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
