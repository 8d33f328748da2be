"""Quantized models: QuantizeLinear / DequantizeLinear under the straight-through estimator.

The true derivative of a quantized network is zero almost everywhere (rounding is piecewise constant), and before
these rules the walk stopped at QuantizeLinear's integer output and returned exactly that: all-zero gradients for
every QDQ model, without a word. Now a quantized tensor carries the cotangent of the real value it stands for, and
QuantizeLinear passes it where x fell inside the integer range: torch.fake_quantize_*'s backward. Checked against a
numpy re-derivation of that mask (per tensor, per axis, every integer type, with and without a zero point), against
torch autograd on fake-quantised nets exported by both exporters (the ONNX form of quantisation-aware training), and
on onnxruntime's own quantizer's output; models that compute on integers get an error naming the operator.
"""
from __future__ import annotations

import contextlib
import io

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from adcheck import assert_standard, rel, session
from onnxplain.kernels import graph as G
from onnxplain.kernels.autodiff import AutodiffError, augment

torch.set_num_threads(1)

RANGES = {np.int8: (-128, 127), np.uint8: (0, 255), np.int16: (-32768, 32767), np.uint16: (0, 65535)}


def qdq_model(shape, scale, zero, axis=None, opset=None):
    """y = w * DequantizeLinear(QuantizeLinear(x)): `zero` None leaves the zero point out (uint8 then)."""
    inits = {"s": np.asarray(scale, np.float32), "w": np.random.default_rng(5).standard_normal(shape).astype(np.float32)}
    names = ["x", "s"]
    if zero is not None:
        inits["z"] = np.asarray(zero)
        names.append("z")
    attrs = {} if axis is None else {"axis": axis}
    nodes = [helper.make_node("QuantizeLinear", names, ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", *names[1:]], ["d"], **attrs),
             helper.make_node("Mul", ["d", "w"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    wide = zero is not None and zero.dtype.itemsize > 1   # 16-bit quantization is opset 21's
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset or (21 if wide else 19))])
    model.ir_version = 10
    return model, inits


def numpy_ste(x, scale, zero, axis, lo, hi):
    """(dequantized x, straight-through mask), written out from the ONNX spec and torch's fake-quantize backward."""
    shape = [1] * x.ndim
    if np.ndim(scale) == 1:
        shape[axis % x.ndim] = -1
    s = np.reshape(scale, shape).astype(np.float32)
    z = np.reshape(np.asarray(0 if zero is None else zero), shape).astype(np.float32)
    t = np.rint(x / s) + z                           # rint: round half to even, as the spec
    return (np.clip(t, lo, hi) - z) * s, ((t >= lo) & (t <= hi)).astype(np.float32)


CASES = {
    "int8 per tensor, zero point": (np.int8, 0.02, -7, None),
    "uint8 per tensor, no zero point": (np.uint8, 0.015, None, None),
    "uint8 per channel (axis 1)": (np.uint8, [0.01, 0.02, 0.04], [128, 100, 3], 1),
    "int8 per last axis (axis -1)": (np.int8, [0.01, 0.03, 0.02, 0.05, 0.015], [0, 5, -3, 0, 9], -1),
    "int16 per tensor": (np.int16, 1e-4, 1000, None),
    "uint16 per channel": (np.uint16, [2e-5, 5e-5, 1e-5], [30000, 0, 65000], 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_quantize_dequantize_passes_the_gradient_inside_the_integer_range(case):
    dtype, scale, zero, axis = CASES[case]
    shape = (2, 3, 4, 5)
    zero_arr = None if zero is None else np.asarray(zero, dtype)
    model, inits = qdq_model(shape, scale, zero_arr, axis)
    lo, hi = RANGES[dtype]
    span = np.max(np.asarray(scale)) * (hi - lo)
    x = np.random.default_rng(1).uniform(-span, span, shape).astype(np.float32)  # many values saturate, both ends
    aug = augment(model, scores="y")
    assert_standard(aug)
    seed = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    y, gx = session(aug).run(["y", "x__grad"], {"x": x, "seed": seed})
    dq, mask = numpy_ste(x, np.asarray(scale, np.float32), zero_arr, 1 if axis is None else axis, lo, hi)
    np.testing.assert_allclose(y, dq * inits["w"], rtol=1e-6, atol=1e-7)   # the forward is what we think it is
    assert 0.2 < mask.mean() < 0.9, "the case must exercise both the range and the saturation"
    np.testing.assert_allclose(gx, seed * inits["w"] * mask, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype, zero, lo, hi", [(TensorProto.INT4, -2, -8, 7), (TensorProto.UINT4, 3, 0, 15)])
def test_four_bit_quantization(dtype, zero, lo, hi):
    """Opset 21's int4 / uint4 (numpy has no 4-bit type, so the zero point is written as a TensorProto)."""
    shape = (2, 3, 4, 5)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "int4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
                              [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
                               helper.make_tensor("z", dtype, [], [zero])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    x = np.random.default_rng(0).uniform(-2, 2, shape).astype(np.float32)
    seed = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    y, gx = session(augment(model, scores="y")).run(["y", "x__grad"], {"x": x, "seed": seed})
    dq, mask = numpy_ste(x, np.float32(0.1), np.asarray(zero), 1, lo, hi)
    np.testing.assert_allclose(y, dq, rtol=1e-6, atol=1e-7)
    assert 0.2 < mask.mean() < 0.9
    np.testing.assert_allclose(gx, seed * mask, rtol=1e-6, atol=0)


def test_the_zero_point_type_sets_the_range():
    """Same x, same scale: an int8 zero point saturates at -128/127, a uint8 one at 0/255."""
    shape = (1, 1, 2, 3)
    x = np.array([[[[-3.0, -1.0, 0.5], [1.0, 2.0, 3.0]]]], np.float32)
    got = {}
    for dtype in (np.int8, np.uint8):
        model, inits = qdq_model(shape, 0.01, np.asarray(0, dtype))
        gx, = session(augment(model, scores="y")).run(["x__grad"], {"x": x, "seed": 1 / inits["w"]})
        got[dtype] = np.round(gx).astype(int).ravel().tolist()
    assert got[np.int8] == [0, 1, 1, 1, 0, 0]    # |x| / 0.01 within [-128, 127]
    assert got[np.uint8] == [0, 0, 1, 1, 1, 0]   # x / 0.01 within [0, 255]


@pytest.mark.parametrize("rule", ["guided", "deconvnet"])
def test_a_range_starting_at_zero_is_a_rectifier_under_guided_and_deconvnet(rule):
    """Quantizers fold ReLU / ReLU6 into a range that starts at 0 and drop the node (onnxruntime's removes every
    Clip of EfficientNet-Lite0): such a QuantizeLinear follows the ReLU variants; a range that does not start at
    0 keeps the true (straight-through) gradient under every rule."""
    shape = (2, 3, 4, 5)
    x = np.random.default_rng(6).uniform(-2, 6, shape).astype(np.float32)
    seed = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    for zero, rectifier in ((np.asarray(0, np.uint8), True), (None, True), (np.asarray(-128, np.int8), True),
                            (np.asarray(-7, np.int8), False), (np.asarray([0, 0, 3], np.uint8), False)):
        per_axis = zero is not None and zero.ndim == 1
        scale = np.full(3, 0.02, np.float32) if per_axis else np.float32(0.02)
        model, inits = qdq_model(shape, scale, zero, 1 if per_axis else None)
        lo, hi = RANGES[np.uint8 if zero is None else zero.dtype.type]
        _, mask = numpy_ste(x, scale, zero, 1, lo, hi)
        g = seed * inits["w"]
        want = mask * g if not rectifier else np.maximum(g, 0) * (mask if rule == "guided" else 1)
        gx, = session(augment(model, scores="y", rule=rule)).run(["x__grad"], {"x": x, "seed": seed})
        np.testing.assert_allclose(gx, want, rtol=1e-6, atol=0, err_msg=f"zero point {zero}")


# --------------------------------------------------------------------------------------------- torch QAT nets
class FakeQuant(nn.Module):
    def __init__(self, scale, zero, lo=-128, hi=127):
        super().__init__()
        self.scale, self.zero, self.lo, self.hi = scale, zero, lo, hi

    def forward(self, x):
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero, self.lo, self.hi)


class QConv(nn.Conv2d):
    """A convolution with per-output-channel int8 fake-quantised weights (what QAT leaves in the graph)."""

    def forward(self, x):
        w = self.weight
        scale = (w.detach().abs().amax(dim=(1, 2, 3)) / 127).float()
        zero = torch.zeros(w.shape[0], dtype=torch.int32)
        return self._conv_forward(x, torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -128, 127), self.bias)


class TinyQAT(nn.Module):
    """Quantised input, a residual block, MaxPool and a uint8 stage: activations saturate at both ends."""

    def __init__(self):
        super().__init__()
        self.q_in = FakeQuant(0.02, 0)
        self.stem = QConv(3, 8, 3, padding=1)
        self.q_stem = FakeQuant(0.04, -20)
        self.body = QConv(8, 8, 3, padding=1)
        self.q_body = FakeQuant(0.05, 3)
        self.pool = nn.MaxPool2d(2)
        self.down = QConv(8, 16, 3, stride=2, padding=1)
        self.q_feat = FakeQuant(0.01, 0, 0, 255)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.q_stem(torch.relu(self.stem(self.q_in(x))))
        x = self.q_body(torch.relu(x + self.body(x)))
        self.feat = torch.relu(self.down(self.pool(x)))
        return self.head(self.q_feat(self.feat).mean((2, 3)))


_EXPORTS = {}


def qat_export(exporter, opset):
    if (exporter, opset) not in _EXPORTS:
        torch.manual_seed(0)
        net = TinyQAT().eval()
        x = torch.randn(2, 3, 16, 16)
        if exporter == "dynamo":
            with contextlib.redirect_stdout(io.StringIO()):   # (a symbolic batch: torch's fake-quantize has no
                model = torch.onnx.export(net, (x,), dynamo=True, input_names=["x"],  # meta kernel for torch.export)
                                          opset_version=opset).model_proto
        else:
            f = io.BytesIO()
            torch.onnx.export(net, (x,), f, dynamo=False, opset_version=opset, input_names=["x"],
                              output_names=["logits"], dynamic_axes={"x": {0: "N"}})
            model = onnx.load_from_string(f.getvalue())
        _EXPORTS[exporter, opset] = net, model
    return _EXPORTS[exporter, opset]


QAT = [("legacy", 13), ("legacy", 17), ("dynamo", 18)]


@pytest.mark.parametrize("exporter,opset", QAT, ids=[f"{e}-{o}" for e, o in QAT])
def test_fake_quantised_net_matches_torch_autograd(exporter, opset):
    """Input and layer gradients of a QAT-style net at batch 2 with different seed rows, against torch's own
    straight-through backward; the export is made of QuantizeLinear/DequantizeLinear pairs around float ops."""
    net, model = qat_export(exporter, opset)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 4 and ops.count("DequantizeLinear") >= 4
    inp, out = model.graph.input[0].name, model.graph.output[0].name
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2, 3, 16, 16)) * 1.5).astype(np.float32)   # the input quantiser saturates too
    seed = rng.standard_normal((2, 5)).astype(np.float32)
    xx = torch.from_numpy(x).requires_grad_()
    logits = net(xx)
    net.feat.retain_grad()
    (logits * torch.from_numpy(seed)).sum().backward()
    layer = _tensor_like(model, inp, x, net.feat.detach().numpy())
    aug = augment(model, layers=[layer], scores=out)
    assert_standard(aug)
    got = dict(zip([out, layer, f"{layer}__grad", f"{inp}__grad"],
                   session(aug).run([out, layer, f"{layer}__grad", f"{inp}__grad"], {inp: x, "seed": seed})))
    np.testing.assert_allclose(got[out], logits.detach().numpy(), rtol=1e-4, atol=1e-5)
    assert np.abs(got[f"{inp}__grad"]).max() > 0
    assert rel(got[f"{layer}__grad"], net.feat.grad.numpy()) < 1e-4
    assert rel(got[f"{inp}__grad"], xx.grad.numpy()) < 1e-4


def _tensor_like(model, inp, x, want):
    """The float tensor of the graph whose value is `want` (names differ between exporters)."""
    names = [o for n in model.graph.node for o in n.output if n.op_type in ("Relu", "Conv", "Add")]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    values = session(probe).run(names, {inp: x})
    return next(n for n, v in zip(names, values) if v.shape == want.shape and np.allclose(v, want, atol=1e-4))


def test_quantized_tensors_are_no_layers_and_each_map_is_listed_once():
    """A QDQ map is listed as its DequantizeLinear output (the real values), not as the integer codes nor as the
    float map the quantizer reads (the same map, before rounding)."""
    _, model = qat_export("legacy", 17)
    inferred = G.infer_shapes(model)
    layers = G.candidate_layers(inferred)
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    assert [producer[layer.name] for layer in layers] == ["DequantizeLinear", "DequantizeLinear", "MaxPool",
                                                          "DequantizeLinear"]
    assert G.default_layer(inferred).name == layers[-1].name


# --------------------------------------------------------------------------------------------- onnxruntime's quantizer
class _Float(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, 2, 1), nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


def _exported(net, d):
    """`net` exported to d/float.onnx (legacy exporter, opset 17, dynamic batch), and a calibration reader factory:
    8 standard-normal 16 x 16 images."""
    from onnxruntime.quantization import CalibrationDataReader

    torch.manual_seed(0)
    torch.onnx.export(net().eval(), (torch.randn(2, 3, 16, 16),), str(d / "float.onnx"), dynamo=False,
                      opset_version=17, input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "N"}})

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter({"x": np.random.default_rng(i).standard_normal((1, 3, 16, 16)).astype(np.float32)}
                              for i in range(8))

        def get_next(self):
            return next(self.feeds, None)

    return Calibration


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A float net and the three forms onnxruntime.quantization writes of it: QDQ (per channel), QOperator, dynamic."""
    from onnxruntime.quantization import QuantFormat, quantize_dynamic, quantize_static

    d = tmp_path_factory.mktemp("quantized")
    Calibration = _exported(_Float, d)

    quantize_static(str(d / "float.onnx"), str(d / "qdq.onnx"), Calibration(), quant_format=QuantFormat.QDQ,
                    per_channel=True)
    quantize_static(str(d / "float.onnx"), str(d / "qop.onnx"), Calibration(), quant_format=QuantFormat.QOperator)
    quantize_dynamic(str(d / "float.onnx"), str(d / "dynamic.onnx"))
    return {k: onnx.load(str(d / f"{k}.onnx")) for k in ("float", "qdq", "qop", "dynamic")}


def torch_reading(model):
    """A quantized graph evaluated by torch, op by op (the ops onnxruntime's quantizer writes here, and those
    kernels.qdq writes for its QOperator form): each QuantizeLinear -> DequantizeLinear pair on an activation becomes
    torch.fake_quantize_per_tensor_affine, whose backward is the straight-through estimator; quantized weights and
    biases are dequantized constants. Dynamic quantization as ONNX defines it: DynamicQuantizeLinear's scale
    (max(x, 0) - min(x, 0)) / 255 and zero point round(-min(x, 0) / scale) come from x's values (held constant: not
    differentiated), its uint8 codes are fake_quantize(x) / scale + zero point (the same backward), ConvInteger and
    MatMulInteger act on those codes minus the zero points, exactly. `run(x, env)` fills `env` with every tensor it
    computed."""
    import torch.nn.functional as F

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    quantized = {}

    def run(x, env=None):
        env = {} if env is None else env
        env[model.graph.input[0].name] = x
        val = lambda name: env[name] if name in env else torch.from_numpy(inits[name].astype(np.float32))
        for n in model.graph.node:
            a = {at.name: helper.get_attribute_value(at) for at in n.attribute}
            i = list(n.input)
            if n.op_type == "QuantizeLinear":
                quantized[n.output[0]] = (i[0], i[1], i[2])
                continue
            if n.op_type == "DynamicQuantizeLinear":
                v = val(i[0]).detach()
                lo, hi = min(float(v.min()), 0.0), max(float(v.max()), 0.0)
                scale = float(np.float32(hi - lo) / np.float32(255))
                zero = int(np.clip(np.rint(-lo / scale), 0, 255))
                codes = torch.fake_quantize_per_tensor_affine(val(i[0]), scale, zero, 0, 255) / scale + zero
                env.update(zip(n.output, (codes, torch.tensor(scale), torch.tensor(float(zero)))))
                continue
            if n.op_type == "DequantizeLinear" and i[0] in quantized:
                src, s, z = quantized[i[0]]
                lo, hi = RANGES[inits[z].dtype.type]
                out = torch.fake_quantize_per_tensor_affine(env[src], float(inits[s]), int(inits[z]), lo, hi)
            elif n.op_type == "DequantizeLinear":   # a constant: weights per output channel (or per column), biases
                s, z = inits[i[1]], inits[i[2]]
                q = inits[i[0]]
                shape = [1] * q.ndim
                if s.ndim == 1 and s.size > 1:
                    shape[a.get("axis", 1) % q.ndim] = -1
                w = (q.astype(np.float64) - z.reshape(shape)) * s.reshape(shape)
                out = torch.from_numpy(w.astype(np.float32))
            elif n.op_type in ("Conv", "MaxPool"):
                pads = a.get("pads", [0, 0, 0, 0])
                assert pads[:2] == pads[2:] and not a.get("ceil_mode")
                out = (F.conv2d(val(i[0]), val(i[1]), val(i[2]) if len(i) > 2 else None, a.get("strides", 1),
                                pads[:2], a.get("dilations", 1), a.get("group", 1)) if n.op_type == "Conv" else
                       F.max_pool2d(val(i[0]), a["kernel_shape"], a.get("strides", 1), pads[:2]))
            elif n.op_type in ("Relu", "Sigmoid"):
                out = getattr(torch, n.op_type.lower())(val(i[0]))
            elif n.op_type == "LeakyRelu":
                out = F.leaky_relu(val(i[0]), a.get("alpha", 0.01))
            elif n.op_type in ("ConvInteger", "MatMulInteger"):
                q, w = val(i[0]) - val(i[2]), val(i[1]) - val(i[3])
                out = (F.conv2d(q, w, None, a.get("strides", 1), a.get("pads", [0, 0, 0, 0])[:2])
                       if n.op_type == "ConvInteger" else q @ w)
            elif n.op_type in ("Add", "Mul", "MatMul"):
                out = {"Add": torch.add, "Mul": torch.mul, "MatMul": torch.matmul}[n.op_type](val(i[0]), val(i[1]))
            elif n.op_type in ("Cast", "Constant"):
                out = val(i[0]) if n.op_type == "Cast" else torch.from_numpy(numpy_helper.to_array(a["value"]).copy())
            elif n.op_type == "Reshape":
                out = val(i[0]).reshape([int(v) for v in env[i[1]]] if i[1] in env else inits[i[1]].tolist())
            elif n.op_type == "Transpose":
                out = val(i[0]).permute(*a["perm"])
            elif n.op_type == "Softmax":
                out = torch.softmax(val(i[0]), a.get("axis", -1))
            elif n.op_type == "Concat":
                out = torch.cat([val(t) for t in i], a["axis"])
            elif n.op_type in ("ReduceMean", "GlobalAveragePool"):
                axes, keep = (a["axes"], a.get("keepdims", 1)) if n.op_type == "ReduceMean" else ((2, 3), 1)
                out = val(i[0]).mean(dim=tuple(axes), keepdim=bool(keep))
            elif n.op_type == "Flatten":
                out = val(i[0]).flatten(a.get("axis", 1))
            elif n.op_type == "Gemm":
                assert a.get("transB") == 1 and a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0
                out = val(i[0]) @ val(i[1]).T + val(i[2])
            else:
                raise AssertionError(f"the reading has no {n.op_type}")
            env[n.output[0]] = out
        return env[model.graph.output[0].name]

    return run


def test_onnxruntime_qdq_model_matches_torch_reading_of_it(quantized):
    """onnxruntime.quantization's QDQ output (uint8 activations, int8 weights per channel): input gradient at batch 3
    with different seed rows against torch autograd on the same graph read op by op."""
    qdq = quantized["qdq"]
    assert {n.op_type for n in qdq.graph.node} >= {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"}
    x = (np.random.default_rng(4).standard_normal((3, 3, 16, 16)) * 2).astype(np.float32)
    seed = np.random.default_rng(5).standard_normal((3, 5)).astype(np.float32)
    aug = augment(qdq)
    assert_standard(aug)
    logits, gx = session(aug).run(["logits", "x__grad"], {"x": x, "seed": seed})
    xx = torch.from_numpy(x).requires_grad_()
    want = torch_reading(qdq)(xx)
    (want * torch.from_numpy(seed)).sum().backward()
    np.testing.assert_allclose(logits, want.detach().numpy(), rtol=1e-4, atol=1e-4)
    assert np.abs(gx).max() > 0
    assert rel(gx, xx.grad.numpy()) < 1e-4


def test_dequantized_weights_are_folded_exactly(quantized):
    """The augmented graph holds a QDQ model's weights and biases as their dequantized values (so a convolution's
    backward is a Conv of the transposed constant, and no weight is dequantized per run): no DequantizeLinear of
    constants is left, and with onnxruntime's optimisations off (the ONNX semantics, operator by operator) its
    outputs equal the model's bit for bit."""
    import onnxruntime as ort

    qdq = quantized["qdq"]
    constants = {t.name for t in qdq.graph.initializer}
    weights = [n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants]
    assert len(weights) >= 5   # 3 weights (per channel) and their biases
    aug = augment(qdq)
    assert not [n for n in aug.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in
                {t.name for t in aug.graph.initializer}]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = np.random.default_rng(8).standard_normal((2, 3, 16, 16)).astype(np.float32)
    plain = ort.InferenceSession(qdq.SerializeToString(), opts).run(["logits"], {"x": x})[0]
    folded = ort.InferenceSession(aug.SerializeToString(), opts).run(
        ["logits"], {"x": x, "seed": np.zeros((2, 5), np.float32)})[0]
    np.testing.assert_array_equal(folded, plain)


class _Tokens(nn.Module):
    """What dynamic quantization is for: a patch embedding, a token projection (MatMulInteger, one scale per column
    when quantized per channel), a token-mixing softmax product and a linear head, ReLU nowhere after the patches."""

    def __init__(self):
        super().__init__()
        self.patch, self.proj, self.head = nn.Conv2d(3, 16, 4, 4), nn.Linear(16, 16), nn.Linear(16, 5)

    def forward(self, x):
        t = self.patch(x).reshape(3, 16, 16).transpose(1, 2)
        t = t + torch.softmax(self.proj(t) @ t.transpose(1, 2), -1) @ t
        return self.head(t.mean(1))


@pytest.fixture(scope="module")
def dynamic(tmp_path_factory, quantized):
    """onnxruntime.quantization.quantize_dynamic's output for the CNN (its defaults: int8 weights per tensor) and
    for the token net (fixed batch 3, int8 weights per column)."""
    from onnxruntime.quantization import quantize_dynamic

    d = tmp_path_factory.mktemp("dynamic")
    torch.manual_seed(0)
    torch.onnx.export(_Tokens().eval(), (torch.randn(3, 3, 16, 16),), str(d / "tokens.onnx"), dynamo=False,
                      opset_version=17, input_names=["x"], output_names=["logits"])
    quantize_dynamic(str(d / "tokens.onnx"), str(d / "tokens_dynamic.onnx"), per_channel=True)
    return {"cnn": quantized["dynamic"], "tokens": onnx.load(str(d / "tokens_dynamic.onnx"))}


@pytest.mark.parametrize("net", ["cnn", "tokens"])
def test_dynamically_quantized_model_gradients_match_torch_reading(dynamic, net):
    """Before: refused (DynamicQuantizeLinear -> ConvInteger/MatMulInteger compute on integers). kernels.qdq writes
    each integer product, its Cast and its Mul by the two scales as the float operator on the two dequantized
    inputs: the scores equal onnxruntime's integer kernels' up to float rounding, the layers are the dequantized
    maps, and the default layer's and the input's gradients at batch 3 with different seed rows match torch autograd
    on the original graph read op by op (torch_reading: DynamicQuantizeLinear's scale and zero point held
    constant)."""
    from onnxplain.kernels.qdq import from_qoperator

    original = dynamic[net]
    ops = {n.op_type for n in original.graph.node}
    assert {"DynamicQuantizeLinear", "ConvInteger", "MatMulInteger"} <= ops
    rewritten = from_qoperator(original)
    assert_standard(rewritten)
    assert not {n.op_type for n in rewritten.graph.node} & {"ConvInteger", "MatMulInteger", "Cast"}
    x = (np.random.default_rng(4).standard_normal((3, 3, 16, 16)) * 2).astype(np.float32)
    want = session(original).run(["logits"], {"x": x})[0]
    np.testing.assert_allclose(session(rewritten).run(["logits"], {"x": x})[0], want, rtol=1e-5, atol=1e-6)

    model = G.load_model(original)
    layer = G.default_layer(model).name
    assert all(not layer.name.endswith("_quantized") for layer in G.candidate_layers(model))
    _gradients_match_the_reading(model, layer, torch_reading(original), x, atol=1e-5)


def test_an_integer_product_the_rewrite_cannot_read_is_named(dynamic):
    """A ConvInteger whose output is scaled by a constant (not the product of its input's dynamic scale and the
    weight's) is not dynamic quantization's pattern: it is kept, and the refusal names it instead of a zero
    gradient."""
    model = onnx.ModelProto()
    model.CopyFrom(dynamic["cnn"])
    scales = next(n for n in model.graph.node if n.op_type == "Mul" and "quant_scales" in n.output[0])
    reader = next(n for n in model.graph.node if scales.output[0] in n.input)
    constants = {t.name for t in model.graph.initializer}
    reader.input[list(reader.input).index(scales.output[0])] = next(i for i in scales.input if i in constants)
    conv = next(n for n in model.graph.node if n.op_type == "ConvInteger")
    with pytest.raises(AutodiffError, match=f"ConvInteger.*{conv.name}.*QDQ format"):
        augment(model)


def test_a_qoperator_node_the_rewrite_cannot_read_is_named(quantized):
    """A QLinearConv whose weight is a graph input (no constant to dequantize per channel) is kept as it is: the
    refusal names it instead of a zero gradient."""
    qop = onnx.ModelProto()
    qop.CopyFrom(quantized["qop"])
    conv = next(n for n in qop.graph.node if n.op_type == "QLinearConv")
    weight = next(t for t in qop.graph.initializer if t.name == conv.input[3])
    qop.graph.input.append(helper.make_tensor_value_info(weight.name, weight.data_type, list(weight.dims)))
    qop.graph.initializer.remove(weight)
    with pytest.raises(AutodiffError, match=f"QLinearConv.*{conv.name}.*QDQ format"):
        augment(qop)


class _Mixed(nn.Module):
    """Every operator onnxruntime's QOperator quantizer writes for a CNN here: QLinearConv (ReLU folded in),
    MaxPool and Flatten on integers, QLinearAdd, QLinearSigmoid, QLinearMul, QLinearConcat, QLinearLeakyRelu,
    QLinearGlobalAveragePool, QGemm."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.c3, self.c4, self.fc = nn.Conv2d(8, 8, 1), nn.Conv2d(16, 16, 3, 2, 1), nn.Linear(16, 5)

    def forward(self, x):
        a = nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
        b = torch.relu(self.c2(a)) + a
        c = torch.sigmoid(self.c3(b)) * b
        e = nn.functional.leaky_relu(self.c4(torch.cat([b, c], 1)), 0.1)
        return self.fc(nn.functional.adaptive_avg_pool2d(e, 1).flatten(1))


QOPERATOR = {"uint8 per channel": ("QUInt8", True), "int8 per tensor": ("QInt8", False)}


@pytest.fixture(scope="module")
def qoperator(tmp_path_factory):
    """_Mixed in the QOperator format, both activation types."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    d = tmp_path_factory.mktemp("qoperator")
    Calibration = _exported(_Mixed, d)

    out = {}
    for case, (activations, per_channel) in QOPERATOR.items():
        path = d / f"{activations}.onnx"
        quantize_static(str(d / "float.onnx"), str(path), Calibration(), quant_format=QuantFormat.QOperator,
                        per_channel=per_channel, activation_type=getattr(QuantType, activations),
                        weight_type=QuantType.QInt8)
        out[case] = onnx.load(str(path))
    return out


@pytest.mark.parametrize("case", list(QOPERATOR))
def test_qoperator_model_is_read_in_the_qdq_format_with_the_same_scores(qoperator, case):
    """kernels.qdq writes every node in the QDQ format, standard operators only, integer tensors under their names;
    onnxruntime fuses it back into its integer kernels, so the scores equal the QOperator model's bit for bit, and
    the graph as ONNX defines it (optimisations off) is what torch's fake quantization computes."""
    import onnxruntime as ort
    from onnxplain.kernels.qdq import from_qoperator

    qop = qoperator[case]
    ops = {n.op_type for n in qop.graph.node}
    assert {"QLinearConv", "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearConcat", "QLinearLeakyRelu",
            "QLinearGlobalAveragePool", "QGemm", "MaxPool", "Flatten"} <= ops
    rewritten = from_qoperator(qop)
    assert_standard(rewritten)
    assert not {n.op_type for n in rewritten.graph.node} - {"QuantizeLinear", "DequantizeLinear", "Conv", "MaxPool",
                                                            "Add", "Mul", "Sigmoid", "Concat", "LeakyRelu",
                                                            "GlobalAveragePool", "Flatten", "Gemm"}
    integers = {o for n in qop.graph.node for o in n.output if n.op_type != "DequantizeLinear"}
    assert integers <= {o for n in rewritten.graph.node for o in n.output}
    x = (np.random.default_rng(4).standard_normal((3, 3, 16, 16)) * 2).astype(np.float32)
    want = session(qop).run(["logits"], {"x": x})[0]
    np.testing.assert_array_equal(session(rewritten).run(["logits"], {"x": x})[0], want)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(rewritten.SerializeToString(), opts).run(["logits"], {"x": x})[0]
    np.testing.assert_allclose(plain, torch_reading(rewritten)(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(QOPERATOR))
def test_qoperator_model_gradients_match_torch_reading(qoperator, case):
    """Loaded as the server loads it: layers are the dequantized maps (no integer tensor), and the default layer's
    and the input's gradients at batch 3 with different seed rows match torch autograd through fake quantization."""
    model = G.load_model(qoperator[case])
    layers = G.candidate_layers(model)
    assert layers and all(layer.name.endswith("_dequantized") for layer in layers)
    layer = G.default_layer(model).name
    assert layer == "/LeakyRelu_output_0_dequantized"
    x = (np.random.default_rng(4).standard_normal((3, 3, 16, 16)) * 2).astype(np.float32)
    _gradients_match_the_reading(model, layer, torch_reading(model), x, atol=1e-4)


def _gradients_match_the_reading(model, layer, reading, x, atol):
    """`layer`'s and the input's gradients of `model` at x's batch with different seed rows (5 classes) against
    torch autograd through `reading` (rel < 1e-4), and the scores against its forward."""
    seed = np.random.default_rng(5).standard_normal((len(x), 5)).astype(np.float32)
    aug = augment(model, layers=[layer])
    assert_standard(aug)
    logits, gl, gx = session(aug).run(["logits", f"{layer}__grad", "x__grad"], {"x": x, "seed": seed})
    xx = torch.from_numpy(x).requires_grad_()
    env = {}
    want = reading(xx, env)
    env[layer].retain_grad()
    (want * torch.from_numpy(seed)).sum().backward()
    np.testing.assert_allclose(logits, want.detach().numpy(), rtol=1e-4, atol=atol)
    assert np.abs(gx).max() > 0 and np.abs(gl).max() > 0
    assert rel(gl, env[layer].grad.numpy()) < 1e-4
    assert rel(gx, xx.grad.numpy()) < 1e-4


@pytest.mark.parametrize("dtype, zero", [(np.uint8, 131), (np.int8, -9)])
def test_value_moving_operators_on_integers_stay_exact(dtype, zero):
    """Pad (its integer 0 is the real value -scale * zero), MaxPool, Transpose, Reshape and Split reading quantized
    tensors become DequantizeLinear -> float operator -> QuantizeLinear with the input's own scale and zero point:
    the same integers, bit for bit, with onnxruntime's optimisations on and off."""
    import onnxruntime as ort
    from onnxplain.kernels.qdq import from_qoperator

    inits = {"s": np.array(0.05, np.float32), "z": np.array(zero, dtype), "pads": np.array([0, 0, 1, 2, 0, 0, 2, 1]),
             "shape": np.array([2, 3, -1]), "split": np.array([10, 20]), "ws": np.array([0.01, 0.02, 0.03], np.float32),
             "wz": np.zeros(3, np.int8), "w": np.random.default_rng(1).integers(-9, 9, (3, 3, 1, 1)).astype(np.int8)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("QLinearConv", ["q", "s", "z", "w", "ws", "wz", "s", "z"], ["c"]),  # (a QOperator model)
             helper.make_node("DequantizeLinear", ["c", "s", "z"], ["c_out"]),
             helper.make_node("Pad", ["q", "pads"], ["p"]),
             helper.make_node("MaxPool", ["p"], ["m"], kernel_shape=[2, 2], strides=[1, 1]),
             helper.make_node("Transpose", ["m"], ["t"], perm=[0, 1, 3, 2]),
             helper.make_node("Reshape", ["t", "shape"], ["r"]),
             helper.make_node("Split", ["r", "split"], ["a", "b"], axis=2)]
    nodes += [helper.make_node("DequantizeLinear", [t, "s", "z"], [f"{t}_out"]) for t in ("a", "b")]
    graph = helper.make_graph(nodes, "moves", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 3])],
                              [helper.make_tensor_value_info(f"{t}_out", TensorProto.FLOAT, [2, 3, n]) for t, n in
                               [("a", 10), ("b", 20)]] + [helper.make_tensor_value_info("c_out", TensorProto.FLOAT, [2, 3, 4, 3])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rewritten = from_qoperator(model)
    assert_standard(rewritten)
    assert [n.op_type for n in rewritten.graph.node].count("QuantizeLinear") == 1 + 1 + 5 + 1  # Split: two outputs
    x = (np.random.default_rng(2).standard_normal((2, 3, 4, 3)) * 3).astype(np.float32)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = session(model).run(["a_out", "b_out"], {"x": x})
    assert np.ptp(want[0]) > 0 and (want[0] == want[0].min()).any()
    for s in (session(rewritten), ort.InferenceSession(rewritten.SerializeToString(), opts)):
        for got, ref in zip(s.run(["a_out", "b_out"], {"x": x}), want):
            np.testing.assert_array_equal(got, ref)


def test_blocked_and_float8_quantization_are_refused_by_name():
    shape = (1, 4, 2, 2)
    blocked, _ = qdq_model(shape, np.full((1, 2, 2, 2), 0.1, np.float32), np.zeros((1, 2, 2, 2), np.int8), axis=1,
                           opset=21)
    for node in blocked.graph.node[:2]:
        node.attribute.append(helper.make_attribute("block_size", 2))
    with pytest.raises(AutodiffError, match="block_size"):
        augment(blocked, scores="y")
    fp8, _ = qdq_model(shape, 0.1, None, opset=19)
    fp8.graph.initializer.append(helper.make_tensor("z", TensorProto.FLOAT8E4M3FN, [], [0.0]))
    for node in fp8.graph.node[:2]:
        node.input.append("z")
    with pytest.raises(AutodiffError, match="FLOAT8E4M3FN|float8e4m3fn"):
        augment(fp8, scores="y")


def _single_qoperator(op, x_shape, y_shape, attrs, weight=None):
    """x -> QuantizeLinear (uint8) -> one QOperator node -> DequantizeLinear -> y, and the torch function it stands
    for under fake quantization."""
    xs, xz, ys, yz = 0.03, 120, 0.02, 100
    inits = {"xs": np.array(xs, np.float32), "xz": np.array(xz, np.uint8), "ys": np.array(ys, np.float32),
             "yz": np.array(yz, np.uint8)}
    ins = ["xq", "xs", "xz"]
    if weight is not None:    # QLinearMatMul's constant int8 right operand, one scale per column
        inits.update(w=weight, ws=np.linspace(0.01, 0.03, weight.shape[-1]).astype(np.float32),
                     wz=np.zeros(weight.shape[-1], np.int8))
        ins += ["w", "ws", "wz"]
    domain = "" if op == "QLinearMatMul" else "com.microsoft"
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node(op, ins + ["ys", "yz"], ["yq"], domain=domain, **attrs),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])]
    graph = helper.make_graph(nodes, op, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain or "x", 1)])

    def reference(x):
        t = torch.fake_quantize_per_tensor_affine(x, xs, xz, 0, 255)
        if weight is not None:
            t = t @ torch.from_numpy(weight.astype(np.float32) * inits["ws"])
        elif op == "QLinearSoftmax":
            t = torch.softmax(t, attrs["axis"])
        elif op == "QLinearAveragePool":
            t = nn.functional.avg_pool2d(t, attrs["kernel_shape"], attrs["strides"])
        elif op == "QLinearReduceMean":
            t = t.mean(dim=tuple(attrs["axes"]), keepdim=True)
        else:                 # QLinearGlobalAveragePool, channels last
            t = t.mean(dim=(1, 2), keepdim=True)
        return torch.fake_quantize_per_tensor_affine(t, ys, yz, 0, 255)

    return model, reference


SINGLE = {
    "QLinearMatMul, per-column weight": ("QLinearMatMul", (2, 4, 6), (2, 4, 5), {}),
    "QLinearSoftmax": ("QLinearSoftmax", (2, 4, 6), (2, 4, 6), {"axis": -1, "opset": 13}),
    "QLinearAveragePool": ("QLinearAveragePool", (2, 3, 6, 6), (2, 3, 3, 3), {"kernel_shape": [2, 2],
                                                                               "strides": [2, 2]}),
    "QLinearReduceMean": ("QLinearReduceMean", (2, 3, 4, 5), (2, 3, 1, 1), {"axes": [2, 3], "keepdims": 1}),
    "QLinearGlobalAveragePool, channels last": ("QLinearGlobalAveragePool", (2, 4, 5, 3), (2, 1, 1, 3),
                                                {"channels_last": 1}),
}


@pytest.mark.parametrize("case", list(SINGLE))
def test_each_qoperator_node_is_written_as_its_float_operator(case):
    """One node at a time: the rewrite leaves no com.microsoft node, its scores are the integer kernel's up to one
    output step (ONNX's float operator rounds once, as the kernel does, but not always to the same step) and torch's,
    and its input gradient at batch 2 with different seed rows is torch autograd's through fake quantization of the
    float operator."""
    from onnxplain.kernels.qdq import from_qoperator

    op, x_shape, y_shape, attrs = SINGLE[case]
    weight = np.random.default_rng(3).integers(-60, 60, (6, 5)).astype(np.int8) if op == "QLinearMatMul" else None
    model, reference = _single_qoperator(op, x_shape, y_shape, attrs, weight)
    rewritten = from_qoperator(model)
    assert_standard(rewritten)
    assert op not in {n.op_type for n in rewritten.graph.node}
    x = np.random.default_rng(4).uniform(-3, 3, x_shape).astype(np.float32)
    got = session(rewritten).run(["y"], {"x": x})[0]
    if op != "QLinearReduceMean":     # (onnxruntime's CPU provider has no kernel for it: the rewrite makes it run)
        want = session(model).run(["y"], {"x": x})[0]
        assert np.abs(got - want).max() <= 0.02 * 1.001 and (got == want).mean() > 0.9
    seed = np.random.default_rng(5).standard_normal(y_shape).astype(np.float32)
    aug = augment(rewritten, scores="y")
    y, gx = session(aug).run(["y", "x__grad"], {"x": x, "seed": seed})
    xx = torch.from_numpy(x).requires_grad_()
    ref = reference(xx)
    (ref * torch.from_numpy(seed)).sum().backward()
    np.testing.assert_allclose(y, ref.detach().numpy(), atol=0.02 * 1.001)
    assert np.abs(gx).max() > 0 and rel(gx, xx.grad.numpy()) < 1e-4
