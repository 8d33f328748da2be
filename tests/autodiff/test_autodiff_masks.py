"""ReLU/ReLU6 masks on float32 tensors are HardSigmoid steps on the activation's output (so that onnxruntime keeps
the backward in its blocked CPU layout): they must equal the exact masks 1[x > 0] and 1[0 < x < 6], at the bounds,
one float step inside them and for tiny activations, on channels-first maps and on any other float32 tensor. On
maps, ReLU6's band is a step at the top, a depthwise Conv plus the map, and a step at 0 (fused by onnxruntime);
a clip whose band does not start at 0 (hardtanh) keeps a step at each bound."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxplain.kernels import autodiff


BOUNDS = {"Relu": (0.0, None), "Clip": (0.0, 6.0), "Hardtanh": (-1.0, 1.0)}


def model(activation: str, channels: int, side: int, classes: int, rng) -> tuple[onnx.ModelProto, np.ndarray]:
    weights = rng.standard_normal((channels * side * side, classes)).astype(np.float32)
    lo, hi = BOUNDS[activation]
    inits = [numpy_helper.from_array(np.eye(channels, dtype=np.float32)[:, :, None, None], "eye"),
             numpy_helper.from_array(weights, "w"),
             numpy_helper.from_array(np.array(lo, np.float32), "lo"),
             numpy_helper.from_array(np.array(hi or 0, np.float32), "hi")]
    act = (helper.make_node("Relu", ["pre"], ["act"]) if activation == "Relu"
           else helper.make_node("Clip", ["pre", "lo", "hi"], ["act"]))
    nodes = [helper.make_node("Conv", ["x", "eye"], ["pre"]), act,     # pre == x exactly (identity 1x1 conv)
             helper.make_node("Flatten", ["act"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, side, side])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), weights


@pytest.mark.parametrize("activation", sorted(BOUNDS))
@pytest.mark.parametrize("rule", ["standard", "guided"])
def test_masks_on_conv_maps_equal_the_exact_masks(activation, rule):
    rng = np.random.default_rng(0)
    channels, side, classes = 8, 6, 3
    lo, hi = BOUNDS[activation]
    m, weights = model(activation, channels, side, classes, rng)
    aug = autodiff.augment(m, [], wrt_input=True, rule=rule, scores="logits")
    assert sum(n.op_type == "HardSigmoid" for n in aug.graph.node) == (1 if activation == "Relu" else 2)
    # ReLU6's band on a map: a depthwise Conv between its two steps (the backward's only other Conv is the 1x1's)
    assert sum(n.op_type == "Conv" for n in aug.graph.node) == 2 + (activation == "Clip")
    assert not any(n.op_type in ("Greater", "Less", "Cast") for n in aug.graph.node)
    f32 = np.float32
    special = [0.0, np.nextafter(f32(0), f32(1)) * 2**30, 1e-30, -1e-30, 3.0, 7.5, -2.0, -0.5, 0.5]
    for bound in (b for b in (lo, hi) if b):   # one float step either side (at 0 the steps are exact from 2**-124)
        special += [bound, np.nextafter(f32(bound), f32(-10)), np.nextafter(f32(bound), f32(10))]
    x = rng.standard_normal((2, channels, side, side)).astype(np.float32) * 4
    x.reshape(2, -1)[:, :len(special)] = np.array(special, np.float32)
    seed = rng.standard_normal((2, classes)).astype(np.float32)
    session = ort.InferenceSession(aug.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(["x__grad"], {"x": x, "seed": seed})[0]
    upstream = (seed @ weights.T).reshape(x.shape)
    if rule == "guided":
        upstream = np.maximum(upstream, 0)
    mask = (x > lo) & ((x < hi) if hi is not None else True)
    np.testing.assert_array_equal(got, np.where(mask, upstream, 0).astype(np.float32))


def nhwc_relu(dtype):
    x = helper.make_tensor_value_info("x", dtype, ["N", 4, 4, 3])
    w = numpy_helper.from_array(np.ones((48, 2), helper.tensor_dtype_to_np_dtype(dtype)), "w")
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["logits"])]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("logits", dtype, ["N", 2])], [w]),
                             opset_imports=[helper.make_opsetid("", 17)])


def test_masks_on_other_float32_tensors_are_exact():
    """A Relu on a tensor that no convolution produced (NHWC here) gets the same exact step mask."""
    aug = autodiff.augment(nhwc_relu(TensorProto.FLOAT), [], wrt_input=True, scores="logits")
    assert any(n.op_type == "HardSigmoid" for n in aug.graph.node)
    x = np.random.default_rng(1).standard_normal((2, 4, 4, 3)).astype(np.float32)
    x.reshape(-1)[:5] = [0.0, 1e-30, -1e-30, np.nextafter(np.float32(0), np.float32(1)) * 2**30, -0.0]
    seed = np.array([[1.0, -2.0], [0.5, 3.0]], np.float32)
    got = ort.InferenceSession(aug.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["x__grad"], {"x": x, "seed": seed})[0]
    np.testing.assert_array_equal(got, np.where(x > 0, seed.sum(1)[:, None, None, None], 0).astype(np.float32))


def test_float64_keeps_the_comparison_masks():
    """The step's exactness argument is for float32; other types keep Greater + Cast."""
    aug = autodiff.augment(nhwc_relu(TensorProto.DOUBLE), [], wrt_input=True, scores="logits")
    assert any(n.op_type == "Greater" for n in aug.graph.node)
    assert not any(n.op_type == "HardSigmoid" for n in aug.graph.node)
