"""Score-CAM against a straightforward numpy re-implementation (the model run by onnxruntime, upsampling by
torch), through the real server with several targets, and on held-out images of the shipped default model."""

from __future__ import annotations


import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from onnxplain.client import MapResult, Progress as ClientProgress
from onnxplain.default_model import shapes
from onnxplain.kernels import graph
from onnxplain.kernels.methods import METHODS, Job, Maps, Progress
from onnxplain.kernels.runtime import Runner

from support import ROOT, png_bytes, pointing_game, shapes_input

SHAPES_MODEL = ROOT / "onnxplain" / "default_model" / "shapes_cnn.onnx"


def session_with(path, extra: str | None = None):
    """onnxruntime session of the model (its logits first), optionally exposing one more tensor."""
    model = onnx.load(str(path))
    model = onnx.shape_inference.infer_shapes(model)
    if extra:
        info = next(v for v in model.graph.value_info if v.name == extra)
        model.graph.output.append(info)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def reference_scorecam(path, x, layer, targets):
    """The paper's formula, one masked image at a time (scores in chunks of 16 images)."""
    session = session_with(path, layer)
    logits, activations = session.run(None, {"input": x[None]})[:2]
    a = activations[0]                                              # [K, h, w]
    up = F.interpolate(torch.from_numpy(a[None]), size=x.shape[1:], mode="bilinear",
                       align_corners=False)[0].numpy()
    masked = []
    for k in range(len(a)):
        m = up[k]
        span = m.max() - m.min()
        n = (m - m.min()) / span if span > 0 else np.zeros_like(m)
        masked.append(x * n[None])
    scores = np.concatenate([session.run(None, {"input": np.stack(masked[i:i + 16])})[0]
                             for i in range(0, len(masked), 16)])
    maps = []
    for c in targets:
        u = scores[:, c].astype(np.float64) - logits[0, c]
        w = np.exp(u - u.max()) / np.exp(u - u.max()).sum()
        maps.append(np.maximum((w[:, None, None] * a).sum(0), 0))
    return np.stack(maps)


@pytest.fixture(scope="module")
def shapes_runner():
    model = graph.load_model(SHAPES_MODEL)
    return Runner(model, graph.score_tensor(model), "input", max_batch=32, providers=["CPUExecutionProvider"])


def test_scorecam_matches_numpy_reference_for_several_targets(shapes_runner):
    sample = shapes.generate(2, seed=9_000_111, size=96)
    layer = graph.default_layer(shapes_runner.model)
    for image in sample.images:
        x = shapes_input(image)
        targets = np.array([0, 3, 6])
        job = Job(shapes_runner, x, targets, {}, layer=layer)
        events = list(METHODS["scorecam"].run(job))
        progress = [e for e in events if isinstance(e, Progress)]
        final = events[-1]
        assert isinstance(final, Maps) and final.final and final.maps.shape == (3, 12, 12)
        # one Progress per batch of 32 masked images (96 maps): a cancelled call stops within one batch
        assert [p.done for p in progress] == [32, 64, 96]
        assert job.passes.forward_samples == 1 + 96 + 1   # activations, masked images, the image's own scores
        expected = reference_scorecam(SHAPES_MODEL, x, layer.name, targets)
        np.testing.assert_allclose(final.maps, expected, rtol=1e-3, atol=1e-4 * expected.max())
        assert expected.max() > 0 and not np.allclose(expected[0], expected[1])


def test_scorecam_through_the_server_with_several_targets(client):
    image = png_bytes(shapes.generate(1, seed=9_000_112, size=96).images[0])
    events = list(client.explain("shapes", [image], ["scorecam"], top_k=3))
    maps = [e for e in events if isinstance(e, MapResult) and e.final]
    assert len(maps) == 3 and len({m.class_id for m in maps}) == 3
    for m in maps:
        assert m.map.shape == (96, 96) and np.isfinite(m.map).all() and m.map.min() >= 0 and m.layer
    assert not np.allclose(maps[0].map, maps[1].map)
    assert [e.done for e in events if isinstance(e, ClientProgress)] == [32, 64, 96]


def test_scorecam_points_at_the_object_on_held_out_shapes(client):
    held_out = shapes.generate(60, seed=9_000_011, size=128)
    hits, on_mask = pointing_game(client, held_out, "scorecam")
    assert hits / 60 >= 0.9, f"Score-CAM maximum in the object's box on {hits}/60 ({on_mask}/60 on its pixels)"
