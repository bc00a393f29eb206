"""``camfunc demo``: explain generated scenes with the embedded model; figures, scores, a table."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from camfunc import Split, models, zoo
from camfunc.cli._common import Subparsers, table
from camfunc.io import write_atomic, write_json
from camfunc.models import UsageError, make_split, resolve_methods
from camfunc.viz import figure

DEMO_METHODS = ["gradcam", "gradcampp", "xgradcam", "layercam", "hirescam", "scorecam",
                "ablationcam", "eigencam"]
# Tolerance 1 px (strict): the maximum must fall on the object itself. The usual
# 15 px is a quarter of these 64 px scenes, where a random point hits half the time.
STRICT = 1.0
DEMO_SEED = 7  # the scenes drawn for figures; scores use the held-out seed the training never saw


def localisation_scores(method: Callable[..., Tensor], split: Split, data: zoo.Scenes, batch_size: int
                        ) -> dict[str, float]:
    """Pointing-game and energy-pointing-game means of one method on ``data``, true classes."""
    from camfunc import metrics

    hits, inside, energy = [], [], []
    for start in range(0, len(data.labels), batch_size):
        images = data.images[start:start + batch_size]
        masks = data.masks[start:start + batch_size]
        maps = method(split, images, data.labels[start:start + batch_size])
        hits.append(metrics.pointing_game(maps, masks).hits.float())
        inside.append(metrics.pointing_game(maps, masks, tolerance=STRICT).hits.float())
        energy.append(metrics.energy_pointing_game(maps, masks).proportions.float())
    return {"pointing_game_15px": torch.cat(hits).mean().item(),
            "pointing_game_strict": torch.cat(inside).mean().item(),
            "energy_pointing_game": torch.cat(energy).mean().item()}


def demo(args: argparse.Namespace) -> int:
    from camfunc.zoo.train import HELD_OUT_SEED

    if args.scenes < 1 or args.eval < 1 or args.batch_size < 1:
        raise UsageError("--scenes, --eval and --batch-size must be positive")
    out = Path(args.out)
    loaded = models.load("builtin")
    split = make_split(loaded, None)
    methods = resolve_methods(args.method or DEMO_METHODS)

    shown = zoo.scenes(args.scenes, seed=DEMO_SEED)
    with torch.no_grad():
        predicted = loaded.model(shown.images).argmax(1)
    figures, scenes = [], []
    for i in range(args.scenes):
        truth, guess = zoo.CLASSES[shown.labels[i]], zoo.CLASSES[predicted[i]]
        maps = {name: method(split, shown.images[i:i + 1], shown.labels[i:i + 1])[0]
                for name, method in methods.items()}
        # The scene itself, at the model's size: what `camfunc explain` should be given.
        scene = save_image(shown.images[i], out / f"scene-{i:02d}.png")
        path = out / f"scene-{i:02d}-maps.png"
        figure(shown.images[i], maps, classes=[f"{truth} (predicted {guess})"], path=path)
        figures.append(str(path))
        scenes.append(str(scene))

    held_out = zoo.scenes(args.eval, seed=HELD_OUT_SEED)
    with torch.no_grad():
        accuracy = (loaded.model(held_out.images).argmax(1) == held_out.labels).float().mean().item()
    rows = []
    for name, method in methods.items():
        start = time.perf_counter()
        scores = localisation_scores(method, split, held_out, args.batch_size)
        rows.append({"method": name, **scores, "seconds": time.perf_counter() - start})
    payload = {"model": "builtin", "layer": zoo.LAYER, "accuracy": accuracy,
               "held_out_scenes": args.eval, "held_out_seed": HELD_OUT_SEED,
               "chance_pointing_game_15px": chance_pointing(held_out),
               "chance_pointing_game_strict": chance_pointing(held_out, STRICT),
               "chance_energy_pointing_game": held_out.masks.float().mean().item(),
               "methods": rows, "scenes": scenes, "figures": figures}
    write_json(out / "scores.json", payload)
    print(f"embedded model accuracy on {args.eval} held-out scenes: {accuracy:.3f}")
    print(f"chance: pointing game (15 px) {payload['chance_pointing_game_15px']:.3f}, strict "
          f"{payload['chance_pointing_game_strict']:.3f}, energy {payload['chance_energy_pointing_game']:.3f}")
    print(table(rows, ["method", "pointing_game_15px", "pointing_game_strict", "energy_pointing_game",
                       "seconds"]))
    print(f"wrote {len(scenes)} scene(s) (scene-NN.png, try: camfunc explain {scenes[0] if scenes else 'IMAGE'}), "
          f"{len(figures)} figure(s) (scene-NN-maps.png) and {out / 'scores.json'}")
    return 0


def save_image(image: torch.Tensor, path: Path) -> Path:
    """A (3, H, W) float image in [0, 1] as an 8-bit PNG, atomically."""
    import io

    from PIL import Image

    pixels = (image.clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return write_atomic(path, lambda file: file.write(buffer.getvalue()))


def chance_pointing(data: zoo.Scenes, tolerance: float = 15.0) -> float:
    """The pointing game of a uniformly random point: mean fraction of pixels within tolerance."""
    from camfunc import metrics

    return float(metrics.pointing_game_chance(data.masks, tolerance=tolerance).mean())


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("demo", help="explain generated scenes with the embedded model",
                                   description="Generate scenes, explain them with the embedded "
                                               "model and several methods, write figures and a "
                                               "JSON of scores, and print a table.")
    parser.add_argument("--out", default="camfunc-demo", help="output folder (default camfunc-demo)")
    parser.add_argument("--scenes", type=int, default=4, help="scenes to draw figures for (default 4)")
    parser.add_argument("--eval", type=int, default=200,
                        help="held-out scenes to score localisation on (default 200)")
    parser.add_argument("--method", action="append",
                        help=f"methods (repeatable; default {' '.join(DEMO_METHODS)})")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.set_defaults(handler=demo)
