"""Faults: an onnxruntime error inside a job fails that call only (maps already streamed are kept), a job over the
memory budget is refused before any work, SIGTERM drains the server (health NOT_SERVING, no new calls, running
calls finish) before it exits 0, a client that stops reading holds neither the compute slot nor (past
max_call_seconds) a thread, connections whose peer vanished, that grow old or sit idle are closed, and long-lived
health Watch and reflection streams cannot take the threads that other calls need."""

from __future__ import annotations

import gc
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from onnxplain import tensors
from onnxplain.v1 import methods_pb2, service_pb2, service_pb2_grpc, tensor_pb2

from production import faulty_model, metric, scrape, start, wait_for_calls
from support import captured_json_logs, default_model_config, sample_png

ROOT = pathlib.Path(__file__).resolve().parents[2]


def occlusion(**params) -> methods_pb2.MethodSpec:
    return methods_pb2.MethodSpec(occlusion=methods_pb2.OcclusionParams(**params))


@pytest.fixture(scope="module")
def faulty_server(tmp_path_factory):
    from onnxplain.server.config import ModelConfig

    path = faulty_model(tmp_path_factory.mktemp("faulty") / "faulty.onnx")
    srv = start([default_model_config(), ModelConfig("faulty", path, preprocessing={"fit": "stretch"})],
                max_batch=8)
    yield srv
    srv.stop(0)


def test_an_onnxruntime_error_fails_the_call_keeps_the_maps_and_the_server(faulty_server):
    stub = service_pb2_grpc.ExplainerStub(grpc.insecure_channel(faulty_server.address))
    sample = np.random.default_rng(0).normal(size=(3, 32, 32)).astype(np.float32)
    request = service_pb2.ExplainRequest(
        model="faulty", images=[tensor_pb2.Image(tensor=tensors.to_proto(sample))],
        methods=[occlusion(window=16, stride=16), occlusion(window=16, stride=16, baseline=1000.0)])
    events = []
    with pytest.raises(grpc.RpcError) as caught:
        for event in stub.Explain(request, timeout=60):
            events.append(event)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "onnxruntime" in caught.value.details() and "Reshape" in caught.value.details()
    finals = [e.map for e in events if e.WhichOneof("event") == "map" and e.map.final]
    assert [m.method for m in finals] == ["occlusion"], "the first method's map was streamed before the fault"
    assert tensors.from_proto(finals[0].map).shape == (32, 32)
    # the server is still healthy and serves both models
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(faulty_server.address))
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
    done = list(stub.Explain(service_pb2.ExplainRequest(
        model="faulty", images=[tensor_pb2.Image(tensor=tensors.to_proto(sample))],
        methods=[occlusion(window=16, stride=16)]), timeout=60))[-1]
    assert done.WhichOneof("event") == "done"
    prediction = stub.Predict(service_pb2.PredictRequest(model="shapes", images=[tensor_pb2.Image(
        encoded=sample_png())], top_k=1), timeout=60)
    assert prediction.predictions[0].top[0].label == "star"
    assert metric(scrape(faulty_server), "onnxplain_calls_total", rpc="Explain", model="faulty", code="INTERNAL") == 1


def test_a_job_over_the_memory_budget_is_refused_before_any_work():
    srv = start([default_model_config()], max_job_bytes=5_000_000)
    try:
        stub = service_pb2_grpc.ExplainerStub(grpc.insecure_channel(srv.address))
        assert stub.GetModel(service_pb2.GetModelRequest(name="shapes")).limits.max_job_bytes == 5_000_000
        before = metric(scrape(srv), "onnxplain_model_samples_total")
        request = service_pb2.ExplainRequest(model="shapes", images=[tensor_pb2.Image(encoded=sample_png())] * 4,
                                             methods=[methods_pb2.MethodSpec(method="gradient")])
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Explain(request, timeout=60))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_job_bytes" in caught.value.details()
        assert metric(scrape(srv), "onnxplain_model_samples_total") == before
        small = service_pb2.ExplainRequest(model="shapes", images=[tensor_pb2.Image(encoded=sample_png())],
                                           methods=[occlusion(window=32, stride=32)])
        assert list(stub.Explain(small, timeout=60))[-1].WhichOneof("event") == "done"
    finally:
        srv.stop(0)


def test_an_evaluate_job_over_the_memory_budget_is_refused_before_any_work():
    # batch 8, 96x96 RGB: an Evaluate holds what an Explain of its methods holds, plus the client's maps, one batch
    # of metric inputs and, for the curves, each map's ranks (server/evaluate.py job_bytes)
    srv = start([default_model_config()], max_batch=8, max_job_bytes=5_000_000)
    try:
        stub = service_pb2_grpc.ExplainerStub(grpc.insecure_channel(srv.address))
        image = tensor_pb2.Image(encoded=sample_png())
        blank = tensors.to_proto(np.random.default_rng(0).random((96, 96), dtype=np.float32))
        deletion = methods_pb2.DELETION
        too_many_maps = service_pb2.EvaluateRequest(model="shapes", images=[image], metrics=[deletion], maps=[
            methods_pb2.Map(image_index=0, class_id=c % 8, map=blank) for c in range(32)])
        too_many_targets = service_pb2.EvaluateRequest(
            model="shapes", images=[image] * 4, methods=[methods_pb2.MethodSpec(method="gradcam")],
            targets=service_pb2.Targets(class_ids=[0, 1, 2, 3]), metrics=[deletion])
        before = metric(scrape(srv), "onnxplain_model_samples_total")
        for request in (too_many_maps, too_many_targets):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Evaluate(request, timeout=60)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_job_bytes" in caught.value.details()
        assert metric(scrape(srv), "onnxplain_model_samples_total") == before, "refused before any model pass"
        assert metric(scrape(srv), "onnxplain_calls_total", rpc="Evaluate", code="RESOURCE_EXHAUSTED") == 2
        # the same calls, smaller, are served
        del too_many_maps.maps[2:]
        assert len(stub.Evaluate(too_many_maps, timeout=60).scores) == 2
        small = service_pb2.EvaluateRequest(model="shapes", images=[image], metrics=[deletion],
                                            methods=[methods_pb2.MethodSpec(method="gradcam")],
                                            targets=service_pb2.Targets(class_ids=[0]))
        assert stub.Evaluate(small, timeout=60).done.maps == 1
    finally:
        srv.stop(0)


def test_work_caps_are_enforced_and_listed():
    srv = start([default_model_config()], metrics=False, max_masks=500, max_steps=20, max_iterations=5)
    try:
        stub = service_pb2_grpc.ExplainerStub(grpc.insecure_channel(srv.address))
        methods = {m.name: {p.name: p for p in m.params} for m in
                   stub.ListMethods(service_pb2.ListMethodsRequest()).methods}
        assert methods["rise"]["masks"].maximum == 500
        assert methods["integrated_gradients"]["steps"].maximum == 20
        assert methods["smoothgrad"]["samples"].maximum == 20
        assert methods["opticam"]["iterations"].maximum == 5
        for spec, field in [(methods_pb2.MethodSpec(rise=methods_pb2.RiseParams(masks=501)), "rise.masks"),
                            (methods_pb2.MethodSpec(integrated_gradients=methods_pb2.IntegratedGradientsParams(
                                steps=21)), "integrated_gradients.steps"),
                            (methods_pb2.MethodSpec(opticam=methods_pb2.OptiCamParams(iterations=6)),
                             "opticam.iterations")]:
            request = service_pb2.ExplainRequest(model="shapes", images=[tensor_pb2.Image(encoded=sample_png())],
                                                 methods=[spec])
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Explain(request, timeout=60))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in caught.value.details() and "limits.max_" in caught.value.details()
    finally:
        srv.stop(0)


def test_sigterm_drains_then_exits_0(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = open(tmp_path / "server.log", "w")    # a file, not a pipe that fills while nobody reads it
    proc = subprocess.Popen([sys.executable, "-m", "onnxplain.server.main", "--port", "0", "--grace", "60",
                             "--max-batch", "16", "--log-format", "json"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = proc.stdout.readline()
        address = re.search(r"on (\S+:\d+)", line).group(1)
        channel = grpc.insecure_channel(address)
        stub = service_pb2_grpc.ExplainerStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        # a long call, admitted before the signal
        request = service_pb2.ExplainRequest(model="shapes", images=[tensor_pb2.Image(encoded=sample_png())],
                                             methods=[methods_pb2.MethodSpec(rise=methods_pb2.RiseParams(masks=800))])
        events, errors, accepted = [], [], threading.Event()

        def run():
            try:
                for event in stub.Explain(request, timeout=120):
                    events.append(event)
                    accepted.set()
            except grpc.RpcError as exc:
                errors.append(exc)
                accepted.set()

        worker = threading.Thread(target=run)
        worker.start()
        assert accepted.wait(60) and not errors
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        time.sleep(0.2)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Predict(service_pb2.PredictRequest(model="shapes", images=[tensor_pb2.Image(encoded=sample_png())]),
                         timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        worker.join(120)
        assert not errors, errors
        assert events[-1].WhichOneof("event") == "done", "the running call finished during the grace period"
        assert proc.wait(60) == 0
        assert time.monotonic() - signalled < 60
        log_lines = (tmp_path / "server.log").read_text()
        assert '"rpc": "Explain"' in log_lines and '"code": "OK"' in log_lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


# ------------------------------------------------------------------------------------------- slow readers, decoding

def test_a_client_that_stops_reading_does_not_hold_the_compute_slot():
    # one compute slot; the stalled stream carries 256 maps with their attributions (~38 MB), far more than HTTP/2
    # flow control lets through unread: its job must still end and free the slot, and its maps wait for the reader
    srv = start([default_model_config()], max_concurrent_jobs=1, max_queued_jobs=1)
    try:
        request = service_pb2.ExplainRequest(
            model="shapes", images=[tensor_pb2.Image(encoded=sample_png())] * 2,
            methods=[methods_pb2.MethodSpec(method="gradient")] * 16, targets=service_pb2.Targets(top_k=8),
            output=methods_pb2.OutputOptions(return_attribution=True))
        stalled = service_pb2_grpc.ExplainerStub(grpc.insecure_channel(srv.address)).Explain(request, timeout=60)
        accepted = next(stalled).accepted
        other = service_pb2_grpc.ExplainerStub(grpc.insecure_channel(srv.address))   # its own connection
        prediction = other.Predict(service_pb2.PredictRequest(
            model="shapes", images=[tensor_pb2.Image(encoded=sample_png("ring"))], top_k=1), timeout=15)
        assert prediction.predictions[0].top[0].label == "ring"
        assert next(r for r in srv.explainer.jobs if r.job_id == accepted.job_id).status == "ok", \
            "the stalled stream's job ended while its client read nothing"
        rest = list(stalled)
        finals = [e.map for e in rest if e.WhichOneof("event") == "map" and e.map.final]
        assert len(finals) == accepted.total_maps == 2 * 16 * 8 and rest[-1].done.maps == len(finals)
        assert all(tensors.from_proto(m.attribution).shape == (3, 96, 96) for m in finals)
    finally:
        srv.stop(0)


def test_a_stalled_stream_keeps_every_final_map_and_drops_previews_past_the_jobs_maps():
    from onnxplain.server.service import EventBuffer

    def map_event(final: bool, index: int):
        return service_pb2.ExplainEvent(map=service_pb2.MapResult(
            final=final, step=index, map=tensors.to_proto(np.zeros((32, 32), np.float32))))

    size = map_event(True, 0).ByteSize()
    buffer = EventBuffer(budget=4 * size)
    sent = ([map_event(False, i) for i in range(50)] + [map_event(True, 50)]
            + [service_pb2.ExplainEvent(progress=service_pb2.Progress(done=i)) for i in range(50)]
            + [map_event(True, i) for i in range(51, 60)])
    buffer.fill(iter(sent))   # nobody reads while the job runs
    got = list(buffer.drain())
    assert [e.map.step for e in got if e.map.final] == [50, *range(51, 60)], "every final map, in order"
    previews = [e.map.step for e in got if e.WhichOneof("event") == "map" and not e.map.final]
    # kept while the buffer held less than its budget: at most the budget and one message
    assert previews == list(range(len(previews))) and 4 <= len(previews) <= 5, previews
    assert not any(e.WhichOneof("event") == "progress" for e in got), "the buffer was over its budget by then"

    def faulty_job():
        yield map_event(True, 0)
        raise ZeroDivisionError("a fault inside the job")

    failing = EventBuffer(budget=size)
    failing.fill(faulty_job())
    drained = failing.drain()
    assert next(drained).map.final
    with pytest.raises(ZeroDivisionError):
        next(drained)


def stalling_request() -> service_pb2.ExplainRequest:
    """128 maps with their attributions (~19 MB): far more than HTTP/2 flow control lets through unread (about 5 MB
    reached the client)."""
    return service_pb2.ExplainRequest(
        model="shapes", images=[tensor_pb2.Image(encoded=sample_png())],
        methods=[methods_pb2.MethodSpec(method="gradient")] * 16, targets=service_pb2.Targets(top_k=8),
        output=methods_pb2.OutputOptions(return_attribution=True))


def threads_sending() -> int:
    """Threads blocked in gRPC's send of a response message (grpc/_server.py): a stream whose client stopped
    reading holds one."""
    count = 0
    for frame in sys._current_frames().values():
        while frame is not None:
            if frame.f_code.co_name == "_send_response" and frame.f_code.co_filename.endswith("_server.py"):
                count += 1
                break
            frame = frame.f_back
    return count


def event_buffers() -> list:
    """The live EventBuffers (each holds one Explain job's undelivered events), as weak references."""
    from onnxplain.server.service import EventBuffer

    gc.collect()
    return [weakref.ref(o) for o in gc.get_objects() if isinstance(o, EventBuffer)]


def test_a_stalled_stream_without_a_deadline_ends_at_max_call_seconds_as_if_its_deadline_passed():
    cap = 3
    with captured_json_logs() as stream:
        srv = start([default_model_config()], max_concurrent_jobs=1, max_queued_jobs=1, max_call_seconds=cap)
        try:
            before = {id(ref()) for ref in event_buffers()}
            stub = service_pb2_grpc.ExplainerStub(grpc.insecure_channel(srv.address))
            started = time.monotonic()
            stalled = stub.Explain(stalling_request())   # no deadline, and nothing read after the first event
            accepted = next(stalled).accepted
            record = next(r for r in srv.explainer.jobs if r.job_id == accepted.job_id)
            while record.status == "running":
                time.sleep(0.05)
            assert record.status == "ok" and time.monotonic() - started < cap, "the job itself ended before the cap"
            [held] = [ref for ref in event_buffers() if id(ref()) not in before]
            while threads_sending() == 0:   # the stream sends what flow control lets through, then blocks
                assert time.monotonic() - started < cap, "the stream's thread never blocked in gRPC's send"
                time.sleep(0.02)
            assert threads_sending() == 1, "the stalled stream holds a thread (and its job's maps: `held`)"
            other = service_pb2_grpc.ExplainerStub(grpc.insecure_channel(srv.address))   # its own connection
            prediction = other.Predict(service_pb2.PredictRequest(
                model="shapes", images=[tensor_pb2.Image(encoded=sample_png("ring"))], top_k=1), timeout=15)
            assert prediction.predictions[0].top[0].label == "ring", "the server serves other calls meanwhile"
            wait_for_calls(srv, started + cap + 1.5 - time.monotonic(), "the stalled call was not ended at "
                           "max_call_seconds", rpc="Explain", code="DEADLINE_EXCEEDED")
            assert threads_sending() == 0, "the call's thread is released"
            gc.collect()
            assert held() is None, "and the job's undelivered maps with it"
            with pytest.raises(grpc.RpcError) as caught:
                list(stalled)   # what had reached the client before the cap, then the status
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert f"limits.max_call_seconds = {cap} s" in caught.value.details()
            # the same stalled stream with a client deadline (before the cap) is recorded the same way
            expiring = stub.Explain(stalling_request(), timeout=1)
            next(expiring)
            time.sleep(1.2)
            with pytest.raises(grpc.RpcError) as caught:
                list(expiring)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            wait_for_calls(srv, 10, "the client's deadline was not counted", count=2, rpc="Explain",
                           code="DEADLINE_EXCEEDED")
            samples = scrape(srv)
            assert metric(samples, "onnxplain_calls_total", rpc="Explain") == 2
            assert metric(samples, "onnxplain_call_seconds_count", rpc="Explain", model="shapes") == 2
            assert other.Predict(service_pb2.PredictRequest(
                model="shapes", images=[tensor_pb2.Image(encoded=sample_png())], top_k=1), timeout=15).predictions
        finally:
            srv.stop(0)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    calls = [line for line in lines if line.get("rpc") == "Explain"]
    assert [(c["code"], c["model"]) for c in calls] == [("DEADLINE_EXCEEDED", "shapes")] * 2
    assert calls[0]["duration_ms"] >= cap * 1000 and calls[0]["request_id"] == accepted.job_id
    assert calls[0]["msg"].endswith("(ran past limits.max_call_seconds)"), "the line says why the server ended it"
    assert not calls[1]["msg"].endswith(")"), "the client's own deadline"


# ------------------------------------------------------------------------------------------- connections

class FreezingProxy:
    """A TCP relay to the server that, once frozen, neither reads nor forwards: the server sees a peer that
    vanished without closing its connection (a cable pulled, a machine gone)."""

    def __init__(self, port: int):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.frozen, self.closed = threading.Event(), threading.Event()
        self.sockets = [self.listener]
        threading.Thread(target=self._accept, args=(port,), daemon=True).start()

    def _accept(self, port: int) -> None:
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        server = socket.create_connection(("127.0.0.1", port))
        self.sockets += [client, server]
        for a, b in ((client, server), (server, client)):
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while not self.frozen.is_set():
                data = source.recv(65536)
                if not data or self.frozen.is_set():
                    break
                sink.sendall(data)
        except OSError:
            pass
        self.closed.wait()

    def close(self) -> None:
        self.closed.set()
        for s in self.sockets:
            s.close()


def start_with_connections(**connections):
    from onnxplain.server.config import Connections, Limits, ServerConfig
    from onnxplain.server.main import Server
    from production import _free_port

    config = ServerConfig(host="127.0.0.1", port=0, models=(default_model_config(),), metrics_port=_free_port(),
                          limits=Limits(max_batch=8), connections=Connections(**connections))
    return Server(config).start()


def long_explain() -> service_pb2.ExplainRequest:
    # RISE with 10,000 masks: far longer than these tests wait
    return service_pb2.ExplainRequest(model="shapes", images=[tensor_pb2.Image(encoded=sample_png())],
                                      methods=[methods_pb2.MethodSpec(rise=methods_pb2.RiseParams(masks=10_000))])


def test_keepalive_closes_a_connection_whose_peer_vanished_and_frees_its_call():
    srv = start_with_connections(keepalive_time_ms=300, keepalive_timeout_ms=300)
    proxy = FreezingProxy(srv.port)
    try:
        call = service_pb2_grpc.ExplainerStub(grpc.insecure_channel(proxy.address)).Explain(long_explain())
        job_id = next(call).accepted.job_id
        proxy.frozen.set()
        frozen = time.monotonic()
        record = next(r for r in srv.explainer.jobs if r.job_id == job_id)
        wait_for_calls(srv, frozen + 5 - time.monotonic(), "the call of a vanished peer is still open", rpc="Explain")
        assert record.status == "cancelled"
    finally:
        proxy.close()
        srv.stop(0)


def test_a_connection_past_its_max_age_and_grace_is_closed_under_a_running_call():
    srv = start_with_connections(max_connection_age_ms=500, max_connection_age_grace_ms=500)
    try:
        stub = service_pb2_grpc.ExplainerStub(grpc.insecure_channel(srv.address))
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Explain(long_explain()))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "max connection age" in caught.value.details()
        assert time.monotonic() - started < 5, "cut at about 1 s; the job alone runs for 10 s or more"
        # the client reconnects for its next call
        assert stub.ListModels(service_pb2.ListModelsRequest(), timeout=10).models[0].name == "shapes"
    finally:
        srv.stop(0)


def test_an_idle_connection_is_closed_and_the_client_reconnects():
    srv = start_with_connections(max_connection_idle_ms=300)
    try:
        channel = grpc.insecure_channel(srv.address)
        stub = service_pb2_grpc.ExplainerStub(channel)
        stub.ListModels(service_pb2.ListModelsRequest(), timeout=10)
        states = []
        channel.subscribe(states.append)
        deadline = time.monotonic() + 3
        while grpc.ChannelConnectivity.IDLE not in states:
            assert time.monotonic() < deadline, f"the idle connection stayed open: {states}"
            time.sleep(0.05)
        assert stub.ListModels(service_pb2.ListModelsRequest(), timeout=10).models[0].name == "shapes"
    finally:
        srv.stop(0)


def slow_decoding(monkeypatch, seconds: float) -> dict:
    """Make every image decode take `seconds` more, and count decodes: how many ran, and the most at once."""
    from onnxplain.kernels import images

    decode, lock = images.decode, threading.Lock()
    counts = {"now": 0, "most": 0, "done": 0}

    def slow(data, max_pixels):
        with lock:
            counts["now"] += 1
            counts["most"] = max(counts["most"], counts["now"])
        try:
            time.sleep(seconds)
            return decode(data, max_pixels)
        finally:
            with lock:
                counts["now"] -= 1
                counts["done"] += 1

    monkeypatch.setattr(images, "decode", slow)
    return counts


def test_images_are_decoded_inside_the_compute_slot(monkeypatch):
    # a decoded 40-Mpx image holds ~120 MB: decoding is bounded by the compute slots (one here), not by the
    # threads that calls can occupy
    srv = start([default_model_config()], max_concurrent_jobs=1, max_queued_jobs=8)
    try:
        counts = slow_decoding(monkeypatch, 0.1)
        stub = service_pb2_grpc.ExplainerStub(grpc.insecure_channel(srv.address))
        answers = []

        def predict():
            answers.append(stub.Predict(service_pb2.PredictRequest(
                model="shapes", images=[tensor_pb2.Image(encoded=sample_png())] * 2, top_k=1), timeout=60))

        callers = [threading.Thread(target=predict) for _ in range(4)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(60)
        assert len(answers) == 4 and counts["done"] == 8
        assert counts["most"] == 1, f"{counts['most']} images decoded at once with one compute slot"
    finally:
        srv.stop(0)


def test_decoding_stops_when_the_caller_is_gone(monkeypatch):
    srv = start([default_model_config()])
    try:
        counts = slow_decoding(monkeypatch, 0.25)
        stub = service_pb2_grpc.ExplainerStub(grpc.insecure_channel(srv.address))
        with pytest.raises(grpc.RpcError) as caught:
            stub.Predict(service_pb2.PredictRequest(model="shapes", images=[tensor_pb2.Image(encoded=sample_png())] * 20),
                         timeout=0.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for_calls(srv, 10, "the call was not recorded as DEADLINE_EXCEEDED", rpc="Predict",
                       code="DEADLINE_EXCEEDED")
        # ~2 images fit in the 0.5 s deadline, and the one being decoded when it passed ends; not all 20
        assert counts["done"] <= 6, f"{counts['done']} of 20 images decoded for a caller that had gone"
    finally:
        srv.stop(0)


def test_an_image_that_drives_the_model_out_of_float_range_is_invalid(faulty_server):
    stub = service_pb2_grpc.ExplainerStub(grpc.insecure_channel(faulty_server.address))
    huge = tensor_pb2.Image(tensor=tensors.to_proto(np.full((3, 96, 96), 3e38, np.float32)))   # finite; logits NaN
    images = [tensor_pb2.Image(encoded=sample_png()), huge]
    calls = {
        "Predict": lambda: stub.Predict(service_pb2.PredictRequest(model="shapes", images=images), timeout=60),
        "Explain": lambda: list(stub.Explain(service_pb2.ExplainRequest(
            model="shapes", images=images, methods=[methods_pb2.MethodSpec(method="gradcam")]), timeout=60)),
        "Evaluate": lambda: stub.Evaluate(service_pb2.EvaluateRequest(
            model="shapes", images=images, methods=[methods_pb2.MethodSpec(method="cam")],
            metrics=[methods_pb2.AVERAGE_DROP]), timeout=60),
    }
    for rpc, call in calls.items():
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, rpc
        assert caught.value.details().startswith("images[1]: ") and "not finite" in caught.value.details(), rpc


def test_a_sigterm_taken_by_another_thread_still_stops_the_server(tmp_path):
    """The kernel may hand a process's SIGTERM to any of its threads; Python runs the handler in the main thread
    only when that thread runs bytecode. With an untimed wait there the server never stopped (reproduced by
    sending the signal to a gRPC thread's id)."""
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "onnxplain.server.main", "--port", "0", "--grace", "5"],
                            cwd=tmp_path, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=log, text=True)
    try:
        assert "serving" in proc.stdout.readline()
        others = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task") if int(t) != proc.pid]
        assert others
        os.kill(others[-1], signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


# ----------------------------------------------------------------------------- long-lived streams, the thread pool

def open_watch(address: str):
    """A health Watch on its own connection, open once its first answer arrived (its channel, its stream)."""
    channel = grpc.insecure_channel(address)
    stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
    assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
    return channel, stream


def open_reflection(address: str):
    """A reflection stream on its own connection, kept open after its first answer (its channel, its stream);
    `None` when the server refused it, RESOURCE_EXHAUSTED."""
    import queue

    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = grpc.insecure_channel(address)
    requests = queue.Queue()
    requests.put(reflection_pb2.ServerReflectionRequest(list_services=""))
    stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter(requests.get, None),
                                                                                    timeout=60)
    try:
        answer = next(stream)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
        assert "limits.max_reflection_streams" in exc.details()
        channel.close()
        return None
    assert "onnxplain.v1.Explainer" in [s.name for s in answer.list_services_response.service]
    return channel, stream


def close(opened) -> None:
    for channel, stream in opened:
        stream.cancel()
        channel.close()


def test_health_watch_streams_hold_no_thread_and_reflection_streams_are_limited():
    """Client-side health checking keeps a Watch per connection open for the connection's life. Health's Watch
    answers through a callback and holds no thread, but the server's request-parsing interceptor wrapped it
    without saying so, and every Watch held a thread of gRPC's pool: 18 of them (the default pool then) left
    nothing to answer other calls, health Check included. Reflection streams do hold a thread each; they are
    limited instead."""
    srv = start([default_model_config()], metrics=False)
    watches, reflections = [], []
    try:
        limits = srv.config.limits
        pool = limits.max_concurrent_jobs + limits.max_queued_jobs + limits.max_reflection_streams + 8
        watches = [open_watch(srv.address) for _ in range(pool + 20)]   # more than the pool has threads
        channel = grpc.insecure_channel(srv.address)
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status \
            == health_pb2.HealthCheckResponse.SERVING
        assert limits.max_reflection_streams == 16
        reflections = [open_reflection(srv.address) for _ in range(16)]
        assert None not in reflections
        assert open_reflection(srv.address) is None, "the 17th reflection stream is refused"
        prediction = service_pb2_grpc.ExplainerStub(channel).Predict(service_pb2.PredictRequest(
            model="shapes", images=[tensor_pb2.Image(encoded=sample_png("ring"))], top_k=1), timeout=15)
        assert prediction.predictions[0].top[0].label == "ring", "the server serves other calls meanwhile"
        info = service_pb2_grpc.ExplainerStub(channel).GetModel(service_pb2.GetModelRequest(name="shapes"), timeout=5)
        assert info.limits.max_reflection_streams == 16   # reported with the other limits
        srv.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)   # every Watch still gets the news
        assert all(next(stream).status == health_pb2.HealthCheckResponse.NOT_SERVING for _, stream in watches)
        close(reflections[:1])   # a closed stream gives its place back
        reflections = reflections[1:]
        deadline = time.monotonic() + 10
        while (opened := open_reflection(srv.address)) is None:
            assert time.monotonic() < deadline, "the closed reflection stream's place never came back"
            time.sleep(0.05)
        reflections.append(opened)
    finally:
        close(watches)
        close([r for r in reflections if r is not None])
        srv.stop(0)


def test_a_call_past_the_thread_pool_is_refused_at_once_not_left_waiting(monkeypatch):
    """Every thread busy (here: a reflection stream, a running job and a queued one, with no threads for short
    calls): a Check gets RESOURCE_EXHAUSTED at once; before, it waited unanswered for a thread until its
    deadline."""
    from onnxplain.server import main

    monkeypatch.setattr(main, "SHORT_CALL_THREADS", 0)
    srv = start([default_model_config()], metrics=False, max_concurrent_jobs=1, max_queued_jobs=1,
                max_reflection_streams=1)
    reflection = None
    try:
        reflection = open_reflection(srv.address)
        channel = grpc.insecure_channel(srv.address)
        stub = service_pb2_grpc.ExplainerStub(channel)
        running = stub.Explain(long_explain(), timeout=60)
        assert next(running).WhichOneof("event") == "accepted"   # it holds the slot before the second call starts
        queued = stub.Explain(long_explain(), timeout=60)
        deadline = time.monotonic() + 10
        while sum(a.queued for a in srv.explainer.admissions.values()) < 1:   # the second call waits for the slot
            assert time.monotonic() < deadline, "the second Explain never queued"
            time.sleep(0.02)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - started < 2
        running.cancel()
        queued.cancel()
        deadline = time.monotonic() + 10
        while True:   # the cancelled calls give their threads back
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        if reflection is not None:
            close([reflection])
        srv.stop(0)
