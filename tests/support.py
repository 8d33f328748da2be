"""Helpers shared by the tests (imported as `support`; tests/ is on sys.path via tests/conftest.py)."""

from __future__ import annotations

import contextlib
import io
import logging
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
EFFICIENTNET = SHARED / "models" / "efficientnet_lite0_imagenet.onnx"
IMAGENET_LABELS = SHARED / "models" / "imagenet_labels.txt"
SHARED_IMAGES = sorted((SHARED / "images").glob("*.jpg"))
EFFICIENTNET_PREPROCESSING = {"fit": "center_crop", "scale": 1.0, "mean": [127.5] * 3, "std": [128.0] * 3}

needs_shared = pytest.mark.skipif(not EFFICIENTNET.exists(), reason="../shared (real model and photos) is absent")


def efficientnet_config():
    from onnxplain.server.config import ModelConfig

    return ModelConfig("efficientnet", EFFICIENTNET, IMAGENET_LABELS, "EfficientNet-Lite0, ImageNet-1k",
                       dict(EFFICIENTNET_PREPROCESSING))


def default_model_config():
    from onnxplain.server import config

    return config.load(None).models[0]


def start_server(models, **limits):
    """A real server on a free loopback port; the caller stops it."""
    from onnxplain.server.config import Limits, ServerConfig
    from onnxplain.server.main import Server

    return Server(ServerConfig(host="127.0.0.1", port=0, limits=Limits(**limits), models=tuple(models))).start()


def png_bytes(array) -> bytes:
    """An RGB uint8 array as PNG bytes."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def pointing_game(client, held_out, method: str, params: dict | None = None, model: str = "shapes"
                  ) -> tuple[int, int]:
    """The pointing game on held-out images of the shipped default model (`shapes.generate(...)`; `model` names it
    or a version of it on the server), with the map of each image's top-1 class made by `method` through the
    server: (hits, hits on the exact mask).

    A hit is the map's maximum falling inside the object's bounding box, the pointing game's convention where
    an object is known by its box (the map's pixel centre, mapped to the image's pixels, inside [x0, x1) x
    [y0, y1)). The exact-mask count is the stricter reading; thin shapes (ring, crescent, star, cross) leave
    much of their box to the background, and a coarse map's peak often falls in a ring's hole."""
    import numpy as np
    from PIL import Image

    from onnxplain.client import MapResult

    events = list(client.explain(model, [png_bytes(i) for i in held_out.images], [(method, params or {})]))
    maps = {e.image_index: e.map for e in events if isinstance(e, MapResult) and e.final}
    assert sorted(maps) == list(range(len(held_out)))
    hits = on_mask = 0
    size = held_out.images.shape[1]
    for i, saliency in maps.items():
        y, x = np.unravel_index(np.argmax(saliency), saliency.shape)
        ix, iy = (x + 0.5) * size / saliency.shape[1], (y + 0.5) * size / saliency.shape[0]
        x0, y0, x1, y1 = held_out.boxes[i]
        hits += bool(x0 <= ix < x1 and y0 <= iy < y1)
        mask = np.asarray(Image.fromarray(held_out.masks[i]).resize(saliency.shape[::-1], Image.Resampling.NEAREST))
        on_mask += bool(mask[y, x])
    return hits, on_mask


def shapes_input(image):
    """The default model's declared preprocessing (96 x 96 bilinear, (v / 255 - 0.5) / 0.5, CHW), written out
    independently of kernels.images."""
    import numpy as np
    from PIL import Image

    img = Image.fromarray(image).resize((96, 96), Image.Resampling.BILINEAR)
    return ((np.asarray(img, np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1).copy()


def sample_png(name: str = "star") -> bytes:
    """A sample image shipped with the default model (onnxplain/default_model/samples/<name>.png)."""
    from importlib.resources import files

    return (files("onnxplain.default_model") / "samples" / f"{name}.png").read_bytes()


def nhwc_model(final="Softmax"):
    """What tf2onnx produces for a Keras CNN: NHWC input, Transpose to NCHW around Convs, NHWC head."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    def init(name, arr):
        return numpy_helper.from_array(np.asarray(arr, np.float32), name)

    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Sub", ["input", "mean"], ["centred"]),  # in-graph preprocessing: no layer
        helper.make_node("Transpose", ["centred"], ["x_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["x_nchw", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Transpose", ["c2"], ["c2_nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Mul", ["c2_nhwc", "bn_scale"], ["scaled"]),  # a folded BatchNorm, channels last
        helper.make_node("Add", ["scaled", "bn_shift"], ["shifted"]),
        helper.make_node("Relu", ["shifted"], ["r2_nhwc"]),
        helper.make_node("ReduceMean", ["r2_nhwc"], ["pooled"], axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["pooled", "wd"], ["mm"]),
        helper.make_node("Add", ["mm", "bd"], ["logits"]),
        helper.make_node(final, ["logits"], ["probs"], axis=-1),
    ]
    inits = [
        init("mean", [0.5, 0.4, 0.3]),
        init("w1", rng.standard_normal((8, 3, 3, 3)) * 0.3), init("b1", rng.standard_normal(8) * 0.1),
        init("w2", rng.standard_normal((16, 8, 3, 3)) * 0.3), init("b2", rng.standard_normal(16) * 0.1),
        init("bn_scale", rng.uniform(0.5, 1.5, 16)), init("bn_shift", rng.standard_normal(16) * 0.1),
        init("wd", rng.standard_normal((16, 5))), init("bd", rng.standard_normal(5)),
    ]
    graph = helper.make_graph(
        nodes, "nhwc", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 24, 32, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@contextlib.contextmanager
def captured_json_logs():
    """The server's log lines (JSON, with request ids) written to the StringIO this yields while the block runs."""
    from onnxplain.server import logs

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.RequestIdFilter())
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("onnxplain.server")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
