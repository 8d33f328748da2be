"""kernels.autodiff.share_forward: one forward of a sample for many seed rows gives, row for row, what the gradient
graph gives for copies of the sample (every zoo net x both torch exporters x the three rules, and the guided
Grad-CAM two-pass graph), and refuses graphs whose backward would read the batch in a way it cannot broadcast."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import zoo
from onnxplain.kernels import graph as G
from onnxplain.kernels.autodiff import AutodiffError, augment, share_forward

CASES = [(n, e) for n in zoo.NAMES for e in zoo.EXPORTERS]
ROWS = 3
# Graphs whose backward reads the batch as a value merged into another dim: Swin's windows (batch x windows).
# share_forward refuses them (callers then repeat the sample); the test holds the list exact both ways. (The legacy
# exporter's ViT reshapes by run-time shapes that ONNX's shape inference cannot tie to the batch, and its CLS
# token's Gather has a backward sized by a run-time shape: onnxruntime's symbolic shape inference ties them, and the
# sizes are computed again for K rows.)
REFUSED = {("swin", "legacy"), ("swin", "dynamo"), ("swin_nhwc", "legacy"), ("swin_nhwc", "dynamo")}


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _seeds(classes: int) -> np.ndarray:
    seed = np.zeros((ROWS, classes), np.float32)
    seed[0, 3] = 1.0
    seed[1, 7] = 1.0
    seed[2] = np.linspace(-1.0, 1.5, classes, dtype=np.float32)
    return seed


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _compare(aug: onnx.ModelProto, x: np.ndarray, seed: np.ndarray) -> dict:
    """Relative error of each output of share_forward(aug) on x[:1] against aug on ROWS copies of x[:1]."""
    shared = share_forward(aug)
    onnx.checker.check_model(shared, full_check=True)
    names = [o.name for o in aug.graph.output]
    tiled = dict(zip(names, _session(aug).run(names, {"input": np.repeat(x[:1], ROWS, 0), "seed": seed})))
    once = dict(zip(names, _session(shared).run(names, {"input": x[:1], "seed": seed})))
    errors = {}
    for name in names:
        if name.endswith("__grad"):
            assert once[name].shape == tiled[name].shape, name
            errors[name] = max(_rel(once[name][i], tiled[name][i]) for i in range(ROWS))
        else:                                   # the forward's outputs come back once
            assert once[name].shape[0] == 1, name
            errors[name] = _rel(once[name][0], tiled[name][0])
    return errors


@pytest.mark.parametrize("name,exporter", CASES)
def test_shared_forward_equals_repeated_samples(name, exporter, zoo_model):
    model = G.load_model(zoo_model(name, exporter))
    layer = G.default_layer(model).name
    x = zoo.example_input(name, 1, seed=5).numpy()
    seed = _seeds(10)
    if (name, exporter) in REFUSED:
        for rule in ("standard", "guided", "deconvnet"):
            with pytest.raises(AutodiffError, match="depends on the batch"):
                share_forward(augment(model, layers=[layer], wrt_input=True, rule=rule, keep_outputs=False))
        return
    errors = {}
    for rule in ("standard", "guided", "deconvnet"):
        for keep in (True, False):
            aug = augment(model, layers=[layer], wrt_input=True, rule=rule, keep_outputs=keep)
            errors.update({f"{rule}/{keep}/{k}": v for k, v in _compare(aug, x, seed).items()})
    both = augment(model, layers=[layer], wrt_input=True, rule="guided", layer_rule="standard", keep_outputs=False)
    errors.update({f"guided+standard/{k}": v for k, v in _compare(both, x, seed).items()})
    bad = {k: v for k, v in errors.items() if not v <= 1e-5}
    assert not bad, f"shared forward differs from repeated samples: {bad}"


def test_shared_forward_offsets_maxpool_switches():
    """MaxPool's switches are flat over N*C*H*W: each row scatters into its own sample (a graph of Conv, MaxPool,
    Gemm whose input gradient for rows 1 and 2 would land in row 0 without the offsets)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1)]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((10, 4 * 4 * 4)).astype(np.float32), "fc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    aug = augment(model, wrt_input=True, keep_outputs=False)
    assert any(n.op_type == "Add" and "share" in n.name for n in share_forward(aug).graph.node)
    errors = _compare(aug, rng.standard_normal((1, 3, 8, 8)).astype(np.float32), _seeds(10))
    assert errors["input__grad"] <= 1e-6


def _reshaping_net(merged: bool) -> onnx.ModelProto:
    """input [n, 10] -> Relu -> Reshape to its own run-time shape -> logits; and its gradient graph, whose input
    gradient is reshaped again by a forward run-time shape into an output "again__grad": the Relu's (the batch
    first), or that of the Relu's output reshaped to [-1, 5] ([2n, 5]: the batch merged into a dim)."""
    nodes = [helper.make_node("Relu", ["input"], ["r"]),
             helper.make_node("Shape", ["r"], ["s"]),
             helper.make_node("Reshape", ["r", "s"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 10])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])])
    aug = augment(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), wrt_input=True)
    if merged:
        aug.graph.initializer.append(numpy_helper.from_array(np.asarray([-1, 5], np.int64), "halves"))
        aug.graph.node.extend([helper.make_node("Reshape", ["r", "halves"], ["f"]),
                               helper.make_node("Shape", ["f"], ["sf"]),
                               helper.make_node("Reshape", ["input__grad", "halves"], ["g2"]),
                               helper.make_node("Reshape", ["g2", "sf"], ["again__grad"])])
    else:
        aug.graph.node.append(helper.make_node("Reshape", ["input__grad", "s"], ["again__grad"]))
    aug.graph.output.append(helper.make_tensor_value_info("again__grad", TensorProto.FLOAT, ["n", 10]))
    return aug


def test_shared_forward_computes_a_run_time_shape_again_for_the_rows():
    """A backward that reads the batch as a value (a Reshape to a forward tensor's run-time shape, as a Gather's
    adjoint sizes its zeros) gets that shape for K rows: the shape of a tensor of one row per sample, with K."""
    aug = _reshaping_net(merged=False)
    errors = _compare(aug, np.random.default_rng(1).standard_normal((1, 10)).astype(np.float32), _seeds(10))
    assert errors["again__grad"] <= 1e-6 and errors["input__grad"] <= 1e-6
    assert any(n.op_type == "Concat" and "share" in n.name for n in share_forward(aug).graph.node)


def test_shared_forward_refuses_a_batch_merged_into_another_dim():
    """The run-time shape of a tensor whose batch is merged into a dim ([2n, 5]) cannot be had for K rows from one
    forward: share_forward says so instead of answering wrongly."""
    with pytest.raises(AutodiffError, match="depends on the batch"):
        share_forward(_reshaping_net(merged=True))
