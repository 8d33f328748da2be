"""Fuzz: ≥ 10,000 generated requests (hypothesis, derandomized) sent as raw bytes to a real loopback server
through generic stubs: random bytes, mutated valid messages, and structured requests with corrupt and truncated
images, extreme and negative shapes, NaN/Inf tensors, wrong dtypes and huge parameter values, and valid requests
with one field perturbed (parameters at and beyond their bounds, NaN/Inf, targets, layers, output options, images)
so that a good share of the requests run methods. Every answer must
be OK or one of the codes the contract documents for that RPC (service.proto), the server must not crash, and
a valid request must still succeed afterwards."""

from __future__ import annotations

import os
import struct
import time
from importlib.resources import files

import grpc
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxplain.v1 import methods_pb2, service_pb2, tensor_pb2

from production import metric, scrape, start
from support import default_model_config

C = grpc.StatusCode
COMMON = {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.RESOURCE_EXHAUSTED, C.DEADLINE_EXCEEDED}
# The codes service.proto documents per RPC (UNAVAILABLE, UNAUTHENTICATED and PERMISSION_DENIED come from the
# transport and the auth layer, which this server does not exercise here).
DOCUMENTED = {
    "ListModels": {C.OK, C.INVALID_ARGUMENT},
    "GetModel": {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND},
    "ListMethods": {C.OK, C.INVALID_ARGUMENT},
    "Predict": COMMON | {C.CANCELLED},
    "Explain": COMMON | {C.CANCELLED},
    "Evaluate": COMMON | {C.CANCELLED},
}
STREAMING = {"Explain"}
REQUESTS = {"ListModels": service_pb2.ListModelsRequest, "GetModel": service_pb2.GetModelRequest,
            "ListMethods": service_pb2.ListMethodsRequest, "Predict": service_pb2.PredictRequest,
            "Explain": service_pb2.ExplainRequest, "Evaluate": service_pb2.EvaluateRequest}
PER_EXAMPLE = 25
EXAMPLES = int(os.environ.get("ONNXPLAIN_FUZZ_EXAMPLES", "400"))   # x 25 requests = 10,000
PNG = (files("onnxplain.default_model") / "samples" / "star.png").read_bytes()
FINITE = st.floats(allow_nan=False, allow_infinity=False, width=32)
ANY_FLOAT = st.floats(width=32) | st.sampled_from([float("nan"), float("inf"), -float("inf"), 3.4e38, -3.4e38])
ANY_INT32 = st.integers(-2**31, 2**31 - 1)
EXTREME_INT32 = st.sampled_from([0, -1, 1, 2**31 - 1, -2**31, 4096, 100000]) | ANY_INT32


def tensor_messages() -> st.SearchStrategy:
    shape = st.lists(st.sampled_from([-5, -1, 0, 1, 3, 32, 96, 100, 2**31, 2**62]) | st.integers(-10, 200),
                     max_size=5)
    special = st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 1e30])

    @st.composite
    def build(draw):
        dims = draw(shape)
        dtype = draw(st.integers(0, 20))
        count = draw(st.integers(0, 64))
        data = draw(st.binary(max_size=64)) if draw(st.booleans()) else np.full(
            count, draw(special), np.float32).tobytes()
        return tensor_pb2.Tensor(dtype=dtype, shape=dims, data=data)

    return build()


def images() -> st.SearchStrategy:
    encoded = st.sampled_from([PNG, PNG[:len(PNG) // 2], PNG[:8], b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
                               b"\xff\xd8\xff\xe0garbage"]) | st.binary(max_size=64)
    sample = np.random.default_rng(0).normal(size=(3, 96, 100)).astype(np.float32)
    bad_sample = sample.copy()
    bad_sample[0, 0, 0] = np.nan

    def tensor(a):
        return tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=list(a.shape), data=a.tobytes())

    return st.one_of(
        encoded.map(lambda b: tensor_pb2.Image(encoded=b)),
        tensor_messages().map(lambda t: tensor_pb2.Image(tensor=t)),
        st.sampled_from([tensor_pb2.Image(tensor=tensor(bad_sample)), tensor_pb2.Image(name="none"),
                         tensor_pb2.Image(tensor=tensor(sample[:, :50]))]))


def method_specs() -> st.SearchStrategy:
    names = st.sampled_from(["occlusion", "gradient", "gradcam", "rise", "integrated_gradients", "smoothgrad",
                             "opticam", "cam", "scorecam", "no_such_method", ""]) | st.text(max_size=8)
    layer = st.sampled_from(["", "no/such/layer"]) | st.text(max_size=6)
    typed = st.one_of(
        st.builds(methods_pb2.OcclusionParams, window=EXTREME_INT32, stride=EXTREME_INT32, baseline=ANY_FLOAT)
        .map(lambda p: methods_pb2.MethodSpec(occlusion=p)),
        st.builds(methods_pb2.RiseParams, masks=EXTREME_INT32, grid=EXTREME_INT32, keep_probability=ANY_FLOAT)
        .map(lambda p: methods_pb2.MethodSpec(rise=p)),
        st.builds(methods_pb2.IntegratedGradientsParams, steps=EXTREME_INT32,
                  baseline_tensor=tensor_messages()).map(lambda p: methods_pb2.MethodSpec(integrated_gradients=p)),
        st.builds(methods_pb2.SmoothGradParams, samples=EXTREME_INT32, noise_level=ANY_FLOAT)
        .map(lambda p: methods_pb2.MethodSpec(smoothgrad=p)),
        st.builds(methods_pb2.OptiCamParams, iterations=EXTREME_INT32, learning_rate=ANY_FLOAT)
        .map(lambda p: methods_pb2.MethodSpec(opticam=p)))
    plain = st.builds(methods_pb2.MethodSpec, method=names, layer=layer)
    return st.one_of(plain, typed)


def targets() -> st.SearchStrategy:
    return st.builds(service_pb2.Targets, class_ids=st.lists(EXTREME_INT32, max_size=3),
                     class_names=st.lists(st.sampled_from(["star", "ring", "nope"]) | st.text(max_size=4),
                                          max_size=2),
                     top_k=EXTREME_INT32)


MODEL = st.one_of(st.just("shapes"), st.just("shapes"), st.sampled_from(["", "efficientnet", "../etc/passwd"]),
                  st.text(max_size=10))


def structured() -> st.SearchStrategy:
    explain = st.builds(service_pb2.ExplainRequest, model=MODEL, images=st.lists(images(), max_size=3),
                        targets=targets(), methods=st.lists(method_specs(), max_size=3),
                        output=st.builds(methods_pb2.OutputOptions, normalization=st.integers(-3, 9),
                                         resolution=st.integers(-3, 9), partial_maps=st.booleans()),
                        request_id=st.text(max_size=20))
    predict = st.builds(service_pb2.PredictRequest, model=MODEL, images=st.lists(images(), max_size=3),
                        top_k=EXTREME_INT32)
    get_model = st.builds(service_pb2.GetModelRequest, name=MODEL)
    evaluate = st.builds(service_pb2.EvaluateRequest, model=MODEL, images=st.lists(images(), max_size=2),
                         methods=st.lists(method_specs(), max_size=2),
                         maps=st.lists(st.builds(methods_pb2.Map, image_index=EXTREME_INT32, class_id=EXTREME_INT32,
                                                 map=tensor_messages()), max_size=2),
                         metrics=st.lists(st.integers(-2, 12), max_size=3),
                         options=st.builds(service_pb2.MetricOptions, steps=EXTREME_INT32, blur_sigma=ANY_FLOAT,
                                           boxes=st.lists(st.builds(service_pb2.Box, image_index=EXTREME_INT32,
                                                                    x0=ANY_FLOAT, y0=ANY_FLOAT, x1=ANY_FLOAT,
                                                                    y1=ANY_FLOAT), max_size=2)))
    return st.one_of(explain.map(lambda m: ("Explain", m.SerializeToString())),
                     predict.map(lambda m: ("Predict", m.SerializeToString())),
                     get_model.map(lambda m: ("GetModel", m.SerializeToString())),
                     evaluate.map(lambda m: ("Evaluate", m.SerializeToString())))


VALID = {
    "Predict": service_pb2.PredictRequest(model="shapes", images=[tensor_pb2.Image(encoded=PNG)], top_k=3),
    "Explain": service_pb2.ExplainRequest(model="shapes", images=[tensor_pb2.Image(encoded=PNG)], methods=[
        methods_pb2.MethodSpec(occlusion=methods_pb2.OcclusionParams(window=48, stride=48))]),
    "GetModel": service_pb2.GetModelRequest(name="shapes"),
    "Evaluate": service_pb2.EvaluateRequest(model="shapes", images=[tensor_pb2.Image(encoded=PNG)], methods=[
        methods_pb2.MethodSpec(method="gradcam")], metrics=[1]),
}


@st.composite
def mutated(draw):
    """A valid request's bytes with bytes flipped, cut, inserted or varints made huge."""
    rpc = draw(st.sampled_from(sorted(VALID)))
    data = bytearray(VALID[rpc].SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "varint", "dup"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            data = data[:at]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "varint":
            data[at:at] = b"\xff" * draw(st.integers(1, 10)) + b"\x01"
        else:
            data += data[:at]
    return rpc, bytes(data)


# Valid requests with one field perturbed: these reach the methods, so that the fuzz exercises running jobs too.
# Cheap valid parameters first (the fuzz server's caps keep any perturbation small: masks, steps, iterations).
CHEAP = {"occlusion": {"window": 32, "stride": 32}, "smoothgrad": {"samples": 2}, "integrated_gradients": {"steps": 4},
         "rise": {"masks": 16}, "opticam": {"iterations": 2, "directions": 4}}
LAYERS = ["", "no/such/layer"]   # plus the model's own layers, filled in by the test from GetModel
INT_EDGES = [0, 1, 2, -1, 3, 7, 8, 31, 32, 33, 63, 64, 65, 96, 97, 1000, 1001, 4096, 4097, 100000, 100001,
             2**31 - 1, -2**31, 2**63 - 1, -2**63]
FLOAT_EDGES = [0.0, -0.0, 1e-5, 1e-4, 0.01, 0.5, 0.99, 1.0, 1.0001, 10.0, 10.5, 1000.0, 1e6, 1.0000001e6, -1.0,
               -1e6, 3.4e38, -3.4e38, 1e-45, float("nan"), float("inf"), -float("inf")]


def _param_value(field, draw):
    from google.protobuf.descriptor import FieldDescriptor as F

    if field.type in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
        return draw(st.sampled_from([v for v in INT_EDGES if -2**31 <= v < 2**31]) | st.integers(-2**31, 2**31 - 1))
    if field.type in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return draw(st.sampled_from(INT_EDGES) | st.integers(-2**63, 2**63 - 1))
    if field.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return draw(st.sampled_from(FLOAT_EDGES) | st.floats(width=32))
    if field.type == F.TYPE_BOOL:
        return draw(st.booleans())
    if field.type == F.TYPE_STRING:
        return draw(st.sampled_from(["plain", "squared", "variance", "black", "zero", "blurred", "custom", "max",
                                     "diff", "auto", "gradient_graph", "finite_differences", "riemann_left",
                                     "gausslegendre", "", "PLAIN", "nope"]) | st.text(max_size=6))
    return None


@st.composite
def valid_perturbed(draw):
    """A valid Explain (sometimes Evaluate) request, then one field perturbed: a method parameter at or beyond its
    bounds (NaN, Inf, huge, negative), the targets, the layer, the output options or the images."""
    from onnxplain.kernels.methods import METHODS

    name = draw(st.sampled_from(sorted(METHODS)))
    spec = methods_pb2.MethodSpec()
    params = getattr(spec, name)
    for key, value in CHEAP.get(name, {}).items():
        setattr(params, key, value)
    params.SetInParent()
    if draw(st.booleans()):   # the plain-name form, half of the time, when the method needs no parameters
        if name not in CHEAP:
            spec = methods_pb2.MethodSpec(method=name)
    request = service_pb2.ExplainRequest(model="shapes", images=[tensor_pb2.Image(encoded=PNG)], methods=[spec],
                                         targets=service_pb2.Targets(class_ids=[draw(st.integers(0, 7))]))
    what = draw(st.sampled_from(["none", "param", "param", "param", "targets", "layer", "output", "images"]))
    if what == "param":
        fields = [f for f in params.DESCRIPTOR.fields if f.message_type is None]
        if fields:
            field = draw(st.sampled_from(fields))
            spec.ClearField("method")
            spec_params = getattr(spec, name)
            spec_params.CopyFrom(params)
            setattr(spec_params, field.name, _param_value(field, draw))
    elif what == "targets":
        request.targets.CopyFrom(draw(st.one_of(
            st.builds(service_pb2.Targets, class_ids=st.lists(st.sampled_from([0, 7, 8, -1, 2**31 - 1, -2**31]),
                                                              max_size=6)),
            st.builds(service_pb2.Targets, top_k=st.sampled_from([0, 1, 4, 5, 8, 9, -1, 2**31 - 1])),
            st.builds(service_pb2.Targets, class_names=st.lists(st.sampled_from(["star", "ring", "", "STAR", "x"]),
                                                                max_size=5)),
            st.just(service_pb2.Targets()))))
    elif what == "layer":
        spec.layer = draw(st.sampled_from(LAYERS) | st.text(max_size=8))
    elif what == "output":
        request.output.CopyFrom(methods_pb2.OutputOptions(
            normalization=draw(st.integers(-1, 4)), resolution=draw(st.integers(-1, 3)),
            partial_maps=draw(st.booleans()), return_attribution=draw(st.booleans())))
    elif what == "images":
        request.images.extend([tensor_pb2.Image(encoded=PNG)] * draw(st.integers(0, 4)))
        if draw(st.booleans()):
            request.images.append(draw(images()))
    if draw(st.integers(0, 4)) == 0:   # the same methods, targets and images scored by Evaluate
        evaluate = service_pb2.EvaluateRequest(model="shapes", images=request.images, methods=request.methods,
                                               targets=request.targets,
                                               metrics=[draw(st.sampled_from([1, 2, 3, 4, 5]))],
                                               options=service_pb2.MetricOptions(steps=draw(st.sampled_from(
                                                   [0, 1, 4, 8, 9217, -1]))))
        return "Evaluate", evaluate.SerializeToString()
    return "Explain", request.SerializeToString()


RANDOM = st.tuples(st.sampled_from(sorted(REQUESTS)), st.binary(max_size=96))
REQUEST = st.one_of(RANDOM, mutated(), structured(), valid_perturbed(), valid_perturbed())


def call(channel, rpc: str, data: bytes) -> grpc.StatusCode:
    path = f"/onnxplain.v1.Explainer/{rpc}"
    identity = dict(request_serializer=None, response_deserializer=None)
    try:
        if rpc in STREAMING:
            for _ in channel.unary_stream(path, **identity)(data, timeout=3):
                pass
        else:
            channel.unary_unary(path, **identity)(data, timeout=3)
        return C.OK
    except grpc.RpcError as exc:
        return exc.code()


def test_fuzz_every_answer_is_documented_and_the_server_survives():
    server = start([default_model_config()], max_batch=64, max_masks=64, max_steps=8, max_iterations=4,
                   max_images=4, max_methods=4, max_targets=4, max_concurrent_jobs=2, max_queued_jobs=4)
    channel = grpc.insecure_channel(server.address)
    seen: dict[tuple[str, grpc.StatusCode], int] = {}
    undocumented: list[tuple[str, grpc.StatusCode, bytes]] = []
    started = time.perf_counter()

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(REQUEST, min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
    def fuzz(batch):
        for rpc, data in batch:
            code = call(channel, rpc, data)
            seen[rpc, code] = seen.get((rpc, code), 0) + 1
            if code not in DOCUMENTED[rpc]:
                undocumented.append((rpc, code, data))

    layers = service_pb2.ModelInfo.FromString(channel.unary_unary("/onnxplain.v1.Explainer/GetModel")(
        VALID["GetModel"].SerializeToString(), timeout=10)).layers
    LAYERS[:] = ["", "no/such/layer", *(layer.name for layer in layers)]

    try:
        fuzz()
        elapsed = time.perf_counter() - started
        total = sum(seen.values())
        samples = scrape(server)
        ran = {rpc: metric(samples, "onnxplain_calls_total", rpc=rpc, code="OK") for rpc in ("Explain", "Evaluate")}
        maps = metric(samples, "onnxplain_maps_total")
        print(f"\nfuzz: {total} requests in {elapsed:.1f} s; answers: "
              + ", ".join(f"{rpc}/{code.name}={n}" for (rpc, code), n in sorted(seen.items(), key=str))
              + f"; ran a method: Explain OK {ran['Explain']:.0f}, Evaluate OK {ran['Evaluate']:.0f}, "
              f"{maps:.0f} final maps")
        assert total >= EXAMPLES * PER_EXAMPLE
        assert not undocumented, undocumented[:5]
        assert metric(samples, "onnxplain_calls_total", code="INTERNAL") == 0, "no fault inside the server"
        # every request is counted in the metrics, the unparsable ones included (+1: the GetModel above)
        assert metric(samples, "onnxplain_calls_total") == total + 1
        # a good share of the requests ran a method (valid requests with one field perturbed)
        assert ran["Explain"] + ran["Evaluate"] >= total // 10, ran
        # still serving: a valid request succeeds
        events = list(channel.unary_stream("/onnxplain.v1.Explainer/Explain")(
            VALID["Explain"].SerializeToString(), timeout=60))
        last = service_pb2.ExplainEvent.FromString(events[-1])
        assert last.WhichOneof("event") == "done" and last.done.maps == 1
    finally:
        server.stop(0)
