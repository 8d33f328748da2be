"""Helpers of the production tests: servers with a metrics port, metric scraping, models that fault at run time."""

from __future__ import annotations

import pathlib
import re
import urllib.request

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def start(models, metrics: bool = True, threads: int = 0, **limits):
    """A real server on free loopback ports (gRPC and, with `metrics`, /metrics); the caller stops it."""
    from onnxplain.server.config import Limits, ServerConfig
    from onnxplain.server.main import Server

    config = ServerConfig(host="127.0.0.1", port=0, limits=Limits(**limits), models=tuple(models),
                          metrics_port=_free_port() if metrics else 0, threads=threads)
    return Server(config).start()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(server) -> dict[str, float]:
    """The server's metrics over loopback HTTP: {'name{labels}': value} for every sample line."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def wait_for_calls(server, seconds: float, why: str, count: int = 1, **labels) -> None:
    """Wait until onnxplain_calls_total with `labels` reaches `count` (the server counts a call as it ends, a moment
    after its client saw the status); fail with `why` after `seconds`."""
    import time

    deadline = time.monotonic() + seconds
    while metric(scrape(server), "onnxplain_calls_total", **labels) < count:
        assert time.monotonic() < deadline, why
        time.sleep(0.05)


def metric(samples: dict[str, float], name: str, **labels) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for key, value in samples.items():
        m = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})?", key)
        if m is None or m.group(1) != name:
            continue
        got = dict(re.findall(r'([a-z_]+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += value
    return total


def faulty_model(path: pathlib.Path, classes: int = 4, size: int = 32) -> pathlib.Path:
    """A classifier that works on ordinary inputs and fails inside onnxruntime when any input value exceeds 100:
    its logits are reshaped to [-1, classes + 1000003 * (max(x) > 100)], which no batch can fill."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(3, classes)).astype(np.float32), "w")
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["raw"]),
        helper.make_node("ReduceMax", ["x"], ["top"], keepdims=0),
        helper.make_node("Greater", ["top", "threshold"], ["over"]),
        helper.make_node("Cast", ["over"], ["over_int"], to=TensorProto.INT64),
        helper.make_node("Mul", ["over_int", "huge"], ["extra"]),
        helper.make_node("Add", ["extra", "classes"], ["width"]),
        helper.make_node("Unsqueeze", ["width", "axis0"], ["width1"]),
        helper.make_node("Concat", ["minus_one", "width1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["raw", "shape"], ["logits"]),
    ]
    inits = [weight, numpy_helper.from_array(np.array(100.0, np.float32), "threshold"),
             numpy_helper.from_array(np.array(1000003, np.int64), "huge"),
             numpy_helper.from_array(np.array(classes, np.int64), "classes"),
             numpy_helper.from_array(np.array([0], np.int64), "axis0"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus_one")]
    graph = helper.make_graph(nodes, "faulty", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path
