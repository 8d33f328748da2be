"""`onnxplain audit DATASET --model M --methods a,b --metrics ... --out DIR`: explain and score a whole dataset.

DATASET is a folder of images (sorted by name) or a CSV file with rows `path,label[,box]` (path relative to the
CSV's folder; label a class id or a label name, empty for the top-1 class; box "x0 y0 x1 y1" in the original
image's pixels, for the pointing games; a first row starting with `path` is a header). Each image is one
Evaluate call (the server computes the maps and scores them in the same call) and, once answered, writes

    maps/<item>.<method>.<class>.npy   the raw map over the model input (float32)
    maps/<item>.<method>.<class>.png   the map drawn over the original image (client/overlay.py)
    items/<item>.json                  every score and curve of the image: the item's done marker

each file atomically (a temporary file, then os.replace). Items are the journal: `--resume` skips every item
whose json exists, so a run killed at any moment loses nothing written and recomputes nothing. At the end the
tables are rebuilt from the items: metrics.csv (one row per image x method x target), summary.csv and
summary.json (methods x metrics: mean and 95% percentile-bootstrap interval; AD/AG/AI and the pointing games in
%, insertion/deletion as areas in [0, 1], as in the Opti-CAM paper's tables) and report.html (self-contained).

`--server` may be repeated (or be one `dns:///name:port` target): the calls go over one channel balanced
round-robin over the replicas, `--workers` at a time; every item is one independent call, so the results do
not depend on which replica answered it. An item whose replica dies (UNAVAILABLE) is sent again and lands on
another replica; its json's "timings" record the attempts it took.
"""

from __future__ import annotations

import base64
import concurrent.futures
import csv
import html
import io
import json
import os
import pathlib
import re
import sys
import time
from dataclasses import dataclass

import grpc
import numpy as np
from PIL import Image
from tqdm import tqdm

from . import client as client_module
from .client import METRICS, Client, Evaluation
from .overlay import displayed, overlay

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
METRIC_ALIASES = {"ad": "average_drop", "ag": "average_gain", "ai": "average_increase", "ins": "insertion",
                  "del": "deletion", "pg": "pointing_game", "pointing": "pointing_game",
                  "epg": "energy_pointing_game", "energy": "energy_pointing_game"}
POINTING = ("pointing_game", "energy_pointing_game")
PERCENT = {"average_drop", "average_gain", "average_increase", "pointing_game", "energy_pointing_game"}
HIGHER_IS_BETTER = {"average_drop": False, "average_gain": True, "average_increase": True, "insertion": True,
                    "deletion": False, "pointing_game": True, "energy_pointing_game": True}
SHORT = {"average_drop": "AD", "average_gain": "AG", "average_increase": "AI", "insertion": "Ins",
         "deletion": "Del", "pointing_game": "PG", "energy_pointing_game": "EPG"}
# A replica that died or went away answers UNAVAILABLE (its calls in flight too); a full one RESOURCE_EXHAUSTED.
RETRYABLE = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}
BOOTSTRAP = 10_000


class AuditError(ValueError):
    """A dataset, option or output folder that cannot be audited (a usage error)."""


@dataclass(frozen=True)
class Item:
    key: str                     # unique, file-name safe: <index>-<stem>
    path: pathlib.Path
    label: str                   # as written in the CSV ("" for none)
    box: tuple[float, float, float, float] | None   # original-image pixels


# ---------------------------------------------------------------------------------------------- dataset

def load_dataset(dataset: str | os.PathLike) -> list[Item]:
    root = pathlib.Path(dataset)
    if root.is_dir():
        files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        rows = [(p, "", None) for p in files]
    elif root.is_file() and root.suffix.lower() == ".csv":
        rows = []
        with open(root, newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.reader(f), 1):
                if not row or not row[0].strip() or (n == 1 and row[0].strip().lower() == "path"):
                    continue
                label = row[1].strip() if len(row) > 1 else ""
                box = None
                if len(row) > 2 and row[2].strip():
                    try:
                        box = tuple(float(v) for v in row[2].split())
                    except ValueError:
                        box = ()
                    if len(box) != 4 or not (box[0] < box[2] and box[1] < box[3]):
                        raise AuditError(f"{root}:{n}: box must be 'x0 y0 x1 y1' with x0 < x1 and y0 < y1, "
                                         f"got {row[2]!r}")
                rows.append((root.parent / row[0].strip(), label, box))
    else:
        raise AuditError(f"DATASET must be a folder of images or a .csv file, got {str(dataset)!r}")
    if not rows:
        raise AuditError(f"DATASET {str(dataset)!r} holds no images")
    items = []
    for i, (path, label, box) in enumerate(rows):
        if not path.is_file():
            raise AuditError(f"image {str(path)!r} (item {i}) does not exist")
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem)
        items.append(Item(f"{i:05d}-{stem}", path, label, box))
    return items


def resolve_target(label: str, labels: list[str], num_classes: int) -> int | None:
    """A class id from a CSV label (an id or a label name); None for the top-1 class."""
    if not label:
        return None
    if re.fullmatch(r"-?\d+", label):
        c = int(label)
        if not 0 <= c < num_classes:
            raise AuditError(f"label {label} is not a class id of the model: ids are 0..{num_classes - 1}")
        return c
    if label in labels:
        return labels.index(label)
    folded = [name.lower() for name in labels]
    if label.lower() in folded:
        return folded.index(label.lower())
    raise AuditError(f"label {label!r} is not a label of the model" + ("" if labels else " (it has no labels)"))


def parse_metrics(text: str) -> list[str]:
    if text in ("", "all"):
        return list(METRICS)
    names = []
    for part in text.split(","):
        name = part.strip().lower()
        name = METRIC_ALIASES.get(name, name)
        if name not in METRICS:
            raise AuditError(f"--metrics: unknown metric {part!r}; metrics: {list(METRICS)} (or "
                             f"{sorted(METRIC_ALIASES)})")
        names.append(name)
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------- channel

def channel_target(servers: list[str]) -> str:
    """One gRPC target for the replicas (client.channel_target), or an AuditError naming --server."""
    try:
        return client_module.channel_target(servers)
    except ValueError as exc:
        raise AuditError(f"--server: {exc}") from None


# ---------------------------------------------------------------------------------------------- writing

def write_atomic(path: pathlib.Path, data: bytes) -> None:
    """Write to a temporary file next to `path`, flush it to disk, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_item(out: pathlib.Path, item: Item, evaluation: Evaluation, target_source: str, attempts: int = 1) -> dict:
    """Write the item's maps, overlays and (last) its json marker; returns the json's content."""
    image_info = evaluation.images[0]
    maps = {}
    with Image.open(item.path) as original:
        original.load()
        for m in evaluation.maps:
            base = f"{item.key}.{m.method}.{m.class_id}"
            write_atomic(out / "maps" / f"{base}.npy", npy_bytes(m.map.astype(np.float32)))
            write_atomic(out / "maps" / f"{base}.png", png_bytes(overlay(original, m.map, image_info.geometry.crop)))
            maps[f"{m.method}.{m.class_id}"] = base
    scores: dict[str, dict] = {}
    for s in evaluation.scores:
        row = scores.setdefault(f"{s.method}.{s.class_id}", {
            "method": s.method, "class_id": s.class_id, "class_score": s.class_score, "masked_score": None,
            "values": {}, "curves": {}})
        row["values"][s.metric] = s.value
        if s.masked_score is not None:
            row["masked_score"] = s.masked_score
        if s.curve is not None:
            row["curves"][s.metric] = s.curve.tolist()
    g = image_info.geometry
    record = {
        "key": item.key, "path": str(item.path), "label": item.label, "box": item.box, "target": target_source,
        "geometry": {"original_width": g.original_width, "original_height": g.original_height, "crop": list(g.crop)},
        "targets": [{"class_id": t.class_id, "label": t.label, "probability": t.probability}
                    for t in image_info.targets],
        "maps": maps, "scores": list(scores.values()),
        "timings": {"total_ms": evaluation.done.total_ms, "model_ms": evaluation.done.model_ms,
                    "forward_samples": evaluation.done.forward_samples,
                    "backward_samples": evaluation.done.backward_samples,
                    "attempts": attempts},   # calls it took (retries after a replica died): not a result
    }
    write_atomic(out / "items" / f"{item.key}.json", json.dumps(record, indent=1).encode())
    return record


# ---------------------------------------------------------------------------------------------- running

@dataclass
class Settings:
    model: str
    methods: list[tuple[str, dict[str, str]]]
    metrics: list[str]
    steps: int
    blur_sigma: float
    layer: str

    def as_json(self, dataset: str) -> dict:
        return {"dataset": dataset, "model": self.model, "methods": [[m, p] for m, p in self.methods],
                "metrics": self.metrics, "steps": self.steps, "blur_sigma": self.blur_sigma, "layer": self.layer}


def evaluate_item(client: Client, settings: Settings, item: Item, target: int | None, timeout: float | None,
                  retries: int = 8) -> tuple[Evaluation, int]:
    """The item's Evaluate call and the number of attempts it took. A RETRYABLE failure sends the call again
    (after a short backoff): over several replicas the channel's round_robin picks the next ready one, and a dead
    replica has left the rotation once its connection broke, so its items move to the living replicas; with one
    server the retries wait, with backoff, for it to come back. Other errors (bad requests) are not retried."""
    metrics = [m for m in settings.metrics if item.box is not None or m not in POINTING]
    boxes = [(0, *item.box, True)] if item.box is not None else []
    for attempt in range(retries + 1):
        try:
            return client.evaluate(settings.model, [item.path], settings.methods, metrics=metrics,
                                   targets=[target] if target is not None else [], top_k=0 if target is not None else 1,
                                   layer=settings.layer, steps=settings.steps, blur_sigma=settings.blur_sigma,
                                   return_curves=True, boxes=boxes, return_maps=True, timeout=timeout), attempt + 1
        except grpc.RpcError as exc:
            if exc.code() not in RETRYABLE or attempt == retries:
                raise
            time.sleep(min(0.2 * 2 ** attempt, 5.0))
    raise AssertionError("unreachable")


def prepare_out(out: pathlib.Path, config: dict, resume: bool) -> None:
    (out / "maps").mkdir(parents=True, exist_ok=True)
    (out / "items").mkdir(parents=True, exist_ok=True)
    marker = out / "audit.json"
    if marker.exists():
        previous = json.loads(marker.read_text())
        if not resume:
            raise AuditError(f"{out} already holds an audit: pass --resume to continue it, or choose another --out")
        if previous != config:
            changed = sorted(k for k in set(config) | set(previous) if config.get(k) != previous.get(k))
            raise AuditError(f"{out} holds an audit with other settings ({', '.join(changed)}); it cannot be resumed "
                             "with these")
    else:
        write_atomic(marker, json.dumps(config, indent=1).encode())
    for stale in list(out.glob(".*.tmp-*")) + list((out / "maps").glob(".*.tmp-*")) + list((out / "items").glob(".*.tmp-*")):
        stale.unlink(missing_ok=True)   # temporary files of a killed run: never renamed, so never results


def run_audit(dataset: str, servers: list[str], settings: Settings, out: str | os.PathLike, *, resume: bool = False,
              workers: int = 0, timeout: float | None = None, quiet: bool = False,
              credentials: dict | None = None) -> dict:
    """Audit a dataset; returns {"items", "computed", "skipped", "seconds", "images_per_s"}. `credentials`:
    Client keyword arguments (token, tls, tls_ca, tls_cert, tls_key)."""
    out = pathlib.Path(out)
    items = load_dataset(dataset)
    config = settings.as_json(str(pathlib.Path(dataset).resolve()))
    prepare_out(out, config, resume)
    done = {p.stem for p in (out / "items").glob("*.json")}
    todo = [item for item in items if item.key not in done]
    started = time.perf_counter()
    channel_target(servers)   # a usage error before any work
    with Client(servers, timeout=timeout, **(credentials or {})) as client:
        info = client.model(settings.model)
        targets = {item.key: resolve_target(item.label, list(info.labels), info.num_classes) for item in items}
        bar = tqdm(total=len(items), initial=len(items) - len(todo), unit="img", disable=quiet, desc="audit",
                   dynamic_ncols=True)
        workers = workers or 2 * len(servers)
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(_one, client, settings, out, item, targets[item.key], timeout): item for item in todo}
            try:
                for future in concurrent.futures.as_completed(futures):
                    future.result()
                    bar.update(1)
                    bar.set_postfix_str(futures[future].key, refresh=False)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
            finally:
                bar.close()
    seconds = time.perf_counter() - started
    write_tables(out, items, settings)
    return {"items": len(items), "computed": len(todo), "skipped": len(items) - len(todo), "seconds": seconds,
            "images_per_s": len(todo) / seconds if todo and seconds > 0 else 0.0}


def _one(client, settings, out, item, target, timeout):
    evaluation, attempts = evaluate_item(client, settings, item, target, timeout)
    save_item(out, item, evaluation, "label" if target is not None else "top1", attempts)


# ---------------------------------------------------------------------------------------------- tables

def bootstrap_interval(values: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean (BOOTSTRAP resamples, fixed seed: reproducible)."""
    if len(values) < 2:
        return float(values.mean()), float(values.mean())
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (BOOTSTRAP, len(values)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def rows_of(records: list[dict], metrics: list[str]) -> list[dict]:
    rows = []
    for r in records:
        labels = {t["class_id"]: t["label"] for t in r["targets"]}
        for s in r["scores"]:
            row = {"image": r["key"], "path": r["path"], "method": s["method"], "class_id": s["class_id"],
                   "label": labels.get(s["class_id"], ""), "target": r["target"], "class_score": s["class_score"],
                   "masked_score": s["masked_score"]}
            row.update({m: s["values"].get(m) for m in metrics})
            rows.append(row)
    return rows


def summarise(rows: list[dict], methods: list[str], metrics: list[str]) -> dict:
    summary = {}
    for method in methods:
        summary[method] = {}
        for metric in metrics:
            values = np.array([r[metric] for r in rows if r["method"] == method and r[metric] is not None], float)
            if not len(values):
                continue
            scale = 100.0 if metric in PERCENT else 1.0
            lo, hi = bootstrap_interval(values)
            summary[method][metric] = {"mean": float(values.mean()) * scale, "ci_low": lo * scale,
                                       "ci_high": hi * scale, "n": int(len(values)),
                                       "unit": "%" if metric in PERCENT else "area",
                                       "higher_is_better": HIGHER_IS_BETTER[metric]}
    return summary


def _fmt(value) -> str:
    return "" if value is None else repr(float(value))


def write_tables(out: pathlib.Path, items: list[Item], settings: Settings) -> None:
    records = [json.loads((out / "items" / f"{item.key}.json").read_text()) for item in items]
    metrics, methods = settings.metrics, [m for m, _ in settings.methods]
    rows = rows_of(records, metrics)
    columns = ["image", "path", "method", "class_id", "label", "target", "class_score", "masked_score", *metrics]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_fmt(row[c]) if c in ("class_score", "masked_score", *metrics) else row[c] for c in columns])
    write_atomic(out / "metrics.csv", buffer.getvalue().encode())
    summary = summarise(rows, methods, metrics)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "metric", "unit", "n", "mean", "ci95_low", "ci95_high"])
    for method, by_metric in summary.items():
        for metric, s in by_metric.items():
            writer.writerow([method, metric, s["unit"], s["n"], _fmt(s["mean"]), _fmt(s["ci_low"]), _fmt(s["ci_high"])])
    write_atomic(out / "summary.csv", buffer.getvalue().encode())
    write_atomic(out / "summary.json", json.dumps({
        "model": settings.model, "methods": methods, "metrics": metrics, "images": len(items), "steps": settings.steps,
        "interval": f"95% percentile bootstrap of the mean, {BOOTSTRAP} resamples", "summary": summary},
        indent=1).encode())
    write_atomic(out / "report.html", report_html(out, records, summary, settings).encode())


def summary_markdown(summary: dict, metrics: list[str]) -> str:
    """The summary as a Markdown table (methods x metrics), for reports and READMEs."""
    head = "| method | " + " | ".join(f"{SHORT[m]} {'↑' if HIGHER_IS_BETTER[m] else '↓'}"
                                     f"{' (%)' if m in PERCENT else ''}" for m in metrics) + " |"
    lines = [head, "|" + " --- |" * (len(metrics) + 1)]
    for method, by_metric in summary.items():
        cells = []
        for m in metrics:
            s = by_metric.get(m)
            digits = 1 if m in PERCENT else 3
            cells.append("" if s is None else f"{s['mean']:.{digits}f} [{s['ci_low']:.{digits}f}, {s['ci_high']:.{digits}f}]")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- report

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22"]


def _data_uri(image: Image.Image, side: int = 200) -> str:
    image = displayed(image)       # as the server decoded it: EXIF orientation, 16-bit greyscale
    image.thumbnail((side, side), Image.Resampling.BILINEAR)
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def svg_plot(curves: dict[str, np.ndarray], title: str, width: int = 360, height: int = 220) -> str:
    """An inline SVG line plot of curves on [0, 1] x [0, 1], one colour per name, with a legend."""
    left, right, top, bottom = 40, 10, 22, 30
    w, h = width - left - right, height - top - bottom
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="{width / 2}" y="15" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#999"/>']
    for v in (0, 0.5, 1):
        y = top + h * (1 - v)
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="10">{v:g}</text>')
        x = left + w * v
        parts.append(f'<text x="{x:.1f}" y="{top + h + 13}" text-anchor="middle" font-size="10">{v:g}</text>')
    parts.append(f'<text x="{left + w / 2}" y="{height - 3}" text-anchor="middle" font-size="10">fraction of pixels'
                 '</text>')
    for i, (name, curve) in enumerate(curves.items()):
        curve = np.asarray(curve, float)
        xs = np.linspace(0, 1, len(curve))
        points = " ".join(f"{left + w * x:.1f},{top + h * (1 - min(max(y, 0), 1)):.1f}" for x, y in zip(xs, curve))
        colour = COLOURS[i % len(COLOURS)]
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.8" points="{points}"/>')
        parts.append(f'<text x="{left + w - 4}" y="{top + 14 + 12 * i}" text-anchor="end" font-size="10" '
                     f'fill="{colour}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


RENDER_CHECK = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var loaded = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  var report = {images: imgs.length, loaded: loaded.length,
                sizes: loaded.map(function (i) { return [i.naturalWidth, i.naturalHeight]; }),
                summary_rows: document.querySelectorAll('#summary tbody tr').length,
                grid_rows: document.querySelectorAll('#grid tbody tr').length,
                plots: document.querySelectorAll('svg.plot').length};
  document.getElementById('render-check').textContent = JSON.stringify(report);
});
"""

STYLE = """
body { font-family: sans-serif; margin: 20px; color: #222; }
table { border-collapse: collapse; margin-bottom: 24px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; font-size: 13px; vertical-align: top; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.cell { font-size: 11px; line-height: 1.3; }
.plots svg { margin-right: 16px; }
#render-check { color: #999; font-size: 10px; }
"""


def report_html(out: pathlib.Path, records: list[dict], summary: dict, settings: Settings) -> str:
    metrics, methods = settings.metrics, [m for m, _ in settings.methods]
    e = html.escape
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>onnxplain audit</title>",
             f"<style>{STYLE}</style></head><body>",
             f"<h1>Faithfulness audit of {e(settings.model)}</h1>",
             f"<p>{len(records)} images; methods {e(', '.join(methods))}; insertion/deletion with {settings.steps} "
             f"steps (blur sigma {settings.blur_sigma:g} px). Means with 95% percentile-bootstrap intervals; "
             "AD/AG/AI and the pointing games in %, insertion/deletion as curve areas.</p>",
             "<h2>Summary</h2><table id='summary'><thead><tr><th>method</th>"]
    parts += [f"<th>{SHORT[m]} {'↑' if HIGHER_IS_BETTER[m] else '↓'}</th>" for m in metrics]
    parts.append("</tr></thead><tbody>")
    for method in methods:
        parts.append(f"<tr><th>{e(method)}</th>")
        for m in metrics:
            s = summary.get(method, {}).get(m)
            d = 1 if m in PERCENT else 3
            parts.append("<td class='num'></td>" if s is None else
                         f"<td class='num'>{s['mean']:.{d}f}<br><small>[{s['ci_low']:.{d}f}, {s['ci_high']:.{d}f}]"
                         "</small></td>")
        parts.append("</tr>")
    parts.append("</tbody></table>")
    # Mean curves per method.
    parts.append("<h2>Insertion and deletion curves (mean over images)</h2><div class='plots'>")
    for curve_name in ("insertion", "deletion"):
        if curve_name not in metrics:
            continue
        means = {}
        for method in methods:
            curves = [s["curves"][curve_name] for r in records for s in r["scores"]
                      if s["method"] == method and curve_name in s["curves"]]
            if curves:
                means[method] = np.mean(np.array(curves), axis=0)
        parts.append(svg_plot(means, f"{curve_name} (p of the class)"))
    parts.append("</div>")
    # Grid: images x methods.
    parts.append("<h2>Maps</h2><table id='grid'><thead><tr><th>image</th>")
    parts += [f"<th>{e(m)}</th>" for m in methods]
    parts.append("</tr></thead><tbody>")
    for r in records:
        for t in r["targets"]:
            with Image.open(r["path"]) as original:
                source = _data_uri(original)
            parts.append(f"<tr><td class='cell'><img src='{source}' alt='{e(r['key'])}'><br>{e(r['key'])}<br>"
                         f"class {t['class_id']} {e(t['label'])} ({r['target']}), p = {t['probability']:.3f}</td>")
            for method in methods:
                key = f"{method}.{t['class_id']}"
                base = r["maps"].get(key)
                score = next((s for s in r["scores"] if s["method"] == method and s["class_id"] == t["class_id"]), None)
                if base is None or score is None:
                    parts.append("<td></td>")
                    continue
                with Image.open(out / "maps" / f"{base}.png") as picture:
                    uri = _data_uri(picture)
                text = ", ".join(f"{SHORT[m]} {score['values'][m] * (100 if m in PERCENT else 1):.{1 if m in PERCENT else 3}f}"
                                 for m in metrics if m in score["values"])
                curves = {c: np.array(score["curves"][c]) for c in ("insertion", "deletion") if c in score["curves"]}
                plot = svg_plot(curves, "", 180, 110) if curves else ""
                parts.append(f"<td class='cell'><img src='{uri}' alt='{e(key)}'><br>{e(text)}<br>{plot}</td>")
            parts.append("</tr>")
    parts.append("</tbody></table><pre id='render-check'></pre>")
    parts.append(f"<script>{RENDER_CHECK}</script></body></html>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------- command line

def add_parser(sub) -> None:
    """Register `onnxplain audit` on the CLI's subparsers."""
    p = sub.add_parser("audit", help="explain and score a dataset: maps, metrics.csv, summary, report.html")
    p.add_argument("dataset", help="folder of images, or CSV of path,label[,'x0 y0 x1 y1' box in original pixels]")
    p.add_argument("--model")
    p.add_argument("--methods", required=True, help="comma-separated method names")
    p.add_argument("--metrics", default="all", help=f"comma-separated, from {list(METRICS)} or "
                   f"{sorted(METRIC_ALIASES)} (default all; the pointing games only score images with a box)")
    p.add_argument("--param", action="append", default=[], help="key=value or method.key=value (repeatable)")
    p.add_argument("--layer", default="", help="layer for layer methods (default: the model's default layer)")
    p.add_argument("--steps", type=int, default=50, help="insertion/deletion steps (default %(default)s)")
    p.add_argument("--blur-sigma", type=float, default=5.0, help="insertion's blur, input pixels (default %(default)s)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted audit in --out")
    p.add_argument("--server", dest="servers", action="append", default=[],
                   help="HOST:PORT of a server replica (repeatable: round-robin over them), or a dns:/// target")
    p.add_argument("--workers", type=int, default=0, help="calls in flight (default 2 per server)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (the final line and table still print)")
    p.set_defaults(run=cmd_audit)


def cmd_audit(client: Client, args) -> None:
    from .cli import credentials, parse_params, pick_model   # cli imports this module

    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not names:
        raise AuditError("--methods names no method")
    params = parse_params(args.param, names)
    model = pick_model(client, args.model) if not args.servers else args.model
    if not model:
        raise AuditError("--model is required")
    settings = Settings(model, [(m, params[m]) for m in names], parse_metrics(args.metrics), args.steps,
                        args.blur_sigma, args.layer)
    servers = args.servers or args.server or ["127.0.0.1:50051"]   # audit's own --server, else the CLI's
    result = run_audit(args.dataset, servers, settings, args.out, resume=args.resume, workers=args.workers,
                       timeout=args.timeout, quiet=args.quiet, credentials=credentials(args))
    print(f"audit: {result['computed']} images computed, {result['skipped']} already done, "
          f"{result['seconds']:.1f} s ({result['images_per_s']:.2f} images/s); written to {args.out}/",
          file=sys.stderr)
    print(summary_markdown(json.loads((pathlib.Path(args.out) / "summary.json").read_text())["summary"],
                           settings.metrics))
