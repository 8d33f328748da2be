"""The Node.js client (client/node/, @grpc/grpc-js + @grpc/proto-loader loading the .proto at run time) against a
real server on loopback: it lists the models and streams an Explain whose maps equal the Python client's maps for
the same request, bit for bit (the server is deterministic and both read the same float32 bytes).

npm dependencies are installed before the tests (`npm ci --prefix client/node`, README's test command): the tests
never touch the network. Where node is installed but client/node/node_modules is not, they fail, not skip."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from support import ROOT, default_model_config, start_server

NODE = shutil.which("node")
CLIENT = ROOT / "client" / "node" / "onnxplain.js"
SAMPLES = ROOT / "onnxplain" / "default_model" / "samples"

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")


@pytest.fixture(scope="module")
def address():
    modules = ROOT / "client" / "node" / "node_modules"
    assert (modules / "@grpc" / "grpc-js").is_dir() and (modules / "@grpc" / "proto-loader").is_dir(), (
        "client/node/node_modules is missing: run `npm ci --prefix client/node` before pytest (README, Run the tests)")
    server = start_server([default_model_config()], max_batch=32, max_concurrent_jobs=2, max_queued_jobs=8)
    yield server.address
    server.stop(0)


def node(*args, cwd=ROOT):
    return subprocess.run([NODE, str(CLIENT), *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_lists_the_models(address):
    result = node("--server", address, "models")
    assert result.returncode == 0, result.stderr
    assert [line.split("\t")[:3] for line in result.stdout.splitlines()] == [
        ["shapes", "8 classes", "CPUExecutionProvider"]]


def test_explain_stream_equals_the_python_client(address, tmp_path):
    from onnxplain.client import Client, MapResult

    images = [SAMPLES / "star.png", SAMPLES / "ring.png"]
    out = tmp_path / "node"
    result = node("--server", address, "explain", *map(str, images), "--model", "shapes", "--method", "gradcam",
                  "--method", "occlusion", "--param", "occlusion.window=16", "--param", "occlusion.stride=8",
                  "--top-k", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "accepted: 8 maps" in result.stderr and "progress: image 1 occlusion" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accepted"]["model"] == "shapes" and summary["done"]["maps"] == 8 == len(summary["maps"])

    with Client(address, timeout=60) as client:
        events = client.explain("shapes", images, ["gradcam", ("occlusion", {"window": 16, "stride": 8})], top_k=2)
        expected = {(e.image_index, e.method, e.class_id): e for e in events if isinstance(e, MapResult) and e.final}
    assert len(expected) == 8
    for entry in summary["maps"]:
        want = expected[(entry["image_index"], entry["method"], entry["class_id"])]
        got = np.load(out / entry["file"])
        assert entry["file"] == f"{images[entry['image_index']].stem}.{entry['method']}.{entry['class_id']}.npy"
        assert got.dtype == np.float32 and got.shape == want.map.shape == tuple(entry["shape"])
        np.testing.assert_array_equal(got, want.map)
        assert entry["label"] == want.label and entry["max"] == pytest.approx(float(want.map.max()), rel=1e-6)


def test_errors_name_the_status_and_field(address, tmp_path):
    sample = str(SAMPLES / "star.png")
    refused = node("--server", address, "explain", sample, "--model", "shapes", "--method", "nope", "--out",
                   str(tmp_path))
    assert refused.returncode == 1 and "NOT_FOUND: methods[0]" in refused.stderr
    bad = node("--server", address, "explain", sample, "--model", "shapes", "--method", "occlusion", "--param",
               "occlusion.windw=3", "--out", str(tmp_path))
    assert bad.returncode == 2 and "occlusion has no parameter windw" in bad.stderr
    out_of_range = node("--server", address, "explain", sample, "--model", "shapes", "--method", "occlusion",
                        "--param", "window=0", "--out", str(tmp_path))
    assert out_of_range.returncode == 1 and "INVALID_ARGUMENT" in out_of_range.stderr and "window" in out_of_range.stderr


def test_readme_grpcurl_explain_request_is_valid_json_of_the_contract(address):
    """README's grpcurl Explain body (JSON, base64 image) parses into an ExplainRequest the server answers."""
    import base64
    import re

    import grpc
    from google.protobuf import json_format

    from onnxplain.v1 import service_pb2, service_pb2_grpc

    body = re.search(r"Explainer/Explain <<EOF\n(.*?)\nEOF\n", (ROOT / "README.md").read_text(), re.S).group(1)
    image = base64.b64encode((SAMPLES / "star.png").read_bytes()).decode()
    body = body.replace("$(base64 -w0 onnxplain/default_model/samples/star.png)", image)
    request = json_format.Parse(body, service_pb2.ExplainRequest())
    with grpc.insecure_channel(address) as channel:
        events = list(service_pb2_grpc.ExplainerStub(channel).Explain(request, timeout=60))
    maps = [e.map for e in events if e.WhichOneof("event") == "map" and e.map.final]
    assert len(maps) == 4 and {m.method for m in maps} == {"occlusion", "gradcam"}
