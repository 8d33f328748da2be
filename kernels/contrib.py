"""Models saved after onnxruntime's graph optimizations, written back in standard ONNX operators so that their
layers can be found and they can be differentiated.

onnxruntime rewrites a graph when it builds a session, and users deploy what it saves: a session's
`optimized_model_filepath` at the extended level (ResNets and MobileNets get FusedConv, transformers FusedMatMul,
BiasGelu, SkipLayerNormalization) or the transformers optimizer (`onnxruntime.transformers.optimizer`, which
Optimum's ORTOptimizer drives: Attention, MultiHeadAttention, SkipLayerNormalization, FastGelu, ...). Those fused
operators are onnxruntime's own (the com.microsoft domain, or its LayerNormalization and
SimplifiedLayerNormalization in the ONNX domain below opset 17): ONNX's shape inference does not know them, so no
layer after the first one has a shape, and the autodiff table has no rule for them. `to_standard` writes each node
it knows as the standard operators it fuses, as onnxruntime's contrib operator documentation defines them:

  FusedConv, FusedGemm       Conv / Gemm, + Z (FusedConv's fused sum), then the activation (Relu, Tanh, Sigmoid,
                             LeakyRelu, Clip, HardSigmoid with the node's parameters)
  FusedMatMul                alpha * MatMul of A and B, each with its last two axes swapped when transA / transB
  Gelu, BiasGelu             x * (1 + erf(x / sqrt 2)) / 2 of x (+ bias); Gelu itself from opset 20
  FastGelu                   the same with tanh(sqrt(2 / pi) * (x + 0.044715 x^3)) for erf(x / sqrt 2)
  QuickGelu                  x * sigmoid(alpha * x)
  BiasAdd                    X + bias + skip
  SkipLayerNormalization     LayerNormalization over the last axis of input + skip (+ bias); the sum and the
                             statistics too when the graph reads them
  (Skip)SimplifiedLayer-     RMS normalization over the last axis: x / sqrt(mean(x^2) + epsilon) * gamma
  Normalization
  Attention                  input @ weights + bias split into Q, K, V (qkv_hidden_sizes or thirds), heads,
                             softmax(Q K^T * scale + attention_bias) V, heads merged
  MultiHeadAttention         the same from separate query, key and value of rank 3 (+ bias thirds)

The node's outputs keep their names, so a layer is listed under the name it has in the optimized model; an
Attention's projections, which the fusion hid, come back as `unfused/<node>/query`, `.../key` and `.../value` (a
ViT's default layer is the last one's value). The forward computes what onnxruntime's kernels compute up to float
rounding (their Gelu evaluates erf by its own polynomial, their attention scales inside the product); onnxruntime
fuses the standard operators again when it builds a session.
A node the table does not know, or one whose form it does not rewrite (an Attention with a mask, past state,
rotary embedding or one direction; a packed MultiHeadAttention; a FusedMatMul that moves batch axes or whose ranks
are unknown), stays as it is, and `autodiff` names it when it lies on a path to differentiate.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .qdq import drop_unused_import, fresh_name, with_shapes

__all__ = ["to_standard"]

_MS = "com.microsoft"
# onnxruntime registers these two in the ONNX domain itself, for opsets that ONNX does not define them in.
_ORT_IN_ONNX_DOMAIN = {"LayerNormalization": 17, "SimplifiedLayerNormalization": None}
_ACTIVATIONS = {"Relu", "Tanh", "Sigmoid", "LeakyRelu", "Clip", "HardSigmoid"}


def _ours(node: onnx.NodeProto, opset: int) -> bool:
    if node.domain == _MS:
        return node.op_type in _LOWER
    if node.domain in ("", "ai.onnx") and node.op_type in _ORT_IN_ONNX_DOMAIN:
        since = _ORT_IN_ONNX_DOMAIN[node.op_type]
        return since is None or opset < since
    return False


class _Lowering:
    def __init__(self, model: onnx.ModelProto, shaped: onnx.ModelProto):
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        g = model.graph
        self.values = {t.name: t for t in g.initializer}
        self.ranks: dict[str, int] = {}     # known ranks, static last dims (attention widths), element types
        self.last: dict[str, int] = {}
        self.types: dict[str, int] = {t.name: t.data_type for t in g.initializer}
        for vi in [*shaped.graph.value_info, *shaped.graph.input, *shaped.graph.output]:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                self.types[vi.name] = vi.type.tensor_type.elem_type
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                dims = vi.type.tensor_type.shape.dim
                self.ranks[vi.name] = len(dims)
                if dims and dims[-1].HasField("dim_value"):
                    self.last[vi.name] = dims[-1].dim_value
        for t in g.initializer:
            self.ranks[t.name] = len(t.dims)
        self.taken = {i.name for i in g.input} | set(self.values) | {o for n in g.node for o in n.output}
        self.node_names = {n.name for n in g.node}
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0
        self.prefix = ""

    # -- emitting ------------------------------------------------------------------------------------------
    def name(self, base: str) -> str:
        return fresh_name(self.taken, base)

    def __call__(self, op_type: str, *inputs: str, out: str = "", **attrs) -> str:
        """Emit a node; its output is `out`, or a fresh name when `out` is empty."""
        out = out or self.name(f"{self.prefix}/{op_type}")
        while f"{self.prefix}/{op_type}/{self.count}" in self.node_names:
            self.count += 1
        node_name = f"{self.prefix}/{op_type}/{self.count}"
        self.node_names.add(node_name)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=node_name, **attrs))
        if inputs and inputs[0] in self.types:   # every operator emitted here keeps its first input's type
            self.types.setdefault(out, self.types[inputs[0]])
        return out

    def const(self, value, like: str = "") -> str:
        """A float constant of the element type of `like` (float32 when unknown: fp16 models keep fp16)."""
        dtype = helper.tensor_dtype_to_np_dtype(self.types.get(like, onnx.TensorProto.FLOAT))
        return self._init(np.asarray(value, dtype))

    def i64(self, values) -> str:
        return self._init(np.asarray(values, np.int64))

    def _init(self, value: np.ndarray) -> str:
        name = self.name(f"{self.prefix}/const")
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def mean_last(self, x: str) -> str:
        if self.opset >= 18:
            return self("ReduceMean", x, self.i64([-1]), keepdims=1)
        return self("ReduceMean", x, axes=[-1], keepdims=1)

    def swap_last(self, x: str) -> str | None:
        rank = self.ranks.get(x)
        if rank is None or rank < 2:
            return None
        return self("Transpose", x, perm=[*range(rank - 2), rank - 1, rank - 2])

    def activation(self, x: str, kind: str, params, out: str) -> str:
        if kind == "LeakyRelu":
            return self("LeakyRelu", x, out=out, alpha=float(params[0]) if params else 0.01)
        if kind == "HardSigmoid":
            alpha, beta = (list(params) + [0.2, 0.5][len(params):])[:2]
            return self("HardSigmoid", x, out=out, alpha=float(alpha), beta=float(beta))
        if kind == "Clip":
            lo, hi = (float(params[0]), float(params[1])) if len(params) >= 2 else (-math.inf, math.inf)
            return self("Clip", x, self.const(lo, x), self.const(hi, x), out=out)
        return self(kind, x, out=out)

    def gelu(self, x: str, out: str, tanh: bool = False) -> str:
        if self.opset >= 20:
            return self("Gelu", x, out=out, approximate="tanh" if tanh else "none")
        if tanh:
            cube = self("Mul", self("Mul", x, x), x)
            inner = self("Mul", self("Add", x, self("Mul", cube, self.const(0.044715, x))),
                         self.const(math.sqrt(2.0 / math.pi), x))
            curve = self("Tanh", inner)
        else:
            curve = self("Erf", self("Mul", x, self.const(1.0 / math.sqrt(2.0), x)))
        return self("Mul", self("Mul", x, self.const(0.5, x)), self("Add", curve, self.const(1.0, x)), out=out)

    def layer_norm(self, x: str, gamma: str, beta: str, eps: float, outs, rms: bool = False) -> None:
        """outs: (y, mean, inv_std) names, '' where the graph does not read it."""
        y, mean_out, inv_out = (list(outs) + ["", "", ""])[:3]
        if not rms and self.opset >= 17 and not mean_out and not inv_out:
            self("LayerNormalization", x, gamma, *([beta] if beta else []), out=y, axis=-1, epsilon=eps)
            return
        centred = x
        if not rms:
            mean = self("Identity", self.mean_last(x), out=mean_out) if mean_out else self.mean_last(x)
            centred = self("Sub", x, mean)
        var = self.mean_last(self("Mul", centred, centred))
        inv = self("Reciprocal", self("Sqrt", self("Add", var, self.const(eps, x))), out=inv_out)
        scaled = self("Mul", self("Mul", centred, inv), gamma, out="" if beta else y)
        if beta:
            self("Add", scaled, beta, out=y)

    def heads(self, t: str, n: int) -> str:
        """(B, S, n * h) -> (B, n, S, h)."""
        return self("Transpose", self("Reshape", t, self.i64([0, 0, n, -1])), perm=[0, 2, 1, 3])

    def attend(self, q: str, k: str, v: str, n: int, scale: float, bias: str, out: str) -> str:
        scores = self("MatMul", self("Mul", self.heads(q, n), self.const(scale, q)),
                      self("Transpose", self("Reshape", k, self.i64([0, 0, n, -1])), perm=[0, 2, 3, 1]))
        if bias:
            scores = self("Add", scores, bias)
        mixed = self("MatMul", self("Softmax", scores, axis=-1), self.heads(v, n))
        return self("Reshape", self("Transpose", mixed, perm=[0, 2, 1, 3]), self.i64([0, 0, -1]), out=out)

    # -- the table -----------------------------------------------------------------------------------------
    def lower(self, node: onnx.NodeProto) -> bool:
        """Emit `node` as standard operators; False (nothing emitted) when its form is not one rewritten here."""
        mark = (len(self.nodes), len(self.inits))
        self.prefix = f"unfused/{node.name or node.output[0]}"
        ok = _LOWER[node.op_type](self, node, {a.name: helper.get_attribute_value(a) for a in node.attribute},
                                  list(node.input) + [""] * 12, list(node.output) + [""] * 4)
        if ok is False:
            del self.nodes[mark[0]:], self.inits[mark[1]:]
            return False
        return True


def _str(v, default=""):
    return v.decode() if isinstance(v, bytes) else (v if v is not None else default)


def _fused_conv(e, n, a, x, y):
    kind = _str(a.get("activation"))
    if kind not in _ACTIVATIONS | {""}:
        return False
    conv = {k: a[k] for k in ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides") if k in a}
    t = e("Conv", *[i for i in x[:3] if i], **conv, out="" if x[3] or kind else y[0])
    if x[3]:
        t = e("Add", t, x[3], out="" if kind else y[0])
    if kind:
        e.activation(t, kind, list(a.get("activation_params", [])), y[0])


def _fused_gemm(e, n, a, x, y):
    kind = _str(a.get("activation"))
    if kind not in _ACTIVATIONS | {""}:
        return False
    gemm = {k: a[k] for k in ("alpha", "beta", "transA", "transB") if k in a}
    t = e("Gemm", *[i for i in x[:3] if i], **gemm, out="" if kind else y[0])
    if kind:
        params = [a[k] for k in ("activation_alpha", "activation_beta") if k in a]
        if kind == "LeakyRelu" and "leaky_relu_alpha" in a and not params:
            params = [a["leaky_relu_alpha"]]
        e.activation(t, kind, params, y[0])


def _fused_matmul(e, n, a, x, y):
    if a.get("transBatchA") or a.get("transBatchB"):
        return False
    lhs = e.swap_last(x[0]) if a.get("transA") else x[0]
    rhs = e.swap_last(x[1]) if a.get("transB") else x[1]
    if lhs is None or rhs is None:
        return False
    alpha = float(a.get("alpha", 1.0))
    if alpha == 1.0:
        e("MatMul", lhs, rhs, out=y[0])
    else:
        e("Mul", e("MatMul", lhs, rhs), e.const(alpha, x[0]), out=y[0])


def _gelu(e, n, a, x, y):
    e.gelu(e("Add", x[0], x[1]) if x[1] else x[0], y[0], tanh=n.op_type == "FastGelu")


def _quick_gelu(e, n, a, x, y):
    e("Mul", x[0], e("Sigmoid", e("Mul", x[0], e.const(float(a.get("alpha", 1.702)), x[0]))), out=y[0])


def _bias_add(e, n, a, x, y):
    e("Add", e("Add", x[0], x[1]), x[2], out=y[0])


def _skip_norm(e, n, a, x, y):
    rms = n.op_type == "SkipSimplifiedLayerNormalization"
    bias = x[3] if rms else x[4]
    s = e("Add", x[0], x[1], out="" if bias else y[3])
    if bias:
        s = e("Add", s, bias, out=y[3])
    e.layer_norm(s, x[2], "" if rms else x[3], float(a.get("epsilon", 1e-12)), [y[0], y[1], y[2]], rms=rms)


def _layer_norm(e, n, a, x, y):
    if a.get("axis", -1) not in (-1, e.ranks.get(x[0], 0) - 1):
        return False
    rms = n.op_type == "SimplifiedLayerNormalization"
    outs = [y[0], "", y[1]] if rms else y[:3]
    e.layer_norm(x[0], x[1], "" if rms else x[2], float(a.get("epsilon", 1e-5)), outs, rms=rms)


def _attention(e, n, a, x, y):
    # inputs: input, weights, bias, mask_index, past, attention_bias, past_sequence_length
    if x[3] or x[4] or x[6] or a.get("unidirectional") or a.get("do_rotary") or y[1]:
        return False
    w = e.values.get(x[1])
    if w is None or len(w.dims) != 2:
        return False
    heads = int(a["num_heads"])
    sizes = list(a.get("qkv_hidden_sizes", [])) or [w.dims[1] // 3] * 3
    if sum(sizes) != w.dims[1] or sizes[0] != sizes[1] or any(s % heads for s in sizes):
        return False
    projected = e("MatMul", x[0], x[1])
    if x[2]:
        projected = e("Add", projected, x[2])
    q, k, v = (e("Slice", projected, e.i64([lo]), e.i64([lo + s]), e.i64([-1]), out=e.name(f"{e.prefix}/{part}"))
               for lo, s, part in zip(np.cumsum([0] + sizes[:2]).tolist(), sizes, ("query", "key", "value")))
    scale = a.get("scale") or 1.0 / math.sqrt(sizes[0] // heads)
    e.attend(q, k, v, heads, float(scale), x[5], y[0])


def _multi_head_attention(e, n, a, x, y):
    # inputs: query, key, value, bias, key_padding_mask, attention_bias, past_key, past_value, ...
    if not (x[1] and x[2]) or x[4] or x[6] or x[7] or x[8] or x[9] or a.get("unidirectional") or any(y[1:4]):
        return False
    if any(e.ranks.get(t) != 3 for t in x[:3]):
        return False
    heads, width, v_width = int(a["num_heads"]), e.last.get(x[0]), e.last.get(x[2])
    if not width or not v_width or width % heads:
        return False
    q, k, v = x[:3]
    if x[3]:
        b = e.values.get(x[3])
        if b is None or list(b.dims) != [2 * width + v_width]:
            return False
        q, k, v = (e("Add", t, e("Slice", x[3], e.i64([lo]), e.i64([hi]), e.i64([0])), out=e.name(f"{e.prefix}/{part}"))
                   for t, lo, hi, part in ((q, 0, width, "query"), (k, width, 2 * width, "key"),
                                           (v, 2 * width, 2 * width + v_width, "value")))
    e.attend(q, k, v, heads, float(a.get("scale") or 1.0 / math.sqrt(width // heads)), x[5], y[0])


_LOWER = {
    "FusedConv": _fused_conv, "FusedGemm": _fused_gemm, "FusedMatMul": _fused_matmul,
    "Gelu": _gelu, "BiasGelu": _gelu, "FastGelu": _gelu, "QuickGelu": _quick_gelu, "BiasAdd": _bias_add,
    "SkipLayerNormalization": _skip_norm, "SkipSimplifiedLayerNormalization": _skip_norm,
    "LayerNormalization": _layer_norm, "SimplifiedLayerNormalization": _layer_norm,
    "Attention": _attention, "MultiHeadAttention": _multi_head_attention,
}


def to_standard(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with the onnxruntime-fused nodes it knows written as standard operators; `model` itself when it has
    none. Passes repeat while they rewrite something: a rank that ONNX infers only once an earlier fused node is
    standard (a FusedMatMul after a SkipLayerNormalization) is known to the next. ValueError for a model in
    onnxruntime's CPU-specific blocked layout."""
    if any(n.domain == _MS + ".nchwc" for n in model.graph.node):
        raise ValueError("it holds onnxruntime's blocked-layout operators (com.microsoft.nchwc), which a session saves "
                         "at the ORT_ENABLE_ALL level for one CPU's vector width; save it at ORT_ENABLE_EXTENDED")
    out = model
    for _ in range(8):
        opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 1)
        if opset < 11 or not any(_ours(n, opset) for n in out.graph.node):
            break
        m = onnx.ModelProto()
        m.CopyFrom(out)
        e = _Lowering(m, with_shapes(out))
        nodes, changed = [], False
        for node in m.graph.node:
            start = len(e.nodes)
            if _ours(node, opset) and e.lower(node):
                nodes.extend(e.nodes[start:])
                changed = True
            else:
                del e.nodes[start:]
                nodes.append(node)
        if not changed:
            break
        del m.graph.node[:]
        m.graph.node.extend(nodes)
        m.graph.initializer.extend(e.inits)
        drop_unused_import(m, _MS)
        out = m
    return out
