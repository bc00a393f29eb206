"""Predicted against expected, in one call: ``camfunc.explain`` explains one image with
several methods and writes an evidence bundle a person can look at and a machine can check.

For the predicted class and the expected one: each method's map, on the pixels the model saw
and put back on the original image; a contrastive map (Finer-CAM: the predicted class against
the expected one, or against its nearest rivals when they agree); the probabilities; and how
far the methods agree (pairwise Spearman rank correlation of their maps). The bundle holds the
maps as ``.npy``, figures and overlays as PNG, the logits, and ``manifest.json``: versions,
model, layer, preprocessing, input shape, and the sha256 of every file written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import itertools
import platform
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy
import torch
from torch import Tensor

from camfunc import metrics
from camfunc._core.ops import upsample
from camfunc._core.split import Split
from camfunc._methods import finercam
from camfunc._util.atomic import write_atomic, write_json
from camfunc._util.images import failure_reason
from camfunc._version import __version__
from camfunc.models import LoadedModel, UsageError, load, make_split, resolve_methods
from camfunc.viz import figure, overlay

__all__ = ["Evidence", "UnreadableImage", "explain"]


class UnreadableImage(UsageError):
    """The image file is missing, unreadable or corrupt (one line naming it)."""

#: Finer-CAM's gamma when the predicted class is contrasted with one expected class: the map
#: of ``y_predicted - y_expected``, what tells them apart.
PAIR_GAMMA = 1.0


@dataclasses.dataclass(frozen=True)
class Evidence:
    """What :func:`explain` found for one image.

    ``maps[role][method]`` is the method's map (h, w) on the model's pixels, ``role``
    ``"predicted"`` or ``"expected"``; ``contrastive`` the Finer-CAM map of the predicted class
    against ``contrasted_with``; ``agreement`` the Spearman correlation of each pair of methods'
    predicted-class maps (``"a~b"``); ``manifest`` the bundle's ``manifest.json`` (None when
    nothing was written).
    """

    predicted: int
    expected: int | None
    class_names: tuple[str, ...] | None
    probabilities: Tensor                      # (num_classes,)
    logits: Tensor                             # (num_classes,)
    maps: dict[str, dict[str, Tensor]]
    contrastive: Tensor
    contrasted_with: tuple[int, ...] | None    # None: the nearest rivals (predicted == expected)
    agreement: dict[str, float]
    input_shape: tuple[int, ...]
    manifest: Path | None = None

    @property
    def correct(self) -> bool | None:
        """Whether the prediction is the expected class (None when none was given)."""
        return None if self.expected is None else self.predicted == self.expected


def explain(model: LoadedModel | str, image: str | Path, *, expected: int | str | None = None,
            methods: Sequence[str] = ("gradcam",), layer: str | None = None,
            out: str | Path | None = None, exif: bool = True, split: Split | None = None,
            model_name: str | None = None) -> Evidence:
    """Explain ``image`` as ``model`` predicts it, against the ``expected`` class.

    Args:
        model: a ``camfunc.models.load`` result, or a spec such as ``"builtin"``,
            ``"timm:resnet18"``, ``"hf:PATH"`` (loaded with its own preprocessing).
        image: an image file, fed through the model's own transform.
        expected: the class it should be, an index or a class name (None: predicted only).
        methods: names in ``camfunc.METHODS``; the first also makes the contrastive map.
        layer: the layer to explain (default: the model's, or camfunc's choice).
        out: a folder for the evidence bundle (None: nothing is written).
        exif: turn the image by its EXIF orientation, as viewers show it.
        split: a split of ``model`` made already (to explain many images with one).
        model_name: how the manifest names the model (default: the spec given, else the
            model's class).

    Returns:
        An :class:`Evidence`. A bad argument raises a one-line ``camfunc.models.UsageError``.

    Example:
        >>> from PIL import Image
        >>> scene = camfunc.zoo.scenes(1, seed=3).images[0]          # (3, 64, 64) in [0, 1]
        >>> Image.fromarray((scene.permute(1, 2, 0) * 255).byte().numpy()).save("scene.png")
        >>> evidence = camfunc.explain("builtin", "scene.png", expected="circle",
        ...                            methods=["gradcam", "layercam"], out="evidence")
        >>> evidence.maps["expected"]["gradcam"].shape, sorted(evidence.agreement)
        (torch.Size([16, 16]), ['gradcam~layercam'])
        >>> evidence.manifest.name
        'manifest.json'
    """
    loaded = load(model) if isinstance(model, str) else model
    chosen = resolve_methods(list(methods))
    if not chosen:
        raise UsageError("explain needs at least one method, given none")
    wanted = None if expected is None else class_index(loaded, expected)
    try:
        original, seen = loaded.read(image, exif=exif)
    except Exception as error:  # whatever the decoder raised, one line
        raise UnreadableImage(failure_reason(error)) from None
    split = split if split is not None else make_split(loaded, layer)
    x = loaded.normalise(seen.unsqueeze(0))
    with torch.no_grad():
        logits = split(x)[0].float()
    predicted = int(logits.argmax())
    roles = {"predicted": predicted, **({"expected": wanted} if wanted is not None else {})}
    maps = {role: {name: _call(name, method, split, x, c)[0] for name, method in chosen.items()}
            for role, c in roles.items()}
    first_name, first = next(iter(chosen.items()))
    contrast = (wanted,) if wanted is not None and wanted != predicted else None
    options = {"references": list(contrast), "gamma": PAIR_GAMMA} if contrast else {}
    contrastive = _call(f"finercam({first_name})", finercam, split, x, predicted,
                        method=first, **options)[0]
    evidence = Evidence(predicted, wanted, loaded.class_names, torch.softmax(logits, 0), logits,
                        maps, contrastive, contrast,
                        agreement(maps["predicted"], tuple(loaded.size)), tuple(x.shape))
    if out is None:
        return evidence
    name = model_name or (model if isinstance(model, str) else type(loaded.model).__name__)
    manifest = _write_bundle(Path(out), evidence, loaded, split, layer, Path(image), original, seen,
                             name)
    return dataclasses.replace(evidence, manifest=manifest)


def class_index(loaded: LoadedModel, given: int | str) -> int:
    """``given`` (an index, its text, or a class name) as a class index, or a one-line error."""
    names = loaded.class_names or ()
    count = len(names) if names else _outputs(loaded)
    text = str(given)
    if isinstance(given, int) or re.fullmatch(r"-?\d+", text):
        index = int(text)
        if count is not None and not 0 <= index < count:
            raise UsageError(f"expected class {index} is out of range: the model has {count} "
                             f"classes (0..{count - 1}); give an index in range or a class name")
        return index
    if text in names:
        return names.index(text)
    shown = ", ".join(names[:8]) + (f" ... ({len(names)} in all)" if len(names) > 8 else "")
    raise UsageError(f"unknown expected class {text!r}: give a class index or one of the "
                     f"model's class names ({shown or 'the model names none; give an index'})")


def _outputs(loaded: LoadedModel) -> int | None:
    """The number of classes the model scores, from a zero input."""
    parameter = next(loaded.model.parameters(), None)
    device = parameter.device if parameter is not None else None
    with torch.no_grad():
        scores = loaded.model(torch.zeros(1, loaded.channels, *loaded.size, device=device))
    return int(scores.shape[-1]) if isinstance(scores, Tensor) and scores.ndim == 2 else None


def _call(name: str, function: Any, split: Split, x: Tensor, cls: int, **options: Any) -> Tensor:
    """``method``'s map (1, h, w) for class ``cls``; a method's refusal as a one-line error."""
    try:
        result = function(split, x, cls, **options)
    except (ValueError, TypeError, IndexError) as error:
        raise UsageError(f"{name}: {str(error).splitlines()[0]}") from None
    maps: Tensor = result[0] if isinstance(result, tuple) else result
    return maps.detach().float().cpu()


def agreement(maps: dict[str, Tensor], size: tuple[int, ...]) -> dict[str, float]:
    """Spearman rank correlation (``camfunc.metrics.spearman``) of each pair of maps, resized to
    the input's ``size`` first (methods give maps at different resolutions); NaN where a map
    is flat."""
    resized = {name: upsample(cam[None], size)[0] for name, cam in maps.items()}
    return {f"{a}~{b}": float(metrics.spearman(resized[a][None], resized[b][None])[0])
            for a, b in itertools.combinations(resized, 2)}


def _name(loaded: LoadedModel, index: int) -> str:
    return loaded.class_name(index)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "item"


def _write_bundle(folder: Path, evidence: Evidence, loaded: LoadedModel, split: Split,
                  layer: str | None, image: Path, original: Tensor, seen: Tensor,
                  model_name: str) -> Path:
    """The maps (.npy), figures and overlays (PNG), logits and ``manifest.json``, whose
    ``files`` give each file's sha256; the manifest is written last, atomically."""
    height, width = original.shape[1:]
    written: list[Path] = []
    records: dict[str, Any] = {}

    def save(stem: str, cam: Tensor, title: str) -> dict[str, str]:
        picture = overlay(original, loaded.on_original(cam, height, width))
        files = {"map": folder / f"{stem}.npy", "figure": folder / f"{stem}.png",
                 "overlay": folder / f"{stem}-overlay.png"}
        save_array(files["map"], cam)
        figure(seen, {stem: cam}, classes=[title], path=files["figure"])
        write_atomic(files["overlay"], lambda file: picture.save(file, format="PNG"))
        written.extend(files.values())
        return {k: v.name for k, v in files.items()}

    probabilities = evidence.probabilities
    for role, per_method in evidence.maps.items():
        c = evidence.predicted if role == "predicted" else evidence.expected
        assert c is not None
        title = f"{role}: {_name(loaded, c)} ({float(probabilities[c]):.1%})"
        records[role] = {"class": c, "name": _name(loaded, c),
                         "probability": float(probabilities[c]), "logit": float(evidence.logits[c]),
                         "files": {m: save(f"{_safe(m)}-{role}-{_safe(_name(loaded, c))}", cam, title)
                                   for m, cam in per_method.items()}}
    against = "nearest rivals" if evidence.contrasted_with is None else \
        ", ".join(_name(loaded, c) for c in evidence.contrasted_with)
    first = next(iter(evidence.maps["predicted"]))
    contrastive = {"method": first, "class": evidence.predicted,
                   "against": None if evidence.contrasted_with is None else list(evidence.contrasted_with),
                   "gamma": PAIR_GAMMA if evidence.contrasted_with else 0.6,
                   "files": save(f"finercam-{_safe(first)}", evidence.contrastive,
                                 f"{_name(loaded, evidence.predicted)} vs {against}")}
    for stem, values in (("logits", evidence.logits), ("probabilities", probabilities)):
        written.append(save_array(folder / f"{stem}.npy", values))
    top = probabilities.topk(min(5, probabilities.numel()))
    manifest = {
        "camfunc": __version__, "versions": versions(),
        "model": model_name,
        "model_class": type(loaded.model).__name__,
        "layer": list(getattr(split, "layers", None) or [layer or loaded.layer or "?"]),
        "preprocessing": loaded.preprocessing(), "input_shape": list(evidence.input_shape),
        "image": {"path": str(image), "sha256": sha256(image), "size": [height, width],
                  "box": list(loaded.box(height, width))},
        "predicted": records["predicted"], "expected": records.get("expected"),
        "correct": evidence.correct,
        "top": [{"class": int(c), "name": _name(loaded, int(c)), "probability": float(p)}
                for p, c in zip(top.values, top.indices, strict=True)],
        "methods": list(evidence.maps["predicted"]), "contrastive": contrastive,
        "agreement": {"statistic": "spearman", "class": "predicted", "pairs": evidence.agreement},
        "files": {path.name: sha256(path) for path in written},
    }
    return write_json(folder / "manifest.json", manifest)


def save_array(path: Path, values: Tensor) -> Path:
    """``values`` as float32 ``.npy``, atomically."""
    array = values.detach().cpu().numpy().astype(numpy.float32)
    return write_atomic(path, lambda file: numpy.save(file, array))


def versions() -> dict[str, str]:
    """The versions of what made the bundle: Python, camfunc, torch, and the model libraries
    and image tools that are installed."""
    found = {"python": platform.python_version(), "camfunc": __version__, "torch": torch.__version__}
    for package in ("torchvision", "timm", "transformers", "numpy", "pillow", "matplotlib"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
