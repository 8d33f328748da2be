"""Small ONNX graphs composed around a model, so that per-pixel work over many perturbed inputs runs inside
onnxruntime next to the model (on the GPU when there is one) instead of in Python.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

PREFIX = "onnxplain__"  # names of the composed nodes and tensors; model names never start with it


def with_prefix(model: onnx.ModelProto, input_name: str, nodes: list[onnx.NodeProto],
                inputs: list[onnx.ValueInfoProto], produces: str, outputs: list[str]) -> onnx.ModelProto:
    """A model that computes `produces` from `inputs` with `nodes`, feeds it to `model` as `input_name`,
    and returns the model tensors named in `outputs`."""
    graph = model.graph
    body = [n for n in graph.node]
    renamed = []
    for node in body:
        node = onnx.NodeProto.FromString(node.SerializeToString())
        for i, name in enumerate(node.input):
            if name == input_name:
                node.input[i] = produces
        renamed.append(node)
    known = {vi.name: vi for vi in list(graph.value_info) + list(graph.output)}
    out_infos = [known[name] if name in known else helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                 for name in outputs]
    composed = helper.make_graph(
        nodes + renamed, f"{PREFIX}{graph.name}", inputs, out_infos,
        initializer=list(graph.initializer), value_info=list(graph.value_info))
    result = helper.make_model(composed, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return result


def masked_model(model: onnx.ModelProto, input_name: str, score_name: str, layout: str) -> onnx.ModelProto:
    """scores(where(mask, baseline, x)): x is one sample [1, C, H, W] (or [1, H, W, C]), mask a boolean batch
    [B, 1, H, W] (or [B, H, W, 1]) and baseline a scalar; each mask row gives one perturbed input."""
    mask_shape = ["B", 1, "H", "W"] if layout == "NCHW" else ["B", "H", "W", 1]
    inputs = [
        helper.make_tensor_value_info(f"{PREFIX}x", TensorProto.FLOAT, None),
        helper.make_tensor_value_info(f"{PREFIX}mask", TensorProto.BOOL, mask_shape),
        helper.make_tensor_value_info(f"{PREFIX}baseline", TensorProto.FLOAT, []),
    ]
    nodes = [helper.make_node("Where", [f"{PREFIX}mask", f"{PREFIX}baseline", f"{PREFIX}x"], [f"{PREFIX}masked"])]
    return with_prefix(model, input_name, nodes, inputs, f"{PREFIX}masked", [score_name])
