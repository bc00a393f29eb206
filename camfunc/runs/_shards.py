"""Shard files: fixed index ranges, compact maps, atomic writes, and the merged tables.

Shard ``j`` always holds dataset indices ``[j * shard_size, (j + 1) * shard_size)``
(the last one fewer), whatever the number of ranks or the batch size, so a
finished shard is finished for any later run with the same settings. A shard
file is a ``torch.save`` dict written to a temporary file and renamed: a file
under its final name is complete. It carries a digest of its content (every
tensor's bytes, dtype and shape, and every other value), so damage that still
loads (a flipped byte in tensor data) is caught when it is read or resumed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

import torch
from torch import Tensor

from camfunc.io import write_atomic

SHARD_FOLDER = "shards"
FORMAT = "camfunc-run/2"
DIGEST = "digest"
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


class DamagedShardError(ValueError):
    """A shard file that cannot be read, or whose content does not match its digest."""


def _feed(digest: Any, value: Any) -> None:
    """Hash ``value`` in a canonical order: dict keys sorted, tensors by dtype, shape and bytes."""
    if isinstance(value, dict):
        digest.update(b"{")
        for key in sorted(value, key=str):
            digest.update(json.dumps(str(key)).encode())
            _feed(digest, value[key])
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            _feed(digest, item)
        digest.update(b"]")
    elif isinstance(value, Tensor):
        data = value.detach().cpu().contiguous()
        digest.update(f"<{data.dtype}{tuple(data.shape)}>".encode())
        # Bytes as stored; the uint8 view works for every dtype (bfloat16 has no numpy twin).
        digest.update(data.reshape(-1).view(torch.uint8).numpy().data if data.numel() else b"")
    else:
        digest.update(json.dumps(value, sort_keys=True, default=str).encode())


def content_digest(payload: dict[str, Any]) -> str:
    """BLAKE2b-128 of a shard's content, its own digest left out (about 1 GB/s on one core)."""
    digest = hashlib.blake2b(digest_size=16)
    _feed(digest, {k: v for k, v in payload.items() if k != DIGEST})
    return digest.hexdigest()


def write_shard(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` with its digest, atomically."""
    signed = {**payload, DIGEST: content_digest(payload)}
    return write_atomic(path, lambda file: torch.save(signed, file))


def _loaded(path: Path, mmap: bool) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises many kinds for a damaged file
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DamagedShardError(f"{path} cannot be read ({reason})") from None
    if not isinstance(payload, dict):
        raise DamagedShardError(f"{path} holds a {type(payload).__name__}, not a shard's dict")
    return payload


def verified(path: Path, payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` if its content matches the digest it was written with, else DamagedShardError."""
    written = payload.get(DIGEST)
    if written is None:
        raise DamagedShardError(f"{path} has no digest (written by camfunc before "
                                f"{FORMAT}); delete it and run again to recompute it")
    found = content_digest(payload)
    if found != written:
        raise DamagedShardError(f"{path} is damaged: its content hashes to {found[:12]}, but it "
                                f"was written as {written[:12]}; run the same command again to "
                                "recompute it")
    return payload


def read_shard(path: str | Path, *, mmap: bool = False, verify: bool = True) -> dict[str, Any]:
    """A shard file's dict (tensors, lists, strings; loaded with ``weights_only=True``).

    With ``verify`` (the default) its content is hashed again and compared with
    the digest it was written with (BLAKE2b-128 over every tensor's bytes and
    every other value); a damaged or unreadable file raises ``ValueError``
    naming it. ``verify=False`` skips the hashing, for speed.

    No formula: shard j holds dataset indices ``[j S, (j + 1) S)`` (see :func:`camfunc.runs.run`).

    Example:
        >>> result = camfunc.runs.run("scenes:8", "out", methods=["gradcam"], progress=False)
        >>> shard = camfunc.runs.read_shard("out/shards/shard-000000.pt")
        >>> shard["maps"]["gradcam"].shape                # (n, K, h, w), as stored
        torch.Size([8, 1, 16, 16])
    """
    path = Path(path)
    payload = _loaded(path, mmap)
    return verified(path, payload) if verify else payload


class Survey(NamedTuple):
    """What a resume finds in the shard folder."""

    finished: list[int]                   # shards to keep
    damaged: list[tuple[int, str]]        # (shard, why) to recompute
    error: str | None                     # a shard of other settings: refuse the folder


def survey_shards(out: Path, count: int, fingerprint: str) -> Survey:
    """Every shard file checked: readable, its digest, its settings' fingerprint."""
    finished, damaged = [], []
    for shard in range(count):
        path = shard_path(out, shard)
        if not path.is_file():
            continue
        try:
            payload = read_shard(path, mmap=True)
        except DamagedShardError as error:
            damaged.append((shard, str(error)))
            continue
        found = str(payload.get("fingerprint"))
        if found != fingerprint:
            return Survey([], [], f"{path} was written with other settings (fingerprint "
                                  f"{found[:12]}, this run {fingerprint[:12]}); use another "
                                  f"--out folder, or delete {out} to start over")
        finished.append(shard)
    return Survey(finished, damaged, None)


def remove_partial_files(out: Path) -> list[Path]:
    """Temporary files a killed run left behind (never taken for results): the shards',
    and those of the tables and the manifest. Returns what it removed."""
    found = [*(out / SHARD_FOLDER).glob(".shard-*.tmp"), *out.glob(".*.tmp")]
    for tmp in found:
        tmp.unlink(missing_ok=True)
    return found


def shards_in_order(out: Path, count: int) -> Iterator[dict[str, Any]]:
    """Every shard, unhashed: the resume verified the kept ones and this run wrote the rest."""
    for shard in range(count):
        yield read_shard(shard_path(out, shard), mmap=True, verify=False)


def metric_rows(shard: dict[str, Any], names: list[str],
                class_names: Sequence[str] | None) -> Iterator[dict[str, Any]]:
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
    def write(file: IO[bytes]) -> None:
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


def read_maps(out: str | Path, method: str, *, verify: bool = True) -> tuple[Tensor, Tensor]:
    """All of a finished run's maps for ``method``: ``(indices (N,), maps (N, K, h, w) float32)``,
    in dataset order (failed images are absent). Refuses a run that has not finished
    (its ``manifest.json`` not ``"complete"``) and shards of other settings. With
    ``verify`` (the default) every shard's content must match its digest and the
    digest the manifest recorded for it, else ``ValueError`` naming the shard;
    ``verify=False`` skips the hashing. No formula: it reads what
    :func:`camfunc.runs.run` wrote.

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
    recorded = {entry.get("file"): entry.get(DIGEST) for entry in manifest.get("shards", [])}
    indices, maps = [], []
    for path in files:
        shard = read_shard(path, verify=verify)
        if shard.get("fingerprint") != manifest.get("fingerprint"):
            raise ValueError(f"{path} was written with other settings than {manifest_path}")
        written = recorded.get(path.relative_to(out).as_posix())
        if verify and written != shard.get(DIGEST):
            raise ValueError(f"{path} is not the shard {manifest_path} recorded (digest "
                             f"{str(shard.get(DIGEST))[:12]}, recorded {str(written)[:12]}); run "
                             "the same command again to recompute it")
        if method not in shard["maps"]:
            raise ValueError(f"{path} has no maps for {method!r}; it has {list(shard['maps'])}")
        indices.append(shard["indices"])
        maps.append(decode_maps(shard["maps"][method]))
    return torch.cat(indices), torch.cat(maps)
