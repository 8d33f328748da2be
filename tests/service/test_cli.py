"""The `onnxplain` command line, run as a subprocess against a real server on loopback."""

from __future__ import annotations

import subprocess
import sys
from importlib.resources import files

import numpy as np
import pytest

from onnxplain.client import MapResult

from support import SHARED, needs_shared

SAMPLES = files("onnxplain.default_model") / "samples"


def cli(server, *args, check_rc=0):
    result = subprocess.run([sys.executable, "-m", "onnxplain.client.cli", "--server", server.address, *map(str, args)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == check_rc, (result.stdout, result.stderr)
    return result


def test_models_and_methods(server):
    assert "shapes" in cli(server, "models").stdout
    out = cli(server, "methods").stdout
    assert "occlusion (perturbation)" in out and "window = 16" in out


def test_model_lists_layers(server):
    out = cli(server, "model", "shapes").stdout
    assert "(default)" in out and "NCHW" in out


def test_predict(server):
    out = cli(server, "predict", SAMPLES / "star.png", "--model", "shapes", "--top-k", "2").stdout
    assert out.splitlines()[0].split(": ")[1].startswith("3 star")


def test_explain_writes_raw_maps_and_overlays(server, client, tmp_path):
    image = SAMPLES / "ring.png"
    out = cli(server, "explain", image, "--model", "shapes", "--method", "occlusion", "--top-k", "2",
              "--param", "window=24", "--param", "occlusion.stride=12", "--out", tmp_path, "--quiet").stdout
    written = sorted(p.name for p in tmp_path.iterdir())
    assert len(written) == 4 and all(name.startswith("ring.occlusion.") for name in written)
    assert sorted(out.split()) == sorted(str(tmp_path / n) for n in written)
    events = list(client.explain("shapes", [image], [("occlusion", {"window": 24, "stride": 12})], top_k=2))
    for event in (e for e in events if isinstance(e, MapResult)):
        saved = np.load(tmp_path / f"ring.occlusion.{event.class_id}.npy")
        assert saved.dtype == np.float32 and saved.shape == (96, 96)
        np.testing.assert_array_equal(saved, event.map)      # raw values, not rescaled
        from PIL import Image
        with Image.open(tmp_path / f"ring.occlusion.{event.class_id}.png") as overlay, Image.open(image) as original:
            assert overlay.size == original.size


@needs_shared
def test_explain_by_label_on_efficientnet(server, tmp_path):
    cli(server, "explain", SHARED / "images" / "coffee.jpg", "--model", "efficientnet", "--method", "occlusion",
        "--target", "espresso", "--param", "window=56", "--param", "stride=56", "--out", tmp_path, "--quiet")
    assert np.load(tmp_path / "coffee.occlusion.967.npy").shape == (224, 224)


@pytest.mark.parametrize("args, rc, message", [
    (("explain", SAMPLES / "star.png", "--model", "nope", "--method", "occlusion", "--out", "{tmp}"), 1, "NOT_FOUND"),
    (("explain", SAMPLES / "star.png", "--method", "occlusion", "--model", "shapes", "--param", "window=0",
      "--out", "{tmp}"), 1, "INVALID_ARGUMENT: methods[0].occlusion.window must be in [1, 4096], got 0"),
    (("explain", SAMPLES / "star.png", "--method", "occlusion", "--model", "shapes", "--param", "window",
      "--out", "{tmp}"), 2, "key=value"),
    (("explain", SAMPLES / "star.png", "--method", "occlusion", "--model", "shapes", "--param", "size=3",
      "--out", "{tmp}"), 2, "no parameter 'size'"),
    (("predict", "/no/such/image.png", "--model", "shapes"), 2, "No such file"),
])
def test_errors_exit_non_zero_with_the_servers_message(server, tmp_path, args, rc, message):
    args = [str(a).replace("{tmp}", str(tmp_path)) for a in args]
    assert message in cli(server, *args, check_rc=rc).stderr


def test_unreachable_server_is_an_error():
    result = subprocess.run([sys.executable, "-m", "onnxplain.client.cli", "--server", "127.0.0.1:1", "--timeout", "2",
                             "models"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr


def test_client_imports_no_onnxruntime():
    code = ("import sys, onnxplain.client, onnxplain.client.cli; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('onnxruntime', 'onnx') or m.startswith('onnxplain.kernels')"
            " or m.startswith('onnxplain.server')]; print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
