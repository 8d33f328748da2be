"""Small ONNX graphs composed around a model, so that per-pixel work over many perturbed inputs runs inside
onnxruntime next to the model (on the GPU when there is one) instead of in Python.
"""

from __future__ import annotations

import heapq

import onnx
from onnx import TensorProto, helper

PREFIX = "onnxplain__"  # names of the composed nodes and tensors; model names never start with it


def with_prefix(model: onnx.ModelProto, input_name: str, nodes: list[onnx.NodeProto],
                inputs: list[onnx.ValueInfoProto], produces: str, outputs: list[str]) -> onnx.ModelProto:
    """A model that computes `produces` from `inputs` with `nodes`, feeds it to `model` as `input_name`,
    and returns the model tensors named in `outputs`."""
    graph = model.graph
    renamed = []
    for node in graph.node:
        node = onnx.NodeProto.FromString(node.SerializeToString())
        for i, name in enumerate(node.input):
            if name == input_name:
                node.input[i] = produces
        renamed.append(node)
    composed = helper.make_graph(
        _sorted(nodes + renamed), f"{PREFIX}{graph.name}", inputs, [],
        initializer=list(graph.initializer), value_info=[*_declared_as(graph, input_name, produces), *graph.value_info])
    result = helper.make_model(composed, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    known = {vi.name: vi for vi in list(graph.value_info) + list(graph.output)}
    if any(name not in known for name in outputs):   # a composed node's output: its type from shape inference
        try:
            known.update((vi.name, vi) for vi in onnx.shape_inference.infer_shapes(result).graph.value_info)
        except Exception:  # noqa: BLE001 - e.g. a model over protobuf's 2 GB: the output stays untyped, ORT runs it
            pass
    result.graph.output.extend(
        known[name] if name in known else helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
        for name in outputs)
    return result


def _declared_as(graph: onnx.GraphProto, input_name: str, produces: str) -> list[onnx.ValueInfoProto]:
    """The model input's declared type for the composed tensor that replaces it, its batch dim left free (a
    prefix may make any number of rows). Shape inference cannot see through most prefixes (a Tile by a run-time
    count, a Where over masks) and leaves all of its dims unknown, and onnxruntime then ran the same kernels
    slower: EfficientNet-Lite0's summed gradient graph (integrated gradients, batch 16) took 313 ms instead of
    259, its fused mask convolutions up to 2.5x longer each."""
    declared = next((i for i in graph.input if i.name == input_name), None)
    if declared is None or not declared.type.tensor_type.HasField("shape"):
        return []
    info = onnx.ValueInfoProto.FromString(declared.SerializeToString())
    info.name = produces
    dims = info.type.tensor_type.shape.dim
    if len(dims):
        dims[0].Clear()
        dims[0].dim_param = f"{PREFIX}batch"
    return [info]


def _sorted(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """`nodes` in topological order, as ONNX requires (composed nodes may read model tensors and feed model
    nodes); among nodes that are ready, the one listed first comes first, so a sorted list stays as it is."""
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    readers: list[list[int]] = [[] for _ in nodes]
    waiting = []
    for i, node in enumerate(nodes):
        needs = {producer[name] for name in _reads(node) if name in producer} - {i}
        waiting.append(len(needs))
        for j in needs:
            readers[j].append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for j in readers[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(order) < len(nodes):
        raise ValueError("composed graph has a cycle")
    return order


def _reads(node: onnx.NodeProto) -> set[str]:
    """The tensors a node reads, those its subgraphs (If, Loop, Scan) read from the enclosing graph included."""
    names = set(node.input)
    for attr in node.attribute:
        for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
            for inner in sub.node:
                names |= _reads(inner)
    return names


def masked_model(model: onnx.ModelProto, input_name: str, score_name: str, layout: str) -> onnx.ModelProto:
    """scores(where(mask, baseline, x)): x is one sample [1, C, H, W] (or [1, H, W, C]), mask a boolean batch
    [B, 1, H, W] (or [B, H, W, 1]) and baseline a scalar; each mask row gives one perturbed input."""
    mask_shape = ["B", 1, "H", "W"] if layout == "NCHW" else ["B", "H", "W", 1]
    inputs = [
        helper.make_tensor_value_info(f"{PREFIX}x", TensorProto.FLOAT, [1, None, None, None]),
        helper.make_tensor_value_info(f"{PREFIX}mask", TensorProto.BOOL, mask_shape),
        helper.make_tensor_value_info(f"{PREFIX}baseline", TensorProto.FLOAT, []),
    ]
    nodes = [helper.make_node("Where", [f"{PREFIX}mask", f"{PREFIX}baseline", f"{PREFIX}x"], [f"{PREFIX}masked"])]
    return with_prefix(model, input_name, nodes, inputs, f"{PREFIX}masked", [score_name])
