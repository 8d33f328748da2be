"""Models quantized in the QOperator format or dynamically, rewritten in the QDQ format so that they can be
differentiated.

onnxruntime.quantization's QOperator format (the ONNX Model Zoo's int8 models) computes on integers: QLinearConv,
QLinearMatMul and onnxruntime's com.microsoft QLinearAdd, QLinearMul, QLinearConcat, QGemm, ... read and write
uint8/int8 tensors, and MaxPool, Flatten, Reshape and the other operators that only move values run on those
integers directly. No derivative can cross them. The QDQ format writes the same network as ONNX defines each
QOperator node: DequantizeLinear of each integer input, the float operator, QuantizeLinear of its output with the
node's output scale and zero point. `from_qoperator` rewrites each node it knows that way, so the whole graph is
made of float operators between quantizers, which `autodiff` differentiates with the straight-through estimator,
and whose dequantized maps `graph` lists as layers.

What stays the same: every integer tensor keeps its name and its values (a QuantizeLinear now writes it), the
scores, the graph's inputs and outputs. onnxruntime's QDQ fusion turns DequantizeLinear -> operator ->
QuantizeLinear back into its integer kernels, so with uint8 activations a forward-only session of the rewritten
model computes what the QOperator model does, bit for bit (EfficientNet-Lite0: the same 49 QLinearConv, 9
QLinearAdd, QLinearGlobalAveragePool and QGemm after onnxruntime's optimisations). With int8 activations on x86 it
leaves the convolutions around residual sums in float (its int8 -> uint8 conversion skips a QuantizeLinear with two
readers), and those may round to the next step. The float operator rounds once where the integer kernel rounds
once, so where onnxruntime does not fuse (the augmented graph reads the float weights) an output may land on the
quantization step next to the integer kernel's, as for any QDQ model.

Names: the map an integer tensor `t_quantized` stands for is `t_dequantized` (DequantizeLinear's output, what the
next float operator reads, the name a layer is listed under); the float operator's output before its quantizer is
`t_float`. A node the table does not know (QAttention, a QLinearAveragePool in channels-last layout ...) is left as
it is, and `autodiff` names it when it lies on a path it must differentiate.

Dynamic quantization (onnxruntime.quantization.quantize_dynamic) quantizes the input of each ConvInteger and
MatMulInteger per run, DynamicQuantizeLinear(x) -> (q, s, z), and scales the integer product by s times the weight's
scale (Cast, Mul). `integer_product` writes that as the float operator on DequantizeLinear(q, s, z) and the float
weight: the scores equal the integer kernels' up to float rounding (a last-bit difference may flip the next
quantizer's rounding: on EfficientNet-Lite0, 49 of them deep, up to 0.17 on logits spanning 9 to 13), and
DynamicQuantizeLinear stays (its rule passes the gradient straight through, s and z held constant).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["from_qoperator"]

_MS = "com.microsoft"

# Operators that only select, move or compare values: on a quantized tensor they give the same integers as
# quantizing their float counterpart's output with the input's own scale and zero point, exactly. Only their
# input 0 is data; the others are shapes, indices, axes.
_MOVES = {"MaxPool", "GlobalMaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Gather",
          "Identity", "DepthToSpace", "SpaceToDepth", "Tile", "Expand", "ReduceMax", "ReduceMin", "Split", "Pad"}


_INTEGER_OPS = {"QGemm", "MatMulInteger", "ConvInteger"}


class _Rewrite:
    def __init__(self, model: onnx.ModelProto, shaped: onnx.ModelProto):
        self.model = model
        self.shaped = shaped
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        g = model.graph
        self.values = {t.name: t for t in g.initializer}
        self.values.update({n.output[0]: n.attribute[0].t for n in g.node if n.op_type == "Constant" and n.attribute
                            and n.attribute[0].name == "value"})
        self.taken = {i.name for i in g.input} | set(self.values) | {o for n in g.node for o in n.output}
        self.params: dict[str, tuple[str, str]] = {}     # integer tensor -> (scale, zero point) it was written with
        self.dequantized: dict[tuple, str] = {}
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0
        self.node_names = {n.name for n in g.node}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        for n in g.node:
            for i in n.input:
                self.readers.setdefault(i, []).append(n)
            for o in n.output:
                self.producer[o] = n
        self.outputs = {o.name for o in g.output}
        self.absorbed: set[tuple] = set()   # (op type, output) of later nodes a rewrite wrote into its own
        self.orphaned: set[str] = set()     # tensors no node may read any more once the rewrite is done

    def name(self, base: str) -> str:
        return fresh_name(self.taken, base)

    def emit(self, op_type: str, inputs, output: str | None = None, base: str = "", **attrs) -> str:
        out = output or self.name(base)
        self.count += 1
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self.node_name(op_type), **attrs))
        return out

    def node_name(self, op_type: str) -> str:
        while f"qdq/{op_type}/{self.count}" in self.node_names:
            self.count += 1
        self.node_names.add(f"qdq/{op_type}/{self.count}")
        return f"qdq/{op_type}/{self.count}"

    def const(self, value: np.ndarray, base: str) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        self.values[name] = self.inits[-1]
        return name

    def value(self, name: str):
        t = self.values.get(name)
        return None if t is None else numpy_helper.to_array(t)

    @staticmethod
    def stem(t: str) -> str:
        return t[: -len("_quantized")] if t.endswith("_quantized") else t

    def dq(self, t: str, scale: str, zero: str, axis: int | None = None) -> str:
        """t's real value: one DequantizeLinear per (tensor, scale, zero point), shared by its readers."""
        key = (t, scale, zero, axis)
        if key not in self.dequantized:
            attrs = {"axis": axis} if axis is not None else {}
            self.dequantized[key] = self.emit("DequantizeLinear", [t, scale, zero] if zero else [t, scale],
                                              base=f"{self.stem(t)}_dequantized", **attrs)
        return self.dequantized[key]

    def axis_of(self, scale: str, rank: int | None, axis: int) -> int | None:
        """None for a per-tensor scale, else `axis` (per-channel weights) where the opset has per-axis
        DequantizeLinear; raises _Skip otherwise."""
        v = self.value(scale)
        if v is None:
            raise _Skip
        if v.size == 1 and v.ndim <= 1:
            return None
        if v.ndim != 1 or self.opset < 13 or rank is None:
            raise _Skip
        return axis % rank

    def rank(self, t: str) -> int | None:
        v = self.value(t)
        return None if v is None else v.ndim

    def requantize(self, out_f: str, y: str, scale: str, zero: str) -> None:
        self.emit("QuantizeLinear", [out_f, scale, zero] if zero else [out_f, scale], output=y)
        self.params[y] = (scale, zero)

    def bias(self, b: str, scale_a: str, scale_b: str, factor: float = 1.0) -> str:
        """An int32 bias quantized with scale factor * scale_a * scale_b and zero point 0, as a float constant."""
        q, sa, sb = self.value(b), self.value(scale_a), self.value(scale_b)
        if q is None or sa is None or sb is None or q.dtype != np.int32:
            raise _Skip
        scale = (np.float32(factor) * sa.astype(np.float32) * sb.astype(np.float32)).astype(np.float32)
        return self.const((q.astype(np.float32) * scale).astype(np.float32), f"{self.stem(b)}_dequantized")

    # --- one method per QOperator node -------------------------------------------------------------------------
    def linear(self, n, float_op: str, pairs, out_params, extra=(), **attrs):
        """float_op(DQ(inputs)...) quantized with out_params; `pairs` are (tensor, scale, zero) of the integer
        inputs, `extra` float inputs appended after them."""
        ins = [self.dq(t, s, z) for t, s, z in pairs] + list(extra)
        y = n.output[0]
        if out_params is None:
            self.emit(float_op, ins, output=y, **attrs)
        else:
            self.requantize(self.emit(float_op, ins, base=f"{self.stem(y)}_float", **attrs), y, *out_params)

    def qlinear_conv(self, n):
        x, xs, xz, w, ws, wz, ys, yz, *b = list(n.input) + [""]
        if self.value(w) is None:
            raise _Skip
        fw = self.dq(w, ws, wz, self.axis_of(ws, self.rank(w), 0))
        extra = [fw] + ([self.bias(b[0], xs, ws)] if b[0] else [])
        self.linear(n, "Conv", [(x, xs, xz)], (ys, yz), extra, **_attrs(n))

    def qlinear_matmul(self, n):
        a, as_, az, b, bs, bz, ys, yz = n.input
        if self.axis_of(as_, self.rank(a), 0) is not None:
            raise _Skip
        rb = self.rank(b)
        fb = self.dq(b, bs, bz, self.axis_of(bs, rb, -1))
        self.linear(n, "MatMul", [(a, as_, az)], (ys, yz), [fb])

    def qgemm(self, n):
        a, as_, az, b, bs, bz, *rest = list(n.input) + ["", "", ""]
        c, ys, yz = rest[:3]
        attrs = _attrs(n)
        trans_b = attrs.get("transB", 0)
        fb = self.dq(b, bs, bz, self.axis_of(bs, self.rank(b), 0 if trans_b else 1))
        alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
        extra = [fb] + ([self.bias(c, as_, bs, alpha / beta)] if c else [])
        self.linear(n, "Gemm", [(a, as_, az)], (ys, yz) if ys else None, extra, **attrs)

    def binary(self, op):
        def rewrite(n):
            a, as_, az, b, bs, bz, ys, yz = n.input
            self.linear(n, op, [(a, as_, az), (b, bs, bz)], (ys, yz))
        return rewrite

    def unary(self, op, allowed=()):
        def rewrite(n):
            x, xs, xz, ys, yz = n.input
            attrs = _attrs(n)
            if set(attrs) - set(allowed):
                raise _Skip
            self.linear(n, op, [(x, xs, xz)], (ys, yz), **attrs)
        return rewrite

    def qlinear_global_average_pool(self, n):
        x, xs, xz, ys, yz = n.input
        if not _attrs(n).get("channels_last", 0):
            return self.linear(n, "GlobalAveragePool", [(x, xs, xz)], (ys, yz))
        rank = _rank_of(self.shaped, x)
        if rank is None:
            raise _Skip
        self.reduce_mean(n, x, xs, xz, ys, yz, list(range(1, rank - 1)), 1)

    def qlinear_reduce_mean(self, n):
        x, xs, xz, ys, yz = n.input
        attrs = _attrs(n)
        self.reduce_mean(n, x, xs, xz, ys, yz, attrs.get("axes"), attrs.get("keepdims", 1))

    def reduce_mean(self, n, x, xs, xz, ys, yz, axes, keepdims):
        if axes is None:
            return self.linear(n, "ReduceMean", [(x, xs, xz)], (ys, yz), keepdims=keepdims)
        if self.opset >= 18:
            return self.linear(n, "ReduceMean", [(x, xs, xz)], (ys, yz), [self.const(np.array(axes, np.int64), "axes")],
                               keepdims=keepdims)
        self.linear(n, "ReduceMean", [(x, xs, xz)], (ys, yz), axes=list(axes), keepdims=keepdims)

    def qlinear_softmax(self, n):
        x, xs, xz, ys, yz = n.input
        attrs = _attrs(n)
        axis, rank = attrs.get("axis", -1), _rank_of(self.shaped, x)
        if rank is None or (attrs.get("opset", 13) < 13 and axis % rank != rank - 1):
            raise _Skip     # the legacy softmax flattens the dims from axis on
        self.linear(n, "Softmax", [(x, xs, xz)], (ys, yz), axis=axis)

    def qlinear_concat(self, n):
        ys, yz, *rest = n.input
        if len(rest) % 3:
            raise _Skip
        self.linear(n, "Concat", [tuple(rest[i:i + 3]) for i in range(0, len(rest), 3)], (ys, yz), **_attrs(n))

    def integer_product(self, n):
        """Dynamic quantization (onnxruntime.quantization.quantize_dynamic): DynamicQuantizeLinear(x) -> (q, s, z),
        then MatMulInteger(q, w, z, wz) or ConvInteger -> Cast to float -> Mul by s * sw, the product of the two
        scales. The integer product times s * sw is the float operator on the two real values s * (q - z) and
        sw * (w - wz): that operator on the two dequantized inputs, written to the Mul's output, and the Cast and
        the Mul go. `q` keeps its DynamicQuantizeLinear, whose rule passes the gradient straight through with its
        scale and zero point held constant."""
        a, b, az, bz = (list(n.input) + ["", "", ""])[:4]
        cast = self.only_reader(n.output[0], "Cast")
        if a not in self.params or cast is None or _attrs(cast).get("to") != onnx.TensorProto.FLOAT:
            raise _Skip
        mul = self.only_reader(cast.output[0], "Mul")
        if mul is None or list(mul.input).count(cast.output[0]) != 1:
            raise _Skip
        scales = self.producer.get(next(i for i in mul.input if i != cast.output[0]))
        sa, za = self.params[a]
        if scales is None or scales.op_type != "Mul" or az != za or list(scales.input).count(sa) != 1:
            raise _Skip
        sb = next(i for i in scales.input if i != sa)
        w, scale, zero = self.value(b), self.value(sb), self.value(bz) if bz else np.zeros((), np.int64)
        if w is None or scale is None or zero is None or w.dtype.kind not in "iu" or scale.dtype != np.float32:
            raise _Skip
        if any(v.size != 1 and (n.op_type == "ConvInteger" or v.shape != w.shape[-1:]) for v in (scale, zero)):
            raise _Skip     # MatMulInteger: one scale per column of w (the Mul's broadcast), ConvInteger: one scale
        # The weight as its float value (one rounding, as DequantizeLinear's): a DequantizeLinear of it would be
        # fused by onnxruntime into MatMulNBits, which quantizes the activations again (accuracy level 4).
        fw = self.const(((w.astype(np.int64) - zero.astype(np.int64)).astype(np.float32) * scale).astype(np.float32),
                        f"{self.stem(b)}_dequantized")
        op, attrs = ("MatMul", {}) if n.op_type == "MatMulInteger" else ("Conv", _attrs(n))
        self.emit(op, [self.dq(a, sa, za), fw], output=mul.output[0], **attrs)
        self.absorbed.update((("Cast", cast.output[0]), ("Mul", mul.output[0])))
        if len(self.readers.get(scales.output[0], [])) == 1 and scales.output[0] not in self.outputs:
            self.orphaned.add(scales.output[0])

    def only_reader(self, t: str, op_type: str):
        readers = self.readers.get(t, [])
        ok = len(readers) == 1 and readers[0].op_type == op_type and readers[0].domain in ("", "ai.onnx")
        return readers[0] if ok and t not in self.outputs else None

    def move(self, n):
        x = n.input[0]
        if x not in self.params or any(i in self.params for i in n.input[1:]):
            raise _Skip
        scale, zero = self.params[x]
        ins = [self.dq(x, scale, zero), *n.input[1:]]
        if n.op_type == "Pad" and _attrs(n).get("mode", b"constant") in (b"constant", "constant"):
            pad_value = n.input[2] if len(n.input) > 2 and n.input[2] else ""
            if pad_value and self.value(pad_value) is None:
                raise _Skip
            # the integer pad value (0 by default) stands for scale * (value - zero) in the float graph
            q = self.value(pad_value) if pad_value else np.zeros((), self.value(zero).dtype if zero else np.uint8)
            real = (q.astype(np.float32) - (self.value(zero).astype(np.float32) if zero else 0)) * self.value(scale)
            ins = [ins[0], n.input[1], self.const(real.astype(np.float32).reshape(()), "pad_value"), *n.input[3:]]
        outs = [o for o in n.output]
        floats = [self.name(f"{self.stem(o)}_float") if o else "" for o in outs]
        keep_index = n.op_type == "MaxPool" and len(outs) > 1 and outs[1]
        if keep_index:      # MaxPool's indices are the same for the float map
            floats[1] = outs[1]
        self.nodes.append(helper.make_node(n.op_type, ins, floats, name=n.name or self.node_name(n.op_type),
                                           domain=n.domain, **_attrs(n)))
        for o, f in zip(outs[: 1 if keep_index else len(outs)], floats):
            if o:
                self.requantize(f, o, scale, zero)

    def run(self) -> bool:
        table = {
            ("", "QLinearConv"): self.qlinear_conv,
            ("", "QLinearMatMul"): self.qlinear_matmul,
            (_MS, "QGemm"): self.qgemm,
            (_MS, "QLinearAdd"): self.binary("Add"),
            (_MS, "QLinearMul"): self.binary("Mul"),
            (_MS, "QLinearSigmoid"): self.unary("Sigmoid"),
            (_MS, "QLinearLeakyRelu"): self.unary("LeakyRelu", ("alpha",)),
            (_MS, "QLinearGlobalAveragePool"): self.qlinear_global_average_pool,
            (_MS, "QLinearAveragePool"): self.qlinear_average_pool,
            (_MS, "QLinearReduceMean"): self.qlinear_reduce_mean,
            (_MS, "QLinearSoftmax"): self.qlinear_softmax,
            (_MS, "QLinearConcat"): self.qlinear_concat,
            ("", "MatMulInteger"): self.integer_product,
            ("", "ConvInteger"): self.integer_product,
        }
        changed = False
        for n in self.model.graph.node:
            if n.output and (n.op_type, n.output[0]) in self.absorbed:
                continue
            domain = "" if n.domain == "ai.onnx" else n.domain
            if n.op_type == "DequantizeLinear" and domain == "" and len(n.input) >= 2:
                scale = self.value(n.input[1])
                if scale is not None and scale.size == 1:     # a reader further on reuses the model's own
                    zero = n.input[2] if len(n.input) > 2 else ""
                    self.dequantized.setdefault((n.input[0], n.input[1], zero, None), n.output[0])
            fn = table.get((domain, n.op_type)) or (self.move if domain == "" and n.op_type in _MOVES else None)
            if n.op_type == "QuantizeLinear" and domain == "" and len(n.input) >= 2:
                self.params[n.output[0]] = (n.input[1], n.input[2] if len(n.input) > 2 else "")
            if n.op_type == "DynamicQuantizeLinear" and domain == "" and len(n.output) == 3:
                self.params[n.output[0]] = (n.output[1], n.output[2])
            if fn is None:
                self.nodes.append(n)
                continue
            mark = (len(self.nodes), len(self.inits), dict(self.dequantized), dict(self.params), set(self.taken))
            try:
                fn(n)
                changed = True
            except (_Skip, ValueError, IndexError):
                del self.nodes[mark[0]:], self.inits[mark[1]:]
                self.dequantized, self.params, self.taken = mark[2], mark[3], mark[4]
                self.nodes.append(n)
        self.nodes = [n for n in self.nodes if not (any(n.output) and set(n.output) - {''} <= self.orphaned)]
        return changed

    def qlinear_average_pool(self, n):
        x, xs, xz, ys, yz = n.input
        attrs = _attrs(n)
        if attrs.pop("channels_last", 0):
            raise _Skip
        self.linear(n, "AveragePool", [(x, xs, xz)], (ys, yz), **attrs)


class _Skip(Exception):
    """This node cannot be written in the QDQ format here; it is kept as it is."""


def _attrs(n) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in n.attribute}


def _rank_of(model, name):
    for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return len(vi.type.tensor_type.shape.dim)
    return None


def drop_unused_import(model: onnx.ModelProto, domain: str) -> None:
    """Remove `model`'s import of `domain` when no node of its graph uses it."""
    if not any(n.domain == domain for n in model.graph.node):
        keep = [o for o in model.opset_import if o.domain != domain]
        del model.opset_import[:]
        model.opset_import.extend(keep)


def fresh_name(taken: set[str], base: str) -> str:
    """`base`, or `base_<k>` for the first k that makes it new; recorded in `taken`."""
    out, k = base, 1
    while out in taken:
        out, k = f"{base}_{k}", k + 1
    taken.add(out)
    return out


def with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with the shapes ONNX can infer recorded (the ranks that a rewrite needs: QLinearSoftmax's,
    channels-last pools', FusedMatMul's); `model` itself when inference fails."""
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - ranks are a convenience here; kernels.graph reports a model that fails
        return model


def from_qoperator(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its QOperator nodes (and the value-moving operators that read their integers) and its dynamically
    quantized integer products written in the QDQ format; `model` itself when it has none. The com.microsoft opset
    import goes when no node uses it. A second pass sees the shapes that ONNX infers once the first pass has written
    the com.microsoft nodes before a QLinearSoftmax as standard operators (it needs its input's rank)."""
    out = model
    for _ in range(3):
        if not any(n.op_type.startswith("QLinear") or n.op_type in _INTEGER_OPS for n in out.graph.node):
            break
        m = onnx.ModelProto()
        m.CopyFrom(out)
        r = _Rewrite(m, with_shapes(out))
        if not r.run():
            break
        read_before = {i for n in m.graph.node for i in n.input}
        del m.graph.node[:]
        m.graph.node.extend(r.nodes)
        read = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
        keep = [t for t in m.graph.initializer if t.name in read or t.name not in read_before]   # the int32 biases go
        del m.graph.initializer[:]
        m.graph.initializer.extend(keep + r.inits)
        drop_unused_import(m, _MS)
        out = m
    return out
