"""The Evaluate RPC through a real server: server-computed and client-sent maps score the same, boxes in original
pixels map through the crop, and every bad field is refused with the right status naming it."""

from __future__ import annotations


import grpc
import numpy as np
import pytest

from onnxplain import tensors
from onnxplain.client.client import METRICS
from onnxplain.default_model import shapes
from onnxplain.v1 import methods_pb2, service_pb2, tensor_pb2

from support import png_bytes


@pytest.fixture(scope="module")
def sample():
    s = shapes.render(3, seed=11, size=128)   # a star, 128 px: the server resizes it to the 96 px input
    return png_bytes(s.images[0]), tuple(float(v) for v in s.boxes[0]), int(s.labels[0])


def test_server_maps_and_the_same_maps_sent_back_score_the_same(client, sample):
    image, box, label = sample
    boxes = [(0, *box, True)]
    served = client.evaluate("shapes", [image], ["gradcam", ("occlusion", {"window": 32, "stride": 32})],
                             metrics=METRICS, steps=6, return_curves=True, boxes=boxes, return_maps=True)
    assert [t.class_id for t in served.images[0].targets] == [label]
    assert len(served.maps) == 2 and served.done.maps == 2
    assert len(served.scores) == 2 * len(METRICS)
    sent = client.evaluate("shapes", [image], maps=[(0, m.class_id, m.method, m.map) for m in served.maps],
                           metrics=METRICS, steps=6, return_curves=True, boxes=boxes)
    assert sent.maps == [] and sent.images[0].targets == []
    for a, b in zip(served.scores, sent.scores):
        assert (a.method, a.class_id, a.metric) == (b.method, b.class_id, b.metric)
        assert a.value == pytest.approx(b.value, abs=1e-6)
        if a.metric in ("insertion", "deletion"):
            assert len(a.curve) == 7
            np.testing.assert_allclose(a.curve, b.curve, atol=1e-6)
            assert a.curve[-1 if a.metric == "insertion" else 0] == pytest.approx(a.class_score, abs=1e-5)
        else:
            assert a.curve is None
        assert (a.masked_score is None) == (a.metric not in ("average_drop", "average_gain", "average_increase"))
    # gradcam points at the star on this easy image
    assert served.value(0, "gradcam", label, "pointing_game") == 1.0


def test_a_box_in_original_pixels_equals_the_box_in_input_pixels(client, sample):
    image, box, label = sample
    saliency = np.zeros((96, 96), np.float32)
    saliency[30:60, 20:50] = 1.0
    saliency[0:10, 0:10] = 0.5
    scale = 96 / 128
    common = dict(maps=[(0, label, "mine", saliency)], metrics=["energy_pointing_game", "pointing_game"])
    original = client.evaluate("shapes", [image], boxes=[(0, 20 / scale, 30 / scale, 50 / scale, 60 / scale, True)],
                               **common)
    model_input = client.evaluate("shapes", [image], boxes=[(0, 20, 30, 50, 60)], **common)
    assert [s.value for s in original.scores] == [s.value for s in model_input.scores]
    assert original.value(0, "mine", label, "energy_pointing_game") == pytest.approx(900 / (900 + 50), abs=1e-6)
    assert original.value(0, "mine", label, "pointing_game") == 1.0


def test_only_images_with_a_box_get_pointing_scores(client, sample):
    image, box, label = sample
    result = client.evaluate("shapes", [image, image], ["gradcam"], metrics=["pointing_game", "deletion"],
                             steps=4, boxes=[(1, *box, True)])
    assert sorted((s.image_index, s.metric) for s in result.scores) == [
        (0, "deletion"), (1, "deletion"), (1, "pointing_game")]


def request(image, **fields):
    base = dict(model="shapes", images=[tensor_pb2.Image(encoded=image)], methods=[methods_pb2.MethodSpec(method="gradcam")],
                metrics=[methods_pb2.DELETION])
    base.update(fields)
    return service_pb2.EvaluateRequest(**base)


def bad_map(shape=(96, 96), value=0.0, dtype=np.float32):
    return methods_pb2.Map(image_index=0, class_id=0, method="m", map=tensors.to_proto(np.full(shape, value, dtype)))


CASES = [
    ("unknown model", dict(model="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
    ("unknown method", dict(methods=[methods_pb2.MethodSpec(method="magic")]), grpc.StatusCode.NOT_FOUND, "magic"),
    ("bad method param", dict(methods=[methods_pb2.MethodSpec(occlusion=methods_pb2.OcclusionParams(window=0))]),
     grpc.StatusCode.INVALID_ARGUMENT, "occlusion.window"),
    ("no metrics", dict(metrics=[]), grpc.StatusCode.INVALID_ARGUMENT, "metrics must hold"),
    ("unknown metric", dict(metrics=[0]), grpc.StatusCode.INVALID_ARGUMENT, "metrics[0]"),
    ("steps too many", dict(options=service_pb2.MetricOptions(steps=100000)), grpc.StatusCode.INVALID_ARGUMENT,
     "options.steps must be in [1, 1000]"),
    ("negative steps", dict(options=service_pb2.MetricOptions(steps=-1)), grpc.StatusCode.INVALID_ARGUMENT,
     "options.steps"),
    ("blur", dict(options=service_pb2.MetricOptions(blur_sigma=-2)), grpc.StatusCode.INVALID_ARGUMENT,
     "options.blur_sigma must be in [0.1, 1000]"),
    ("nan blur", dict(options=service_pb2.MetricOptions(blur_sigma=float("nan"))), grpc.StatusCode.INVALID_ARGUMENT,
     "options.blur_sigma"),
    ("pointing without boxes", dict(metrics=[methods_pb2.POINTING_GAME]), grpc.StatusCode.INVALID_ARGUMENT,
     "options.boxes must hold at least 1 box"),
    ("box image", dict(options=service_pb2.MetricOptions(boxes=[service_pb2.Box(image_index=3, x1=5, y1=5)])),
     grpc.StatusCode.INVALID_ARGUMENT, "options.boxes[0].image_index must be in [0, 0]"),
    ("empty box", dict(options=service_pb2.MetricOptions(boxes=[service_pb2.Box(x0=5, x1=5, y1=5)])),
     grpc.StatusCode.INVALID_ARGUMENT, "x0 < x1"),
    ("box outside", dict(options=service_pb2.MetricOptions(boxes=[service_pb2.Box(x0=200, x1=300, y0=0, y1=5)])),
     grpc.StatusCode.INVALID_ARGUMENT, "covers no pixel"),
    ("nothing to score", dict(methods=[]), grpc.StatusCode.INVALID_ARGUMENT, "set methods"),
    ("map shape", dict(methods=[], maps=[bad_map((48, 48))]), grpc.StatusCode.INVALID_ARGUMENT,
     "maps[0].map must be FLOAT32 [96, 96]"),
    ("map dtype", dict(methods=[], maps=[bad_map(dtype=np.float64)]), grpc.StatusCode.INVALID_ARGUMENT, "maps[0].map"),
    ("map nan", dict(methods=[], maps=[bad_map(value=np.nan)]), grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    ("map class", dict(methods=[], maps=[methods_pb2.Map(class_id=8, map=bad_map().map)]),
     grpc.StatusCode.INVALID_ARGUMENT, "maps[0].class_id must be in [0, 7]"),
    ("map image", dict(methods=[], maps=[methods_pb2.Map(image_index=1, map=bad_map().map)]),
     grpc.StatusCode.INVALID_ARGUMENT, "maps[0].image_index must be in [0, 0]"),
    ("target", dict(targets=service_pb2.Targets(class_ids=[9])), grpc.StatusCode.INVALID_ARGUMENT,
     "targets.class_ids[0]"),
    ("no images", dict(images=[]), grpc.StatusCode.INVALID_ARGUMENT, "images must hold"),
]


@pytest.mark.parametrize("name, fields, code, text", CASES, ids=[c[0] for c in CASES])
def test_bad_requests_are_refused_naming_the_field(client, sample, name, fields, code, text):
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Evaluate(request(sample[0], **fields), timeout=30)
    assert err.value.code() == code, err.value.details()
    assert text in err.value.details()


def test_original_pixel_boxes_need_an_encoded_image(client):
    image = tensor_pb2.Image(tensor=tensors.to_proto(np.zeros((3, 96, 96), np.float32)))
    box = service_pb2.Box(x1=10, y1=10, original_pixels=True)
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Evaluate(service_pb2.EvaluateRequest(
            model="shapes", images=[image], methods=[methods_pb2.MethodSpec(method="gradcam")],
            metrics=[methods_pb2.POINTING_GAME], options=service_pb2.MetricOptions(boxes=[box])), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "options.boxes[0].original_pixels needs an encoded image" in err.value.details()


def test_evaluate_is_admitted_and_recorded(server, client, sample):
    client.evaluate("shapes", [sample[0]], ["gradcam"], metrics=["deletion"], steps=3)
    record = [r for r in server.explainer.jobs if r.rpc == "Evaluate"][-1]
    assert record.status == "ok" and record.passes.forward_samples > 0
    assert server.explainer.admissions and all(a.running == 0 for a in server.explainer.admissions.values())


def test_a_map_spanning_the_float32_range_scores_as_the_same_map(client, sample):
    image, box, label = sample
    x0, y0, x1, y1 = (round(v * 96 / 128) for v in box)
    saliency = np.ones((96, 96), np.float32)
    saliency[y0:y1, x0:x1] = -1.0   # the background: masking by it blackens the star
    huge = saliency * np.float32(3e38)
    masking = ["average_drop", "average_gain", "average_increase"]
    result = client.evaluate("shapes", [image], maps=[(0, label, "plain", saliency), (0, label, "huge", huge)],
                             metrics=masking)
    assert result.value(0, "plain", label, "average_drop") > 0.5, "0.0, the best score, would be wrong here"
    for name in masking:
        assert result.value(0, "huge", label, name) == pytest.approx(result.value(0, "plain", label, name), abs=1e-6)
    scores = {s.method: s.masked_score for s in result.scores if s.metric == "average_drop"}
    assert scores["huge"] == pytest.approx(scores["plain"], abs=1e-6)


def nan_when_dark_model(path):
    """A 4-class classifier of 16 x 16 images whose scores are NaN when any input value is below -1 (+ 0 x
    sqrt(min(x) + 1)): finite for a grey picture, NaN for it blended towards black (ImageNet preprocessing)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["linear"]),
             helper.make_node("ReduceMin", ["x"], ["low"], keepdims=0),
             helper.make_node("Add", ["low", "one"], ["margin"]),
             helper.make_node("Sqrt", ["margin"], ["root"]),
             helper.make_node("Mul", ["root", "zero"], ["nan_or_zero"]),
             helper.make_node("Add", ["linear", "nan_or_zero"], ["logits"])]
    graph = helper.make_graph(nodes, "nan_when_dark",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(np.float32(1), "one"),
                               numpy_helper.from_array(np.float32(0), "zero")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_a_metric_that_would_not_be_finite_is_refused_naming_the_map(tmp_path):
    from onnxplain.client import Client
    from onnxplain.server.config import ModelConfig

    from support import start_server

    srv = start_server([ModelConfig("dark", nan_when_dark_model(tmp_path / "dark.onnx"),
                                    preprocessing={"fit": "stretch"})])
    try:
        with Client(srv.address, timeout=60) as c:
            grey = png_bytes(np.full((16, 16, 3), 128, np.uint8))
            saliency = np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32)
            with pytest.raises(grpc.RpcError) as caught:
                c.evaluate("dark", [grey], maps=[(0, 0, "mine", saliency)], metrics=["average_drop"])
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details() == ("images[0], maps[0]: AVERAGE_DROP would not be finite: the model's "
                                              "scores for the perturbed inputs they need are NaN or Inf")
            assert c.evaluate("dark", [grey], maps=[(0, 0, "mine", saliency)], metrics=["pointing_game"],
                              boxes=[(0, 0, 0, 8, 8)]).scores, "metrics that need no perturbed input are scored"
    finally:
        srv.stop(0)
