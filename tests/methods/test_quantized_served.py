"""Quantized models through the real server: the int8 versions that onnxruntime's quantizer writes of the shipped
default model and of the real ImageNet model, QDQ format (uint8 activations, int8 weights per channel).

Gradient and CAM methods differentiate them with the straight-through estimator (tests/autodiff/
test_autodiff_quantized.py checks the rules); here: every method runs on real photos, the int8 model's maps agree
with the float model's, Grad-CAM still points at the object on held-out images, and a QOperator-format model (which
computes on integers) gets its forward methods and, for gradient methods, an error naming the operator."""

from __future__ import annotations

import dataclasses
import shutil

import grpc
import numpy as np
import pytest
from PIL import Image

from onnxplain.client import Client, MapResult

from support import (SHARED, SHARED_IMAGES, default_model_config, efficientnet_config, needs_shared, png_bytes,
                     pointing_game, shapes_input)
from test_methods_served import CAM_METHODS, FAST, GRADIENT_METHODS


# Pearson r between the int8 and the float model's maps (chelsea.jpg, class 285) must reach this; measured when the
# test was written: cam 0.997, eigencam 0.999, the other CAM methods 0.971-0.974, deconvnet 0.995, guided backprop and
# guided Grad-CAM 0.91-0.92, pixel gradients 0.66-0.74 (rounding every activation moves a pixel-level gradient more
# than a layer's). An unrelated map would be near 0, and before quantized tensors carried gradients all were zero.
# A quantizer's rounding flips with the last bit of its input, so these move with how onnxruntime sums a convolution:
# with the weights left as DequantizeLinear nodes (the plain, unblocked kernels) the CAM methods read 0.997.
AGREEMENT = {"gradient": 0.55, "input_x_gradient": 0.55, "smoothgrad": 0.55, "integrated_gradients": 0.55,
             "guided_backprop": 0.85, "guided_gradcam": 0.85}


def _quantize(source, target, inputs, quant_format):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    name = __import__("onnx").load(str(source)).graph.input[0].name

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter({name: x[None]} for x in inputs)

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(source), str(target), Calibration(), quant_format=getattr(QuantFormat, quant_format),
                    per_channel=quant_format == "QDQ")
    return target


def _imagenet_input(path):
    """The shared model's preprocessing (its README), written out: centre square, 224 bilinear, (p - 127.5) / 128."""
    image = Image.open(path).convert("RGB")
    w, h = image.size
    s = min(w, h)
    image = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize(
        (224, 224), Image.Resampling.BILINEAR)
    return ((np.asarray(image, np.float32) - 127.5) / 128).transpose(2, 0, 1).copy()


@pytest.fixture(scope="module")
def quantized_server(tmp_path_factory):
    from onnxplain.default_model import shapes

    d = tmp_path_factory.mktemp("int8")

    def version(config, name, inputs, quant_format):   # (labels beside the model: the server reads no file elsewhere)
        labels = shutil.copy(config.labels, d / f"{name}.labels.txt")
        path = _quantize(config.path, d / f"{name}.onnx", inputs, quant_format)
        return dataclasses.replace(config, name=name, path=path, labels=labels)

    shapes_config = default_model_config()
    calibration = [shapes_input(image) for image in shapes.generate(32, seed=17).images]
    configs = [version(shapes_config, "shapes_int8", calibration, "QDQ"),
               version(shapes_config, "shapes_qop", calibration, "QOperator")]
    if SHARED_IMAGES:
        calibration = [_imagenet_input(p) for p in SHARED_IMAGES]
        configs += [efficientnet_config(), version(efficientnet_config(), "efficientnet_int8", calibration, "QDQ")]
    from onnxplain.server.config import Security, ServerConfig
    from onnxplain.server.main import Server

    # onnxruntime's QOperator format writes com.microsoft ops (QGemm, QLinearGlobalAveragePool): allowed here by name
    server = Server(ServerConfig(host="127.0.0.1", port=0, models=tuple(configs),
                                 security=Security(allowed_domains=("com.microsoft",)))).start()
    yield server
    server.stop(0)


def _final(events):
    return [e for e in events if isinstance(e, MapResult) and e.final]


def _pearson(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@needs_shared
def test_every_method_runs_on_int8_efficientnet_and_agrees_with_the_float_model(quantized_server):
    photo = SHARED / "images" / "chelsea.jpg"
    with Client(quantized_server.address, timeout=300) as client:
        info = client.model("efficientnet_int8")
        default = next(layer for layer in info.layers if layer.is_default)
        assert default.name.endswith("DequantizeLinear_Output") and (default.grid_height, default.grid_width) == (7, 7)
        for method in GRADIENT_METHODS + CAM_METHODS:
            runs = {model: _final(client.explain(model, [photo], [(method, FAST.get(method, {}))], targets=[285, 281]))
                    for model in ("efficientnet", "efficientnet_int8")}
            maps = runs["efficientnet_int8"]
            assert len(maps) == 2, method
            for m in maps:
                assert m.map.shape == (224, 224) and np.isfinite(m.map).all() and np.ptp(m.map) > 0, method
            if method != "eigencam":
                assert not np.allclose(maps[0].map, maps[1].map), method
            r = _pearson(maps[0].map, runs["efficientnet"][0].map)
            assert r >= AGREEMENT.get(method, 0.95), f"{method}: int8 vs float maps correlate at r = {r:.3f}"


def test_gradcam_points_at_the_object_with_the_int8_default_model(quantized_server):
    from onnxplain.default_model import shapes

    held_out = shapes.generate(60, seed=9_000_002, size=128)
    with Client(quantized_server.address, timeout=300) as client:
        hits, on_mask = pointing_game(client, held_out, "gradcam", model="shapes_int8")
    assert hits / 60 >= 0.9, f"int8 Grad-CAM maximum in the object's box on {hits}/60 ({on_mask}/60 on its pixels)"


def test_a_model_that_computes_on_integers_gets_forward_methods_and_a_named_refusal(quantized_server):
    from onnxplain.default_model import shapes

    image = shapes.generate(1, seed=3, size=96).images[0]
    with Client(quantized_server.address, timeout=300) as client:
        assert _final(client.explain("shapes_qop", [png_bytes(image)], [("occlusion", {"window": 16, "stride": 8})]))
        with pytest.raises(grpc.RpcError) as err:
            list(client.explain("shapes_qop", [png_bytes(image)], ["gradient"]))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "QLinearConv" in err.value.details() and "QDQ format" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            list(client.explain("shapes_qop", [png_bytes(image)], ["gradcam"]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "QOperator" in err.value.details()
        assert _final(client.explain("shapes_qop", [png_bytes(image)], ["rise"]))   # still serving
