"""``camfunc explain``: overlays for images, per method and class, and a JSON summary.

For each image, method and class: a figure (the pixels the model saw beside
the overlay, titled with the class and its probability, with a colour bar, at
least 256 px) and the map put back on the original image through the model's
resize and crop (``...-overlay.png``, zero outside the crop), so it lines up.
Images are read as viewers show them (EXIF orientation applied, unless
``--no-exif``) and fed through the model's own transform (timm's, the image
processor's, torchvision weights'), or resized whole for other models or when
``--size`` is given. With ``--expected``, an evidence bundle per image
(``camfunc.explain``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy
import torch
from torch import Tensor

import camfunc
from camfunc import models
from camfunc.cli._common import Subparsers, error_line, read_batches, safe_name
from camfunc.evidence import UnreadableImage, explain as explain_image
from camfunc.io import expand_images, progress, write_atomic, write_json
from camfunc.models import (
    LoadedModel,
    UsageError,
    make_split,
    resolve_methods,
    with_normalisation,
)
from camfunc.viz import figure, overlay


def positive_int(text: str) -> int:
    """An argparse type: an int of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def floats(text: str) -> tuple[float, ...]:
    """``0.5,0.5,0.5`` as floats, for --mean and --std."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as "
                                         f"0.485,0.456,0.406, got {text!r}") from None


def loaded_model(args: argparse.Namespace) -> LoadedModel:
    """The model the arguments name, with --mean/--std applied."""
    loaded = models.load(args.model, args.weights, args.size, args.pretrained_cfg)
    try:
        return with_normalisation(loaded, args.mean, args.std)
    except ValueError as error:
        raise UsageError(f"--mean/--std: {error}") from None


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="builtin",
                        help="builtin, torchvision:NAME, timm:NAME, hf:PATH (a save_pretrained "
                             "folder) or package.module:factory (default: "
                             "builtin; a module in the working directory is found). The model is "
                             "put in eval mode, as explaining needs; the Python API refuses a "
                             "training-mode model instead")
    parser.add_argument("--weights", help="state dict to load (torch.load with weights_only=True)")
    parser.add_argument("--layer", help="layer to explain (default: the model's, or chosen automatically)")
    parser.add_argument("--pretrained-cfg",
                        help="a timm: model's local JSON overlay on its pretrained config "
                             "(num_classes, input_size, mean, std, label_names...)")
    parser.add_argument("--size", type=positive_int,
                        help="square size images are resized to, for non-builtin models (default: "
                             "a timm or hf model's configured size, else 224)")
    parser.add_argument("--mean", type=floats,
                        help="per-channel mean, comma-separated (overrides the model's; with --std)")
    parser.add_argument("--std", type=floats,
                        help="per-channel std, comma-separated (overrides the model's; with --mean)")
    parser.add_argument("--batch-size", type=positive_int, default=16,
                        help="images per batch (default 16)")
    parser.add_argument("--no-exif", action="store_true",
                        help="keep images as stored, not turned by their EXIF orientation")


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--class", dest="cls", help="class index (or builtin class name) to explain")
    target.add_argument("--topk", type=int, help="explain each image's K top classes (default 1)")


def target_from(args: argparse.Namespace, loaded: LoadedModel) -> Any:
    """The ``cls`` argument for the methods: an int or camfunc.topk(k)."""
    if args.cls is None:
        k = args.topk if args.topk is not None else 1
        if k < 1:
            raise UsageError(f"--topk must be at least 1, got {k}")
        return camfunc.topk(k)
    if args.cls.lstrip("-").isdigit():
        return int(args.cls)
    names = loaded.class_names or ()
    if args.cls not in names:
        raise UsageError(f"unknown class {args.cls!r}; give an index or one of: {', '.join(names) or 'none'}")
    return names.index(args.cls)


def explained_classes(cls: Any, scores: Tensor) -> Tensor:
    """(B, K) class indices the maps were made for."""
    if isinstance(cls, camfunc.TopK):
        return scores.topk(cls.k, dim=1).indices
    return torch.full((scores.shape[0], 1), int(cls), dtype=torch.long)


def maps_per_class(maps: Tensor) -> Tensor:
    """Methods give (B, h, w) for one class and (B, K, h, w) for several: always the latter."""
    return maps if maps.ndim == 4 else maps.unsqueeze(1)


def save_overlay(path: Path, image: Tensor, cam: Tensor) -> Path:
    """The map over the image, at the image's own pixels (for tools that align them)."""
    picture = overlay(image, cam)
    return write_atomic(path, lambda file: picture.save(file, format="PNG"))


def save_array(path: Path, cam: Tensor) -> Path:
    """The map as the method gave it (float32 .npy), for exact comparisons."""
    array = cam.detach().float().cpu().numpy()
    return write_atomic(path, lambda file: numpy.save(file, array))


def save_figure(path: Path, image: Tensor, method: str, cam: Tensor, title: str) -> Path:
    """The image beside the overlay, at least 256 px, titled with the class and its
    probability, with a colour bar: what a person looks at."""
    figure(image, {method: cam}, classes=[title], path=path)
    return path


def unique_stems(paths: list[Path]) -> list[str]:
    """A distinct folder name per image (a numeric suffix where stems repeat)."""
    taken: set[str] = set()
    stems = []
    for path in paths:
        stem = candidate = safe_name(path.stem)
        copy = 1
        while candidate in taken:  # a.png twice and a-2.png must not share a folder
            copy += 1
            candidate = f"{stem}-{copy}"
        taken.add(candidate)
        stems.append(candidate)
    return stems


def explain(args: argparse.Namespace) -> int:
    loaded = loaded_model(args)
    methods = resolve_methods(args.method or ["gradcam"])
    if args.expected is not None:
        return explain_expected(args, loaded, list(methods))
    cls = target_from(args, loaded)
    split = make_split(loaded, args.layer)
    paths = expand_images(args.images)
    if not paths:
        raise UsageError("no images given (or none found in the folders given)")
    out = Path(args.out)
    stems = unique_stems(paths)
    records: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []

    batches = read_batches(paths, loaded, args.batch_size, failed, exif=not args.no_exif)
    total = -(-len(paths) // args.batch_size)
    for batch in progress(batches, total, "explain", unit="batch"):
        indices = [index for index, _, _ in batch]
        originals = [original for _, original, _ in batch]
        seen = [image for _, _, image in batch]
        images = torch.stack(seen)
        x = loaded.normalise(images)
        per_method = {}
        for name, method in methods.items():
            try:
                maps, scores = method(split, x, cls, return_scores=True)
            except (ValueError, TypeError, IndexError) as error:
                raise UsageError(f"{name}: {str(error).splitlines()[0]}") from None
            per_method[name] = maps_per_class(maps)
        classes = explained_classes(cls, scores)
        probabilities = torch.softmax(scores.float(), dim=1)
        for row, index in enumerate(indices):
            folder = out / stems[index]
            height, width = originals[row].shape[1:]
            entries = []
            for k, c in enumerate(classes[row].tolist()):
                files, overlays, arrays = {}, {}, {}
                title = f"{loaded.class_name(c)} ({float(probabilities[row, c]):.1%})"
                for name, maps in per_method.items():
                    stem = folder / f"{safe_name(name)}-{safe_name(loaded.class_name(c))}"
                    files[name] = str(save_figure(stem.with_suffix(".png"), seen[row],
                                                  name, maps[row, k], title))
                    arrays[name] = str(save_array(stem.with_suffix(".npy"), maps[row, k]))
                    back = loaded.on_original(maps[row, k], height, width)
                    overlays[name] = str(save_overlay(stem.with_name(stem.name + "-overlay.png"),
                                                      originals[row], back))
                entries.append({"class": c, "name": loaded.class_name(c),
                                "score": float(scores[row, c]),
                                "probability": float(probabilities[row, c]), "files": files,
                                "overlays": overlays, "maps": arrays})
            records.append({"path": str(paths[index]), "size": [height, width],
                            "box": list(loaded.box(height, width)), "classes": entries})
    summary = {"model": args.model, "layer": split_layer_names(split, args.layer, loaded),
               "preprocessing": loaded.preprocessing(), "methods": list(methods), "images": records, "failed": failed}
    write_json(out / "summary.json", summary)
    print(f"explained {len(records)} image(s) with {len(methods)} method(s); "
          f"{len(failed)} failed; wrote {out / 'summary.json'}")
    return 1 if failed else 0


def explain_expected(args: argparse.Namespace, loaded: LoadedModel, methods: list[str]) -> int:
    """``--expected``: an evidence bundle per image (``camfunc.explain``), and summary.json
    with the predicted and expected classes' files, as the report reads it."""
    if args.cls is not None or args.topk is not None:
        raise UsageError("--expected explains the predicted and the expected class; drop "
                         "--class/--topk")
    split = make_split(loaded, args.layer)
    paths = expand_images(args.images)
    if not paths:
        raise UsageError("no images given (or none found in the folders given)")
    out = Path(args.out)
    records: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    for path, stem in progress(list(zip(paths, unique_stems(paths), strict=True)), len(paths),
                               "explain", unit="image"):
        try:
            evidence = explain_image(loaded, path, expected=args.expected, methods=methods,
                                     layer=args.layer, out=out / stem, exif=not args.no_exif,
                                     split=split, model_name=args.model)
        except UnreadableImage as error:  # the rest go on, as without --expected
            error_line(str(error))
            failed.append({"path": str(path), "reason": str(error)})
            continue
        assert evidence.manifest is not None
        manifest = json.loads(evidence.manifest.read_text())
        folder = evidence.manifest.parent
        entries = []
        for role in ("predicted", "expected"):
            record = manifest[role]
            files = record["files"]
            entries.append({"role": role, "class": record["class"], "name": record["name"],
                            "score": record["logit"], "probability": record["probability"],
                            "files": {m: str(folder / f["figure"]) for m, f in files.items()},
                            "overlays": {m: str(folder / f["overlay"]) for m, f in files.items()},
                            "maps": {m: str(folder / f["map"]) for m, f in files.items()}})
        records.append({"path": str(path), "size": manifest["image"]["size"],
                        "box": manifest["image"]["box"], "correct": manifest["correct"],
                        "agreement": manifest["agreement"]["pairs"],
                        "bundle": str(evidence.manifest), "classes": entries})
    summary = {"model": args.model, "layer": split_layer_names(split, args.layer, loaded),
               "preprocessing": loaded.preprocessing(), "methods": methods,
               "expected": args.expected, "images": records, "failed": failed}
    write_json(out / "summary.json", summary)
    wrong = sum(1 for r in records if not r["correct"])
    print(f"explained {len(records)} image(s) against expected class {args.expected!r}: "
          f"{wrong} predicted otherwise; {len(failed)} failed; wrote {out / 'summary.json'}")
    return 1 if failed else 0


def split_layer_names(split: camfunc.Split, layer: str | None, loaded: LoadedModel) -> list[str]:
    names = getattr(split, "layers", None)
    return list(names) if names else [layer or loaded.layer or "?"]


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("explain", help="write CAM overlays for images",
                                   description="Write one overlay per image, method and class, "
                                               "and a JSON summary.")
    parser.add_argument("images", nargs="+", help="image files or folders")
    add_model_arguments(parser)
    parser.add_argument("--method", action="append",
                        help="a camfunc method (repeatable; default gradcam)")
    add_target_arguments(parser)
    parser.add_argument("--expected", metavar="CLASS",
                        help="the class each image should be (index or name): write an evidence "
                             "bundle per image with the predicted and expected classes' maps, a "
                             "contrastive Finer-CAM map, probabilities, the methods' agreement "
                             "and a manifest with sha256 hashes")
    parser.add_argument("--out", default="camfunc-out", help="output folder (default camfunc-out)")
    parser.set_defaults(handler=explain)
