"""The input gradient of a strided depthwise convolution on float32 maps is built as g spread out with zeros and a
stride-1 depthwise Conv of the flipped kernel (not onnxruntime's slow grouped ConvTranspose). The float64 finite-
difference cases never take that path (it is for float32 maps), so here it is checked against the adjoint
re-derived in numpy, for each geometry it accepts, and the geometries it declines must still be right."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxplain.kernels import autodiff


def conv_model(channels, side, kernel, multiplier=1, **attrs):
    rng = np.random.default_rng(sum(kernel) + channels)
    w = rng.standard_normal((channels * multiplier, 1, *kernel)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], group=channels, **attrs)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, *side])
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    m = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    return m, w


def reference(g, w, channels, side, strides, dilations, pads):
    n, cout, oh, ow = g.shape
    mult = cout // channels
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = strides, dilations, pads
    padded = np.zeros((n, channels, side[0] + pt + pb, side[1] + pl + pr), np.float64)
    kh, kw = w.shape[2:]
    for i in range(kh):
        for j in range(kw):
            for m in range(mult):
                out = np.arange(channels) * mult + m
                contrib = w[out, 0, i, j][None, :, None, None] * g[:, out].astype(np.float64)
                padded[:, :, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw] += contrib
    return padded[:, :, pt: pt + side[0], pl: pl + side[1]]


CASES = {   # kernel, side, attributes; all taken by the spread path
    "k3-s2-p1-even": ((3, 3), (12, 12), dict(strides=[2, 2], pads=[1, 1, 1, 1])),
    "k3-s2-p1-odd": ((3, 3), (11, 13), dict(strides=[2, 2], pads=[1, 1, 1, 1])),
    "k5-s2-p2": ((5, 5), (14, 14), dict(strides=[2, 2], pads=[2, 2, 2, 2])),
    "k3-s2-tf-same": ((3, 3), (12, 12), dict(strides=[2, 2], pads=[0, 0, 1, 1])),
    "k3-s3-nodivide": ((3, 3), (13, 11), dict(strides=[3, 3])),
    "k3-s2-dilated": ((3, 3), (13, 13), dict(strides=[2, 2], dilations=[2, 2], pads=[2, 2, 2, 2])),
    "k3x5-s2x1": ((3, 5), (10, 9), dict(strides=[2, 1], pads=[1, 2, 1, 2])),
    "same-upper": ((4, 3), (11, 12), dict(strides=[2, 2], auto_pad="SAME_UPPER")),
    "same-lower": ((4, 4), (12, 12), dict(strides=[2, 2], auto_pad="SAME_LOWER")),
}
DECLINED = {   # the spread path does not fit: the grouped ConvTranspose remains, and must be right too
    "pad-past-kernel": ((1, 1), (9, 9), dict(strides=[2, 2], pads=[1, 1, 1, 1]), 1),
    "channel-multiplier-2": ((3, 3), (10, 10), dict(strides=[2, 2], pads=[1, 1, 1, 1]), 2),
}


def check(model, w, channels, side, attrs, kernel):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, channels, *side)).astype(np.float32)
    aug = autodiff.augment(model, [], wrt_input=True, scores="y")
    onnx.checker.check_model(aug, full_check=True)
    session = ort.InferenceSession(aug.SerializeToString(), providers=["CPUExecutionProvider"])
    y_shape = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["y"], {"x": x})[0].shape
    g = rng.standard_normal(y_shape).astype(np.float32)
    got = session.run(["x__grad"], {"x": x, "seed": g})[0]
    strides = attrs.get("strides", [1, 1])
    dilations = attrs.get("dilations", [1, 1])
    if "pads" in attrs:
        pads = attrs["pads"]
    elif "auto_pad" in attrs:
        totals = [max(0, (-(-n // s) - 1) * s + d * (k - 1) + 1 - n)
                  for n, s, d, k in zip(side, strides, dilations, kernel)]
        small = [t // 2 for t in totals]
        big = [t - t // 2 for t in totals]
        pads = small + big if attrs["auto_pad"] == "SAME_UPPER" else big + small
    else:
        pads = [0, 0, 0, 0]
    want = reference(g, w, channels, side, strides, dilations, pads)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    return aug


def spread_ops(aug):
    """The ConvTransposes of the backward and their kernel sizes."""
    weights = {t.name: t for t in aug.graph.initializer}
    return [tuple(weights[n.input[1]].dims[2:]) if n.input[1] in weights else None
            for n in aug.graph.node if n.op_type == "ConvTranspose"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_strided_depthwise_backward_is_a_spread_and_a_depthwise_conv(name):
    kernel, side, attrs = CASES[name]
    channels = 8
    model, w = conv_model(channels, side, kernel, **attrs)
    aug = check(model, w, channels, side, attrs, kernel)
    # the only ConvTranspose left is the 1x1 spread of ones; the kernel itself runs in a depthwise Conv
    assert spread_ops(aug) == [(1, 1)]
    assert sum(n.op_type == "Conv" for n in aug.graph.node) == 2


@pytest.mark.parametrize("name", sorted(DECLINED))
def test_declined_geometries_keep_the_grouped_conv_transpose(name):
    kernel, side, attrs, multiplier = DECLINED[name]
    channels = 8
    model, w = conv_model(channels, side, kernel, multiplier=multiplier, **attrs)
    aug = check(model, w, channels, side, attrs, kernel)
    assert spread_ops(aug) == [kernel]
