"""ReLU/ReLU6 masks on channels-first maps are built from depthwise 1x1 convolutions with a fused Clip (so that
onnxruntime keeps the backward in its blocked CPU layout): they must equal the exact masks 1[x > 0] and
1[0 < x < 6], at the bounds, one float step inside them and for tiny activations."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxplain.kernels import autodiff


def model(activation: str, channels: int, side: int, classes: int, rng) -> tuple[onnx.ModelProto, np.ndarray]:
    weights = rng.standard_normal((channels * side * side, classes)).astype(np.float32)
    inits = [numpy_helper.from_array(np.eye(channels, dtype=np.float32)[:, :, None, None], "eye"),
             numpy_helper.from_array(weights, "w"),
             numpy_helper.from_array(np.array(0, np.float32), "lo"), numpy_helper.from_array(np.array(6, np.float32), "hi")]
    act = (helper.make_node("Relu", ["pre"], ["act"]) if activation == "Relu"
           else helper.make_node("Clip", ["pre", "lo", "hi"], ["act"]))
    nodes = [helper.make_node("Conv", ["x", "eye"], ["pre"]), act,     # pre == x exactly (identity 1x1 conv)
             helper.make_node("Flatten", ["act"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, side, side])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), weights


@pytest.mark.parametrize("activation", ["Relu", "Clip"])
@pytest.mark.parametrize("rule", ["standard", "guided"])
def test_conv_masks_equal_the_exact_masks(activation, rule):
    rng = np.random.default_rng(0)
    channels, side, classes = 8, 6, 3
    m, weights = model(activation, channels, side, classes, rng)
    aug = autodiff.augment(m, [], wrt_input=True, rule=rule, scores="logits")
    assert sum(n.op_type == "Conv" and n.name.startswith("ad/") for n in aug.graph.node) >= 1   # the conv path is taken
    assert not any(n.op_type in ("Greater", "Less", "Cast") for n in aug.graph.node)
    special = np.array([0.0, 6.0, np.nextafter(np.float32(6), np.float32(0)), np.nextafter(np.float32(0), np.float32(1)) * 2**30,
                        1e-30, -1e-30, 3.0, 7.5, -2.0, np.nextafter(np.float32(6), np.float32(7))], np.float32)
    x = rng.standard_normal((2, channels, side, side)).astype(np.float32) * 4
    x.reshape(2, -1)[:, :special.size] = special
    seed = rng.standard_normal((2, classes)).astype(np.float32)
    session = ort.InferenceSession(aug.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(["x__grad"], {"x": x, "seed": seed})[0]
    upstream = (seed @ weights.T).reshape(x.shape)
    if rule == "guided":
        upstream = np.maximum(upstream, 0)
    mask = (x > 0) & ((x < 6) if activation == "Clip" else True)
    np.testing.assert_array_equal(got, np.where(mask, upstream, 0).astype(np.float32))


def test_nhwc_maps_keep_the_comparison_masks():
    """A Relu on a tensor that no convolution produced (layout unknown) keeps the comparison mask."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 4, 3])
    w = numpy_helper.from_array(np.ones((48, 2), np.float32), "w")
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["logits"])]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])], [w]),
                          opset_imports=[helper.make_opsetid("", 17)])
    aug = autodiff.augment(m, [], wrt_input=True, scores="logits")
    assert any(n.op_type == "Greater" for n in aug.graph.node)
