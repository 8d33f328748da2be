"""Reverse-mode differentiation of ONNX graphs into ONNX graphs.

`augment(model)` returns a model that takes the original inputs plus `seed` (the cotangent of the score
tensor, shaped like it) and additionally returns chosen layer tensors, their gradients `<layer>__grad`
and the input gradient `<input>__grad`. `differentiate` is the general form for composed graphs.

The per-operator vector-Jacobian rules live in one table, `autodiff_rules.RULES`; this module holds the
reverse walk (`_backward`) and the small `Ctx` API the rules use to emit nodes. Everything emitted is a
standard ai.onnx operator, so the result runs on any ONNX runtime (onnxruntime's own training ops are
com.microsoft and not available at inference time). Forward tensors are reused by name: the backward never
recomputes the forward.
"""
from __future__ import annotations

import hashlib
import itertools
import re
from collections import OrderedDict
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import contrib, qdq
from .autodiff_rules import NON_DIFFERENTIABLE, QUANTIZED, RULES, RULE_VARIANTS

__all__ = ["augment", "augment_cached", "differentiate", "share_forward", "AutodiffError", "RULE_VARIANTS"]

# ScatterElements(reduction="add") and CastLike need opset 16; opsets 13..15 differ from 16 only in type
# lists and ops that image classifiers do not use, so such models are lifted by relabelling the import.
_MIN_OPSET = 16
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


class AutodiffError(ValueError):
    """A graph that cannot be differentiated (missing rule, missing static shape, bad request)."""


# ----------------------------------------------------------------------------------------------------------
# What the rules see: the node, its output cotangents, and an emitter of new nodes.
# ----------------------------------------------------------------------------------------------------------
class Ctx:
    def __init__(self, g: "_Graph", node: onnx.NodeProto, gs: list, rule: str):
        self.graph, self.node, self.gs, self.rule = g, node, gs, rule
        self.attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        self.opset = g.opset

    # node ---------------------------------------------------------------------------------------------
    @property
    def g(self):
        return self.gs[0]

    def x(self, i: int = 0):
        return self.node.input[i] if i < len(self.node.input) and self.node.input[i] else None

    def y(self, i: int = 0):
        return self.node.output[i] if i < len(self.node.output) and self.node.output[i] else None

    def attr(self, name, default=None):
        v = self.attrs.get(name, default)
        return v.decode() if isinstance(v, bytes) else v

    def needs(self, i: int) -> bool:
        return self.x(i) is not None and self.x(i) in self.graph.active

    def fail(self, why: str):
        raise AutodiffError(f"{self.node.op_type} node {self.node.name!r}: {why}")

    # static knowledge ---------------------------------------------------------------------------------
    def value(self, name):
        """Constant value of a tensor (initializer or Constant output), else None."""
        return None if name is None else self.graph.consts.get(name)

    def ints(self, name):
        v = self.value(name)
        return None if v is None else [int(t) for t in np.asarray(v).reshape(-1)]

    def dims(self, name):
        return self.graph.dims(name)

    def rank(self, name):
        d = self.graph.dims(name)
        if d is None and name in self.graph.consts:
            return np.asarray(self.graph.consts[name]).ndim
        return None if d is None else len(d)

    def need_rank(self, name):
        r = self.rank(name)
        if r is None:
            self.fail(f"the rank of {name!r} is unknown (shape inference gave none)")
        return r

    def static_dims(self, name, axes=None):
        """Integer dims of `name` (only `axes` when given), or None where any is symbolic/unknown."""
        d = self.dims(name)
        if d is None:
            return None
        d = list(d) if axes is None else [d[a] for a in axes]
        return d if all(isinstance(v, int) for v in d) else None

    def dtype(self, name):
        return self.graph.dtype(name)

    # emitting -----------------------------------------------------------------------------------------
    def __call__(self, op_type, *inputs, outputs: int = 1, **attrs):
        return self.graph.emit(op_type, inputs, outputs, attrs, hint=self.node.name or self.node.op_type)

    def const(self, value, like=None, dtype=None):
        """A constant with the element type of tensor `like` (or explicit onnx dtype)."""
        dt = dtype if dtype is not None else self.dtype(like)
        return self.graph.const(np.asarray(value, dtype=helper.tensor_dtype_to_np_dtype(dt)))

    def i64(self, values):
        return self.graph.const(np.asarray(values, dtype=np.int64))

    def shape(self, name, start=None, end=None):
        return self.graph.shape(name, start, end)

    def size(self, name):
        return self.graph.size(name)

    def zeros_like(self, name):
        dt = helper.tensor_dtype_to_np_dtype(self.dtype(name))
        return self("ConstantOfShape", self.shape(name), value=numpy_helper.from_array(np.zeros(1, dt)))

    def reduce(self, op, x, axes, keepdims=1):
        """Reduce over `axes` (ints) choosing attribute or input form by opset."""
        if op == "ReduceSum" and self.opset >= 13 or self.opset >= 18:
            return self(op, x, self.i64(list(axes)), keepdims=keepdims)
        return self(op, x, axes=list(axes), keepdims=keepdims)

    def reshape_like(self, g, x):
        return self("Reshape", g, self.shape(x))

    def unbroadcast(self, g, x, like=None):
        """Sum cotangent `g` (shaped like tensor `like`, by default the node's output) back to the shape
        of operand `x`."""
        gd, xd = self.dims(like or self.y(0)), self.dims(x)
        if gd is not None and xd is not None and _same_dims(gd, xd):
            return g
        if gd is not None and xd is not None and _static_broadcast_axes(gd, xd) is not None:
            axes = _static_broadcast_axes(gd, xd)
            if axes:
                g = self.reduce("ReduceSum", g, axes, keepdims=1)
            return g if len(gd) == len(xd) else self("Reshape", g, self.shape(x))
        # Fully dynamic: left-pad x's shape with ones to g's rank and sum where the dims differ.
        sg, sx = self.shape(g), self.shape(x)
        extra = self("Sub", self("Size", sg), self("Size", sx))
        ones = self("ConstantOfShape", self("Reshape", extra, self.i64([1])),
                    value=numpy_helper.from_array(np.ones(1, np.int64)))
        padded = self("Concat", ones, sx, axis=0)
        axes = self("Reshape", self("NonZero", self("Not", self("Equal", padded, sg))), self.i64([-1]))
        summed = self("ReduceSum", g, axes, keepdims=1, noop_with_empty_axes=1)
        return self("Reshape", summed, sx)

    def scatter_back(self, x, g, forward):
        """Adjoint of an index-selecting op (Gather, Slice, Pad modes, ...): run the op on the flat indices
        of `x`, then scatter-add `g` to where each element came from (duplicates sum, as autograd does)."""
        sx = self.shape(x)
        n = self.size(x)
        idx = self("Reshape", self("Range", self.i64(0), n, self.i64(1)), sx)
        picked = self("Reshape", forward(idx), self.i64([-1]))
        dt = helper.tensor_dtype_to_np_dtype(self.dtype(x))
        zeros = self("ConstantOfShape", self("Reshape", n, self.i64([1])),
                     value=numpy_helper.from_array(np.zeros(1, dt)))
        flat = self("ScatterElements", zeros, picked, self("Reshape", g, self.i64([-1])),
                    axis=0, reduction="add")
        return self("Reshape", flat, sx)


def _same_dims(a, b):
    return len(a) == len(b) and all(p == q and p is not None for p, q in zip(a, b))


def _static_broadcast_axes(gd, xd):
    """Axes of g to sum so it broadcasts back to x, when knowable from static/symbolic dims."""
    if len(xd) > len(gd):
        return None
    pad = len(gd) - len(xd)
    axes = list(range(pad))
    for i, d in enumerate(xd):
        o = gd[pad + i]
        if d == 1 and o != 1:
            if o is None:
                return None
            axes.append(pad + i)
        elif d != o or d is None:
            return None
    return axes


# ----------------------------------------------------------------------------------------------------------
# The graph under construction
# ----------------------------------------------------------------------------------------------------------
class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.opset = _default_opset(model)
        self.nodes, self.inits = [], []
        self.consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        for n in g.node:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and n.attribute:
                a = n.attribute[0]
                if a.name == "value":
                    self.consts[n.output[0]] = numpy_helper.to_array(a.t)
                elif a.name in ("value_float", "value_int", "value_floats", "value_ints"):
                    self.consts[n.output[0]] = np.asarray(helper.get_attribute_value(a))
        # The graph's outputs are inferred, not read as declared: the legacy exporter names an output's dims that
        # its dynamic_axes leave out ("Gemmlogits_dim_0"), which would untie the scores' batch (and the seed's) from
        # the input's; a dim inference cannot tell keeps its declared name.
        bare = onnx.ModelProto()
        bare.CopyFrom(model)
        for vi in bare.graph.output:
            for d in vi.type.tensor_type.shape.dim if vi.type.HasField("tensor_type") else []:
                d.ClearField("dim_param")
        try:
            inferred = onnx.shape_inference.infer_shapes(bare, data_prop=True)
        except Exception:  # noqa: BLE001 - a model ORT accepts may still trip the checker's inference
            inferred = model
        self.types = {}
        ig = inferred.graph
        for vi in itertools.chain(ig.input, ig.value_info, ig.output):
            if vi.type.HasField("tensor_type"):
                self.types[vi.name] = vi.type.tensor_type
        for vi in g.output:
            t = self.types.get(vi.name)
            declared = vi.type.tensor_type.shape.dim if vi.type.HasField("tensor_type") else []
            if t is not None and t.HasField("shape") and len(t.shape.dim) == len(declared):
                for d, was in zip(t.shape.dim, declared):
                    if not d.HasField("dim_value") and was.dim_param and (not d.dim_param
                                                                          or d.dim_param.startswith("unk__")):
                        d.dim_param = was.dim_param
        for t in g.initializer:
            self.types.setdefault(t.name, onnx.TypeProto.Tensor(elem_type=t.data_type, shape=_shape_proto(t.dims)))
        self.taken = {n for node in g.node for n in itertools.chain(node.input, node.output)}
        self.producer = {out: node for node in g.node for out in node.output}
        self.taken |= {v.name for v in itertools.chain(g.input, g.output, g.initializer)}
        self.counter = itertools.count()
        self.const_cache, self.shape_cache = {}, {}
        self.batch = None   # (symbol, tensor): a graph input whose dim 0 is that symbol (differentiate sets the seed)
        self.active = set()
        self.cot_dtype = {}
        self.real = {}   # quantized tensor on the path -> element type of the real value it stands for

    def cotangent_dtype(self, name):
        """Element type of the cotangent of forward tensor `name` (a quantized tensor's is its real value's)."""
        return self.real.get(name) or self.dtype(name)

    # static info
    def dims(self, name):
        t = self.types.get(name)
        if t is None or not t.HasField("shape"):
            if name in self.consts:
                return list(np.asarray(self.consts[name]).shape)
            return None
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]

    def dtype(self, name):
        if name in self.cot_dtype:
            return self.cot_dtype[name]
        t = self.types.get(name)
        if t is not None and t.elem_type:
            return t.elem_type
        if name in self.consts:
            return helper.np_dtype_to_tensor_dtype(np.asarray(self.consts[name]).dtype)
        return TensorProto.FLOAT

    # emission
    def fresh(self, hint):
        while True:
            name = f"ad/{hint}/{next(self.counter)}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def emit(self, op_type, inputs, outputs, attrs, hint="grad"):
        outs = [self.fresh(hint) for _ in range(outputs)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        ins = ["" if i is None else i for i in inputs]
        self.nodes.append(helper.make_node(op_type, ins, outs, name=self.fresh(f"{hint}/{op_type}"), **attrs))
        return outs[0] if outputs == 1 else outs

    def const(self, arr: np.ndarray):
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self.const_cache:
            name = self.fresh("const")
            self.inits.append(numpy_helper.from_array(arr, name))
            self.consts[name] = arr
            self.types[name] = onnx.TypeProto.Tensor(elem_type=helper.np_dtype_to_tensor_dtype(arr.dtype),
                                                     shape=_shape_proto(arr.shape))
            self.const_cache[key] = name
        return self.const_cache[key]

    def shape(self, name, start=None, end=None):
        """Shape of `name` (dims start:end). Dims that shape inference knows are constants, and a dim that is the
        seed's batch symbol is read from the seed: the backward then does not keep forward tensors alive only for
        their shapes, so forward nodes that no gradient reads are pruned (deconvnet needs no forward activation
        but MaxPool's switches: on ResNet-50 its graph went from 75 to 45 ms)."""
        key = (name, start, end)
        if key not in self.shape_cache:
            dims = self.dims(name)
            dims = None if dims is None else dims[start:end]
            if dims is not None and all(isinstance(d, int) for d in dims):
                self.shape_cache[key] = self.const(np.asarray(dims, np.int64))
            elif (dims is not None and self.batch and name != self.batch[1]
                  and all(isinstance(d, int) or d == self.batch[0] for d in dims)):
                batch = self.shape(self.batch[1], 0, 1)
                parts = [batch if d == self.batch[0] else self.const(np.asarray([d], np.int64)) for d in dims]
                self.shape_cache[key] = self.emit("Concat", parts, 1, {"axis": 0}, hint="shape")
            else:
                self.shape_cache[key] = self.emit("Shape", [name], 1, {"start": start, "end": end}, hint="shape")
        return self.shape_cache[key]

    def size(self, name):
        """Number of elements of `name` (a scalar), from its shape (see `shape`)."""
        dims = self.dims(name)
        if dims is not None and all(isinstance(d, int) for d in dims):
            return self.const(np.asarray(int(np.prod(dims)), np.int64))
        return self.emit("ReduceProd", [self.shape(name)], 1, {"keepdims": 0}, hint="size")


def _shape_proto(dims):
    s = onnx.TensorShapeProto()
    for d in dims:
        s.dim.add().dim_value = int(d)
    return s


def _default_opset(model):
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 1


def _lift_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    v = _default_opset(model)
    if v >= _MIN_OPSET:
        return model
    if v < 13:
        from onnx import version_converter

        return _restore_names(model, version_converter.convert_version(model, _MIN_OPSET))
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = _MIN_OPSET
    model.ir_version = max(model.ir_version, 8)
    return model


def _fold_dequantized_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with each DequantizeLinear of constants (a QDQ model's int8 weights and int32 biases) replaced by
    its value, the same bits onnxruntime computes. onnxruntime keeps those nodes so as to fuse them into integer
    kernels, which the augmented graph rules out (the backward reads the float weights); left in, every weight is
    dequantized on every run, and each convolution's backward is a ConvTranspose of a computed kernel instead of
    a Conv of the transposed constant that its rule writes when the weight is known (EfficientNet-Lite0 quantized
    by onnxruntime: 50 ms for forward + backward with them, against 18 ms for the float model)."""
    values = dequantized_constants(model)
    if values:
        keep = [n for n in model.graph.node if not (n.op_type == "DequantizeLinear" and n.output[0] in values)]
        read_before = {i for n in model.graph.node for i in n.input}
        read = {i for n in keep for i in n.input} | {o.name for o in [*model.graph.output, *model.graph.input]}
        del model.graph.node[:]
        model.graph.node.extend(keep)
        inits = [t for t in model.graph.initializer if t.name in read or t.name not in read_before]  # the integers go
        del model.graph.initializer[:]
        model.graph.initializer.extend(inits)
        model.graph.initializer.extend(numpy_helper.from_array(v, name) for name, v in values.items())
    return model


def dequantized_constants(model: onnx.ModelProto) -> dict:
    """Output name -> value of each DequantizeLinear of integer initializers (per tensor or per axis, not blocked):
    (q - zero) * scale in the scale's type, with the one rounding onnxruntime's kernel makes."""
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if (n.op_type != "DequantizeLinear" or n.domain not in ("", "ai.onnx") or len(n.input) < 2
                or not all(i in inits for i in n.input if i)
                or any(a.name == "block_size" and a.i for a in n.attribute)):
            continue
        q, scale, zero = [numpy_helper.to_array(inits[i]) if i else None for i in [*n.input[:3], ""][:3]]
        if q.dtype.kind not in "iu" or (zero is not None and zero.dtype.kind not in "iu"):
            continue
        shape = [1] * q.ndim
        if scale.ndim == 1 and q.ndim:
            shape[next((a.i for a in n.attribute if a.name == "axis"), 1) % q.ndim] = -1
        diff = q.astype(np.int64) - (0 if zero is None else zero.astype(np.int64).reshape(shape or ()))
        out[n.output[0]] = (diff.astype(scale.dtype) * scale.reshape(shape or ())).astype(scale.dtype)
    return out


def _restore_names(before: onnx.ModelProto, after: onnx.ModelProto) -> onnx.ModelProto:
    """Give tensors the version converter renamed their old names back: it writes a replaced node's output under a
    new name (opset 9's Upsample becomes a Resize writing `_v_17`), and the layers callers list, found on the model as
    loaded, must still name tensors of the converted graph. Old and new names are paired where a node that kept its
    name and type reads a new name at the input position where it read the old one, or at a graph output."""
    def names(m):
        return {t for n in m.graph.node for t in [*n.input, *n.output]} | {i.name for i in m.graph.input}

    gone = names(before) - names(after)
    if not gone:
        return after
    old_nodes = {(n.name, n.op_type): n for n in before.graph.node if n.name}
    pairs = [zip(old_nodes[n.name, n.op_type].input, n.input) for n in after.graph.node
             if (n.name, n.op_type) in old_nodes]
    pairs.append((o.name, a.name) for o, a in zip(before.graph.output, after.graph.output))
    back = {new: old for group in pairs for old, new in group if old != new and old in gone}
    for n in after.graph.node:
        n.input[:] = [back.get(t, t) for t in n.input]
        n.output[:] = [back.get(t, t) for t in n.output]
    for vi in [*after.graph.output, *after.graph.value_info]:
        vi.name = back.get(vi.name, vi.name)
    return after


# ----------------------------------------------------------------------------------------------------------
# The walk
# ----------------------------------------------------------------------------------------------------------
def _path(g: _Graph, of: str, wrt: Sequence[str]):
    """Nodes that carry a derivative from some `wrt` tensor to `of`, in topological order."""
    nodes = list(g.model.graph.node)
    active = set(wrt)
    for n in nodes:
        if n.op_type in NON_DIFFERENTIABLE and n.domain in ("", "ai.onnx"):
            continue  # (a custom-domain node stays on the path, so that the walk reports it has no rule)
        if not any(i in active for i in n.input):
            continue
        if n.op_type in QUANTIZED and n.domain in ("", "ai.onnx"):
            # the quantized output only: DynamicQuantizeLinear's scale and zero point are held constant
            active.add(n.output[0])
            g.real[n.output[0]] = g.dtype(n.input[0])
        else:
            active.update(o for o in n.output if o and g.dtype(o) in _FLOAT_TYPES)
    _refuse_integer_cuts(g, nodes, active, of, wrt)
    needed = {of}
    on_path = []
    for n in reversed(nodes):
        if any(o in needed for o in n.output) and any(i in active for i in n.input):
            if n.op_type in NON_DIFFERENTIABLE and n.domain in ("", "ai.onnx"):
                continue
            on_path.append(n)
            needed.update(i for i in n.input if i in active)
    g.active = active & needed
    return on_path[::-1]


def _refuse_integer_cuts(g: _Graph, nodes, active: set, of: str, wrt) -> None:
    """Raise where the derivative would silently stop at an integer tensor that the score still depends on: a node
    without a rule that turns a tensor on the path into integers, or any node but DequantizeLinear that reads a
    quantized tensor (a QOperator-format node or an integer product kernels.qdq could not rewrite). Left alone,
    the walk would find no path there and return a zero gradient for a model whose output plainly depends on it.
    Integer outputs of nodes that have a rule (Cast to an integer type, TopK's indices) and of NON_DIFFERENTIABLE
    nodes are true zeros and pass; a node of another domain (com.microsoft's QLinearSoftmax) has no rule."""
    reaches = {of}
    for n in reversed(nodes):
        if any(o in reaches for o in n.output):
            reaches.update(i for i in n.input if i)
    for n in nodes:
        standard = n.domain in ("", "ai.onnx")
        if standard and n.op_type in NON_DIFFERENTIABLE:
            continue
        cut = [o for o in n.output if o and o not in active and o in reaches]
        if not cut or not any(i in active for i in n.input):
            continue
        reads_quantized = any(i in g.real for i in n.input) and n.op_type != "DequantizeLinear"
        if reads_quantized or not standard or n.op_type not in RULES:
            hint = (" Operators that compute on integers have no rules (kernels.qdq writes the QOperator format's "
                    "QLinearConv, QLinearMatMul, QGemm, QLinearAdd/Mul/Concat/Sigmoid/LeakyRelu/Softmax and pools, "
                    "and dynamic quantization's ConvInteger/MatMulInteger -> Cast -> Mul by the two scales, in the "
                    "QDQ format, but not this node): quantize the model in the QDQ "
                    "format instead (QuantizeLinear/DequantizeLinear around float operators, differentiated with the "
                    "straight-through estimator) or serve it with a gradient graph of your own."
                    if reads_quantized or "Quantize" in n.op_type else "")
            raise AutodiffError(f"no gradient rule for operator {n.op_type!r} (node {n.name!r}) on the path from "
                                f"{list(wrt)} to {of!r}: its output {cut[0]!r} is {_type_name(g.dtype(cut[0]))}, "
                                f"so no derivative would reach the score through it.{hint}")


def _type_name(dtype) -> str:
    return helper.tensor_dtype_to_string(dtype).replace("TensorProto.", "").lower()


def _backward(g: _Graph, of: str, seed: str, wrt: Sequence[str], rule: str) -> dict:
    """Reverse walk: each node turns its outputs' summed cotangents into its inputs' cotangents."""
    grads: dict[str, list[str]] = {of: [seed]}

    def total(name):
        parts = grads.get(name)
        if not parts:
            return None
        if len(parts) > 1:  # a tensor with several consumers: its cotangent is the sum of theirs
            grads[name] = [g.emit("Sum", parts, 1, {}, hint=f"{name}/sum")]
            g.cot_dtype[grads[name][0]] = g.cotangent_dtype(name)
        return grads[name][0]

    for node in reversed(_path(g, of, wrt)):
        gs = [total(o) if o else None for o in node.output]
        if all(c is None for c in gs):
            continue
        fn = RULES.get(node.op_type)
        if fn is None or node.domain not in ("", "ai.onnx"):
            raise AutodiffError(f"no gradient rule for operator {node.op_type!r} "
                                f"(node {node.name!r}) on the path from {list(wrt)} to {of!r}")
        ctx = Ctx(g, node, gs, rule)
        dxs = list(fn(ctx)) + [None] * len(node.input)
        for i, name in enumerate(node.input):
            if name and name in g.active:
                if dxs[i] is None:
                    raise AutodiffError(f"{node.op_type} node {node.name!r}: no gradient for its input {i} "
                                        f"({name!r}), which lies on the path to {of!r}")
                g.cot_dtype.setdefault(dxs[i], g.cotangent_dtype(name))
                grads.setdefault(name, []).append(dxs[i])
    return {w: total(w) for w in wrt}


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------
def differentiate(model: onnx.ModelProto, of: str, wrt: Sequence[str], rule: str = "standard",
                  seed_name: str = "seed", keep_outputs: bool = True,
                  extra_outputs: Sequence[str] = (), reuse_seed: bool = False) -> onnx.ModelProto:
    """Model computing d<of>/d<w> for each w in `wrt` (any graph inputs or intermediate tensors), given
    `seed_name` as the cotangent of `of`. Outputs: the original outputs (if keep_outputs), `extra_outputs`,
    then `<w>__grad` for each w. The input model is not modified. `reuse_seed`: `seed_name` is already an input
    of `model` (a graph this function made) and is the cotangent again, e.g. to add a second backward pass under
    another rule that shares the forward and the seed with the first."""
    if rule not in RULE_VARIANTS:
        raise AutodiffError(f"rule must be one of {sorted(RULE_VARIANTS)}, got {rule!r}")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m = _fold_dequantized_constants(_lift_opset(qdq.from_qoperator(contrib.to_standard(m))))
    g = _Graph(m)
    known = g.taken
    for name in [of, *wrt, *extra_outputs]:
        if name not in known:
            raise AutodiffError(f"tensor {name!r} is not in the graph")
    inputs = {i.name for i in m.graph.input}
    if reuse_seed and seed_name not in inputs:
        raise AutodiffError(f"seed {seed_name!r} to reuse is not an input of the graph")
    if seed_name in known and not reuse_seed:
        raise AutodiffError(f"seed name {seed_name!r} is already used in the graph")
    wrt = list(dict.fromkeys(wrt))
    dims = g.dims(of)
    seed_vi = helper.make_tensor_value_info(seed_name, g.dtype(of), dims)
    g.cot_dtype[seed_name] = g.dtype(of)
    if dims and isinstance(dims[0], str):
        g.types[seed_name] = seed_vi.type.tensor_type
        g.batch = (dims[0], seed_name)
    grads = _backward(g, of, seed_name, wrt, rule)

    out_vis = []
    for o in (m.graph.output if keep_outputs else []):
        if not o.type.tensor_type.HasField("shape") and g.dims(o.name) is not None:
            o = helper.make_tensor_value_info(o.name, g.dtype(o.name), g.dims(o.name))
        out_vis.append(o)
    present = {v.name for v in out_vis}
    for name in extra_outputs:
        if name not in present:
            out_vis.append(helper.make_tensor_value_info(name, g.dtype(name), g.dims(name)))
            present.add(name)
    ctx = Ctx(g, helper.make_node("Identity", [], [], name="wrt"), [], rule)
    for w in wrt:
        gname = f"{w}__grad"
        # A tensor the score does not depend on has a zero gradient, not a missing output.
        src = grads[w] if grads[w] is not None else ctx.zeros_like(w)
        g.nodes.append(helper.make_node("Identity", [src], [gname], name=g.fresh(f"{w}/grad/out")))
        out_vis.append(helper.make_tensor_value_info(gname, g.dtype(w), g.dims(w)))

    m.graph.node.extend(g.nodes)
    m.graph.initializer.extend(g.inits)
    if not reuse_seed:
        m.graph.input.append(seed_vi)
    del m.graph.output[:]
    m.graph.output.extend(out_vis)
    return _with_shapes(_pruned(m))


def _pruned(m: onnx.ModelProto) -> onnx.ModelProto:
    """The graph without the nodes and initializers that no output needs (onnxruntime runs every node it is
    given): forward nodes whose tensors only an original output read, when keep_outputs is False."""
    from .compose import _reads

    needed = {o.name for o in m.graph.output}
    live = []
    for node in reversed(m.graph.node):
        if any(o in needed for o in node.output):
            live.append(node)
            needed |= _reads(node)
    if len(live) < len(m.graph.node):
        del m.graph.node[:]
        m.graph.node.extend(reversed(live))
        declared = {i.name for i in m.graph.input}      # an initializer listed as an input (IR < 4) stays
        kept = [t for t in m.graph.initializer if t.name in needed or t.name in declared]
        del m.graph.initializer[:]
        m.graph.initializer.extend(kept)
    return m


def _with_shapes(m: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with every tensor's inferred shape recorded (value_info), data propagation included.
    Backward tensors are often shaped at run time (Expand/Reshape to Shape(x)); onnxruntime's own inference does
    not propagate those values, and without static shapes its CPU layout pass (NCHWc) cannot keep same-shape
    elementwise ops of the backward in the blocked layout, so it reorders tensors around each of them."""
    try:
        inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is an optimisation here; onnxruntime infers at load anyway
        return m
    del m.graph.value_info[:]
    m.graph.value_info.extend(inferred.graph.value_info)
    return m


def _score_of(model):
    try:
        from .graph import score_tensor
    except ImportError:
        return model.graph.output[0].name
    return score_tensor(model)


def _float_inputs(model):
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits
            and i.type.tensor_type.elem_type in _FLOAT_TYPES]


def augment(model: onnx.ModelProto, layers: Sequence[str] = (), wrt_input: bool = True,
            rule: str = "standard", scores: str | None = None, layer_rule: str | None = None,
            keep_outputs: bool = True) -> onnx.ModelProto:
    """Inputs: the original inputs + `seed` (cotangent of the score tensor, so a batch of one-hot or weighted
    targets is one run). Outputs: original outputs, each layer tensor, `<layer>__grad` per layer, and
    `<input>__grad` per float input when `wrt_input`. Each sample's gradient depends only on its seed row.
    `rule`: "standard" (gradient), "guided" or "deconvnet" (see autodiff_rules). `layer_rule`: the layers'
    gradients under another rule than the input's (guided Grad-CAM: guided input, standard layers), from a
    second backward pass in the same graph, which shares its forward and its seed. `keep_outputs` False: the
    original outputs are left out, and with them the forward nodes that only they need."""
    layers = list(layers)
    score = scores if scores is not None else _score_of(model)
    wrt = layers + (_float_inputs(model) if wrt_input else [])
    if not wrt:
        raise AutodiffError("nothing to differentiate: no layers given and wrt_input is False")
    layer_rule = layer_rule or rule
    if not wrt_input:
        return differentiate(model, score, wrt, rule=layer_rule, extra_outputs=layers, keep_outputs=keep_outputs)
    if layer_rule == rule or not layers:
        return differentiate(model, score, wrt, rule=rule, extra_outputs=layers, keep_outputs=keep_outputs)
    inputs = differentiate(model, score, _float_inputs(model), rule=rule)   # keeps the score for the second pass
    both = differentiate(inputs, score, layers, rule=layer_rule, extra_outputs=layers, reuse_seed=True)
    original = {o.name for o in model.graph.output}
    group = {**{name: 0 for name in original}, **{name: 1 for name in layers},
             **{f"{name}__grad": 2 for name in layers}}
    outputs = sorted(both.graph.output, key=lambda o: group.get(o.name, 3))    # augment's usual order (stable)
    del both.graph.output[:]
    both.graph.output.extend(o for o in outputs if keep_outputs or o.name not in original)
    return both if keep_outputs else _with_shapes(_pruned(both))


# Operators that broadcast numpy-style: a forward operand with one row broadcasts against a backward operand with
# K rows exactly as K copies of it would (MatMul over its batch dims, so only at rank >= 3).
_ROW_BROADCASTING = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Greater",
                     "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "MatMul"}


def share_forward(model: onnx.ModelProto, seed_name: str = "seed") -> onnx.ModelProto:
    """A gradient graph (from `differentiate` or `augment`) whose forward runs once for many seed rows: its inputs
    take one sample (batch 1) and `seed_name` K rows; each gradient output has K rows, row k what the original
    graph gives for row k of K copies of the sample, for the cost of one forward and K backwards. Outputs the
    forward computes (scores, layers) come back once, with batch 1.

    The backward reads forward tensors (a ReLU's mask, a Softmax's output, MaxPool's switches) with one row:
    element-wise operators broadcast them against the K rows by themselves (so a mask is computed once), other
    operators read an Expand to K rows, and MaxPool's flat switch indices get each row's offset. A forward tensor
    whose batch is merged into a dim (c * batch: a Swin's windows, torch.nn.MultiheadAttention's batch x heads) is
    tiled K times along it, which is right if that dim runs over the batch outermost; the result is then checked
    against K copies of a random sample (one run of each graph) and refused if it differs. A value computed from
    the shape of a tensor of one row per sample (a Gather's zeros to scatter into, sized by the run-time shape of
    what it gathered from) is computed again from that shape with K rows (c * K for a merged dim). Raises
    AutodiffError where the backward would read a forward value that holds the batch in any other way or whose
    shape is unknown, so a caller can repeat the sample instead. Where ONNX's shape inference leaves a tensor's
    batch untied (a reshape to a run-time shape, as the legacy exporter writes a ViT's), onnxruntime's symbolic
    shape inference is asked, then the shapes the graph's tensors take at batch 1 and 2 (measured shapes are
    seen, not proved, so that result is checked too)."""
    try:
        return _share_forward(model, seed_name, None)
    except AutodiffError as error:
        last = error
    for shapes in (_symbolic_shapes, _measured_shapes):
        refined = shapes(model, seed_name)
        if refined is not None:
            try:       # measured shapes are seen, not proved: the result is then checked as a merged batch is
                return _share_forward(model, seed_name, refined, check=shapes is _measured_shapes)
            except AutodiffError as error:
                last = error
    raise last


def _symbolic_shapes(model: onnx.ModelProto, seed_name: str) -> list | None:
    """The value infos onnxruntime's symbolic shape inference (sympy) gives `model`'s tensors, or None where it
    cannot: it follows a batch through Shape -> Gather -> Concat -> Reshape and arithmetic on it, which ONNX's
    data propagation does not."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        bare = onnx.ModelProto()
        bare.CopyFrom(model)
        del bare.graph.value_info[:]
        inferred = SymbolicShapeInference.infer_shapes(bare, auto_merge=True)
    except Exception:  # noqa: BLE001 - sympy missing, or an operator it does not know: ONNX's shapes stand
        return None
    return list(inferred.graph.value_info) if inferred is not None else None


def _measured_shapes(model: onnx.ModelProto, seed_name: str, batches=(1, 2)) -> list | None:
    """Value infos from the shapes every tensor takes when `model` runs at batch 1 and 2 (random float32
    inputs): a dim that does not change is static, one that is c times the batch in each run is written "c*n"
    (n: the seed's batch symbol), others are left unknown. For graphs whose shape arithmetic neither inference
    follows (the legacy exporter's torch.nn.MultiheadAttention); None where an input is not float32 with static
    dims after the batch, or the runs fail."""
    import onnxruntime as ort

    seed_dims = [d.dim_param or d.dim_value for vi in model.graph.input if vi.name == seed_name
                 for d in vi.type.tensor_type.shape.dim]
    if not seed_dims or not isinstance(seed_dims[0], str):
        return None
    inits = {t.name for t in model.graph.initializer}
    shapes, types = {}, {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=o) for o in itertools.chain(
        (i.name for i in probe.graph.input if i.name not in inits), (o for n in probe.graph.node for o in n.output))
        if o and o not in outputs)
    try:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        rng = np.random.default_rng(0)
        for batch in batches:
            feeds = {}
            for vi in model.graph.input:
                if vi.name in inits:
                    continue
                t = vi.type.tensor_type
                dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim][1:]
                if t.elem_type != TensorProto.FLOAT or None in dims:
                    return None
                feeds[vi.name] = rng.standard_normal((batch, *dims)).astype(np.float32)
            for name, value in zip(names, session.run(names, feeds)):
                if isinstance(value, np.ndarray):
                    shapes.setdefault(name, []).append(value.shape)
                    types[name] = helper.np_dtype_to_tensor_dtype(value.dtype)
    except Exception:  # noqa: BLE001 - the shapes stay unknown: share_forward refuses as before
        return None
    infos = []
    for name, runs in shapes.items():
        if len(runs) != len(batches) or len({len(r) for r in runs}) != 1:
            continue
        dims = []
        for sizes in zip(*runs):
            c = sizes[0] // batches[0]
            if len(set(sizes)) == 1:
                dims.append(sizes[0])
            elif c and all(size == c * b for size, b in zip(sizes, batches)):
                dims.append(seed_dims[0] if c == 1 else f"{c}*{seed_dims[0]}")
            else:
                dims.append(None)
        infos.append(helper.make_tensor_value_info(name, types[name], dims))
    return infos


def _share_forward(model: onnx.ModelProto, seed_name: str, value_info: list | None, check: bool = False
                   ) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if value_info is not None:
        del m.graph.value_info[:]
        m.graph.value_info.extend(value_info)
    g = _Graph(m)
    if value_info is not None:      # over ONNX's own inference, which _Graph ran
        g.types.update((vi.name, vi.type.tensor_type) for vi in value_info if vi.type.HasField("tensor_type"))
    graph = m.graph
    seed_dims = g.dims(seed_name)
    if seed_name not in {i.name for i in graph.input} or not seed_dims or not isinstance(seed_dims[0], str):
        raise AutodiffError(f"{seed_name!r} is not an input with a symbolic batch dim")
    batch = seed_dims[0]
    inits = {t.name for t in graph.initializer}
    data = [i for i in graph.input if i.name != seed_name and i.name not in inits]
    for i in data:
        dims = g.dims(i.name)
        if not dims or dims[0] != batch:
            raise AutodiffError(f"input {i.name!r} does not have the seed's batch dim {batch!r}")

    switches = {n.output[1] for n in graph.node if n.op_type == "MaxPool" and len(n.output) > 1 and n.output[1]}
    late = {seed_name}          # tensors with K rows: those computed from the seed or from MaxPool's switches
    # Tensors made from the batch as a value alone (a run-time shape or size, then constants: sizes, zeros, flat
    # positions), with their node; what a forward tensor makes with them (a Reshape of it) is forward data.
    held = {}
    for node in graph.node:
        ins = [i for i in node.input if i]
        if any(i in late or i in switches for i in ins):
            late.update(o for o in node.output if o)
        elif ((node.op_type in ("Shape", "Size") and not _static(g.dims(ins[0])))
              or (any(i in held for i in ins) and all(i in held or i in inits or i in g.consts for i in ins))):
            held.update((o, node) for o in node.output if o)

    made: dict = {}
    nodes = []

    def emit(op_type, inputs, **attrs):
        out = g.fresh("share")
        nodes.append(helper.make_node(op_type, inputs, [out], name=g.fresh(f"share/{op_type}"), **attrs))
        return out

    def rows(rank):
        if ("rows", rank) not in made:
            if "k" not in made:
                made["k"] = emit("Shape", [seed_name], start=0, end=1)
            made[("rows", rank)] = emit("Concat", [made["k"], g.const(np.ones(rank - 1, np.int64))], axis=0) \
                if rank > 1 else made["k"]
        return made[("rows", rank)]

    def expanded(name):
        if ("expand", name) not in made:
            dims = g.dims(name)
            out = emit("Expand", [name, rows(len(dims))])
            if name in switches:      # flat over N*C*H*W (ONNX MaxPool): row k's switches lie k*C*H*W further on
                source = next(n.input[0] for n in graph.node if n.op_type == "MaxPool" and n.output[1] == name)
                per_row = g.dims(source)
                if not per_row or not _static(per_row[1:]):
                    raise AutodiffError(f"MaxPool input {source!r} needs static dims after the batch")
                k = emit("Squeeze", [made["k"], g.const(np.asarray([0], np.int64))])
                offsets = emit("Mul", [emit("Range", [g.const(np.asarray(0, np.int64)), k,
                                                      g.const(np.asarray(1, np.int64))]),
                                       g.const(np.asarray(int(np.prod(per_row[1:])), np.int64))])
                out = emit("Add", [out, emit("Reshape", [offsets, g.const(np.asarray([-1] + [1] * (len(dims) - 1),
                                                                                      np.int64))])])
            made[("expand", name)] = out
        return made[("expand", name)]

    def tiled(name, axis, factor):
        """A forward tensor whose `axis` holds the batch `factor` times, for one sample, repeated K times along it:
        what K copies of the sample give if that axis runs over the batch outermost (a reshape that merges the
        batch dim with the ones after it); the other order is caught by the check below."""
        if ("tile", name) not in made:
            rank = len(g.dims(name))
            rows(1)
            repeats = emit("Concat", [g.const(np.ones(axis, np.int64)), made["k"],
                                      g.const(np.ones(rank - axis - 1, np.int64))], axis=0)
            made[("tile", name)] = emit("Tile", [name, repeats])
            if factor != 1:
                made["merged"] = True
        return made[("tile", name)]

    def k_rows(name, reader):
        """The held value `name` as K copies of the sample give it: a Shape or Size of a tensor of one row per
        sample with K rows, and the nodes from there on again, on those."""
        if ("k", name) in made:
            return made[("k", name)]
        node = held[name]
        source = g.dims(node.input[0])
        if node.op_type in ("Shape", "Size") and node.input[0] not in held:
            # one dim the batch or c times it (merged: a Swin's windows, attention's batch x heads), the others static
            where = _batch_axis(source, batch)
            if where is None:
                raise AutodiffError(f"{reader.op_type} node {reader.name!r} reads {name!r}, whose value depends on "
                                    f"the batch held in {node.input[0]!r} of shape {source}")
            axis, factor = where
            rows(1)
            k = emit("Mul", [made["k"], g.const(np.asarray([factor], np.int64))]) if factor != 1 else made["k"]
            if node.op_type == "Size":
                rest = int(np.prod([d for i, d in enumerate(source) if i != axis]))
                out = emit("Squeeze", [emit("Mul", [k, g.const(np.asarray([rest], np.int64))]),
                                       g.const(np.asarray([0], np.int64))])
            else:
                rank, attrs = len(source), {a.name: helper.get_attribute_value(a) for a in node.attribute}
                start, end = (max(0, min(rank, v + rank if v < 0 else v))
                              for v in (attrs.get("start", 0), attrs.get("end", rank)))
                if not start <= axis < end:
                    return name         # static
                parts = [g.const(np.asarray(part, np.int64)) for part in (source[start:axis], source[axis + 1:end])]
                out = emit("Concat", [parts[0], k, parts[1]], axis=0)
            made[("k", name)] = out
            return out
        inputs = [k_rows(i, reader) if i in held else i for i in node.input]      # the others: constants
        outs = [g.fresh("share") if o else "" for o in node.output]
        clone = helper.make_node(node.op_type, inputs, outs, name=g.fresh(f"share/{node.op_type}"), domain=node.domain)
        clone.attribute.extend(node.attribute)
        nodes.append(clone)
        for o, fresh in zip(node.output, outs):
            if o:
                made[("k", o)] = fresh
        return made[("k", name)]

    rewritten = []
    for node in graph.node:
        if any(o in late for o in node.output if o):
            for j, name in enumerate(node.input):
                if not name or name in late or name in inits or name in g.consts:
                    continue
                dims = g.dims(name)
                if name in held:
                    node.input[j] = k_rows(name, node)
                    continue
                if dims is None:
                    raise AutodiffError(f"{node.op_type} node {node.name!r} reads {name!r}, whose value or shape "
                                        "depends on the batch")
                where = _batch_axis(dims, batch)
                if where is None:
                    if any(isinstance(d, str) for d in dims):
                        raise AutodiffError(f"{node.op_type} node {node.name!r} reads {name!r} of shape {dims}, "
                                            f"which may hold the batch {batch!r} in another dim")
                    continue            # a tensor of the weights alone
                if where[1] != 1:       # c copies of the batch in one dim: c for one sample, c * K for K
                    node.input[j] = tiled(name, *where)
                    continue
                if (name not in switches and node.op_type in _ROW_BROADCASTING
                        and (node.op_type != "MatMul" or len(dims) - where[0] >= 3)
                        and any(_batch_axis(g.dims(i), batch) == where and len(g.dims(i)) == len(dims)
                                for i in node.input if i in late)):
                    continue            # broadcasts its one row against the K rows of a backward operand
                node.input[j] = expanded(name) if where[0] == 0 else tiled(name, *where)
            rewritten.extend(nodes)
            nodes.clear()
        rewritten.append(node)
    del graph.node[:]
    graph.node.extend(rewritten)
    graph.initializer.extend(g.inits)

    def one_row(vi):
        for d in vi.type.tensor_type.shape.dim if vi.type.tensor_type.HasField("shape") else []:
            factor = _batch_factor(d.dim_param, batch) if d.HasField("dim_param") else None
            if factor is not None:
                d.Clear()
                d.dim_value = factor
    for vi in itertools.chain(data, graph.value_info, graph.output):
        if vi.name not in late:     # onnxruntime plans memory by dim symbols: one-row tensors must not share K's
            one_row(vi)
    if check or made.get("merged"):
        _check_rows(model, m, seed_name, [i.name for i in data])
    return m


def _check_rows(model: onnx.ModelProto, shared: onnx.ModelProto, seed_name: str, inputs: list[str]) -> None:
    """Whether `shared` (share_forward of `model`) gives on one sample what `model` gives on copies of it, on a
    random sample and seed rows; raises AutodiffError if not. Run where a forward tensor with the batch merged into
    a dim was repeated for the rows: that is right only if the dim runs over the batch outermost (Swin's windows
    b * windows + w, attention's b * heads + h), which a symbolic shape such as "64*n" does not tell."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    feeds, rows = {}, 2
    for vi in model.graph.input:
        if vi.name not in inputs and vi.name != seed_name:
            continue
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim][1:]
        if t.elem_type != TensorProto.FLOAT or None in dims:
            raise AutodiffError(f"the batch is merged into a dim and input {vi.name!r} (not float32 with static "
                                "dims after the batch) cannot check that the rows come out in order")
        feeds[vi.name] = rng.standard_normal((1 if vi.name != seed_name else rows, *dims)).astype(np.float32)
    copies = {k: v if k == seed_name else np.repeat(v, rows, 0) for k, v in feeds.items()}
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    names = [o.name for o in model.graph.output]
    want = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(names, copies)
    got = ort.InferenceSession(shared.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(names, feeds)
    for name, a, b in zip(names, got, want):
        b = b if len(a) == len(b) else b[:len(a)]       # the forward's outputs come back once
        if a.shape != b.shape or not np.allclose(a, b, rtol=1e-3, atol=1e-4 * max(float(np.abs(b).max()), 1e-30)):
            raise AutodiffError(f"{name!r} of one forward for {rows} rows differs from that of {rows} copies of the "
                                "sample: a dim that merges the batch does not run over it outermost, or the shapes "
                                "measured at batch 1 and 2 do not hold")


def _static(dims) -> bool:
    return dims is not None and all(isinstance(d, int) for d in dims)


def _batch_factor(dim, batch) -> int | None:
    """c when a dim is c times the batch symbol (1: the batch itself; "c*batch" as onnxruntime's symbolic shape
    inference writes a reshape that merges the batch with other dims), else None."""
    if dim == batch:
        return 1
    if isinstance(dim, str):
        match = re.fullmatch(rf"(\d+)\*{re.escape(batch)}|{re.escape(batch)}\*(\d+)", dim.replace(" ", ""))
        if match:
            return int(match.group(1) or match.group(2))
    return None


def _batch_axis(dims, batch) -> tuple[int, int] | None:
    """(axis, c) for a tensor of one sample's c rows per sample: one dim c times the batch, the others static."""
    if not dims:
        return None
    found = [(i, f) for i, f in ((i, _batch_factor(d, batch)) for i, d in enumerate(dims)) if f is not None]
    if len(found) != 1 or not _static([d for i, d in enumerate(dims) if i != found[0][0]]):
        return None
    return found[0]


_CACHE: "OrderedDict[tuple, onnx.ModelProto]" = OrderedDict()
_CACHE_SIZE = 16


def model_digest(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def augment_cached(model: onnx.ModelProto, layers: Sequence[str] = (), wrt_input: bool = True,
                   rule: str = "standard", scores: str | None = None, layer_rule: str | None = None
                   ) -> onnx.ModelProto:
    """`augment`, built once per (model bytes, layers, wrt_input, rule, scores, layer_rule) and then shared: the
    same ModelProto object is returned on a hit, so callers must not mutate it."""
    key = (model_digest(model), tuple(layers), bool(wrt_input), rule, scores, layer_rule)
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    out = augment(model, layers, wrt_input, rule, scores, layer_rule)
    _CACHE[key] = out
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return out
