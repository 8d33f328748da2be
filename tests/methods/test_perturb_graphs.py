"""The pieces of graph that the perturbation methods compose in front of a model (kernels.methods.perturb),
run alone in onnxruntime against numpy."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxplain.kernels.images import upsample_bilinear
from onnxplain.kernels.methods.perturb import EPS, Builder


def normalised_upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Builder.normalised_upsample of [B, 1, h, w] maps, run by onnxruntime."""
    b = Builder(helper.make_model(helper.make_graph([], "g", [], []), opset_imports=[helper.make_opsetid("", 17)]))
    out = b.normalised_upsample("maps", maps.shape[2:], *size, out="out")
    g = helper.make_graph(b.nodes, "g",
                          [helper.make_tensor_value_info("maps", TensorProto.FLOAT, ["B", 1, *maps.shape[2:]])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["B", 1, *size])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"maps": maps.astype(np.float32)})[0]


def minmax_of_upsampled(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The straightforward way, in float64: upsample every pixel, then min-max normalise each map (the span floored
    by EPS, as the graph's)."""
    up = upsample_bilinear(maps[:, 0].astype(np.float64), *size).astype(np.float64)
    lo, hi = up.min(axis=(1, 2), keepdims=True), up.max(axis=(1, 2), keepdims=True)
    return ((up - lo) / (hi - lo + EPS))[:, None]


@pytest.mark.parametrize("grid, size", [((12, 12), (96, 96)), ((7, 7), (224, 224)), ((5, 9), (33, 20)),
                                        ((6, 6), (4, 4))])
def test_normalised_upsample_is_minmax_of_the_upsampled_map(grid, size):
    rng = np.random.default_rng(0)
    maps = np.concatenate([rng.normal(size=(8, 1, *grid)), np.maximum(rng.normal(size=(8, 1, *grid)), 0) * 1e3,
                           rng.random((8, 1, *grid)) ** 6 * 1e-3])
    got = normalised_upsample(maps, size)
    assert got.shape == (len(maps), 1, *size)
    np.testing.assert_allclose(got, minmax_of_upsampled(maps, size), rtol=0, atol=2e-6)
    assert got.min() >= -2e-6 and got.max() <= 1 + 2e-6 and np.allclose(got.max(axis=(2, 3)), 1, atol=2e-6)


def test_normalised_upsample_gives_an_all_zero_mask_for_a_constant_map():
    """All zeros (a dead ReLU channel), constants, and a map whose values differ by two float32 rounding steps
    (minmax(upsample) stretched that one to [0, 1])."""
    maps = np.zeros((4, 1, 12, 12), np.float32)
    maps[1] = 7.3
    maps[2] = 1e30
    ulp = np.float32(3.0) * np.float32(2 ** -23)
    maps[3] = np.float32(3.0) + ulp * np.random.default_rng(1).integers(0, 3, (12, 12))
    got = normalised_upsample(maps, (96, 96))
    np.testing.assert_array_equal(got, np.zeros((4, 1, 96, 96), np.float32))


def test_normalised_upsample_of_maps_spanning_the_float32_range():
    """Halved before the span is taken: max - min of +-3e38 would overflow to Inf."""
    maps = np.zeros((1, 1, 4, 4), np.float32)
    maps[0, 0, 0, 0], maps[0, 0, 3, 3] = -3e38, 3e38
    got = normalised_upsample(maps, (16, 16))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, minmax_of_upsampled(maps.astype(np.float64), (16, 16)), rtol=0, atol=1e-6)
