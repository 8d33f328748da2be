"""Every RPC through the real client against a real server on loopback: answers, streaming order, every
validation error with its status code (each followed by a successful call on the same server), capacity,
cancellation, deadlines, health and reflection."""

from __future__ import annotations

import io
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from onnxplain import tensors
from onnxplain.client import Accepted, Client, Done, MapResult, Progress
from onnxplain.v1 import methods_pb2, service_pb2, tensor_pb2

from support import SHARED, default_model_config, needs_shared, png_bytes, sample_png, start_server


def occlusion(**params) -> methods_pb2.MethodSpec:
    return methods_pb2.MethodSpec(occlusion=methods_pb2.OcclusionParams(**params))


def explain_request(**overrides) -> service_pb2.ExplainRequest:
    request = service_pb2.ExplainRequest(model="shapes", images=[tensor_pb2.Image(encoded=sample_png())],
                                         methods=[occlusion(window=24, stride=24)])
    for key, value in overrides.items():
        if isinstance(value, list):
            request.ClearField(key)
            getattr(request, key).extend(value)
        else:
            getattr(request, key).CopyFrom(value) if hasattr(value, "DESCRIPTOR") else setattr(request, key, value)
    return request


def drain(client: Client, request) -> list:
    return list(client.explain_call(request))


def assert_still_serving(client: Client) -> None:
    prediction = client.predict("shapes", [sample_png()], top_k=1)[0]
    assert prediction.top[0].label == "star"


# ------------------------------------------------------------------------------------------------ answers

def test_list_models(client):
    models = {m.name: m for m in client.models()}
    assert "shapes" in models
    assert models["shapes"].num_classes == len(client.model("shapes").labels)
    assert models["shapes"].execution_provider == "CPUExecutionProvider"


@needs_shared
def test_get_model_describes_efficientnet(client):
    info = client.model("efficientnet")
    assert [(t.name, list(t.shape)) for t in info.inputs] == [("input", [-1, 3, 224, 224])]
    assert info.score_tensor == "logits" and info.num_classes == 1000 and info.labels[285] == "Egyptian cat"
    pre = info.preprocessing
    assert (pre.layout, pre.fit, pre.input_height, pre.input_width) == ("NCHW", "center_crop", 224, 224)
    assert list(pre.mean) == [127.5] * 3 and list(pre.std) == [128.0] * 3
    defaults = [layer for layer in info.layers if layer.is_default]
    assert len(defaults) == 1 and list(defaults[0].shape) == [-1, 1280, 7, 7]
    assert info.execution_provider == "CPUExecutionProvider"
    assert info.limits.max_batch == 32 and info.limits.max_images == 64


def test_get_model_unknown_is_not_found(client):
    with pytest.raises(grpc.RpcError) as err:
        client.model("nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "shapes" in err.value.details()


def test_list_methods_declares_occlusion_parameters(client):
    methods = {m.name: m for m in client.methods()}
    params = {p.name: p for p in methods["occlusion"].params}
    assert params["window"].default_number == 16 and params["window"].minimum == 1
    assert params["stride"].type == methods_pb2.ParamInfo.TYPE_INT
    assert params["baseline"].type == methods_pb2.ParamInfo.TYPE_FLOAT


@needs_shared
def test_predict_shared_photos(client):
    photos = [SHARED / "images" / n for n in ("chelsea.jpg", "coffee.jpg", "rocket.jpg")]
    top = [p.top[0].class_id for p in client.predict("efficientnet", photos, top_k=3)]
    assert top[0] in (285, 282, 281) and top[1:] == [967, 657]


def test_predict_probabilities_sum_to_one_over_all_classes(client):
    n = client.model("shapes").num_classes
    prediction = client.predict("shapes", [sample_png()], top_k=n)[0]
    assert len(prediction.top) == n
    assert sum(s.probability for s in prediction.top) == pytest.approx(1.0, abs=1e-5)
    assert [s.logit for s in prediction.top] == sorted((s.logit for s in prediction.top), reverse=True)


def test_explain_streams_accepted_progress_maps_done(client):
    events = list(client.explain("shapes", [sample_png(), sample_png("ring")],
                                 [("occlusion", {"window": 24, "stride": 24})], top_k=2, request_id="r-1"))
    assert isinstance(events[0], Accepted) and isinstance(events[-1], Done)
    accepted, done = events[0], events[-1]
    assert accepted.request_id == "r-1" and accepted.total_maps == 4
    assert [len(i.targets) for i in accepted.images] == [2, 2]
    assert accepted.images[0].targets[0].label == "star"
    maps = [e for e in events if isinstance(e, MapResult)]
    assert len(maps) == 4 and all(m.final and m.map.shape == (96, 96) and m.map.dtype == np.float32 for m in maps)
    assert {(m.image_index, m.class_id) for m in maps} == {
        (i.image_index, t.class_id) for i in accepted.images for t in i.targets}
    progress = [e for e in events if isinstance(e, Progress)]
    assert progress and progress[-1].done == progress[-1].total == 16   # (96 - 24) / 24 + 1 = 4 -> 4 x 4 windows
    # one forward for the targets (both images in one batch), then 16 occluded inputs per image
    assert done.forward_samples == 2 + 2 * 16 and done.backward_samples == 0 and done.maps == 4


def test_partial_maps_come_before_the_final_map(client):
    events = list(client.explain("shapes", [sample_png()], [("occlusion", {"window": 8, "stride": 4})],
                                 partial_maps=True))
    maps = [e for e in events if isinstance(e, MapResult)]
    assert len(maps) >= 2 and not maps[0].final and maps[-1].final and sum(m.final for m in maps) == 1


def test_normalisation_is_an_output_option(client):
    def final_map(normalization):
        return next(e.map for e in client.explain("shapes", [sample_png()], ["occlusion"], normalization=normalization)
                    if isinstance(e, MapResult))
    raw, minmax, maxabs = final_map("none"), final_map("minmax"), final_map("maxabs")
    assert raw.max() > 1.0  # raw logit drops, not rescaled
    np.testing.assert_allclose(minmax, (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-6)
    np.testing.assert_allclose(maxabs, raw / np.abs(raw).max(), atol=1e-6)


def test_minmax_normalises_a_map_spanning_the_float32_range():
    """hi - lo of a map spanning +-3e38 overflows float32: the map came out [[0, 0], [nan, nan]]."""
    from onnxplain.server import service

    m = np.array([[-3e38, 0.0], [1e38, 3e38]], np.float32)
    out = service.normalise(m, methods_pb2.OutputOptions.MINMAX)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.0, 0.5], [2 / 3, 1.0]], rtol=1e-6)
    np.testing.assert_array_equal(service.normalise(np.full((2, 2), 7, np.float32), methods_pb2.OutputOptions.MINMAX),
                                  np.zeros((2, 2), np.float32))


def test_tensor_input_gives_the_same_map_as_the_encoded_image(client):
    info = client.model("shapes").preprocessing
    img = np.asarray(Image.open(io.BytesIO(sample_png())).convert("RGB").resize((96, 96), Image.Resampling.BILINEAR),
                     np.float32)
    x = ((img * info.scale - np.array(info.mean, np.float32)) / np.array(info.std, np.float32)).transpose(2, 0, 1)
    maps = [next(e.map for e in client.explain("shapes", [image], ["occlusion"], targets=[0])
                 if isinstance(e, MapResult)) for image in (sample_png(), np.ascontiguousarray(x, np.float32))]
    np.testing.assert_allclose(maps[0], maps[1], atol=1e-4)


# ------------------------------------------------------------------------------------------------ errors

def _big_png() -> bytes:
    return png_bytes(np.zeros((7000, 7000), np.uint8))  # 49 Mpx, compresses to a few kB


def _tensor_image(array) -> tensor_pb2.Image:
    return tensor_pb2.Image(tensor=tensors.to_proto(array))


GOOD_X = np.zeros((3, 96, 96), np.float32)
SMALL_X = tensors.to_proto(np.zeros((3, 8, 8), np.float32))
HUGE_EMPTY = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2**62, 2**62, 0])


def integrated_gradients(**params) -> methods_pb2.MethodSpec:
    return methods_pb2.MethodSpec(integrated_gradients=methods_pb2.IntegratedGradientsParams(**params))


ERRORS = {
    "unknown model": (dict(model="nope"), grpc.StatusCode.NOT_FOUND, "models: ["),
    "unknown method": (dict(methods=[methods_pb2.MethodSpec(method="magic")]), grpc.StatusCode.NOT_FOUND, "occlusion"),
    "no method": (dict(methods=[]), grpc.StatusCode.INVALID_ARGUMENT, "at least 1 method"),
    "method and params disagree": (dict(methods=[methods_pb2.MethodSpec(method="gradcam", occlusion={})]),
                                   grpc.StatusCode.INVALID_ARGUMENT, "parameters are for 'occlusion'"),
    "class id too large": (dict(targets=service_pb2.Targets(class_ids=[8])), grpc.StatusCode.INVALID_ARGUMENT, "[0, 7]"),
    "negative class id": (dict(targets=service_pb2.Targets(class_ids=[-1])), grpc.StatusCode.INVALID_ARGUMENT, "[0, 7]"),
    "unknown class name": (dict(targets=service_pb2.Targets(class_names=["dog"])), grpc.StatusCode.INVALID_ARGUMENT,
                           "'dog'"),
    "top_k too large": (dict(targets=service_pb2.Targets(top_k=99)), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    "corrupt image": (dict(images=[tensor_pb2.Image(encoded=b"\x89PNG\r\n\x1a\n garbage")]),
                      grpc.StatusCode.INVALID_ARGUMENT, "images[0]"),
    "truncated image": (dict(images=[tensor_pb2.Image(encoded=sample_png()[:300])]),
                        grpc.StatusCode.INVALID_ARGUMENT, "images[0]"),
    "empty image": (dict(images=[tensor_pb2.Image(encoded=b"")]), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    "image without source": (dict(images=[tensor_pb2.Image(name="x")]), grpc.StatusCode.INVALID_ARGUMENT, "images[0]"),
    "no images": (dict(images=[]), grpc.StatusCode.INVALID_ARGUMENT, "at least 1 image"),
    "too many images": (dict(images=[tensor_pb2.Image(encoded=b"x")] * 65), grpc.StatusCode.INVALID_ARGUMENT,
                        "at most 64"),
    "too many pixels": (dict(images=[tensor_pb2.Image(encoded=_big_png())]), grpc.StatusCode.INVALID_ARGUMENT,
                        "limit is 40000000"),
    "wrong tensor shape": (dict(images=[_tensor_image(np.zeros((3, 64, 64), np.float32))]),
                           grpc.StatusCode.INVALID_ARGUMENT, "[3, 96, 96]"),
    "negative tensor shape": (dict(images=[tensor_pb2.Image(tensor=tensor_pb2.Tensor(
        dtype=tensor_pb2.DTYPE_FLOAT32, shape=[3, -96, 96]))]), grpc.StatusCode.INVALID_ARGUMENT, ">= 0"),
    "wrong tensor dtype": (dict(images=[_tensor_image(GOOD_X.astype(np.float64))]),
                           grpc.StatusCode.INVALID_ARGUMENT, "float32"),
    "tensor bytes disagree": (dict(images=[tensor_pb2.Image(tensor=tensor_pb2.Tensor(
        dtype=tensor_pb2.DTYPE_FLOAT32, shape=[3, 96, 96], data=b"\0" * 12))]), grpc.StatusCode.INVALID_ARGUMENT,
        "needs 110592"),
    "NaN tensor": (dict(images=[_tensor_image(np.where(np.arange(GOOD_X.size).reshape(GOOD_X.shape) == 7, np.nan,
                                                       GOOD_X).astype(np.float32))]),
                   grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    "Inf tensor": (dict(images=[_tensor_image(np.full_like(GOOD_X, np.inf))]), grpc.StatusCode.INVALID_ARGUMENT, "Inf"),
    "window below bounds": (dict(methods=[occlusion(window=0)]), grpc.StatusCode.INVALID_ARGUMENT, "[1, 4096]"),
    "window above input": (dict(methods=[occlusion(window=97)]), grpc.StatusCode.INVALID_ARGUMENT, "[1, 96]"),
    "NaN baseline": (dict(methods=[occlusion(baseline=float("nan"))]), grpc.StatusCode.INVALID_ARGUMENT, "finite"),
    "huge baseline": (dict(methods=[occlusion(baseline=1e30)]), grpc.StatusCode.INVALID_ARGUMENT, "1e+06"),
    "layer for a method without layers": (dict(methods=[methods_pb2.MethodSpec(method="occlusion", layer="x")]),
                                          grpc.StatusCode.INVALID_ARGUMENT, "uses no layer"),
    # 0 elements and 0 bytes, but numpy cannot make an array of it: refused before the reshape
    "overflowing tensor shape": (dict(images=[tensor_pb2.Image(tensor=HUGE_EMPTY)]), grpc.StatusCode.INVALID_ARGUMENT,
                                 "images[0].tensor.shape"),
    "overflowing baseline shape": (dict(methods=[integrated_gradients(baseline="custom", baseline_tensor=HUGE_EMPTY)]),
                                   grpc.StatusCode.INVALID_ARGUMENT,
                                   "methods[0].integrated_gradients.baseline_tensor.shape"),
    "baseline of the wrong shape": (dict(methods=[integrated_gradients(baseline="custom", baseline_tensor=SMALL_X)]),
                                    grpc.StatusCode.INVALID_ARGUMENT,
                                    "methods[0].integrated_gradients.baseline_tensor has shape [3, 8, 8]"),
    "baseline_tensor without baseline custom": (dict(methods=[integrated_gradients(baseline="zero",
                                                                                   baseline_tensor=SMALL_X)]),
                                                grpc.StatusCode.INVALID_ARGUMENT, "baseline = custom"),
    "unknown normalization": (dict(output=methods_pb2.OutputOptions(normalization=99)),
                              grpc.StatusCode.INVALID_ARGUMENT, "output.normalization must be one of"),
    "image name too long": (dict(images=[tensor_pb2.Image(encoded=sample_png(), name="n" * 257)]),
                            grpc.StatusCode.INVALID_ARGUMENT, "images[0].name has 257 characters"),
    # the client's value is quoted, cut so that the status fits gRPC's metadata limit (the real code arrives)
    "20,000-character model name": (dict(model="m" * 20_000), grpc.StatusCode.NOT_FOUND, "characters, cut"),
    "20,000-character layer name": (dict(methods=[methods_pb2.MethodSpec(method="gradcam", layer="l" * 20_000)]),
                                    grpc.StatusCode.NOT_FOUND, "characters, cut"),
    # integer bounds are printed exactly, not as 2.14748e+09
    "seed above bounds": (dict(methods=[methods_pb2.MethodSpec(smoothgrad=methods_pb2.SmoothGradParams(seed=2**31))]),
                          grpc.StatusCode.INVALID_ARGUMENT, "[0, 2147483647]"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_request_gets_its_status_and_the_server_keeps_serving(client, case):
    overrides, code, fragment = ERRORS[case]
    with pytest.raises(grpc.RpcError) as err:
        drain(client, explain_request(**overrides))
    assert err.value.code() == code, err.value.details()
    assert fragment in err.value.details()
    assert_still_serving(client)


def test_a_tensor_error_names_its_field_once(client):
    bad = tensors.to_proto(np.zeros((1, 3, 96, 96), np.float32))
    bad.data = bad.data[:-3]
    with pytest.raises(grpc.RpcError) as err:
        drain(client, explain_request(images=[tensor_pb2.Image(tensor=bad)]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("images[0].tensor"), err.value.details()   # not "images[0]: images[0]..."


def test_overflowing_tensor_shapes_are_invalid_in_predict_and_evaluate(client):
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Predict(service_pb2.PredictRequest(model="shapes", images=[tensor_pb2.Image(tensor=HUGE_EMPTY)]),
                            timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "images[0].tensor.shape" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Evaluate(service_pb2.EvaluateRequest(
            model="shapes", images=[tensor_pb2.Image(encoded=sample_png())], metrics=[methods_pb2.DELETION],
            maps=[methods_pb2.Map(class_id=0, map=HUGE_EMPTY)]), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "maps[0].map.shape" in err.value.details()
    assert_still_serving(client)


def test_a_bad_baseline_is_refused_before_any_event(client):
    """The baseline's shape is a parameter check: no `accepted`, no map of an earlier method, then a failure."""
    events = []
    with pytest.raises(grpc.RpcError) as err:
        for event in client.explain_call(explain_request(methods=[
                methods_pb2.MethodSpec(method="gradcam"),
                integrated_gradients(steps=4, baseline="custom", baseline_tensor=SMALL_X)])):
            events.append(event)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "methods[1].integrated_gradients.baseline_tensor" in err.value.details()
    assert "[3, 96, 96]" in err.value.details() and events == []
    assert_still_serving(client)


@pytest.mark.parametrize("field, value", [("normalization", 99), ("normalization", -3), ("resolution", 99)])
def test_unknown_output_enum_values_are_refused(field, value):
    """proto3 keeps an unknown enum value as a number, which read as the default (validation.output_options)."""
    from onnxplain.server import validation

    with pytest.raises(validation.RequestError) as err:
        validation.output_options(methods_pb2.OutputOptions(**{field: value}))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"output.{field} must be one of" in err.value.message and f"got {value}" in err.value.message
    assert "MINMAX (2)" in err.value.message if field == "normalization" else "LAYER (2)" in err.value.message
    validation.output_options(methods_pb2.OutputOptions(normalization=methods_pb2.OutputOptions.MAX_ABS,
                                                        resolution=methods_pb2.OutputOptions.LAYER))


def test_image_names_are_capped():
    """Image.name is repeated in every event of the call (validation.image_name)."""
    from onnxplain.server import validation

    with pytest.raises(validation.RequestError) as err:
        validation.image_name(tensor_pb2.Image(name="n" * 257), 3)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.message == "images[3].name has 257 characters; at most 256 are allowed"
    assert validation.image_name(tensor_pb2.Image(name="n" * 256), 3) == "n" * 256
    assert validation.image_name(tensor_pb2.Image(), 3) == "image3"


def test_predict_errors(client):
    with pytest.raises(grpc.RpcError) as err:
        client.predict("shapes", [sample_png()], top_k=100)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "[1, 8]" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.predict("shapes", [b"not an image"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_still_serving(client)


def test_evaluate_without_images_is_refused(client):
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Evaluate(service_pb2.EvaluateRequest(model="shapes"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image" in err.value.details()
    assert_still_serving(client)


def test_message_over_the_size_limit_is_refused(server):
    small = start_server([default_model_config()], max_message_bytes=50_000)
    try:
        with Client(small.address, timeout=30) as c:
            with pytest.raises(grpc.RpcError) as err:
                drain(c, explain_request(images=[tensor_pb2.Image(encoded=b"\0" * 60_000)]))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert c.predict("shapes", [sample_png()])[0].top[0].label == "star"
    finally:
        small.stop(0)


# ------------------------------------------------------------------------------------------------ capacity and cancellation

LONG = dict(methods=[occlusion(window=1, stride=1)])   # 9216 occluded inputs: minutes of work if not stopped


@pytest.fixture(scope="module")
def narrow_server():
    """One job at a time, none queued, small batches: capacity and cancellation are observable."""
    srv = start_server([default_model_config()], max_concurrent_jobs=1, max_queued_jobs=0, max_batch=8)
    yield srv
    srv.stop(0)


def _record(srv, job_id):
    return next(r for r in srv.explainer.jobs if r.job_id == job_id)


def _wait_ended(record, timeout=10.0):
    deadline = time.time() + timeout
    while (record.samples_at_end is None or record.status == "running") and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)   # anything still running would add samples now


def test_over_capacity_is_resource_exhausted_at_once(narrow_server):
    with Client(narrow_server.address, timeout=60) as c:
        call = c.explain_call(explain_request(**LONG))
        first = next(call)
        assert first.WhichOneof("event") == "accepted"
        started = time.perf_counter()
        with pytest.raises(grpc.RpcError) as err:
            drain(c, explain_request())
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.perf_counter() - started < 2.0
        call.cancel()
        _wait_ended(_record(narrow_server, first.accepted.job_id))
        assert [e.WhichOneof("event") for e in drain(c, explain_request())][-1] == "done"


def test_cancel_stops_the_work_within_one_batch(narrow_server):
    with Client(narrow_server.address, timeout=60) as c:
        call = c.explain_call(explain_request(**LONG))
        job_id = next(call).accepted.job_id
        for event in call:
            if event.WhichOneof("event") == "progress" and event.progress.done >= 40:
                break
        call.cancel()
        record = _record(narrow_server, job_id)
        _wait_ended(record)
        assert record.status == "cancelled"
        assert record.samples_at_end is not None
        assert record.samples() - record.samples_at_end <= 8, "work went on for more than one batch after cancel"
        assert record.samples() < 1000
        assert [e.WhichOneof("event") for e in drain(c, explain_request())][-1] == "done"


def test_deadline_stops_the_work_within_one_batch(narrow_server):
    with Client(narrow_server.address) as c:
        call = c.explain_call(explain_request(**LONG), timeout=1.0)
        with pytest.raises(grpc.RpcError) as err:
            for _ in call:
                pass
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        record = narrow_server.explainer.jobs[-1]
        _wait_ended(record)
        assert record.status == "cancelled"
        assert record.samples() - record.samples_at_end <= 8
        assert [e.WhichOneof("event") for e in drain(c, explain_request())][-1] == "done"


def test_queued_call_runs_when_the_slot_frees():
    srv = start_server([default_model_config()], max_concurrent_jobs=1, max_queued_jobs=1, max_batch=8)
    try:
        with Client(srv.address, timeout=60) as c:
            first = c.explain_call(explain_request(methods=[occlusion(window=2, stride=2)]))
            next(first)
            result = {}
            waiter = threading.Thread(target=lambda: result.setdefault("events", drain(c, explain_request())))
            waiter.start()
            list(first)
            waiter.join(60)
            done = result["events"][-1].done
            assert done.maps == 1 and done.timings.queue_ms > 0
    finally:
        srv.stop(0)


# ------------------------------------------------------------------------------------------------ health and reflection

def test_health_reports_serving(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "onnxplain.v1.Explainer"):
            status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_and_describes_the_service(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
    from google.protobuf.descriptor_pool import DescriptorPool

    with grpc.insecure_channel(server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"onnxplain.v1.Explainer", "grpc.health.v1.Health"} <= services
        pool = DescriptorPool(database)
        explainer = pool.FindServiceByName("onnxplain.v1.Explainer")
        assert {m.name for m in explainer.methods} == {"ListModels", "GetModel", "ListMethods", "Predict", "Explain",
                                                        "Evaluate"}
        assert explainer.methods_by_name["Explain"].output_type.full_name == "onnxplain.v1.ExplainEvent"
