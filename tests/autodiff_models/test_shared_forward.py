"""kernels.autodiff.share_forward: one forward of a sample for many seed rows gives, row for row, what the gradient
graph gives for copies of the sample (every zoo net x both torch exporters x the three rules, and the guided
Grad-CAM two-pass graph; every net of tests/architectures.py), also where the batch is merged into another dim
(Swin's windows, torch.nn.MultiheadAttention's batch x heads), and refuses graphs whose backward would read the
batch in a way it cannot broadcast."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import zoo
from architectures import NETS, export
from onnxplain.kernels import graph as G
from onnxplain.kernels.autodiff import AutodiffError, augment, share_forward

CASES = [(n, e) for n in zoo.NAMES for e in zoo.EXPORTERS]
ROWS = 3
# Swin's windows (batch x windows) and the legacy exporter's ViT (reshapes by run-time shapes that ONNX's shape
# inference cannot tie to the batch, and a CLS token whose Gather has a backward sized by a run-time shape) read the
# batch as a value: onnxruntime's symbolic shape inference ties them, and the sizes are computed again for K rows.
MERGED = {"swin", "swin_nhwc"}


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
    errors = {}
    for rule in ("standard", "guided", "deconvnet"):
        for keep in (True, False):
            aug = augment(model, layers=[layer], wrt_input=True, rule=rule, keep_outputs=keep)
            errors.update({f"{rule}/{keep}/{k}": v for k, v in _compare(aug, x, seed).items()})
    both = augment(model, layers=[layer], wrt_input=True, rule="guided", layer_rule="standard", keep_outputs=False)
    errors.update({f"guided+standard/{k}": v for k, v in _compare(both, x, seed).items()})
    bad = {k: v for k, v in errors.items() if not v <= 1e-5}
    assert not bad, f"shared forward differs from repeated samples: {bad}"
    if name in MERGED:      # forward tensors of batch x windows rows were tiled for the K rows
        shared = share_forward(augment(model, layers=[layer], wrt_input=True, keep_outputs=False))
        assert any(n.op_type == "Tile" and n.name.startswith("ad/share/") for n in shared.graph.node)


@pytest.mark.parametrize("name,exporter", [(n, e) for n in NETS for e in ("legacy", "dynamo")])
def test_shared_forward_on_the_architectures(name, exporter):
    """Every net of tests/architectures.py shares its forward, with the legacy exporter's outputs whose batch dim
    its dynamic_axes leave unnamed (the scores' batch is inferred, not read as declared) and torch's
    MultiheadAttention (DeiT: batch x heads merged; by the legacy exporter, shapes neither inference follows, so
    the shapes measured at batch 1 and 2)."""
    _, model = export(name, exporter)
    layer = G.default_layer(model).name
    x = np.random.default_rng(2).standard_normal((1, 3, 16, 16)).astype(np.float32)
    seed = np.random.default_rng(3).standard_normal((ROWS, 5)).astype(np.float32)
    errors = _compare(augment(model, layers=[layer], wrt_input=True, keep_outputs=False), x, seed)
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


def test_shared_forward_repeats_a_batch_merged_into_a_dim():
    """The run-time shape of a tensor whose batch is merged into a dim ([2n, 5]) is computed again with 2K rows."""
    aug = _reshaping_net(merged=True)
    errors = _compare(aug, np.random.default_rng(1).standard_normal((1, 10)).astype(np.float32), _seeds(10))
    assert errors["again__grad"] <= 1e-6 and errors["input__grad"] <= 1e-6


def _batch_inner_net() -> onnx.ModelProto:
    """input [n, 10] -> Transpose -> Reshape to [10n] (row b of sample i at i * n + b: the batch runs innermost)
    -> Relu -> back to [n, 10]: the Relu's backward reads its output, whose rows for K copies of a sample are not
    the sample's rows tiled K times."""
    nodes = [helper.make_node("Transpose", ["input"], ["t"], perm=[1, 0]),
             helper.make_node("Reshape", ["t", "flat"], ["f"]),
             helper.make_node("Relu", ["f"], ["r"]),
             helper.make_node("Reshape", ["r", "rows"], ["u"]),
             helper.make_node("Transpose", ["u"], ["logits"], perm=[1, 0])]
    inits = [numpy_helper.from_array(np.asarray([-1], np.int64), "flat"),
             numpy_helper.from_array(np.asarray([10, -1], np.int64), "rows")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 10])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])], inits)
    return augment(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), wrt_input=True)


def test_shared_forward_refuses_a_merged_batch_that_runs_innermost():
    """Tiling a merged dim is right only where it runs over the batch outermost; the check against copies of a
    sample catches the other order, and share_forward refuses instead of answering wrongly."""
    aug = _batch_inner_net()
    with pytest.raises(AutodiffError, match="outermost"):
        share_forward(aug)
    # the graph itself is right: row k of copies is the input's gradient for seed row k
    x = np.random.default_rng(4).standard_normal((1, 10)).astype(np.float32)
    seed = _seeds(10)
    grad = _session(aug).run(["input__grad"], {"input": np.repeat(x, ROWS, 0), "seed": seed})[0]
    np.testing.assert_allclose(grad, seed * (x > 0), rtol=1e-6)
