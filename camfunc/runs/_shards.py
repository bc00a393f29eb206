"""Shard files: fixed index ranges, compact maps, atomic writes, and the merged tables.

Shard ``j`` always holds dataset indices ``[j * shard_size, (j + 1) * shard_size)``
(the last one fewer), whatever the number of ranks or the batch size, so a
finished shard is finished for any later run with the same settings. A shard
file is a ``torch.save`` dict written to a temporary file and renamed: a file
under its final name is complete.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from camfunc._util.atomic import write_atomic

SHARD_FOLDER = "shards"
FORMAT = "camfunc-run/1"
MAP_DTYPES = {"float16": torch.float16, "uint8": torch.uint8, "float32": torch.float32}
UINT8_LEVELS = 255.0


def shard_count(num_images: int, shard_size: int) -> int:
    return -(-num_images // shard_size)


def shard_range(shard: int, num_images: int, shard_size: int) -> range:
    """The dataset indices shard ``shard`` covers."""
    return range(shard * shard_size, min((shard + 1) * shard_size, num_images))


def shard_path(out: Path, shard: int) -> Path:
    return out / SHARD_FOLDER / f"shard-{shard:06d}.pt"


def encode_maps(maps: Tensor, dtype: str) -> Tensor:
    """Maps in [0, 1] stored as ``dtype``: uint8 keeps 255 levels (error at most 1/510)."""
    if dtype == "uint8":
        return (maps.float() * UINT8_LEVELS).round().clamp(0, UINT8_LEVELS).to(torch.uint8)
    return maps.to(MAP_DTYPES[dtype])


def decode_maps(stored: Tensor) -> Tensor:
    """Stored maps as float32 in [0, 1]."""
    if stored.dtype == torch.uint8:
        return stored.float() / UINT8_LEVELS
    return stored.float()


def write_shard(path: Path, payload: dict[str, Any]) -> Path:
    return write_atomic(path, lambda file: torch.save(payload, file))


def read_shard(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """A shard file's dict (tensors, lists, strings; loaded with ``weights_only=True``).

    No formula: shard j holds dataset indices ``[j S, (j + 1) S)`` (see :func:`camfunc.runs.run`).

    Example:
        >>> result = camfunc.runs.run("scenes:8", "out", methods=["gradcam"], progress=False)
        >>> shard = camfunc.runs.read_shard("out/shards/shard-000000.pt")
        >>> shard["maps"]["gradcam"].shape                # (n, K, h, w), as stored
        torch.Size([8, 1, 16, 16])
    """
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def shard_fingerprint(path: Path) -> str | None:
    """The fingerprint a shard file was written with, or None if it cannot be read."""
    try:
        payload = read_shard(path, mmap=True)
    except Exception:  # a damaged file is simply redone
        return None
    return payload.get("fingerprint") if isinstance(payload, dict) else None


def finished_shards(out: Path, count: int, fingerprint: str) -> tuple[list[int], str | None]:
    """``(finished shard numbers, error)``: error when a shard was made with other settings."""
    finished = []
    for shard in range(count):
        path = shard_path(out, shard)
        if not path.is_file():
            continue
        found = shard_fingerprint(path)
        if found is None:
            continue
        if found != fingerprint:
            return [], (f"{path} was written with other settings (fingerprint {found[:12]}, "
                        f"this run {fingerprint[:12]}); use another --out folder, or delete "
                        f"{out} to start over")
        finished.append(shard)
    return finished, None


def remove_partial_files(out: Path) -> None:
    """Temporary files a killed run left behind (never taken for shards)."""
    for tmp in (out / SHARD_FOLDER).glob(".shard-*.tmp"):
        tmp.unlink(missing_ok=True)


def shards_in_order(out: Path, count: int) -> Iterator[dict[str, Any]]:
    for shard in range(count):
        yield read_shard(shard_path(out, shard), mmap=True)


def metric_rows(shard: dict[str, Any], names: list[str],
                class_names: list[str] | None) -> Iterator[dict[str, Any]]:
    """One row per image, method and explained class (rank 0 = first class)."""
    classes, scores, probabilities = shard["classes"], shard["scores"], shard["probabilities"]
    for row, index in enumerate(shard["indices"].tolist()):
        for method, table in shard["metrics"].items():
            for rank in range(classes.shape[1]):
                c = int(classes[row, rank])
                line = {"index": index, "name": names[index], "label": int(shard["labels"][row]),
                        "method": method, "rank": rank, "class": c,
                        "class_name": class_names[c] if class_names and c < len(class_names) else c,
                        "score": float(scores[row, rank]),
                        "probability": float(probabilities[row, rank])}
                for column, values in table.items():
                    line[column] = float(values[row, rank])
                yield line


def _cell(value: Any) -> Any:
    return f"{value:.9g}" if isinstance(value, float) else value


def write_csv(path: Path, columns: list[str], rows: Iterator[dict[str, Any]]) -> Path:
    """Stream rows into a CSV file, atomically."""
    def write(file) -> None:
        text = io.TextIOWrapper(file, encoding="utf-8", newline="")
        writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})
        text.flush()
        text.detach()

    return write_atomic(path, write)


def index_rows(out: Path, count: int, names: list[str], labels: list[int]) -> Iterator[dict]:
    """Where each dataset index ended: its shard and row, or failed with the reason."""
    for shard_number, shard in enumerate(shards_in_order(out, count)):
        rows = {index: row for row, index in enumerate(shard["indices"].tolist())}
        reasons = {f["index"]: f["reason"] for f in shard["failed"]}
        for index in range(shard["start"], shard["stop"]):
            yield {"index": index, "name": names[index], "label": labels[index],
                   "status": "ok" if index in rows else "failed", "shard": shard_number,
                   "file": shard_path(Path("."), shard_number).as_posix(),
                   "row": rows.get(index, ""), "reason": reasons.get(index, "")}


def read_maps(out: str | Path, method: str) -> tuple[Tensor, Tensor]:
    """All of a finished run's maps for ``method``: ``(indices (N,), maps (N, K, h, w) float32)``,
    in dataset order (failed images are absent). Refuses a run that has not finished
    (its ``manifest.json`` not ``"complete"``) and shards of other settings. No formula: it
    reads what :func:`camfunc.runs.run` wrote.

    Example:
        >>> result = camfunc.runs.run("scenes:8", "out", methods=["gradcam"], progress=False)
        >>> indices, maps = camfunc.runs.read_maps("out", "gradcam")
        >>> maps.shape
        torch.Size([8, 1, 16, 16])
    """
    out = Path(out)
    manifest_path = out / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"no manifest.json in {out}; is it a camfunc run folder?")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("status") != "complete":
        raise ValueError(f"the run in {out} has not finished (status {manifest.get('status')!r}); "
                         "run the same command again to complete it")
    files = sorted((out / SHARD_FOLDER).glob("shard-*.pt"))
    if len(files) != manifest.get("num_shards"):
        raise ValueError(f"{out} holds {len(files)} shard files but its run wrote "
                         f"{manifest.get('num_shards')}; run the same command again to redo them")
    indices, maps = [], []
    for path in files:
        shard = read_shard(path)
        if shard.get("fingerprint") != manifest.get("fingerprint"):
            raise ValueError(f"{path} was written with other settings than {manifest_path}")
        if method not in shard["maps"]:
            raise ValueError(f"{path} has no maps for {method!r}; it has {list(shard['maps'])}")
        indices.append(shard["indices"])
        maps.append(decode_maps(shard["maps"][method]))
    return torch.cat(indices), torch.cat(maps)
