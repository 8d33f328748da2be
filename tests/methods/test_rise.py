"""RISE against a straightforward numpy re-implementation with the same coarse grids and shifts (upsampling by
torch, cropping and masking in numpy, the model run by onnxruntime), its anytime partial maps, reproducibility,
the real server with several targets, and held-out images of the shipped default model."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

from onnxplain.client import MapResult
from onnxplain.default_model import shapes
from onnxplain.kernels import graph
from onnxplain.kernels.methods import METHODS, Job, Maps, Progress
from onnxplain.kernels.methods.rise import coarse_masks
from onnxplain.kernels.runtime import Runner

from support import ROOT, png_bytes, pointing_game, shapes_input

SHAPES_MODEL = ROOT / "onnxplain" / "default_model" / "shapes_cnn.onnx"


def runner(max_batch: int = 32) -> Runner:
    model = graph.load_model(SHAPES_MODEL)
    return Runner(model, graph.score_tensor(model), "input", max_batch=max_batch, providers=["CPUExecutionProvider"])


def reference_rise(x, targets, masks, grid, keep, seed):
    """The paper's masks, one at a time: the same coarse grid and shift per mask, upsampled to (s+1)*cell and
    cropped; map = sum_i S_c(x * M_i) M_i / (N p1)."""
    _, height, width = x.shape
    cy, cx = math.ceil(height / grid), math.ceil(width / grid)
    grids, shifts = coarse_masks(np.random.default_rng(seed), masks, grid, keep, (cy, cx))
    session = ort.InferenceSession(str(SHAPES_MODEL), providers=["CPUExecutionProvider"])
    total = np.zeros((len(targets), height, width))
    for g, (dy, dx) in zip(grids, shifts):
        up = F.interpolate(torch.from_numpy(g[None]), size=((grid + 1) * cy, (grid + 1) * cx), mode="bilinear",
                           align_corners=False)[0, 0].numpy()
        m = up[dy:dy + height, dx:dx + width]
        score = session.run(None, {"input": (x * m)[None]})[0][0]
        for t, c in enumerate(targets):
            total[t] += score[c] * m
    return total / (masks * keep)


def test_rise_matches_numpy_reference_with_the_same_masks():
    x = shapes_input(shapes.generate(1, seed=9_000_131, size=96).images[0])
    targets = np.array([2, 5])
    params = METHODS["rise"].resolve(dict(masks=70, grid=5, keep_probability=0.4, seed=17), (96, 96))
    job = Job(runner(), x, targets, params)
    events = list(METHODS["rise"].run(job))
    assert [e.done for e in events if isinstance(e, Progress)] == [32, 64, 70]   # one per batch: cancellable
    final = events[-1]
    assert isinstance(final, Maps) and final.final and final.maps.shape == (2, 96, 96)
    assert job.passes.forward_samples == 70 and job.passes.runs == 3
    expected = reference_rise(x, targets, 70, 5, 0.4, 17)
    np.testing.assert_allclose(final.maps, expected, rtol=0, atol=2e-4 * np.abs(expected).max())
    assert not np.allclose(expected[0], expected[1])


def test_rise_partial_maps_seeds_and_batch_size():
    x = shapes_input(shapes.generate(1, seed=9_000_132, size=96).images[0])
    targets = np.array([0, 4])
    params = METHODS["rise"].resolve(dict(masks=100, seed=3), (96, 96))
    job = Job(runner(max_batch=10), x, targets, params, partial_every=3)
    events = list(METHODS["rise"].run(job))
    partial = [e for e in events if isinstance(e, Maps) and not e.final]
    assert [e.step for e in partial] == [3, 6, 9]
    # a partial map is the same estimate over the masks seen so far: 30 of them after 3 batches of 10
    first_30 = list(METHODS["rise"].run(Job(runner(), x, targets, dict(params, masks=30))))[-1].maps
    np.testing.assert_allclose(partial[0].maps, first_30, rtol=1e-5, atol=1e-6)
    final = events[-1].maps
    # the same seed gives the same masks whatever the batch size; another seed gives others
    again = list(METHODS["rise"].run(Job(runner(max_batch=32), x, targets, params)))[-1].maps
    np.testing.assert_allclose(final, again, rtol=1e-5, atol=1e-6)
    other = list(METHODS["rise"].run(Job(runner(), x, targets, dict(params, seed=4))))[-1].maps
    assert np.abs(other - final).max() > 1e-3


def test_rise_through_the_server_with_several_targets_and_partial_maps(client):
    image = png_bytes(shapes.generate(1, seed=9_000_133, size=96).images[0])
    events = list(client.explain("shapes", [image], [("rise", dict(masks=256, seed=1))], top_k=3,
                                 partial_maps=True))
    maps = [e for e in events if isinstance(e, MapResult)]
    final = [m for m in maps if m.final]
    assert len(final) == 3 and len({m.class_id for m in final}) == 3
    assert {m.step for m in maps if not m.final} == {4}        # 8 batches of 32, a partial map every 4
    for m in final:
        assert m.map.shape == (96, 96) and np.isfinite(m.map).all() and not m.layer
    assert not np.allclose(final[0].map, final[1].map)


def test_rise_points_at_the_object_on_held_out_shapes(client):
    held_out = shapes.generate(40, seed=9_000_012, size=128)
    # 1000 masks (the default is 4000): with 500 the Monte-Carlo noise moves the peak of 5/40 maps off the object
    hits, on_mask = pointing_game(client, held_out, "rise", dict(masks=1000, seed=0))
    assert hits / 40 >= 0.9, f"RISE maximum in the object's box on {hits}/40 ({on_mask}/40 on its pixels)"
