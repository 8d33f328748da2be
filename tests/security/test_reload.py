"""Model management under load on a real server: ReloadModel runs again and again while several threads stream
Explain; no call fails, and every map equals the map of the model version the call started on (never a mix).
UnloadModel refuses new calls and lets a running one finish."""

from __future__ import annotations

import shutil
import threading
import time

import grpc
import numpy as np
import onnx
import pytest

from onnxplain.client import MapResult
from onnxplain.v1 import admin_pb2, admin_pb2_grpc, methods_pb2, service_pb2, service_pb2_grpc, tensor_pb2

from support import default_model_config, sample_png

SHAPES = default_model_config()


def request(**params) -> service_pb2.ExplainRequest:
    return service_pb2.ExplainRequest(
        model="shapes", images=[tensor_pb2.Image(encoded=sample_png())],
        targets=service_pb2.Targets(class_ids=[0]),
        methods=[methods_pb2.MethodSpec(occlusion=methods_pb2.OcclusionParams(**(params or dict(window=24, stride=24))))])


def final_map(stub, req) -> np.ndarray:
    from onnxplain.client.client import event_from_message

    events = [event_from_message(m) for m in stub.Explain(req, timeout=60)]
    maps = [e.map for e in events if isinstance(e, MapResult) and e.final]
    assert len(maps) == 1
    return maps[0]


def scaled_copy(source, target, factor: float) -> None:
    """The model with its last layer's weights and bias scaled: logits (and occlusion maps) scale by `factor`."""
    model = onnx.load(str(source))
    for init in model.graph.initializer:
        if init.name in ("20.weight", "20.bias"):
            init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * factor, init.name))
    tmp = target.with_suffix(".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(target)   # atomic: a reload reads either the old or the new file, never half of one


@pytest.fixture
def server(tmp_path):
    from onnxplain.server.config import Limits, ModelConfig, ServerConfig
    from onnxplain.server.main import Server

    shutil.copy(SHAPES.path, tmp_path / "shapes.onnx")
    shutil.copy(SHAPES.labels, tmp_path / "shapes.txt")
    config = ModelConfig("shapes", tmp_path / "shapes.onnx", tmp_path / "shapes.txt", "", SHAPES.preprocessing)
    srv = Server(ServerConfig(host="127.0.0.1", port=0, models=(config,), model_dirs=(tmp_path,),
                              limits=Limits(max_concurrent_jobs=4, max_queued_jobs=16))).start()
    yield srv, tmp_path
    srv.stop(0)


def test_reload_under_load_fails_no_call_and_mixes_no_models(server):
    srv, directory = server
    channel = grpc.insecure_channel(srv.address)
    stub, admin = service_pb2_grpc.ExplainerStub(channel), admin_pb2_grpc.AdminStub(channel)
    req = request()
    original = final_map(stub, req)
    scaled_copy(directory / "shapes.onnx", directory / "shapes.onnx", 1.0)   # same weights, re-saved
    versions = {1.0: original}
    scaled_copy(SHAPES.path, directory / "shapes.onnx", 3.0)
    admin.ReloadModel(admin_pb2.ReloadModelRequest(name="shapes"), timeout=60)
    versions[3.0] = final_map(stub, req)
    assert not np.allclose(versions[3.0], versions[1.0], rtol=1e-3), "the two versions must be told apart"
    np.testing.assert_allclose(versions[3.0], 3.0 * versions[1.0], rtol=1e-4, atol=1e-4)

    stop = threading.Event()
    failures, results = [], []

    def stream():
        while not stop.is_set():
            try:
                results.append(final_map(stub, req))
            except Exception as exc:   # noqa: BLE001 - every failure is a test failure, kept for the message
                failures.append(repr(exc))

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for t in threads:
        t.start()
    reloads = 0
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline or reloads < 10:
        factor = 1.0 if reloads % 2 else 3.0
        scaled_copy(SHAPES.path, directory / "shapes.onnx", factor)
        answer = admin.ReloadModel(admin_pb2.ReloadModelRequest(name="shapes"), timeout=60)
        assert answer.model.name == "shapes"
        reloads += 1
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert failures == []
    assert len(results) >= 12, f"only {len(results)} calls completed during {reloads} reloads"
    matched = [next((f for f, m in versions.items() if np.allclose(r, m, rtol=1e-4, atol=1e-5)), None) for r in results]
    assert None not in matched, "a call returned a map of neither model version"
    assert set(matched) == {1.0, 3.0}, f"calls saw only versions {set(matched)} over {reloads} reloads"
    # after the last reload (factor 1.0 when reloads is even), new calls get the last version
    last = 1.0 if (reloads - 1) % 2 else 3.0
    np.testing.assert_allclose(final_map(stub, req), versions[last], rtol=1e-4, atol=1e-5)
    channel.close()


def test_unload_refuses_new_calls_and_lets_running_ones_finish(server):
    srv, directory = server
    channel = grpc.insecure_channel(srv.address)
    stub, admin = service_pb2_grpc.ExplainerStub(channel), admin_pb2_grpc.AdminStub(channel)
    slow = request(window=8, stride=4)   # ~500 occluded samples: runs long enough to unload mid-way
    call = stub.Explain(slow, timeout=120)
    first = next(call)
    assert first.WhichOneof("event") == "accepted"
    admin.UnloadModel(admin_pb2.UnloadModelRequest(name="shapes"), timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        final_map(stub, request())
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    rest = list(call)   # the running call finishes on the model it holds
    assert rest[-1].WhichOneof("event") == "done" and rest[-1].done.maps == 1
    with pytest.raises(grpc.RpcError) as info:
        admin.ReloadModel(admin_pb2.ReloadModelRequest(name="shapes"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # and it can be loaded again
    assert admin.LoadModel(admin_pb2.LoadModelRequest(path="shapes.onnx"), timeout=60).model.name == "shapes"
    with pytest.raises(grpc.RpcError) as info:
        admin.LoadModel(admin_pb2.LoadModelRequest(path="shapes.onnx"), timeout=60)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert admin.LoadModel(admin_pb2.LoadModelRequest(path="shapes.onnx", replace=True), timeout=60).model.name
    channel.close()
