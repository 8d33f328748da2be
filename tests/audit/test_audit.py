"""`onnxplain audit` end to end: the shared photos with the real model and every metric, a SIGKILL midway then
--resume equal to an uninterrupted run, two replicas behind round-robin equal to one, and report.html rendered
by headless Chromium."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from support import ROOT, SHARED_IMAGES, default_model_config, needs_shared, start_server

from onnxplain.client import cli
from onnxplain.client.client import METRICS
from onnxplain.default_model import shapes

SHAPES_METHODS = ["--methods", "occlusion,gradcam,integrated_gradients", "--param", "occlusion.window=32",
                  "--param", "occlusion.stride=32", "--param", "integrated_gradients.steps=4", "--steps", "6"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def outputs(out: pathlib.Path) -> dict[str, bytes]:
    """Every result file of an audit folder, by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def comparable(files: dict[str, bytes]) -> dict[str, bytes]:
    """Item jsons hold per-call timings; everything else must be byte-identical."""
    result = {}
    for name, data in files.items():
        if name.startswith("items/"):
            record = json.loads(data)
            record.pop("timings")
            data = json.dumps(record, sort_keys=True).encode()
        result[name] = data
    return result


# ------------------------------------------------------------------------------------------ real photos

@pytest.fixture(scope="module")
def photo_audit(server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("photos")
    dataset = tmp / "photos.csv"
    # chelsea by label name with a box around the cat's head; coffee by class id; the others top-1, one boxed.
    rows = [["path", "label", "box"]]
    for path in SHARED_IMAGES:
        label, box = {"chelsea": ("tabby", "80 20 300 250"), "coffee": ("967", ""),
                      "astronaut": ("", "140 20 320 230")}.get(path.stem, ("", ""))
        rows.append([os.path.relpath(path, tmp), label, box])
    with open(dataset, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    out = tmp / "out"
    code = cli.main(["--server", server.address, "audit", str(dataset), "--model", "efficientnet", "--methods",
                     "occlusion,gradcam,integrated_gradients", "--param", "occlusion.window=56", "--param",
                     "occlusion.stride=56", "--param", "integrated_gradients.steps=4", "--steps", "8",
                     "--metrics", "all", "--out", str(out), "--quiet"])
    assert code == 0
    return out


@needs_shared
def test_audit_of_the_shared_photos_writes_maps_tables_and_report(photo_audit, client):
    out = photo_audit
    rows = read_csv(out / "metrics.csv")
    methods = ["occlusion", "gradcam", "integrated_gradients"]
    assert len(rows) == len(SHARED_IMAGES) * len(methods)
    by_image = {}
    for row in rows:
        by_image.setdefault(pathlib.Path(row["path"]).stem, []).append(row)
    assert {r["class_id"] for r in by_image["chelsea"]} == {"281"} and by_image["chelsea"][0]["target"] == "label"
    assert {r["class_id"] for r in by_image["coffee"]} == {"967"}
    assert by_image["rocket"][0]["target"] == "top1"
    for row in rows:
        for m in ("average_drop", "average_gain", "insertion", "deletion"):
            assert 0 <= float(row[m]) <= (1 if m != "average_gain" else 1e6)
        assert row["average_increase"] in ("0.0", "1.0")
        boxed = pathlib.Path(row["path"]).stem in ("chelsea", "astronaut")
        assert (row["pointing_game"] != "") == boxed and (row["energy_pointing_game"] != "") == boxed
        base = out / "maps" / f"{row['image']}.{row['method']}.{row['class_id']}"
        assert np.load(f"{base}.npy").shape == (224, 224)
        with Image.open(f"{base}.png") as overlay, Image.open(row["path"]) as original:
            assert overlay.size == original.size
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"] == methods and summary["metrics"] == list(METRICS)
    for method in methods:
        ad = summary["summary"][method]["average_drop"]
        assert ad["n"] == 4 and ad["unit"] == "%" and ad["ci_low"] <= ad["mean"] <= ad["ci_high"]
        assert summary["summary"][method]["pointing_game"]["n"] == 2
    assert len(read_csv(out / "summary.csv")) == len(methods) * len(METRICS)
    # The saved map, sent back to the server, scores what the audit wrote (maps travel and are saved intact).
    row = next(r for r in rows if r["method"] == "gradcam" and "chelsea" in r["path"])
    saliency = np.load(out / "maps" / f"{row['image']}.gradcam.281.npy")
    again = client.evaluate("efficientnet", [row["path"]], maps=[(0, 281, "saved", saliency)],
                            metrics=["average_drop", "deletion"], steps=8)
    assert again.value(0, "saved", 281, "average_drop") == pytest.approx(float(row["average_drop"]), abs=1e-6)
    assert again.value(0, "saved", 281, "deletion") == pytest.approx(float(row["deletion"]), abs=1e-6)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def need_chromium():
    if CHROMIUM is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is missing in CI (.ci/run installs it with apt-get)")
        pytest.skip("chromium is not installed")


@needs_shared
def test_report_renders_in_headless_chromium(photo_audit, tmp_path):
    need_chromium()
    report = (photo_audit / "report.html").resolve()
    dom = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile1'}",
                          "--virtual-time-budget=10000", "--dump-dom", report.as_uri()],
                         capture_output=True, text=True, timeout=120)
    start = dom.stdout.index('<pre id="render-check">') + len('<pre id="render-check">')
    check = json.loads(dom.stdout[start:dom.stdout.index("</pre>", start)].replace("&quot;", '"'))
    images = len(SHARED_IMAGES) * (1 + 3)            # each photo, then one overlay per method
    assert check["images"] == check["loaded"] == images
    assert all(w > 0 and h > 0 for w, h in check["sizes"])
    assert check["summary_rows"] == 3 and check["grid_rows"] == len(SHARED_IMAGES)
    assert check["plots"] == 2 + len(SHARED_IMAGES) * 3
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", f"--screenshot={shot}",
                    "--window-size=1280,2000", report.as_uri()], capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB"), np.float64)
    assert pixels.shape == (2000, 1280, 3)
    # Top: the title and the summary table (dark text and grey header cells on white).
    assert (pixels[:400].mean(axis=2) < 100).mean() > 0.005
    # Lower: the photos and overlays are drawn: many saturated, varied pixels (not a blank page or broken icons).
    grid = pixels[900:2000]
    saturation = grid.max(axis=2) - grid.min(axis=2)
    assert (saturation > 60).mean() > 0.05 and grid.std() > 40


# ------------------------------------------------------------------------------------------ shapes: resume and replicas

@pytest.fixture(scope="module")
def shapes_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes_ds")
    s = shapes.generate(10, seed=5, size=96)
    with open(folder / "data.csv", "w", newline="") as f:
        writer = csv.writer(f)
        for i in range(len(s)):
            Image.fromarray(s.images[i]).save(folder / f"s{i:02d}.png")
            label = shapes.CLASSES[s.labels[i]] if i % 3 else str(s.labels[i])
            box = " ".join(str(v) for v in s.boxes[i]) if i % 2 == 0 else ""
            writer.writerow([f"s{i:02d}.png", label, box])
    return folder / "data.csv"


def audit_command(dataset, out, servers, *extra):
    command = [sys.executable, "-m", "onnxplain.client.cli", "audit", str(dataset), "--model", "shapes",
               *SHAPES_METHODS, "--out", str(out), "--quiet", *extra]
    for address in servers:
        command += ["--server", address]
    return command


@pytest.fixture(scope="module")
def uninterrupted(server, shapes_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    subprocess.run(audit_command(shapes_dataset, out, [server.address]), check=True, timeout=300, cwd=ROOT)
    return out


def test_audit_killed_midway_then_resumed_equals_an_uninterrupted_run(server, shapes_dataset, uninterrupted, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen(audit_command(shapes_dataset, out, [server.address], "--workers", "1"), cwd=ROOT)
    items = out / "items"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if items.exists() and len(list(items.glob("*.json"))) >= 3:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait(30) == -signal.SIGKILL, "the audit ended before it could be killed"
    done_before = {p.name: p.stat().st_mtime_ns for p in items.glob("*.json")}
    assert 3 <= len(done_before) < 10
    assert not (out / "metrics.csv").exists()
    # A kill inside a write leaves at most a temporary file; a resume must neither use nor keep it.
    (out / "maps" / ".00009-s09.gradcam.0.npy.tmp-1").write_bytes(b"half a file")
    # Without --resume the folder is refused; with other settings too.
    refused = subprocess.run(audit_command(shapes_dataset, out, [server.address]), capture_output=True, text=True)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    other = subprocess.run(audit_command(shapes_dataset, out, [server.address], "--resume", "--metrics", "ad"),
                           capture_output=True, text=True)
    assert other.returncode == 2 and "metrics" in other.stderr
    resumed = subprocess.run(audit_command(shapes_dataset, out, [server.address], "--resume"), capture_output=True,
                             text=True, timeout=300, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{10 - len(done_before)} images computed, {len(done_before)} already done" in resumed.stderr
    assert {n: (items / n).stat().st_mtime_ns for n in done_before} == done_before   # nothing recomputed
    assert comparable(outputs(out)) == comparable(outputs(uninterrupted))


def test_two_replicas_round_robin_give_the_results_of_one(server, shapes_dataset, uninterrupted, tmp_path):
    second = start_server([default_model_config()], max_batch=32, max_concurrent_jobs=2, max_queued_jobs=8)
    try:
        before = sum(r.rpc == "Evaluate" for r in server.explainer.jobs)
        out = tmp_path / "out"
        code = cli.main(["audit", str(shapes_dataset), "--model", "shapes", *SHAPES_METHODS, "--out", str(out),
                         "--quiet", "--server", server.address, "--server", second.address, "--workers", "2"])
        assert code == 0
        first_calls = sum(r.rpc == "Evaluate" for r in server.explainer.jobs) - before
        second_calls = sum(r.rpc == "Evaluate" for r in second.explainer.jobs)
        assert first_calls + second_calls == 10 and first_calls >= 3 and second_calls >= 3
    finally:
        second.stop(0)
    assert comparable(outputs(out)) == comparable(outputs(uninterrupted))


def test_usage_errors(server, tmp_path, shapes_dataset):
    bad = tmp_path / "bad.csv"
    bad.write_text("s.png,circle,1 2 3\n")
    assert cli.main(["--server", server.address, "audit", str(bad), "--model", "shapes", "--methods", "gradcam",
                     "--out", str(tmp_path / "o1"), "--quiet"]) == 2
    assert cli.main(["--server", server.address, "audit", str(shapes_dataset), "--model", "shapes", "--methods",
                     "gradcam", "--metrics", "auc", "--out", str(tmp_path / "o2"), "--quiet"]) == 2
    assert cli.main(["audit", str(shapes_dataset), "--model", "shapes", "--methods", "gradcam", "--out",
                     str(tmp_path / "o3"), "--server", "example.com:1", "--server", "example.org:2"]) == 2
    assert cli.main(["--server", server.address, "audit", str(shapes_dataset), "--model", "shapes", "--methods",
                     "nope", "--out", str(tmp_path / "o4"), "--quiet"]) == 1   # NOT_FOUND from the server
    from onnxplain.client.audit import channel_target
    assert channel_target(["127.0.0.1:1", "localhost:2"]) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target(["dns:///svc:50051"]) == "dns:///svc:50051"


def test_report_thumbnails_show_the_picture_as_it_displays():
    """A photo stored sideways with EXIF orientation 6 is thumbnailed upright, as the server explains it."""
    import base64
    import io

    from PIL import Image

    from onnxplain.client.audit import _data_uri

    stored = Image.new("RGB", (64, 128), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", exif=exif)
    uri = _data_uri(Image.open(io.BytesIO(buffer.getvalue())))
    thumbnail = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert thumbnail.size == (128, 64)      # stored 64 x 128; thumbnail() never enlarges
