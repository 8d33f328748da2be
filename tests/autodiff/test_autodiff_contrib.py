"""onnxruntime's fused operators (kernels.contrib) written as standard ONNX: each against onnxruntime's own kernel.

Per case, a one-node graph with the fused operator: `to_standard` leaves no onnxruntime operator and passes the
ONNX checker; the rewritten forward equals onnxruntime's fused kernel; and `augment` of the fused graph (which
rewrites it first) gives gradients that match central finite differences of onnxruntime's fused kernel itself, in
float32 (the kernels' only type), so the reference owes nothing to the rewrite. Forms that are not rewritten stay,
and autodiff then names the node.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from adcheck import finite_differences, rel, session
from onnxplain.kernels.autodiff import AutodiffError, augment
from onnxplain.kernels.contrib import to_standard

MS = "com.microsoft"
R = np.random.default_rng(7)


def away(*shape, lo=0.2, hi=1.0):
    return (R.choice([-1.0, 1.0], size=shape) * R.uniform(lo, hi, size=shape)).astype(np.float32)


def fused(op, ins, outs, inputs: dict, inits: dict = None, opset=17, domain=MS, **attrs):
    """A model of one onnxruntime node. inputs / inits: name -> float32 (or int64) array."""
    node = helper.make_node(op, ins, outs if isinstance(outs, list) else [outs], domain=domain, **attrs)
    vis = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
           for k, v in inputs.items()]
    outs = outs if isinstance(outs, list) else [outs]
    graph = helper.make_graph([node], "case", vis, [helper.make_tensor_value_info(o, 1, None) for o in outs if o],
                              [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)])
    model.ir_version = 9
    for o, y in zip(model.graph.output, session(model).run(None, inputs)):   # the checker wants output shapes
        o.CopyFrom(helper.make_tensor_value_info(o.name, 1, list(y.shape)))
    return model, inputs


def check(case, out="y", tol=3e-3, h=1e-3):
    model, feeds = case
    lowered = to_standard(model)
    assert {(n.domain, n.op_type) for n in lowered.graph.node} & {(MS, model.graph.node[0].op_type),
                                                                   ("", model.graph.node[0].op_type)} == set()
    assert all(n.domain in ("", "ai.onnx") for n in lowered.graph.node)
    onnx.checker.check_model(lowered)
    onnx.shape_inference.infer_shapes(lowered, check_type=True, strict_mode=True)
    fused_s = session(model)
    want = fused_s.run(None, feeds)
    got = session(lowered).run(None, feeds)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)
    y = dict(zip([o.name for o in fused_s.get_outputs()], want))[out]
    seed = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)
    aug = augment(model, scores=out)
    assert all(n.domain in ("", "ai.onnx") for n in aug.graph.node)
    res = dict(zip([o.name for o in aug.graph.output], session(aug).run(None, {**feeds, "seed": seed})))
    for name in feeds:
        fd = finite_differences(fused_s, feeds, out, seed, name, h)
        err = rel(res[f"{name}__grad"], fd)
        assert err < tol, f"{name}: relative error {err:.2e}"


CONV_ACTIVATIONS = [("Relu", []), ("Tanh", []), ("Sigmoid", []), ("LeakyRelu", [0.15]), ("Clip", [-0.4, 0.5]),
                    ("HardSigmoid", [0.3, 0.4]), ("", [])]


@pytest.mark.parametrize("activation,params", CONV_ACTIVATIONS, ids=[a or "none" for a, _ in CONV_ACTIVATIONS])
def test_fused_conv(activation, params):
    attrs = {"activation": activation} if activation else {}
    if params:
        attrs["activation_params"] = params
    x, w, b = away(2, 4, 7, 6), away(6, 2, 3, 3) * 0.3, away(6)
    check(fused("FusedConv", ["x", "w", "b"], "y", {"x": x}, {"w": w, "b": b}, strides=[2, 1], pads=[1, 0, 1, 1],
                group=2, **attrs))


def test_fused_conv_with_its_sum_and_no_bias():
    x, z = away(2, 3, 6, 6), away(2, 4, 6, 6)
    check(fused("FusedConv", ["x", "w", "", "z"], "y", {"x": x, "z": z}, {"w": away(4, 3, 3, 3) * 0.3},
                pads=[1, 1, 1, 1], activation="Relu"))


@pytest.mark.parametrize("activation", ["Relu", "LeakyRelu", "Sigmoid"])   # onnxruntime wants one
def test_fused_gemm(activation):
    attrs = {"activation": activation} if activation else {}
    if activation == "LeakyRelu":
        attrs["activation_alpha"] = 0.2
    a, b, c = away(5, 3), away(4, 5), away(4)
    check(fused("FusedGemm", ["a", "b", "c"], "y", {"a": a, "b": b}, {"c": c}, transA=1, transB=1, alpha=0.7,
                beta=1.3, **attrs))


@pytest.mark.parametrize("trans", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_fused_matmul(trans):
    a = away(2, 3, 4, 5) if trans[0] else away(2, 3, 5, 4)
    b = away(3, 6, 4) if trans[1] else away(3, 4, 6)
    check(fused("FusedMatMul", ["a", "b"], "y", {"a": a, "b": b}, transA=trans[0], transB=trans[1], alpha=0.5))


@pytest.mark.parametrize("op", ["Gelu", "BiasGelu", "FastGelu", "FastGelu+bias", "QuickGelu"])
def test_gelus(op):
    x, bias = away(2, 3, 8, hi=2.0), away(8)
    if op in ("BiasGelu", "FastGelu+bias"):
        case = fused(op.split("+")[0], ["x", "bias"], "y", {"x": x, "bias": bias})
    else:
        case = fused(op, ["x"], "y", {"x": x}, **({"alpha": 1.5} if op == "QuickGelu" else {}))
    check(case)


def test_bias_add():
    """onnxruntime has BiasAdd on CUDA only: checked against its definition."""
    x, bias, skip = away(2, 3, 8), away(8), away(2, 3, 8)
    node = helper.make_node("BiasAdd", ["x", "bias", "skip"], ["y"], domain=MS)
    vis = [helper.make_tensor_value_info(k, 1, list(v.shape)) for k, v in (("x", x), ("bias", bias), ("skip", skip))]
    graph = helper.make_graph([node], "case", vis, [helper.make_tensor_value_info("y", 1, [2, 3, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    lowered = to_standard(model)
    assert [n.op_type for n in lowered.graph.node] == ["Add", "Add"]
    y = session(lowered).run(None, {"x": x, "bias": bias, "skip": skip})[0]
    np.testing.assert_array_equal(y, x + bias + skip)


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("form", ["gamma", "beta+bias", "all outputs"])
def test_skip_layer_normalization(form, opset):
    x, skip = away(2, 3, 8, hi=2.0), away(2, 3, 8)
    ins, inits = ["x", "skip", "gamma"], {"gamma": away(8, lo=0.5, hi=1.5)}
    if form != "gamma":
        ins += ["beta", "bias"]
        inits.update(beta=away(8), bias=away(8))
    outs = ["y", "mean", "inv", "sum"] if form == "all outputs" else ["y"]
    check(fused("SkipLayerNormalization", ins, outs, {"x": x, "skip": skip}, inits, opset=opset, epsilon=1e-5))
    if form == "all outputs":
        check(fused("SkipLayerNormalization", ins, outs, {"x": x, "skip": skip}, inits, opset=opset, epsilon=1e-5),
              out="sum")


def test_skip_simplified_layer_normalization():
    check(fused("SkipSimplifiedLayerNormalization", ["x", "skip", "gamma", "bias"], "y",
                {"x": away(2, 3, 8, hi=2.0), "skip": away(2, 3, 8)}, {"gamma": away(8), "bias": away(8)},
                epsilon=1e-5))


@pytest.mark.parametrize("op", ["LayerNormalization", "SimplifiedLayerNormalization"])
def test_onnxruntimes_normalizations_in_the_onnx_domain(op):
    """onnxruntime writes these in the ONNX domain below opset 17, where ONNX defines no such operator (its checker
    refuses the model): they become standard operators there."""
    ins = ["x", "gamma", "beta"] if op == "LayerNormalization" else ["x", "gamma"]
    inits = {"gamma": away(8), "beta": away(8)}
    check(fused(op, ins, "y", {"x": away(2, 3, 8, hi=2.0)}, {k: inits[k] for k in ins[1:]}, opset=13, domain="",
                axis=-1, epsilon=1e-5))


def test_attention():
    """com.microsoft Attention: packed projection, unequal V width (qkv_hidden_sizes), additive bias, own scale."""
    x = away(2, 5, 8)
    w, b = away(8, 8 + 8 + 12) * 0.5, away(28)
    bias = away(1, 2, 5, 5)
    check(fused("Attention", ["x", "w", "b", "", "", "ab"], "y", {"x": x, "ab": bias}, {"w": w, "b": b},
                num_heads=2, qkv_hidden_sizes=[8, 8, 12], scale=0.4))
    check(fused("Attention", ["x", "w", "b"], "y", {"x": x}, {"w": away(8, 24) * 0.5, "b": away(24)}, num_heads=4))


@pytest.mark.parametrize("with_bias", [False, True])
def test_multi_head_attention(with_bias):
    q, k, v = away(2, 4, 8), away(2, 6, 8), away(2, 6, 12)
    ins, inits = ["q", "k", "v"], {}
    if with_bias:
        ins.append("b")
        inits["b"] = away(28)
    check(fused("MultiHeadAttention", ins, "y", {"q": q, "k": k, "v": v}, inits, num_heads=2))


def test_forms_that_are_not_rewritten_stay_and_are_named():
    x, w = away(2, 5, 8), away(8, 24)
    mask = np.ones((2, 5), np.int32)
    model, _ = fused("Attention", ["x", "w", "", "mask"], "y", {"x": x, "mask": mask}, {"w": w}, num_heads=2,
                     unidirectional=1)
    assert [n.op_type for n in to_standard(model).graph.node] == ["Attention"]
    with pytest.raises(AutodiffError, match="Attention"):
        augment(model, scores="y")
    q, k, v, mask = away(2, 4, 8), away(2, 6, 8), away(2, 6, 8), np.ones((2, 6), np.int32)
    model, _ = fused("MultiHeadAttention", ["q", "k", "v", "", "mask"], "y", {"q": q, "k": k, "v": v, "mask": mask},
                     num_heads=2)
    assert [n.op_type for n in to_standard(model).graph.node] == ["MultiHeadAttention"]


def test_a_model_with_nothing_to_rewrite_is_returned_as_it_is():
    model, _ = fused("Relu", ["x"], "y", {"x": away(2, 3)}, domain="")
    assert to_standard(model) is model


@pytest.mark.parametrize("op", ["BiasGelu", "FastGelu", "QuickGelu"])
def test_a_float16_model_keeps_float16_constants(op):
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float16)
    ins = ["x", "b"] if op != "QuickGelu" else ["x"]
    inits = [numpy_helper.from_array(np.linspace(-1, 1, 8).astype(np.float16), "b")] if "b" in ins else []
    graph = helper.make_graph([helper.make_node(op, ins, ["y"], domain=MS)], "case",
                              [helper.make_tensor_value_info("x", 10, [2, 3, 8])],
                              [helper.make_tensor_value_info("y", 10, [2, 3, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    lowered = to_standard(model)
    onnx.checker.check_model(lowered)
    want = session(model).run(None, {"x": x})[0].astype(np.float32)
    got = session(lowered).run(None, {"x": x})[0]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want, atol=2e-3)
