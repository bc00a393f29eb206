"""``camfunc report``: a static, self-contained HTML report of a run, evaluate or explain folder.

One ``index.html`` with inline CSS and JS (no server, no network), the rows in one JSON
blob, and Pillow thumbnails beside it; only the current page of rows is rendered.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from camfunc.cli._common import Subparsers
from camfunc.cli._explain import positive_int
from camfunc.io import progress, read_shown, write_text_atomic
from camfunc.models import Geometry, UsageError, on_original

if TYPE_CHECKING:  # torch loads only when thumbnails are drawn
    from torch import Tensor

THUMB = 128
#: Metrics where a high value is bad: these sort worst-first descending, the rest ascending.
HIGH_IS_BAD = ("drop", "deletion")


def detect(folder: Path) -> str:
    """Which command wrote ``folder``: "run", "evaluate" or "explain"."""
    if (folder / "manifest.json").is_file() and (folder / "metrics.csv").is_file():
        return "run"
    if (folder / "metrics.json").is_file():
        return "evaluate"
    if (folder / "summary.json").is_file():
        return "explain"
    raise UsageError(f"{folder} is not a camfunc run, evaluate or explain folder (expected "
                     "manifest.json, metrics.json or summary.json); give the --out of one of those")


def _number(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


def _bar(rows: list[dict[str, Any]], description: str, shown: bool) -> Iterable[dict[str, Any]]:
    return progress(rows, len(rows), description, unit="map") if shown else rows


def _thumb(image: Tensor, cam: Tensor, path: Path) -> str:
    from camfunc.viz import overlay

    picture = overlay(image, cam)
    picture.thumbnail((THUMB, THUMB))
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path.name


def run_rows(folder: Path, thumbs: Path, show_progress: bool) -> tuple[list[dict], dict]:
    """metrics.csv's rows, each with an overlay thumbnail made from the shards' maps."""
    import torch

    from camfunc.runs import open_data, read_maps

    manifest = json.loads((folder / "manifest.json").read_text())
    with open(folder / "metrics.csv", newline="") as handle:
        rows = [{k: _number(v) if k not in ("name", "method", "class_name") else v
                 for k, v in row.items()} for row in csv.DictReader(handle)]
    settings = manifest.get("settings", {})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    maps = {m: read_maps(folder, m, verify=False) for m in methods}
    height, width = settings.get("model", {}).get("size") or (64, 64)
    data = open_data(manifest["run"]["data"], (int(height), int(width)))
    geometry = run_geometry(manifest)
    exif = bool(settings.get("data", {}).get("exif", True))
    position = {m: {int(i): p for p, i in enumerate(maps[m][0].tolist())} for m in methods}
    rank = {m: 0 for m in methods}
    for row in _bar(rows, "thumbnails", show_progress):
        index, method = int(row["index"]), row["method"]
        cam = maps[method][1][position[method][index], int(row.get("rank", 0) or 0)]
        if geometry is not None and hasattr(data, "files"):
            # The model's own resize and crop: the map back on the original image.
            image = read_shown(data.files[index], exif=exif)
            height, width = image.shape[1:]
            cam = on_original(cam.float(), height, width, geometry.box(height, width))
        else:
            image = data[index].image
            image = image.float() / 255 if image.dtype == torch.uint8 else image
        row["thumb"] = "thumbs/" + _thumb(image, cam, thumbs / f"{index}-{method}-{rank[method]}.png")
        rank[method] += 1
    return rows, {"kind": "run", "settings": settings, "run": manifest.get("run", {}),
                  "versions": manifest.get("versions", {}), "failed": manifest.get("failed", [])}


def run_geometry(manifest: dict) -> Geometry | None:
    """The resize and crop a run fed its images through (the model's own transform), from its
    manifest; None where it resized them whole."""
    preprocessing = manifest.get("preprocessing") or {}
    if "center_crop" not in preprocessing:
        return None
    return Geometry.from_record(preprocessing)


def evaluate_rows(folder: Path) -> tuple[list[dict], dict]:
    """metrics.json's per-image rows (evaluate keeps no maps, so no thumbnails)."""
    data = json.loads((folder / "metrics.json").read_text())
    rows = [{**r, "name": r["image"]} for r in data["images"]]
    return rows, {"kind": "evaluate", "model": data.get("model"), "methods": data.get("methods"),
                  "metrics": data.get("metrics"), "summary": data.get("summary"),
                  "curves": mean_curves(data.get("curves", []))}


def mean_curves(curves: list[dict]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per metric and method, the mean class score at each fraction moved (each image's curve
    put on the first one's fractions by linear interpolation, should their steps differ)."""
    import numpy

    grouped: dict[tuple[str, str], list[dict]] = {}
    for curve in curves:
        grouped.setdefault((curve["metric"], curve["method"]), []).append(curve)
    means: dict[str, dict[str, dict[str, Any]]] = {}
    for (metric, method), members in grouped.items():
        fractions = numpy.asarray(members[0]["fractions"], dtype=float)
        scores = numpy.mean([numpy.interp(fractions, c["fractions"], c["scores"]) for c in members], 0)
        means.setdefault(metric, {})[method] = {"fractions": fractions.tolist(),
                                                "scores": scores.tolist(), "images": len(members)}
    return means


COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def curve_svg(metric: str, methods: dict[str, dict[str, Any]]) -> str:
    """An inline SVG of each method's mean curve for ``metric``: fraction moved (x, 0 to 1)
    against the mean class score (y, over the curves' own range), with a legend."""
    width, height, left, top, right, bottom = 360, 220, 48, 24, 110, 36
    low = min(min(m["scores"]) for m in methods.values())
    high = max(max(m["scores"]) for m in methods.values())
    span = high - low or 1.0
    plot_w, plot_h = width - left - right, height - top - bottom

    def point(f: float, v: float) -> str:
        return f"{left + f * plot_w:.1f},{top + (1 - (v - low) / span) * plot_h:.1f}"

    parts = [f'<svg class="curve" data-metric="{html.escape(metric)}" xmlns="http://www.w3.org/2000/svg" '
             f'width="{width}" height="{height}" role="img"><title>{html.escape(metric)}: mean class '
             'score against fraction of pixels moved</title>',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>',
             f'<text x="{left}" y="16" font-size="13">{html.escape(metric)}</text>',
             f'<text x="{left}" y="{height - 8}" font-size="11">0</text>',
             f'<text x="{left + plot_w - 6}" y="{height - 8}" font-size="11">1</text>',
             f'<text x="{left + plot_w / 2 - 40}" y="{height - 8}" font-size="11">fraction moved</text>',
             f'<text x="2" y="{top + 10}" font-size="11">{high:.3g}</text>',
             f'<text x="2" y="{top + plot_h}" font-size="11">{low:.3g}</text>']
    for number, (method, curve) in enumerate(methods.items()):
        colour = COLOURS[number % len(COLOURS)]
        points = " ".join(point(f, v) for f, v in zip(curve["fractions"], curve["scores"], strict=True))
        parts.append(f'<polyline data-method="{html.escape(method)}" fill="none" stroke="{colour}" '
                     f'stroke-width="2" points="{points}"/>')
        y = top + 14 + 16 * number
        parts.append(f'<line x1="{width - right + 8}" y1="{y - 4}" x2="{width - right + 24}" '
                     f'y2="{y - 4}" stroke="{colour}" stroke-width="2"/><text x="{width - right + 28}" '
                     f'y="{y}" font-size="11">{html.escape(method)}</text>')
    return "".join(parts) + "</svg>"


def explain_rows(folder: Path, thumbs: Path, show_progress: bool) -> tuple[list[dict], dict]:
    """summary.json's overlays, one row per image, class and method, thumbnailed."""
    from PIL import Image

    data = json.loads((folder / "summary.json").read_text())
    rows = []
    for record in data["images"]:
        for entry in record["classes"]:
            for method, file in entry["overlays"].items():
                rows.append({"name": record["path"], "method": method, "class": entry["class"],
                             "class_name": entry["name"], "probability": entry["probability"],
                             "score": entry["score"], "file": file})
    for number, row in enumerate(_bar(rows, "thumbnails", show_progress)):
        source = Path(row.pop("file"))
        source = source if source.is_file() else folder / source.name
        with Image.open(source) as picture:
            picture.thumbnail((THUMB, THUMB))
            thumbs.mkdir(parents=True, exist_ok=True)
            picture.convert("RGB").save(thumbs / f"{number}.png")
        row["thumb"] = f"thumbs/{number}.png"
    return rows, {"kind": "explain", "model": data.get("model"), "layer": data.get("layer"),
                  "methods": data.get("methods"), "failed": data.get("failed", [])}


def metric_keys(rows: list[dict]) -> list[str]:
    """The numeric columns a reader sorts by (not indices or ranks)."""
    skip = {"index", "label", "rank", "class", "thumb"}
    return [k for k in (rows[0] if rows else {}) if k not in skip
            and all(isinstance(r.get(k), (int, float)) for r in rows[:50])]


def worst_first(rows: list[dict], metrics: list[str]) -> list[dict]:
    """Pointing misses first, then the highest drop / deletion AUC and lowest insertion AUC."""
    pointing = [m for m in metrics if m.startswith("pointing_game")]
    bad = [(m, 1 if any(b in m for b in HIGH_IS_BAD) else -1) for m in metrics if "insertion" in m
           or any(b in m for b in HIGH_IS_BAD)]

    def key(row: dict) -> tuple:
        return (*(row[m] for m in pointing[:1]), *(-sign * row[m] for m, sign in bad))
    return sorted(rows, key=key)


def page(rows: list[dict], meta: dict, page_size: int) -> str:
    """The whole HTML page: rows and settings inlined as one JSON blob."""
    curves = meta.pop("curves", None) or {}
    blob = json.dumps({"rows": rows, "meta": meta, "metrics": metric_keys(rows),
                       "pageSize": page_size}).replace("</", "<\\/")
    title = html.escape(f"camfunc report: {meta['kind']}")
    plots = "".join(curve_svg(metric, methods) for metric, methods in sorted(curves.items()))
    section = f'<h2>Deletion and insertion curves</h2><div id="curves">{plots}</div>' if plots else ""
    return TEMPLATE.replace("__TITLE__", title).replace("__CURVES__", section).replace("__DATA__", blob)


def report(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder; give the output folder of run, evaluate or explain")
    kind = detect(folder)
    out = Path(args.out) if args.out else folder / "report"
    thumbs = out / "thumbs"
    shutil.rmtree(thumbs, ignore_errors=True)
    if kind == "run":
        rows, meta = run_rows(folder, thumbs, not args.quiet)
    elif kind == "evaluate":
        rows, meta = evaluate_rows(folder)
    else:
        rows, meta = explain_rows(folder, thumbs, not args.quiet)
    rows = worst_first(rows, metric_keys(rows))
    write_text_atomic(out / "index.html", page(rows, meta, args.page_size))
    print(f"report of the {kind} folder, {len(rows)} row(s): wrote {out / 'index.html'}")
    return 0


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser("report", help="a static HTML report of a run, evaluate or explain folder",
                                   description="Write FOLDER/report/index.html: a gallery of overlays, "
                                               "sortable and filterable, worst first, with settings.")
    parser.add_argument("folder", help="the --out folder of camfunc run, evaluate or explain")
    parser.add_argument("--out", help="report folder (default FOLDER/report)")
    parser.add_argument("--page-size", type=positive_int, default=100, help="rows per page (default 100)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=report)


TEMPLATE = """<!doctype html>
<html><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font:14px sans-serif;margin:1em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
#grid{display:flex;flex-wrap:wrap;gap:6px}.card{width:140px;font-size:11px}
.card img{width:128px;height:128px;object-fit:contain;image-rendering:auto;display:block}
.miss{outline:3px solid #d00}
</style></head><body>
<h1>__TITLE__</h1>
<details><summary>Settings</summary><pre id="settings"></pre></details>
__CURVES__
<h2>Per class</h2><table id="classes"></table>
<h2>Gallery</h2>
<label>Sort <select id="sort"></select></label>
<label><input type="checkbox" id="desc"> descending</label>
<label>Method <select id="method"></select></label>
<label>Class <select id="cls"></select></label>
<label>Where <select id="fmetric"></select></label><select id="fop"><option>&ge;</option><option>&le;</option></select>
<input id="fvalue" type="number" step="any" size="6" placeholder="value">
<button id="prev">&lt;</button><span id="pageinfo"></span><button id="next">&gt;</button>
<div id="grid"></div>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const $ = (id) => document.getElementById(id);
const state = {page: 0};
function options(select, values, all) {
  select.innerHTML = "";
  for (const v of (all ? ["(all)"] : []).concat(values)) {
    const o = document.createElement("option"); o.value = o.textContent = v; select.appendChild(o);
  }
}
function distinct(key) { return [...new Set(D.rows.map((r) => String(r[key])))].sort(); }
function classOf(r) { return String(r.class_name !== undefined ? r.class_name : r["class"]); }
function view() {
  const m = $("method").value, c = $("cls").value, key = $("sort").value, sign = $("desc").checked ? -1 : 1;
  const fm = $("fmetric").value, fv = $("fvalue").value === "" ? NaN : Number($("fvalue").value), above = $("fop").selectedIndex === 0;
  const kept = (r) => fm === "(none)" || Number.isNaN(fv) || (above ? r[fm] >= fv : r[fm] <= fv);
  let rows = D.rows.filter((r) => (m === "(all)" || r.method === m) && (c === "(all)" || classOf(r) === c) && kept(r));
  if (key !== "(worst first)") rows = rows.slice().sort((a, b) => sign * (a[key] - b[key]));
  return rows;
}
function render() {
  const rows = view(), pages = Math.max(1, Math.ceil(rows.length / D.pageSize));
  state.page = Math.min(state.page, pages - 1);
  $("pageinfo").textContent = ` page ${state.page + 1} of ${pages} (${rows.length} rows) `;
  const grid = $("grid"), frag = document.createDocumentFragment();
  for (const r of rows.slice(state.page * D.pageSize, (state.page + 1) * D.pageSize)) {
    const card = document.createElement("div"); card.className = "card";
    if (Object.keys(r).some((k) => k.startsWith("pointing_game") && r[k] === 0)) card.classList.add("miss");
    if (r.thumb) { const img = document.createElement("img"); img.src = r.thumb; img.alt = r.name; card.appendChild(img); }
    const text = document.createElement("div");
    text.textContent = `${r.name} ${r.method} ${classOf(r)} ` + D.metrics.map((k) => `${k}=${Number(r[k]).toFixed(3)}`).join(" ");
    card.appendChild(text); card.dataset.name = r.name; frag.appendChild(card);
  }
  grid.replaceChildren(frag);
}
function classTable() {
  const groups = {};
  for (const r of D.rows) (groups[classOf(r) + " / " + r.method] ||= []).push(r);
  const head = "<tr><th>class / method</th><th>rows</th>" + D.metrics.map((k) => `<th>${k}</th>`).join("") + "</tr>";
  const body = Object.entries(groups).sort().map(([g, rs]) => `<tr><td>${g}</td><td>${rs.length}</td>` +
    D.metrics.map((k) => `<td>${(rs.reduce((s, r) => s + Number(r[k]), 0) / rs.length).toFixed(3)}</td>`).join("") + "</tr>").join("");
  $("classes").innerHTML = head + body;
}
$("settings").textContent = JSON.stringify(D.meta, null, 1);
options($("sort"), D.metrics, false); $("sort").insertAdjacentHTML("afterbegin", "<option selected>(worst first)</option>");
options($("method"), distinct("method"), true);
options($("cls"), [...new Set(D.rows.map(classOf))].sort(), true);
options($("fmetric"), ["(none)"].concat(D.metrics), false);
for (const id of ["sort", "desc", "method", "cls", "fmetric", "fop"]) $(id).addEventListener("change", () => { state.page = 0; render(); });
$("fvalue").addEventListener("input", () => { state.page = 0; render(); });
$("prev").onclick = () => { state.page = Math.max(0, state.page - 1); render(); };
$("next").onclick = () => { state.page += 1; render(); };
classTable(); render();
</script></body></html>
"""
