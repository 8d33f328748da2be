"""Load an ONNX classifier, find the layers worth explaining, expose them, cut the model at one.

Plain functions over `onnx.ModelProto`; numpy/onnx only (no onnxruntime, no gRPC).

Layer listing policy (``candidate_layers``)
-------------------------------------------
A candidate is a tensor that

* lies on a path from the image input to the score tensor (depends on the input, and the scores depend on it),
* is computed by the network proper: some Conv/ConvTranspose/MatMul/Gemm/Einsum lies on or before it, so an
  in-graph preprocessing step (``(x - mean) / std``, the NHWC->NCHW Transpose of a tf2onnx graph) is no layer,
* and is either a spatial map -- ``N x C x H x W`` ("spatial") or ``N x H x W x C`` ("spatial_nhwc"), H, W > 1,
  its layout known by propagating layouts from the input and from the ops that fix one (Conv, pools, norms are
  NCHW in ONNX; Transpose permutes the layout; Reshape/Flatten/... forget it) -- or a transformer token tensor
  ``N x T x C`` ("tokens") whose C is the patch-embedding Conv's output channels and whose T is that Conv's
  output grid ``gh * gw`` plus ``prefix_tokens`` (0..8: CLS / distillation tokens concatenated in front).
  Hierarchical transformers merge patches (Swin: strided slices + Concat, or timm's Reshape + Transpose +
  Reshape): their later stages are token tensors of ``(gh / f) * (gw / f)`` tokens (f = 2, 4, ...) whose C is the
  width of a residual stream of that many tokens, with the batch itself as first dimension, or channels-last maps
  found by following the space-to-depth.
* and shows the image in place: its map is upsampled over the whole image, so a map that torch.roll shifted
  (Swin's shifted windows: Slices joined by a Concat along a spatial axis), anything computed from it until the
  roll is undone, a crop and a mirror are not listed, nor a Slice that only subsamples a map or a Pad that
  gives it a border (what is computed from either is).

Near-duplicates are dropped: a tensor is not listed when every consumer is a pointwise op that keeps its shape
(activation, BatchNormalization, bias/residual Add, Mul by a gate, Dropout/Identity ...), and a Transpose that
only switches a map between NCHW and NHWC is not listed (its input is). So ``Conv -> BN -> ReLU`` lists the ReLU output only, a residual
``Add -> ReLU`` lists the ReLU output, ``x * sigmoid(x)`` lists the product, and a tensor that also feeds a
Conv, a pool or the next residual branch stays listed. The listed tensor always carries the same map as the
dropped ones, after the activation -- what Grad-CAM style methods conventionally explain. In a quantized (QDQ)
model QuantizeLinear and DequantizeLinear count as pointwise, and tensors of integers are never listed: a map is
listed as its DequantizeLinear output, the values the next operator reads.

Default layer (``default_layer``): the last listed spatial map (the one feeding the classifier head). For token
models: the last token tensor that the scores depend on through *all* of its tokens. With mean pooling over
tokens that is the last block's output; with CLS pooling the last block's output (after its attention) reaches
the scores through the CLS token only, so gradients on patch tokens are exactly zero there -- the default is then
the input of the last token-mixing op (the last block's first LayerNorm output, as pytorch-grad-cam advises).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import contrib, qdq

__all__ = [
    "Layer",
    "load_model",
    "infer_shapes",
    "input_spec",
    "score_tensor",
    "scores_of",
    "candidate_layers",
    "default_layer",
    "expose",
    "cut",
]

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
_TWO_GIB = 2**31


@dataclass(frozen=True)
class Layer:
    name: str  # tensor name in the graph
    shape: tuple  # ints, None for symbolic dims (batch)
    kind: str  # "spatial" (N,C,H,W), "spatial_nhwc" (N,H,W,C) or "tokens" (N,T,C)
    grid: tuple  # (H, W) of the map; for token layers the patch grid derived from the graph
    prefix_tokens: int = 0  # CLS/distillation tokens before the grid tokens (token layers)
    op_type: str = ""  # op of the producing node


# ----------------------------------------------------------------------------------------------- loading


def load_model(path_or_bytes, max_bytes: int | None = None) -> onnx.ModelProto:
    """Parse, check and shape-infer a model given as a path, raw bytes or a ModelProto. A model quantized in the
    QOperator format, or dynamically, comes back in the QDQ format (kernels.qdq), and one saved after onnxruntime's
    graph optimizations comes back with its fused nodes written as standard operators (kernels.contrib), so that it
    can be differentiated and its layers have shapes.

    Raises ValueError naming the problem: too large, not an ONNX model, fails the checker, no float input.
    """
    if isinstance(path_or_bytes, onnx.ModelProto):
        model = path_or_bytes
        size = model.ByteSize()
        if max_bytes is not None and size > max_bytes:
            raise ValueError(f"model is {size} bytes, more than the allowed {max_bytes} bytes")
    elif isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(path_or_bytes)
        if max_bytes is not None and len(data) > max_bytes:
            raise ValueError(f"model is {len(data)} bytes, more than the allowed {max_bytes} bytes")
        if not data:
            raise ValueError("model is empty (0 bytes)")
        model = _parse(data, "model bytes")
    elif isinstance(path_or_bytes, (str, os.PathLike)):
        path = os.fspath(path_or_bytes)
        if not os.path.isfile(path):
            raise ValueError(f"model file {path!r} does not exist")
        size = os.path.getsize(path)
        if max_bytes is not None and size > max_bytes:
            raise ValueError(f"model file {path!r} is {size} bytes, more than the allowed {max_bytes} bytes")
        if size == 0:
            raise ValueError(f"model file {path!r} is empty (0 bytes)")
        with open(path, "rb") as f:
            model = _parse(f.read(), f"model file {path!r}")
        if any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer):
            try:
                onnx.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
            except Exception as e:  # noqa: BLE001 - any failure here is a bad model for the user
                raise ValueError(f"model file {path!r}: cannot load its external data: {e}") from e
            if max_bytes is not None and model.ByteSize() > max_bytes:
                raise ValueError(
                    f"model {path!r} with its external data is {model.ByteSize()} bytes, "
                    f"more than the allowed {max_bytes} bytes"
                )
    else:
        raise TypeError(f"load_model takes a path, bytes or a ModelProto, not {type(path_or_bytes).__name__}")

    if len(model.graph.node) == 0:
        raise ValueError("model has no nodes (is it an ONNX model?)")
    try:   # before the checker: onnxruntime's LayerNormalization below opset 17 is not an ONNX operator there
        model = contrib.to_standard(model)
    except Exception as e:  # noqa: BLE001 - a fused node the rewrite cannot read is a model error
        raise ValueError(f"model's onnxruntime-fused nodes cannot be written as standard operators: "
                         f"{_first_line(e)}") from e
    try:
        if model.ByteSize() < _TWO_GIB:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise ValueError(f"model fails the ONNX checker: {_first_line(e)}") from e
    try:
        model = qdq.from_qoperator(model)
    except Exception as e:  # noqa: BLE001 - a node the rewrite cannot read is a model error
        raise ValueError(f"model's QOperator nodes cannot be written in the QDQ format: {_first_line(e)}") from e
    try:
        model = infer_shapes(model)
    except Exception as e:  # noqa: BLE001 - inference errors are model errors
        raise ValueError(f"model fails ONNX shape inference: {_first_line(e)}") from e
    real = _real_inputs(model)
    if not any(vi.type.tensor_type.elem_type in _FLOAT_TYPES for vi in real):
        names = ", ".join(f"{vi.name} ({_type_name(vi)})" for vi in real) or "none"
        raise ValueError(f"model has no floating-point input to explain; its inputs: {names}")
    return float32_boundary(model)


def float32_boundary(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with a float32 image input and float32 float outputs where it had float16, bfloat16 or double
    ones (a model converted to half precision without keep_io_types): a Cast from float32 to the model's type
    after the input and one to float32 before each such output, under the same names, as onnxconverter-common's
    keep_io_types writes them. The model computes in its own precision; images, seeds and maps stay float32."""
    other = {TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    floats = [vi for vi in _real_inputs(model) if vi.type.tensor_type.elem_type in _FLOAT_TYPES]
    inputs = [vi.name for vi in floats[:1] if vi.type.tensor_type.elem_type in other]
    outputs = [vi.name for vi in model.graph.output if vi.type.tensor_type.elem_type in other]
    if not inputs and not outputs:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    taken = {n for node in g.node for n in (*node.input, *node.output)} | {v.name for v in (*g.input, *g.output)}
    taken |= {t.name for t in g.initializer}

    def fresh(name, elem):
        return qdq.fresh_name(taken, f"{name}/{TensorProto.DataType.Name(elem).lower()}")

    def rename(old, new):
        for node in g.node:
            node.input[:] = [new if i == old else i for i in node.input]
            node.output[:] = [new if o == old else o for o in node.output]
    head, tail = [], []
    for vi in g.input:
        if vi.name in inputs:
            elem = vi.type.tensor_type.elem_type
            inner = fresh(vi.name, elem)
            rename(vi.name, inner)
            head.append(helper.make_node("Cast", [vi.name], [inner], name=f"{inner}/cast", to=elem))
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    for vi in g.output:
        if vi.name in outputs:
            elem = vi.type.tensor_type.elem_type
            inner = fresh(vi.name, elem)
            rename(vi.name, inner)
            if vi.name in inputs:       # an input that is also an output: its Cast already reads it
                continue
            tail.append(helper.make_node("Cast", [inner], [vi.name], name=f"{inner}/cast", to=TensorProto.FLOAT))
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    nodes = [*head, *g.node, *tail]
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    return infer_shapes(out)


def _parse(data: bytes, what: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError or RuntimeError
        raise ValueError(f"{what} is not a valid ONNX model (protobuf parse failed: {_first_line(e)})") from e
    if not model.HasField("graph"):
        raise ValueError(f"{what} is not a valid ONNX model (no graph)")
    return model


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _type_name(vi) -> str:
    t = vi.type.tensor_type.elem_type
    return TensorProto.DataType.Name(t).lower() if t else "non-tensor"


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference with data propagation (resolves Reshape targets computed from Shape), after folding
    the small constant arithmetic that exporters emit for shapes (_fold_constants): PyTorch's legacy exporter
    computes a reflect Pad's pads with ConstantOfShape, Concat, Reshape, Slice, Transpose and Cast, which data
    propagation does not follow, and every spatial size after such a Pad was unknown; at opset 13 it writes
    GroupNorm's Reshape back to Shape(conv output), which Reshape-13 does not read from data propagation. With a
    symbolic batch, the dimensions still unknown are looked for with the batch fixed (_batch_probes). The model
    returned is the given one with the shapes found (the folded nodes stay in it)."""
    if model.ByteSize() >= _TWO_GIB:
        return model
    inferred = _infer(model)
    _merge_shapes(inferred, _folded_shapes(model, inferred))
    _merge_shapes(inferred, _batch_probes(model, inferred))
    return inferred


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)


# A fold can make shapes known that let a Shape further on fold (two GroupNorms in a row at opset 13): folding and
# inference alternate until nothing more folds, at most this many times.
_FOLD_ROUNDS = 64


def _folded_shapes(model: onnx.ModelProto, inferred: onnx.ModelProto) -> dict:
    """Tensor name -> value info found by inferring shapes on copies of `model` with its constants folded."""
    found, current, shapes = {}, model, _static_shapes(inferred)
    for _ in range(_FOLD_ROUNDS):
        folded = _fold_constants(current, shapes)
        if folded is None:
            break
        try:
            better = _infer(folded)
        except Exception:  # noqa: BLE001 - the folded copy only adds information; without it, what was found stands
            break
        found.update((v.name, v) for v in better.graph.value_info)
        current, shapes = folded, {**shapes, **_static_shapes(better)}
    return found


def _merge_shapes(inferred: onnx.ModelProto, better: dict) -> None:
    """Replace or add the value infos of `inferred` by those in `better` (name -> value info)."""
    known = {v.name for v in inferred.graph.value_info}
    for i, v in enumerate(inferred.graph.value_info):
        if v.name in better:
            inferred.graph.value_info[i].CopyFrom(better[v.name])
    inferred.graph.value_info.extend(v for name, v in better.items() if name not in known)


# The batch sizes a model with a symbolic batch is probed at: not 1, which Squeeze without axes would remove; three,
# so that a dimension computed from the batch that two sizes happen to agree on (N // 2 is 1 at both 2 and 3) is
# not taken for a number (N // k up to k = 7 differs at 7).
_PROBE_BATCHES = (2, 3, 7)


def _batch_probes(model: onnx.ModelProto, inferred: onnx.ModelProto) -> dict:
    """Tensor name -> value info with the dimensions that `inferred` left unknown and that do not depend on the
    batch, when the inputs' only symbolic dimension is their first (the batch).

    ONNX shape inference does not cancel a symbolic batch: a Reshape of an N x 16 x 4 x 4 map to [N, 16, -1] (the
    legacy exporter's flatten(2) with a dynamic batch) has an unknown last dimension, and with it the token count
    of every later tensor; nor can a Shape of a tensor with a symbolic batch fold. Inference and folding with the
    batch fixed at each of _PROBE_BATCHES resolve them: a dimension that is the same number at all does not depend on
    the batch, one that is each batch size is the batch, any other stays unknown."""
    real = {vi.name: _dims(vi) for vi in _real_inputs(model)}
    if any(not dims or None in dims[1:] for dims in real.values()):
        return {}
    batched = [name for name, dims in real.items() if dims[0] is None]
    if not batched or not _has_unknown_dims(inferred):
        return {}
    runs = []
    for size in _PROBE_BATCHES:
        fixed = onnx.ModelProto()
        fixed.CopyFrom(model)
        del fixed.graph.value_info[:]
        for vi in fixed.graph.input:
            if vi.name in batched:
                vi.type.tensor_type.shape.dim[0].dim_value = size
        try:
            run = _infer(fixed)
        except Exception:  # noqa: BLE001 - a model that refuses these batch sizes keeps what was found
            return {}
        found = {v.name: v for v in run.graph.value_info}
        found.update(_folded_shapes(fixed, run))
        runs.append(found)
    batch = next(vi for vi in model.graph.input if vi.name == batched[0]).type.tensor_type.shape.dim[0].dim_param
    before = {v.name: v for v in inferred.graph.value_info}
    better = {}
    for name, first in runs[0].items():
        if all(name in run for run in runs[1:]):
            vi = _agreed(before.get(name), [run[name] for run in runs], batch or None)
            if vi is not None:
                better[name] = vi
    return better


def _has_unknown_dims(model: onnx.ModelProto) -> bool:
    """Whether some node output has no inferred shape or an unknown dimension after the first."""
    shapes = {vi.name: _dims(vi) for vi in list(model.graph.value_info) + list(model.graph.output)}
    return any(o and (shapes.get(o) is None or None in shapes[o][1:]) for n in model.graph.node for o in n.output)


def _agreed(before, probes, batch):
    """The value info `before` (None: no shape was inferred) with the unknown dimensions that the value infos
    `probes` (one per probe batch size) agree on; None when that adds nothing."""
    shapes = [_dims(p) for p in probes]
    if any(d is None or len(d) != len(shapes[0]) for d in shapes):
        return None
    old = list(before.type.tensor_type.shape.dim) if before is not None and _dims(before) is not None else None
    if old is not None and len(old) != len(shapes[0]):
        return None
    dims, gained = [], old is None
    for k, seen in enumerate(zip(*shapes)):
        dim = old[k] if old is not None else None
        if dim is not None and dim.HasField("dim_value"):
            dims.append(dim.dim_value)
        elif seen[0] is not None and len(set(seen)) == 1:
            dims.append(seen[0])
            gained = True
        elif dim is not None and dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:
            dims.append(batch if seen == _PROBE_BATCHES else None)
    return helper.make_tensor_value_info(probes[0].name, probes[0].type.tensor_type.elem_type, dims) if gained else None


def _static_shapes(model: onnx.ModelProto) -> dict:
    """Tensor name -> shape, for the inputs and inferred tensors whose every dimension is a number."""
    out = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        dims = _dims(vi)
        if dims is not None and None not in dims:
            out[vi.name] = dims
    return out


# Operators whose outputs are constants when their inputs are, cheap to evaluate on small tensors, and named by
# exporters' shape arithmetic. Each input and output of a folded node has at most _FOLD_MAX elements (Shape and
# Size of a computed tensor read only its inferred shape), and Constant, ConstantOfShape, Expand, Tile and Range
# are checked before they run, so a hostile file cannot make loading allocate much.
_FOLDABLE = {"Constant", "ConstantOfShape", "Concat", "Reshape", "Slice", "Transpose", "Cast", "Squeeze",
             "Unsqueeze", "Gather", "Add", "Sub", "Mul", "Div", "Neg", "Identity", "Expand", "Tile", "Range",
             "Flatten", "Shape", "Size", "Equal", "Where", "Not", "Less", "Greater"}
_FOLD_MAX = 1 << 16


def _fold_constants(model: onnx.ModelProto, shapes: dict | None = None) -> onnx.ModelProto | None:
    """A copy of the model in which the nodes that compute constants from constants (_FOLDABLE) are replaced by
    initializers holding their values, every other tensor keeping its name; None when there is nothing to
    fold. A Shape or Size whose input has a known static shape (`shapes`: name -> dims) is such a constant.
    Only for shape inference: the model that runs keeps its own nodes."""
    shapes = shapes or {}
    small = {t.name: t for t in model.graph.initializer if _size(t.dims) <= _FOLD_MAX}
    values: dict[str, np.ndarray] = {}

    def value(name):      # initializers are converted when a foldable node reads them
        if name not in values and name in small:
            values[name] = numpy_helper.to_array(small[name])
        return values.get(name)

    inputs = {vi.name for vi in model.graph.input} - set(small)
    folded = []
    for node in model.graph.node:
        if node.op_type not in _FOLDABLE or node.domain not in ("", "ai.onnx"):
            continue
        args = [value(name) if name else None for name in node.input]
        if node.op_type in ("Shape", "Size") and args[0] is None and node.input[0] in shapes:
            values[node.output[0]] = _shape_value(node, shapes[node.input[0]])
            folded.append(node)
            continue
        if any(name and (name in inputs or a is None) for name, a in zip(node.input, args)):
            continue
        if not _small_result(node, args):
            continue
        try:
            if node.op_type == "Constant":
                outs = [_constant_value(node)]
            else:
                from onnx.reference import ReferenceEvaluator      # 20 ms to import: only when there is work

                one = helper.make_graph([node], "fold", _untyped([n for n in node.input if n]), _untyped(node.output))
                outs = ReferenceEvaluator(helper.make_model(one, opset_imports=model.opset_import)).run(
                    None, {n: a for n, a in zip(node.input, args) if n})
        except Exception:  # noqa: BLE001 - what cannot be evaluated is left to shape inference as it is
            continue
        if any(np.asarray(o).size > _FOLD_MAX for o in outs):
            continue
        values.update({n: np.asarray(o) for n, o in zip(node.output, outs)})
        folded.append(node)
    if not any(n.op_type != "Constant" for n in folded):
        return None
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    gone = {id(n) for n in folded}
    keep = [n for n in model.graph.node if id(n) not in gone]
    del copy.graph.node[:]
    copy.graph.node.extend(keep)
    produced = {o for n in folded for o in n.output}
    copy.graph.initializer.extend(numpy_helper.from_array(values[name], name) for name in produced)
    return copy


def _shape_value(node: onnx.NodeProto, dims: tuple) -> np.ndarray:
    """Shape (its start/end attributes clamped as Python slices are) or Size of a tensor of shape `dims`."""
    if node.op_type == "Size":
        return np.array(_size(dims), np.int64)
    return np.array(dims[_attr(node, "start", 0):_attr(node, "end", None)], np.int64)


def _untyped(names) -> list:
    return [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in names]


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    """The value of a Constant node (its `value` tensor or one of the value_* attributes)."""
    attr = node.attribute[0]
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    return np.asarray(helper.get_attribute_value(attr),
                      np.float32 if attr.name.startswith("value_float") else np.int64)


def _size(dims) -> int:
    return int(np.prod([int(d) for d in dims], dtype=np.int64)) if len(dims) else 1


def _small_result(node: onnx.NodeProto, args: list) -> bool:
    """False when the node would make a tensor of more than _FOLD_MAX elements (checked before it runs)."""
    if any(a is not None and np.asarray(a).size > _FOLD_MAX for a in args):
        return False
    try:
        if node.op_type == "Constant":
            return not node.attribute or node.attribute[0].name != "value" or _size(node.attribute[0].t.dims) <= _FOLD_MAX
        if node.op_type == "ConstantOfShape":
            return _size(np.asarray(args[0]).ravel()) <= _FOLD_MAX
        if node.op_type == "Expand":
            shape = np.broadcast_shapes(np.asarray(args[0]).shape, tuple(int(d) for d in np.asarray(args[1]).ravel()))
            return _size(shape) <= _FOLD_MAX
        if node.op_type == "Tile":
            return np.asarray(args[0]).size * _size(np.asarray(args[1]).ravel()) <= _FOLD_MAX
        if node.op_type == "Range":
            start, limit, delta = (float(np.asarray(a).ravel()[0]) for a in args)
            return delta != 0 and abs((limit - start) / delta) <= _FOLD_MAX
    except (ValueError, TypeError, IndexError, OverflowError):
        return False
    return True


def _real_inputs(model):
    inits = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def _dims(vi) -> tuple | None:
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)


def input_spec(model: onnx.ModelProto) -> tuple[str, tuple, str]:
    """(input name, shape with None for symbolic dims, "NCHW" or "NHWC") of the first float input."""
    floats = [vi for vi in _real_inputs(model) if vi.type.tensor_type.elem_type in _FLOAT_TYPES]
    if not floats:
        raise ValueError("model has no floating-point input")
    vi = floats[0]
    if vi.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ValueError(f"input {vi.name!r} is {_type_name(vi)}; onnxplain feeds images as float32: give the model a "
                         "float32 input (a Cast to the model's own precision inside the graph is fine)")
    shape = _dims(vi)
    if shape is None or len(shape) != 4:
        raise ValueError(f"input {vi.name!r} has shape {shape}; an image classifier takes a 4-D NCHW or NHWC tensor")
    return vi.name, shape, _layout_of(shape)


def with_input_size(model: onnx.ModelProto, height: int, width: int) -> onnx.ModelProto:
    """A copy of the model whose input has the given height and width where they were symbolic, its shapes
    inferred again. A model exported with dynamic H and W is served at one size; layer discovery needs the
    feature maps' sizes, which only a fixed input size gives."""
    name, _, layout = input_spec(model)
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    del fixed.graph.value_info[:]       # inferred for the symbolic size
    dims = next(vi for vi in fixed.graph.input if vi.name == name).type.tensor_type.shape.dim
    for axis, size in zip((2, 3) if layout == "NCHW" else (1, 2), (height, width)):
        if not dims[axis].HasField("dim_value"):
            dims[axis].dim_value = size
    return infer_shapes(fixed)


def _layout_of(shape) -> str:
    if shape[1] in (1, 3):
        return "NCHW"
    if shape[3] in (1, 3):
        return "NHWC"
    return "NCHW"  # unknown channel count: ONNX's own convention


# ---------------------------------------------------------------------------------------------- analysis


class _Graph:
    """Index of one (shape-inferred) graph: producers, consumers, shapes, constants."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.model = model
        self.nodes = list(g.node)
        self.inits = {t.name: t for t in g.initializer}
        self.producer = {}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for o in n.output:
                if o:
                    self.producer[o] = n
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.shapes, self.dtypes, self.leading = {}, {}, {}
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            s = _dims(vi)
            if s is not None:
                self.shapes[vi.name] = s
                if s:        # the first dimension as a number or a symbol: which tensors carry the batch
                    d = vi.type.tensor_type.shape.dim[0]
                    self.leading[vi.name] = d.dim_value if d.HasField("dim_value") else d.dim_param or None
            if vi.type.tensor_type.elem_type:
                self.dtypes[vi.name] = vi.type.tensor_type.elem_type
        for t in g.initializer:
            self.shapes[t.name] = tuple(t.dims)

    def const(self, name):
        """numpy value of an initializer or Constant output, else None."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        n = self.producer.get(name)
        if n is not None and n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name == "value_int":
                    return np.array(a.i)
                if a.name == "value_ints":
                    return np.array(list(a.ints))
        return None

    def ancestors(self, names) -> set:
        seen, stack = set(), [n for n in names]
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            n = self.producer.get(t)
            if n is not None:
                stack.extend(i for i in n.input if i)
        return seen

    def descendants(self, names) -> set:
        seen, stack = set(), list(names)
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            for n in self.consumers.get(t, ()):
                stack.extend(o for o in n.output if o)
        return seen


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def score_tensor(model: onnx.ModelProto) -> str:
    """The tensor to explain: the first floating-point output (a model may output its predicted label first), or
    the logits when that output is their (Log)Softmax or Sigmoid."""
    return scores_of(model)[0]


def scores_of(model: onnx.ModelProto) -> tuple[str, str]:
    """(score_tensor(model), how its scores become class probabilities): "sigmoid" when the model's output is the
    Sigmoid of them (a multi-label classifier: each class its own yes/no), else "softmax" (one class per image)."""
    gi = _Graph(model)
    outputs = model.graph.output
    first = next((o.name for o in outputs if o.type.tensor_type.elem_type in _FLOAT_TYPES), outputs[0].name)
    name = first
    while True:
        n = gi.producer.get(name)
        if n is not None and n.op_type == "Identity":
            name = n.input[0]
            continue
        if n is not None and n.op_type in ("Softmax", "LogSoftmax", "Sigmoid"):
            return n.input[0], "sigmoid" if n.op_type == "Sigmoid" else "softmax"
        return first, "softmax"


_SPATIAL_OPS = {
    "Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool",
    "GlobalMaxPool", "GlobalLpPool", "BatchNormalization", "InstanceNormalization", "LRN", "MaxUnpool",
    "DeformConv",
}
# ops that move axes around: a layout cannot be carried through them
_LAYOUT_BREAKERS = {
    "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Gather", "GatherElements", "GatherND", "DepthToSpace",
    "SpaceToDepth", "Einsum", "Shape", "Size", "ConstantOfShape", "Expand", "Tile", "Range", "NonZero",
}
_WEIGHTED_OPS = {"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "MatMul", "MatMulInteger", "Gemm", "Einsum"}
# pointwise ops after which a map is "the same layer" (listed instead of their input when they are its only users)
_POINTWISE = {
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
    "Softplus", "Softsign", "Gelu", "Mish", "Erf", "ThresholdedRelu", "Swish", "BatchNormalization",
    "Add", "Sub", "Mul", "Div", "Dropout", "Identity", "Cast", "Neg", "Abs", "Pow", "Sqrt", "Max", "Min",
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
}


def _layouts(gi: _Graph, input_name: str, input_layout: str) -> dict:
    """Tensor name -> "NCHW" / "NHWC" for rank-4 tensors whose axis meaning is known."""
    lay = {input_name: input_layout}
    for n in gi.nodes:
        for o in n.output:
            if not o or len(gi.shapes.get(o, ())) != 4:
                continue
            if n.op_type in _SPATIAL_OPS:
                lay[o] = "NCHW"
            elif n.op_type == "Transpose":
                src = lay.get(n.input[0])
                perm = _attr(n, "perm")
                if src and perm and len(perm) == 4:
                    out = "".join(src[p] for p in perm)
                    if out in ("NCHW", "NHWC"):
                        lay[o] = out
            elif n.op_type == "Reshape" and (found := _reshaped_back(gi, n, lay) or _space_to_depth(gi, n, lay)):
                lay[o] = found
            elif n.op_type in _LAYOUT_BREAKERS:
                continue
            elif n.op_type == "MatMul":
                # x @ W over the last axis keeps a channels-last layout (ConvNeXt's pointwise "Linear")
                src = lay.get(n.input[0])
                if src == "NHWC" and len(gi.shapes.get(n.input[1], ())) == 2:
                    lay[o] = src
            else:
                for i in n.input:
                    src = lay.get(i)
                    if src and len(gi.shapes.get(i, ())) == 4:
                        lay[o] = src
                        break
    return lay


_REGROUPING = {"Reshape", "InstanceNormalization", "LayerNormalization"} | _POINTWISE


def _reshaped_back(gi: _Graph, node, lay: dict) -> str | None:
    """The layout of the map a Reshape restores: exporters write GroupNorm as Reshape [N, G, -1] ->
    InstanceNormalization -> Reshape back to the map's shape. Followed back through ops that regroup or act
    pointwise but never permute axes, up to a tensor with a layout of exactly the Reshape's output shape."""
    out = gi.shapes.get(node.output[0])
    if out is None or any(d is None for d in out[1:]):
        return None
    name, seen = node.input[0], 0
    while seen < 8:
        if name in lay:
            return lay[name] if gi.shapes.get(name) == out else None
        producer = gi.producer.get(name)
        if producer is None or producer.op_type not in _REGROUPING or not producer.input:
            return None
        name, seen = producer.input[0], seen + 1
    return None


def _space_to_depth(gi: _Graph, node, lay: dict) -> str | None:
    """"NHWC" when a Reshape ends a space-to-depth of a channels-last map, as timm's Swin merges patches:
    (N, H, W, C) -> Reshape (N, H/a, a, W/b, b, C) -> Transpose keeping N, H/a, W/b in front -> Reshape
    (N, H/a, W/b, a*b*C). The result is the map at a coarser grid, each cell holding its a x b patch."""
    out = gi.shapes.get(node.output[0])
    t = gi.producer.get(node.input[0])
    if out is None or len(out) != 4 or None in out[1:] or t is None or t.op_type != "Transpose":
        return None
    r = gi.producer.get(t.input[0])
    perm = list(_attr(t, "perm") or [])
    if r is None or r.op_type != "Reshape" or perm[:3] != [0, 1, 3] or lay.get(r.input[0]) != "NHWC":
        return None
    src, six = gi.shapes.get(r.input[0]), gi.shapes.get(r.output[0])
    if src is None or six is None or len(six) != 6 or None in src[1:] or None in six[1:]:
        return None
    _, h, a, w, b, c = six
    return "NHWC" if (h * a, w * b, c) == src[1:] and out[1:] == (h, w, a * b * c) else None


def _offsets(gi: _Graph, lay: dict) -> dict:
    """Maps that do not show the image in place: tensor -> (dy, dx) for a map whose cell (i, j) holds cell
    (i + dy, j + dx) (mod H, W) of the map in place -- torch.roll, which exporters write as Slices joined by a
    Concat along a spatial axis (Swin's shifted windows) -- or None for a map that does not cover the image (a
    crop, such as a piece of a roll, or a mirror) or mixes different shifts. Maps in place are absent. Followed
    through every op that keeps a layout; a strided subsample that starts within its first step (Swin's patch
    merging by x[:, 0::2, 0::2]) covers the image and keeps its input's offset."""
    off: dict = {}
    for n in gi.nodes:
        o = n.output[0] if n.output else ""
        if not o or o not in lay:
            continue
        axes = (2, 3) if lay[o] == "NCHW" else (1, 2)
        if n.op_type == "Slice":
            off[o] = _sliced(gi, n, axes, off.get(n.input[0], (0, 0)))
        elif n.op_type == "Concat" and (roll := _rolled(gi, n, axes)) is not None:
            axis, k, src = roll
            base = off.get(src, (0, 0))
            size = gi.shapes[o][axes[axis]]
            off[o] = None if base is None else tuple((v + k * (j == axis)) % size for j, v in enumerate(base))
        else:
            seen = {off.get(i, (0, 0)) for i in n.input if i in lay}
            off[o] = (0, 0) if not seen else seen.pop() if len(seen) == 1 else None
        if off[o] == (0, 0):
            del off[o]
    return off


def _spatial_dims(shape, layout: str):
    return None if shape is None or len(shape) != 4 else (shape[2], shape[3]) if layout == "NCHW" else shape[1:3]


def _slice_args(gi: _Graph, node, rank: int) -> dict | None:
    """{axis: (start, end, step)} of a Slice with constant arguments (opset 10+), None otherwise."""
    args = [gi.const(node.input[k]) if len(node.input) > k and node.input[k] else None for k in range(1, 5)]
    starts, ends, axes, steps = args
    if starts is None or ends is None or (len(node.input) > 3 and node.input[3] and axes is None) or (
            len(node.input) > 4 and node.input[4] and steps is None):
        return None
    starts, ends = np.ravel(starts), np.ravel(ends)
    axes = np.arange(len(starts)) if axes is None else np.ravel(axes)
    steps = np.ones(len(starts), np.int64) if steps is None else np.ravel(steps)
    return {int(a) % rank: (int(b), int(e), int(st)) for a, b, e, st in zip(axes, starts, ends, steps)}


def _sliced(gi: _Graph, node, axes, base):
    """The offset of a Slice's output given its input's (see _offsets)."""
    src, out = gi.shapes.get(node.input[0]), gi.shapes.get(node.output[0])
    if src is None or out is None or any(src[a] is None or out[a] is None for a in axes):
        return None
    args = _slice_args(gi, node, len(src))
    for a in axes:
        if args is None:
            if out[a] != src[a]:
                return None
            continue
        b, _, st = args.get(a, (0, 0, 1))
        b = b + src[a] if b < 0 else b
        if st <= 0 or not 0 <= b < st or out[a] != -(-src[a] // st):
            return None       # a crop or a mirror
        if st > 1 and base not in ((0, 0), None):
            return None       # a subsample of a shifted map: the shift is not a whole number of coarse cells
    return base


def _rolled(gi: _Graph, node, axes):
    """(0 or 1, k, X) when a Concat along spatial axis `axes[0 or 1]` joins contiguous slices X[k:] and X[:k] of
    one tensor X (torch.roll by -k), else None."""
    out = gi.shapes.get(node.output[0])
    axis = _attr(node, "axis")
    if out is None or axis is None or int(axis) % len(out) not in axes or len(node.input) < 2:
        return None
    axis = int(axis) % len(out)
    src, ranges = None, []
    for i in node.input:
        p = gi.producer.get(i)
        if p is None or p.op_type != "Slice" or src not in (None, p.input[0]):
            return None
        src = p.input[0]
        size = (gi.shapes.get(src) or (None,) * len(out))[axis]
        args = _slice_args(gi, p, len(out))
        if size is None or args is None or any(a != axis for a in args):
            return None
        b, e, st = args[axis]
        b, e = (b + size if b < 0 else b), min(e + size if e < 0 else e, size)
        if st != 1:
            return None
        ranges.append((b, e))
    if gi.shapes.get(src) != out:
        return None
    k = ranges[0][0]
    rotated = [((b - k) % out[axis], (e - k) % out[axis] or out[axis]) for b, e in ranges]
    if any(r[0] != (prev[1] if prev else 0) for prev, r in zip([None] + rotated[:-1], rotated)) or \
            rotated[-1][1] != out[axis]:
        return None
    return axes.index(axis), k, src


def _on_path(gi: _Graph, input_name: str, score: str) -> set:
    return gi.ancestors([score]) & gi.descendants([input_name])


def _computed(gi: _Graph, path: set) -> set:
    """Tensors on the path at or after the first weighted op (so preprocessing is no layer)."""
    seeds = [o for n in gi.nodes if n.op_type in _WEIGHTED_OPS for o in n.output if o in path]
    return gi.descendants(seeds) & path


def _is_duplicate(gi: _Graph, name: str, lay: dict) -> bool:
    users = gi.consumers.get(name, [])
    if not users:
        return False
    shape = gi.shapes.get(name)
    for n in users:
        if n.op_type in _POINTWISE:
            if gi.shapes.get(n.output[0]) != shape:
                return False
            continue
        return False
    return True


def _patch_grids(gi: _Graph, path: set, lay: dict) -> list:
    """(tensor, C, gh, gw) for every NCHW Conv output on the path: candidate patch embeddings."""
    out = []
    for n in gi.nodes:
        if n.op_type == "Conv" and n.output[0] in path and lay.get(n.output[0]) == "NCHW":
            s = gi.shapes[n.output[0]]
            if s[1] is not None and s[2] is not None and s[3] is not None:
                out.append((n.output[0], s[1], s[2], s[3]))
    return out


def _batch_like(d, batch) -> bool:
    return d is None or d == batch


def candidate_layers(model: onnx.ModelProto, scores: str | None = None) -> list[Layer]:
    """Layers worth explaining, in topological order (see the module docstring for the policy), on the path to
    `scores` (default: score_tensor(model))."""
    gi = _Graph(model)
    input_name, in_shape, in_layout = input_spec(model)
    score = scores or score_tensor(model)
    path = _on_path(gi, input_name, score)
    computed = _computed(gi, path)
    lay = _layouts(gi, input_name, in_layout)
    grids = _patch_grids(gi, path, lay)
    off = _offsets(gi, lay)
    streams = _residual_streams(gi, computed)
    batch = in_shape[0]
    layers = []
    for n in gi.nodes:
        for o in n.output:
            if not o or o not in computed or o == score or o in off:
                continue
            s = gi.shapes.get(o)
            if s is None or gi.dtypes.get(o, TensorProto.FLOAT) not in _FLOAT_TYPES:
                continue  # (a quantized map's integers are codes, not activations: its DequantizeLinear is listed)
            if n.op_type == "Transpose" and n.input[0] in lay:
                continue  # the same map in the other layout: its input is the layer
            if len(s) == 4 and o in lay and _batch_like(s[0], batch):
                h, w = (s[2], s[3]) if lay[o] == "NCHW" else (s[1], s[2])
                if h is None or w is None or h <= 1 or w <= 1 or _is_duplicate(gi, o, lay):
                    continue
                if n.op_type in ("Slice", "Pad") and _spatial_dims(gi.shapes.get(n.input[0]), lay[o]) != (h, w):
                    continue  # a subsample of a map, or a map with a border (its input is listed, and what
                    # is computed from it: a Pad then a VALID convolution is a SAME convolution)
                kind = "spatial" if lay[o] == "NCHW" else "spatial_nhwc"
                layers.append(Layer(o, s, kind, (h, w), 0, n.op_type))
            elif len(s) == 3 and _batch_like(s[0], batch) and s[1] is not None and s[2] is not None:
                grid = _token_grid(gi, o, s, grids) or _merged_grid(gi, o, s, grids, streams, input_name)
                if grid is None or _is_duplicate(gi, o, lay):
                    continue
                (gh, gw), prefix = grid
                layers.append(Layer(o, s, "tokens", (gh, gw), prefix, n.op_type))
    return layers


def _token_grid(gi: _Graph, name: str, shape, grids):
    """((gh, gw), prefix) when `name` is N x (prefix + gh*gw) x C below a patch-embedding Conv with C channels."""
    anc = None
    for conv_out, c, gh, gw in reversed(grids):  # the nearest (last) patch conv wins
        prefix = shape[1] - gh * gw
        if shape[2] != c or not 0 <= prefix <= 8:
            continue
        if anc is None:
            anc = gi.ancestors([name])
        if conv_out in anc:
            return (gh, gw), prefix
    return None


def _residual_streams(gi: _Graph, computed: set) -> set:
    """(T, C) of every residual stream of tokens: an Add of two computed N x T x C tensors."""
    out = set()
    for n in gi.nodes:
        if n.op_type == "Add" and len(n.input) == 2 and all(i in computed for i in n.input):
            a, b = (gi.shapes.get(i) for i in n.input)
            if a is not None and a == b and len(a) == 3 and None not in a[1:]:
                out.add(a[1:])
    return out


def _merged_grid(gi: _Graph, name: str, shape, grids, streams: set, input_name: str):
    """((gh / f, gw / f), 0) when `name` is N x T x C below a patch-embedding Conv of grid gh x gw, with T =
    (gh / f) (gw / f) for a whole f >= 2, and C the width of a residual stream of T tokens: the tokens of a
    hierarchical transformer after patch merging (Swin's later stages, which merge 2 x 2 patches by strided
    slices and a Concat). Their first dimension must be the batch itself (not the windows x batch of window
    attention), and C a stream's width so that, as with the patch grid's C, the wider MLP and QKV tensors are
    left out."""
    if shape[1:] not in streams or gi.leading.get(name) != gi.leading.get(input_name):
        return None
    anc = None
    for conv_out, _, gh, gw in reversed(grids):
        f = int(round((gh * gw / shape[1]) ** 0.5))
        if f < 2 or gh % f or gw % f or (gh // f) * (gw // f) != shape[1]:
            continue
        if anc is None:
            anc = gi.ancestors([name])
        if conv_out in anc:
            return (gh // f, gw // f), 0
    return None


def _token_reach(gi: _Graph, layers: list[Layer], score: str) -> dict:
    """Token layer name -> True when the scores depend on its grid tokens, False when only on its prefix tokens.

    A backward pass: a tensor is restricted to tokens [0, P) when every consumer on the way to the scores either
    selects prefix tokens (Gather / Slice on the token axis) or is per-token (pointwise, LayerNormalization over
    the last axis, MatMul/Gemm by a constant matrix, Reshape/Transpose keeping the first two axes) with a
    restricted output. Anything else (attention, pooling over tokens, ...) reaches all tokens.
    """
    tokens = [l for l in layers if l.kind == "tokens"]
    if not tokens:
        return {}
    anc = gi.ancestors([score])
    restricted: dict[str, tuple | None] = {}  # absent or None: all tokens matter
    for n in reversed(gi.nodes):
        if n.op_type in ("Shape", "Size") or not any(o in anc for o in n.output):
            continue  # no gradient flows through shape queries or dead branches
        for i in n.input:
            if not i or i in gi.inits:
                continue
            verdict = _restricts(gi, n, i, restricted)
            if i not in restricted:
                restricted[i] = verdict
            elif restricted[i] != verdict:
                prev = restricted[i]
                same_t = prev is not None and verdict is not None and prev[0] == verdict[0]
                restricted[i] = (prev[0], max(prev[1], verdict[1])) if same_t else None
    out = {}
    for l in tokens:
        r = restricted.get(l.name)
        out[l.name] = not (r is not None and r[0] == l.shape[1] and r[1] <= l.prefix_tokens)
    return out


def _restricts(gi: _Graph, node, inp: str, restricted: dict):
    """(T, P) when node only uses tokens [0, P) of input `inp` (token axis 1, T tokens) on the way to the scores."""
    s = gi.shapes.get(inp)
    if s is None or len(s) < 3 or s[1] is None:
        return None
    T = s[1]
    if node.op_type == "Gather" and node.input[0] == inp and _attr(node, "axis", 0) == 1:
        idx = gi.const(node.input[1])
        if idx is not None:
            idx = np.where(idx < 0, idx + T, idx)
            return (T, int(idx.max()) + 1)
        return None
    if node.op_type == "Slice" and node.input[0] == inp:
        args = _slice_args(gi, node, len(s))
        if args is None:
            return None
        if 1 in args:
            b, e, st = args[1]
            b = b + T if b < 0 else b
            e = min(e + T if e < 0 else e, T)
            if st > 0 and 0 <= b < e:
                return (T, e)
        return _follow(node, restricted, T)
    # per-token ops: pass the restriction of their (first) output through
    out = node.output[0]
    os_ = gi.shapes.get(out)
    if os_ is None or len(os_) < 2 or os_[1] != T or (os_[0] is not None and s[0] is not None and os_[0] != s[0]):
        return None
    op = node.op_type
    if op in _POINTWISE and len(os_) == len(s) and os_[:2] == s[:2]:   # broadcasting over channels stays per token
        return _follow(node, restricted, T)
    if op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceSumSquare") \
            and node.input[0] == inp and _attr(node, "keepdims", 1) and _reduced_axes(gi, node) == [len(s) - 1]:
        return _follow(node, restricted, T)   # a written-out LayerNorm's statistics (opsets < 17)
    if op == "LayerNormalization" and node.input[0] == inp and _attr(node, "axis", -1) in (-1, len(s) - 1):
        return _follow(node, restricted, T)
    if op in ("MatMul", "Gemm") and node.input[0] == inp and node.input[1] in gi.inits or (
        op == "MatMul" and node.input[0] == inp and gi.const(node.input[1]) is not None
    ):
        return _follow(node, restricted, T)
    if op == "Reshape" and node.input[0] == inp:
        return _follow(node, restricted, T)
    if op == "Transpose" and node.input[0] == inp:
        perm = list(_attr(node, "perm", []))
        if perm[:2] == [0, 1]:
            return _follow(node, restricted, T)
    return None


def _reduced_axes(gi: _Graph, node) -> list | None:
    """A Reduce* node's axes (attribute or constant input), made non-negative; None when unknown or all."""
    axes = _attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = gi.const(node.input[1])
    rank = len(gi.shapes.get(node.input[0]) or ())
    if axes is None or not rank:
        return None
    return sorted(int(a) % rank for a in np.asarray(axes).ravel())


def _follow(node, restricted, T):
    r = restricted.get(node.output[0])
    if r is None:
        return None
    return (T, r[1]) if r[0] == T else None


def default_layer(model: onnx.ModelProto, scores: str | None = None) -> Layer:
    """The last spatial map feeding the classifier head (`scores`, default score_tensor(model)); for a token model
    see the module docstring."""
    scores = scores or score_tensor(model)
    layers = candidate_layers(model, scores)
    if not layers:
        raise ValueError("model has no spatial feature map or token grid on the path to its scores")
    tokens = [l for l in layers if l.kind == "tokens"]
    if tokens:
        # token models: the last spatial map is the patch embedding, the interesting part comes after
        gi = _Graph(model)
        reach = _token_reach(gi, layers, scores)
        usable = [l for l in tokens if reach.get(l.name, True)]
        return usable[-1] if usable else tokens[-1]
    return layers[-1]


# --------------------------------------------------------------------------------------------- surgery


def expose(model: onnx.ModelProto, names) -> onnx.ModelProto:
    """A copy of `model` that also outputs the named intermediate tensors (with their inferred types/shapes)."""
    names = [names] if isinstance(names, str) else list(names)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    known = {vi.name: vi for vi in m.graph.value_info}
    present = {o.name for o in m.graph.output}
    producible = {o for n in m.graph.node for o in n.output} | {i.name for i in m.graph.input}
    missing = [n for n in names if n not in producible]
    if missing:
        raise ValueError(f"tensor(s) {missing} are not in the graph")
    if any(n not in known and n not in present and n not in {i.name for i in m.graph.input} for n in names):
        m = infer_shapes(m)
        known = {vi.name: vi for vi in m.graph.value_info}
    inputs = {i.name: i for i in m.graph.input}
    for n in names:
        if n in present:
            continue
        vi = known.get(n) or inputs.get(n)
        if vi is None:
            raise ValueError(f"tensor {n!r} has no inferred type; cannot expose it")
        m.graph.output.append(vi)
        present.add(n)
    return m


def cut(model: onnx.ModelProto, layer: str, scores: str | None = None) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Split `model` at tensor `layer` into body (inputs -> layer) and head (layer -> `scores`, default
    score_tensor(model)).

    The body's first output and the head's first input are `layer`. When the layer does not separate the
    graph (a residual branch bypasses it, e.g. a ViT block's LayerNorm output), the other tensors the head needs
    follow as further body outputs / head inputs, in the same order, so ``head(body(x))`` by name is the model.
    """
    model = infer_shapes(model)
    gi = _Graph(model)
    input_names = [vi.name for vi in _real_inputs(model)]
    if layer not in gi.producer:
        raise ValueError(f"layer {layer!r} is not a tensor computed by the graph")
    score = scores or score_tensor(model)
    from_layer = gi.descendants([layer])
    if score not in from_layer:
        raise ValueError(f"the scores {score!r} do not depend on layer {layer!r}")
    from_input = gi.descendants(input_names)
    extras, seen, stack = [], set(), [score]
    while stack:
        t = stack.pop()
        if t in seen or t == layer:
            continue
        seen.add(t)
        if t not in from_layer and t in from_input:
            extras.append(t)  # computed from the input without passing through the layer
            continue
        n = gi.producer.get(t)
        if n is not None:
            stack.extend(i for i in n.input if i)
    order = {o: k for k, n in enumerate(gi.nodes) for o in n.output}
    extras.sort(key=lambda t: order.get(t, -1))
    missing_vi = [t for t in [layer, *extras] if t not in gi.shapes]
    if missing_vi:
        raise ValueError(f"no inferred shape for {missing_vi}; cannot cut there")
    ex = onnx.utils.Extractor(model)
    body = ex.extract_model(input_names, [layer, *extras])
    head = ex.extract_model([layer, *extras], [score])
    for m in (body, head):
        m.ir_version = model.ir_version
        del m.opset_import[:]
        m.opset_import.extend(model.opset_import)
    return body, head
