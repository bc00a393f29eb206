"""``camfunc evaluate``: faithfulness and localisation metrics per image and method; table, JSON, CSV."""

from __future__ import annotations

import argparse
import csv
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from camfunc.cli._common import Subparsers, read_batches, table
from camfunc.cli._explain import add_model_arguments, loaded_model, positive_int
from camfunc.io import expand_images, progress, write_json, write_text_atomic
from camfunc.models import LoadedModel, UsageError, make_split, resolve_methods

METRICS = ("confidence", "deletion", "insertion", "pointing", "road", "arcc", "infidelity",
           "sensitivity")
DEFAULT_METRICS = ("confidence", "deletion", "insertion")


RANDOM_METRICS = ("road", "arcc", "infidelity", "sensitivity")


#: (names, images, classes or None, masks or None): one batch to evaluate.
Batch = tuple[list[str], Tensor, Tensor | None, Tensor | None]


def metric_columns(name: str, model: Callable[[Tensor], Any], x: Tensor, maps: Tensor, cls: Tensor,
                   masks: Tensor | None, args: argparse.Namespace, method: Callable[..., Tensor],
                   first: int) -> dict[str, Tensor]:
    """One metric's per-image columns for a batch whose first image is number ``first``.

    Random metrics run an image at a time, each from a generator seeded by ``--seed`` and the
    image's number, so their values do not depend on ``--batch-size``.
    """
    if name in RANDOM_METRICS and x.shape[0] > 1:
        parts = [metric_columns(name, model, x[i:i + 1], maps[i:i + 1], cls[i:i + 1], None, args,
                                method, first + i) for i in range(x.shape[0])]
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    from camfunc import metrics

    generator = torch.Generator(device=x.device).manual_seed(args.seed * 1_000_003 + first)

    if name == "confidence":
        change = metrics.confidence_change(model, x, maps, cls)
        return {"drop": change.drop, "increase": change.increase.float()}
    if name in ("deletion", "insertion"):
        curve = getattr(metrics, name)(model, x, maps, cls, step=args.step, batch_size=args.batch_size)
        # 2-D columns are curves: kept in metrics.json's "curves", not in the table or CSV.
        return {f"{name}_auc": curve.auc, f"{name}_curve": curve.curves,
                f"{name}_fractions": curve.fractions.expand(curve.curves.shape[0], -1)}
    if name == "pointing":
        return {"pointing_game_15px": metrics.pointing_game(maps, masks).hits.float(),
                "energy_pointing_game": metrics.energy_pointing_game(maps, masks).proportions}
    if name == "road":
        return {"road_logit_change": metrics.road(model, x, maps, cls, generator=generator,
                                     batch_size=args.batch_size)}
    if name == "arcc":
        return {"arcc": metrics.arcc(method, model, x, cls, maps=maps, generator=generator,
                                     batch_size=args.batch_size)}
    if name == "infidelity":
        return {"infidelity": metrics.infidelity(model, x, maps, cls, generator=generator,
                                                 batch_size=args.batch_size)}
    return {"sensitivity_max": metrics.sensitivity_max(method, model, x, cls, generator=generator,
                                                       batch_size=args.batch_size)}


def generated_batches(args: argparse.Namespace) -> Iterator[Batch]:
    """(names, images, classes, masks) batches of the embedded model's held-out scenes."""
    from camfunc import zoo

    data = zoo.scenes(args.generated, seed=args.seed)
    for start in range(0, args.generated, args.batch_size):
        stop = min(start + args.batch_size, args.generated)
        names = [f"scene-{i:05d}" for i in range(start, stop)]
        yield names, data.images[start:stop], data.labels[start:stop], data.masks[start:stop]


def file_batches(args: argparse.Namespace, loaded: LoadedModel, failed: list[dict[str, str]]
                 ) -> Iterator[Batch]:
    """(names, images, classes or None, None) batches of readable image files, read a batch
    at a time; failures recorded."""
    paths = expand_images(args.images)
    for batch in read_batches(paths, loaded, args.batch_size, failed, exif=not args.no_exif):
        yield ([str(paths[index]) for index, _, _ in batch],
               torch.stack([image for _, _, image in batch]), None, None)


def evaluate(args: argparse.Namespace) -> int:
    if args.images and args.generated:
        raise UsageError("give image files or folders, or --generated N (the embedded model's scenes), not both")
    if not args.images and not args.generated:
        raise UsageError("nothing to evaluate: give image files or folders, or --generated N "
                         "(the embedded model's scenes)")
    if args.generated and args.model != "builtin":
        raise UsageError("--generated scenes are for the builtin model; drop --model or give images")
    chosen = args.metric or list(DEFAULT_METRICS) + (["pointing"] if args.generated else [])
    unknown = [m for m in chosen if m not in METRICS]
    if unknown:
        raise UsageError(f"unknown metric {unknown[0]!r}; choose from: {', '.join(METRICS)}")
    if "pointing" in chosen and not args.generated:
        raise UsageError("the pointing game needs object masks: use it with --generated N")
    loaded = loaded_model(args)
    methods = resolve_methods(args.method or ["gradcam"])
    split = make_split(loaded, args.layer)
    failed: list[dict[str, str]] = []
    batches = generated_batches(args) if args.generated else file_batches(args, loaded, failed)
    rows: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []
    first = 0
    for names, images, classes, masks in progress(batches, None, "evaluate", unit="batch"):
        x = loaded.normalise(images)
        if classes is None:
            with torch.no_grad():
                classes = split(x).argmax(1) if args.cls is None else torch.full(
                    (len(names),), args.cls, dtype=torch.long)
        for method_name, method in methods.items():
            try:
                maps = method(split, x, classes)
                columns: dict[str, Tensor] = {}
                for metric in chosen:
                    columns.update(metric_columns(metric, split, x, maps, classes, masks, args,
                                                  method, first))
            except (ValueError, TypeError, IndexError) as error:
                raise UsageError(f"{method_name}: {str(error).splitlines()[0]}") from None
            scalars = {k: v for k, v in columns.items() if v.ndim == 1}
            for row, name in enumerate(names):
                rows.append({"image": name, "method": method_name, "class": int(classes[row]),
                             **{key: float(value[row]) for key, value in scalars.items()}})
                curves.extend(curve_records(columns, row, name, method_name, int(classes[row])))
        first += len(names)
    if not rows:
        raise UsageError("no image could be read")
    summary = summarise(rows)
    out = Path(args.out)
    write_json(out / "metrics.json", {"model": args.model, "preprocessing": loaded.preprocessing(),
                                      "methods": list(methods), "metrics": chosen,
                                      "summary": summary, "images": rows, "curves": curves,
                                      "failed": failed})
    write_text_atomic(out / "metrics.csv", to_csv(rows))
    print(table(summary, list(summary[0])))
    print(f"wrote {out / 'metrics.csv'} and {out / 'metrics.json'}")
    return 1 if failed else 0


def curve_records(columns: dict[str, Tensor], row: int, image: str, method: str,
                  cls: int) -> list[dict[str, Any]]:
    """One image's deletion and insertion curves: the class score at each fraction moved."""
    return [{"image": image, "method": method, "class": cls, "metric": key[:-len("_curve")],
             "fractions": [round(float(f), 6) for f in columns[key[:-len("_curve")] + "_fractions"][row]],
             "scores": [float(v) for v in value[row]]}
            for key, value in columns.items() if key.endswith("_curve")]


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method, the mean of every metric column."""
    keys = [k for k in rows[0] if k not in ("image", "method", "class")]
    summary = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        summary.append({"method": method, "images": len(mine),
                        **{k: sum(r[k] for r in mine) / len(mine) for k in keys}})
    return summary


def to_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="score CAM methods with faithfulness metrics",
                                   description="Run metrics over images or the generated set; "
                                               "print a table, save JSON and CSV.")
    parser.add_argument("images", nargs="*", help="image files or folders")
    parser.add_argument("--generated", type=positive_int, default=0,
                        help="use N generated scenes (builtin model; true classes and object masks)")
    parser.add_argument("--seed", type=int, default=20_261_126,
                        help="scene seed for --generated, and the random metrics' seed "
                             "(default: the held-out seed)")
    add_model_arguments(parser)
    parser.add_argument("--method", action="append", help="a camfunc method (repeatable; default gradcam)")
    parser.add_argument("--metric", action="append",
                        help=f"one of {', '.join(METRICS)} (repeatable; default "
                             f"{', '.join(DEFAULT_METRICS)}, plus pointing with --generated)")
    parser.add_argument("--class", dest="cls", type=int,
                        help="class index to explain in image files (default: the predicted class)")
    parser.add_argument("--step", type=int, help="pixels per deletion/insertion step (default: image width)")
    parser.add_argument("--out", default="camfunc-eval", help="output folder (default camfunc-eval)")
    parser.set_defaults(handler=evaluate)
