"""Every gradient and CAM method through the real server and the CLI: the real ImageNet model with real
photos and several targets per image, a ViT-like model whose token grid is found from the graph, layer
errors, and Grad-CAM pointing at the known object of the shipped default model."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import grpc
import numpy as np
import pytest

from onnxplain import tensors
from onnxplain.client import Client, MapResult
from onnxplain.server.config import ModelConfig

from support import SHARED, needs_shared, png_bytes, pointing_game, start_server

GRADIENT_METHODS = ["gradient", "input_x_gradient", "smoothgrad", "integrated_gradients", "guided_backprop",
                    "deconvnet"]
CAM_METHODS = ["cam", "gradcam", "gradcampp", "xgradcam", "hirescam", "layercam", "eigencam", "guided_gradcam"]
FAST = {"smoothgrad": {"samples": 4}, "integrated_gradients": {"steps": 8}}


def final_maps(events):
    return [e for e in events if isinstance(e, MapResult) and e.final]


@needs_shared
@pytest.mark.parametrize("method", GRADIENT_METHODS + CAM_METHODS)
def test_every_method_on_efficientnet_with_real_photos(client, method):
    photos = [SHARED / "images" / name for name in ("chelsea.jpg", "coffee.jpg")]
    events = list(client.explain("efficientnet", photos, [(method, FAST.get(method, {}))], top_k=2,
                                 return_attribution=True))
    maps = final_maps(events)
    assert len(maps) == 4 and {(m.image_index, m.method) for m in maps} == {(0, method), (1, method)}
    for m in maps:
        assert m.map.shape == (224, 224) and np.isfinite(m.map).all() and np.ptp(m.map) > 0
    layer_methods = set(CAM_METHODS)
    assert all(bool(m.layer) == (method in layer_methods) for m in maps)
    pixel_level = method in GRADIENT_METHODS or method == "guided_gradcam"
    assert all((m.attribution is not None) == pixel_level for m in maps)
    if pixel_level:
        assert maps[0].attribution.shape == (3, 224, 224)
    # two targets of the same image give different maps (eigencam is class-agnostic by definition)
    if method != "eigencam":
        assert not np.allclose(maps[0].map, maps[1].map)
    if method == "integrated_gradients":
        assert {"completeness_gap", "score_delta"} <= set(maps[0].stats)


@needs_shared
def test_layer_resolution_and_an_earlier_layer(client):
    info = client.model("efficientnet")
    early = next(layer for layer in info.layers if layer.grid_height == 14)
    events = list(client.explain("efficientnet", [SHARED / "images" / "rocket.jpg"], ["gradcam"], layer=early.name,
                                 targets=[657]))
    assert final_maps(events)[0].layer == early.name
    request = client.explain_request("efficientnet", [SHARED / "images" / "rocket.jpg"], ["gradcam"], targets=[657],
                                     layer=early.name)
    request.output.resolution = request.output.LAYER
    layer_map = next(tensors.from_proto(e.map.map) for e in client.explain_call(request)
                     if e.WhichOneof("event") == "map")
    assert layer_map.shape == (14, 14) and np.isfinite(layer_map).all()


@pytest.mark.parametrize("layer, code, fragment", [
    ("no/such/tensor", grpc.StatusCode.NOT_FOUND, "valid layers"),
    ("logits", grpc.StatusCode.INVALID_ARGUMENT, "no spatial structure"),
])
def test_bad_layers_name_the_valid_ones(client, layer, code, fragment):
    with pytest.raises(grpc.RpcError) as err:
        list(client.explain("shapes", [_sample()], ["gradcam"], layer=layer))
    assert err.value.code() == code and fragment in err.value.details()
    valid = [layer.name for layer in client.model("shapes").layers]
    assert all(name in err.value.details() for name in valid)
    assert final_maps(client.explain("shapes", [_sample()], ["gradcam"]))


@pytest.fixture(scope="module")
def vit_server(zoo_model):
    path = zoo_model("vit", "dynamo")
    config = ModelConfig("vit", pathlib.Path(path), None, "ViT-like",
                         {"fit": "stretch", "mean": [0.5] * 3, "std": [0.25] * 3})
    srv = start_server([config])
    yield srv
    srv.stop(0)


def test_vit_token_grid_is_found_and_every_method_runs(vit_server):
    with Client(vit_server.address, timeout=120) as c:
        info = c.model("vit")
        default = next(layer for layer in info.layers if layer.is_default)
        assert (default.kind, default.grid_height, default.grid_width, default.prefix_tokens) == ("tokens", 4, 6, 1)
        image = png_bytes(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
        for method in GRADIENT_METHODS + [m for m in CAM_METHODS if m != "cam"]:
            maps = final_maps(c.explain("vit", [image], [(method, FAST.get(method, {}))], targets=[1, 4]))
            assert len(maps) == 2 and maps[0].map.shape == (32, 48), method
            assert np.isfinite(maps[0].map).all()
        with pytest.raises(grpc.RpcError) as err:   # CLS-token head: no global-average-pooling head for CAM
            list(c.explain("vit", [image], ["cam"]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "global-average-pooling" in err.value.details()


@pytest.fixture(scope="module")
def swin_server(zoo_model):
    configs = [ModelConfig(name, pathlib.Path(zoo_model(name, "legacy")), None, "Swin-like",
                           {"fit": "stretch", "mean": [0.5] * 3, "std": [0.25] * 3}) for name in ("swin", "swin_nhwc")]
    srv = start_server(configs)
    yield srv
    srv.stop(0)


@pytest.mark.parametrize("name, kind", [("swin", "tokens"), ("swin_nhwc", "spatial_nhwc")])
def test_swin_last_stage_grid_is_found_and_every_method_runs(swin_server, name, kind):
    """A hierarchical transformer: the default layer is the last stage (4 x 6 after patch merging), not the
    end of the first stage (8 x 12), and no shifted (rolled) map is offered as a layer."""
    perturbation = {"scorecam": {}, "ablationcam": {}, "rise": {"masks": 64}, "opticam": {"iterations": 3}}
    on_layer = CAM_METHODS + ["scorecam", "ablationcam", "opticam"]      # RISE and the pixel methods use none
    with Client(swin_server.address, timeout=120) as c:
        layers = c.model(name).layers
        default = next(layer for layer in layers if layer.is_default)
        assert (default.kind, default.grid_height, default.grid_width, default.prefix_tokens) == (kind, 4, 6, 0)
        assert {(layer.grid_height, layer.grid_width) for layer in layers} == {(8, 12), (4, 6)}
        image = png_bytes(np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8))
        for method in GRADIENT_METHODS + CAM_METHODS + list(perturbation):
            params = {**FAST, **perturbation}.get(method, {})
            maps = final_maps(c.explain(name, [image], [(method, params)], targets=[1, 4]))
            assert len(maps) == 2 and maps[0].map.shape == (32, 48), method
            assert all(m.layer == default.name for m in maps if method in on_layer), method
            assert np.isfinite(maps[0].map).all() and np.ptp(maps[0].map) > 0, method


def test_the_cam_methods_of_one_request_share_the_layer_pass(client):
    """Seven CAM methods on two images, top 2 each: per image, the model runs up to the layer once (for cam) and
    its head's gradient graph once for both targets, on that run's outputs; every method reads those. Each map
    equals the method's map asked alone."""
    from onnxplain.client import Done

    shared = [m for m in CAM_METHODS if m != "guided_gradcam"]
    images = [_sample(), _sample("ring")]
    events = list(client.explain("shapes", images, shared, top_k=2))
    done = events[-1]
    assert isinstance(done, Done) and done.maps == 2 * 2 * len(shared)
    # the targets' scores (both images, one run), then per image: the body (the model up to the layer) for cam,
    # whose activations eigencam reuses, and the head's gradients for the 2 targets on the body's outputs for
    # gradcam (the others reuse them)
    assert (done.model_runs, done.forward_samples, done.backward_samples) == (1 + 2 * 2, 2 + 2 * 1, 2 * 2)
    together = {(m.image_index, m.method, m.class_id): m.map for m in final_maps(events)}
    for method in shared:
        for m in final_maps(client.explain("shapes", images, [method], top_k=2)):
            np.testing.assert_allclose(together[m.image_index, method, m.class_id], m.map, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("order, runs, forward, backward", [
    # per image: gradcam runs the body (1 sample forward) and the head's gradients (2 rows); gradient runs the
    # image once for its 2 targets, input x gradient reuses that; guided backprop runs once, guided Grad-CAM reuses
    # its guided gradients and gradcam's layer gradients
    (["gradcam", "gradient", "input_x_gradient", "guided_backprop", "guided_gradcam"], 4, 1, 6),
    # guided Grad-CAM's one run (both backward passes, 2 rows) leaves gradcam and guided backprop nothing to run
    (["guided_gradcam", "gradcam", "guided_backprop"], 1, 0, 2),
])
def test_the_methods_of_one_request_share_their_gradients(client, order, runs, forward, backward):
    """The gradients one method of a request computed on an image are read by the others that need the same ones
    (Job.shared), and each map equals the method's map asked alone. Counts: the targets' scores (both images,
    one run), then the runs per image given above."""
    from onnxplain.client import Done

    images = [_sample(), _sample("ring")]
    events = list(client.explain("shapes", images, order, top_k=2))
    done = events[-1]
    assert isinstance(done, Done) and done.maps == 2 * 2 * len(order)
    assert (done.model_runs, done.forward_samples, done.backward_samples) == (1 + 2 * runs, 2 + 2 * forward,
                                                                              2 * backward)
    together = {(m.image_index, m.method, m.class_id): m.map for m in final_maps(events)}
    for method in order:
        alone = final_maps(client.explain("shapes", images, [method], top_k=2))
        assert len(alone) == 4
        for m in alone:
            np.testing.assert_allclose(together[m.image_index, method, m.class_id], m.map, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["scorecam", "ablationcam", "opticam"])
def test_a_layer_method_reuses_the_run_up_to_the_layer(client, method):
    """After EigenCAM on the same image, Score-CAM, Ablation-CAM and Opti-CAM read its run of the model up to the
    layer (Job.shared): the pair costs the second method's runs alone, and its map is the one asked alone."""
    from onnxplain.client import Done

    params = {"opticam": {"iterations": 3}}.get(method, {})
    alone = list(client.explain("shapes", [_sample()], [(method, params)]))
    pair = list(client.explain("shapes", [_sample()], ["eigencam", (method, params)]))
    assert isinstance(alone[-1], Done) and isinstance(pair[-1], Done)
    assert (pair[-1].model_runs, pair[-1].forward_samples) == (alone[-1].model_runs, alone[-1].forward_samples)
    ours = next(m for m in final_maps(pair) if m.method == method)
    np.testing.assert_allclose(ours.map, final_maps(alone)[0].map, rtol=1e-5, atol=1e-6)


def test_cli_runs_a_cam_method(server, tmp_path):
    from importlib.resources import files

    image = files("onnxplain.default_model") / "samples" / "star.png"
    result = subprocess.run([sys.executable, "-m", "onnxplain.client.cli", "--server", server.address, "explain",
                             str(image), "--model", "shapes", "--method", "gradcam,integrated_gradients",
                             "--param", "integrated_gradients.steps=8", "--top-k", "2", "--out", str(tmp_path),
                             "--quiet"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(list(tmp_path.glob("star.gradcam.*.npy"))) == 2
    assert len(list(tmp_path.glob("star.integrated_gradients.*.npy"))) == 2


def test_gradcam_points_at_the_object_on_held_out_shapes(client):
    from onnxplain.default_model import shapes

    held_out = shapes.generate(60, seed=9_000_002, size=128)
    hits, on_mask = pointing_game(client, held_out, "gradcam")
    assert hits / 60 >= 0.9, f"Grad-CAM maximum in the object's box on {hits}/60 ({on_mask}/60 on its pixels)"


def _sample(name: str = "star") -> bytes:
    from importlib.resources import files

    return (files("onnxplain.default_model") / "samples" / f"{name}.png").read_bytes()




@needs_shared
def test_the_shared_model_as_onnxruntime_saves_it_explains_as_the_original(client, tmp_path):
    """Users deploy what an onnxruntime session saves (optimized_model_filepath: 33 FusedConv here): served, its
    layers and maps are the original model's (kernels.contrib writes the fused nodes back as standard ones)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(SHARED / "models" / "efficientnet_lite0_imagenet.onnx"), options,
                         providers=["CPUExecutionProvider"])
    got, want = _beside_the_original(client, tmp_path / "optimized.onnx",
                                     ["gradcam", ("integrated_gradients", {"steps": 8}), "guided_backprop"])
    assert len(got) == len(want) == 6
    for g, w in zip(got, want):
        assert (g.method, g.class_id) == (w.method, w.class_id)
        np.testing.assert_allclose(g.map, w.map, rtol=1e-4, atol=1e-4 * np.abs(w.map).max())


@needs_shared
def test_the_shared_model_in_half_precision_is_served(client, tmp_path):
    """The shared model converted to float16 as onnxconverter-common does it (inputs and outputs float16 too) is
    served from float32 images: graph.load_model puts Casts at its boundary, the model and its backward run in
    half precision. Its layers are the original's, and its maps follow the float32 model's: the CAM maps closely
    (measured on this photo: relative error <= 2.2e-3), the pixel-level gradients within half precision's noise
    (measured: Pearson r 0.987-0.999, relative error 0.04-0.14)."""
    import warnings

    import onnx
    from onnxconverter_common import float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # "the float32 number ... will be truncated"
        half = float16.convert_float_to_float16(onnx.load(SHARED / "models" / "efficientnet_lite0_imagenet.onnx"))
    assert half.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    onnx.save(half, tmp_path / "half.onnx")
    got, want = _beside_the_original(client, tmp_path / "half.onnx", ["gradcam", "layercam", "gradient",
                                                                      "guided_backprop"])
    assert len(got) == len(want) == 8
    for g, w in zip(got, want):
        assert (g.method, g.class_id) == (w.method, w.class_id) and g.map.dtype == np.float32
        error = np.linalg.norm(g.map - w.map) / np.linalg.norm(w.map)
        r = np.corrcoef(g.map.ravel(), w.map.ravel())[0, 1]
        if g.method in ("gradcam", "layercam"):
            assert error <= 1e-2, (g.method, g.class_id, error)
        else:
            assert r >= 0.98 and error <= 0.2, (g.method, g.class_id, r, error)


def _beside_the_original(client, path: pathlib.Path, methods: list) -> tuple[list, list]:
    """A variant of the shared model (the file at `path`) served with the original's preprocessing: its layer list
    must be the original's; its final maps and the original's for chelsea.jpg and two targets, in stream order."""
    import dataclasses

    from support import efficientnet_config

    config = dataclasses.replace(efficientnet_config(), name="variant", path=path, labels=None)
    srv = start_server([config])
    try:
        with Client(srv.address, timeout=120) as variant:
            assert [layer.name for layer in variant.model("variant").layers] == \
                [layer.name for layer in client.model("efficientnet").layers]
            photo = [SHARED / "images" / "chelsea.jpg"]
            return (final_maps(variant.explain("variant", photo, methods, targets=[281, 285])),
                    final_maps(client.explain("efficientnet", photo, methods, targets=[281, 285])))
    finally:
        srv.stop(0)
