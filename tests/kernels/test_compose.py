"""Graphs composed around a model (kernels.compose) are valid ONNX, not only graphs onnxruntime happens to accept:
every graph the methods and metrics hand to onnxruntime passes onnx.checker's full check (topological order,
typed inputs and outputs, shape inference)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxplain.default_model import shapes
from onnxplain.kernels import graph, images, metrics
from onnxplain.kernels.compose import _sorted
from onnxplain.kernels.methods import METHODS, Job
from onnxplain.kernels.runtime import Runner

from support import ROOT, nhwc_model, shapes_input

SMALL = dict(rise=dict(masks=40), opticam=dict(iterations=2), smoothgrad=dict(samples=4),
             integrated_gradients=dict(steps=4), occlusion=dict(window=16, stride=16))
SHAPES_PRE = images.Preprocessing(96, 96, scale=1 / 255, mean=(0.5,) * 3, std=(0.5,) * 3)


@pytest.fixture
def handed_to_onnxruntime(monkeypatch):
    """Every model a Runner makes a session of, in order."""
    models = []
    make = Runner._session

    def recording(self, model):
        models.append(model)
        return make(self, model)

    monkeypatch.setattr(Runner, "_session", recording)
    return models


def run_everything(model: onnx.ModelProto, sample: np.ndarray, layout: str, pre=None) -> None:
    score = graph.score_tensor(model)
    runner = Runner(graph.expose(model, [score]), score, graph.input_spec(model)[0], max_batch=16,
                    providers=["CPUExecutionProvider"])
    spatial = sample.shape[1:] if layout == "NCHW" else sample.shape[:2]
    for name, method in METHODS.items():
        params = method.resolve(SMALL.get(name, {}), spatial)
        if name == "integrated_gradients" and pre is None:
            params["baseline"] = "zero"
        job = Job(runner, sample, np.array([1, 2]), params, layout=layout, layer=graph.default_layer(model),
                  preprocessing=pre)
        for _ in method.run(job):
            pass
    if pre is not None:
        maps = np.random.default_rng(0).random((2, *spatial), dtype=np.float32)
        metrics.evaluate(runner, sample, maps, [1, 2], pre, metrics.METRICS, steps=4, boxes=[(10, 10, 50, 50)] * 2)


def test_every_composed_graph_passes_the_onnx_checker(handed_to_onnxruntime):
    model = graph.load_model(ROOT / "onnxplain" / "default_model" / "shapes_cnn.onnx")
    run_everything(model, shapes_input(shapes.generate(1, seed=5, size=96).images[0]), "NCHW", SHAPES_PRE)
    composed = [m for m in handed_to_onnxruntime if m.graph.name.startswith("onnxplain__")]
    assert len(composed) >= 8   # occlusion, smoothgrad, integrated gradients, Score-CAM, Ablation-CAM, RISE, ...
    for m in handed_to_onnxruntime:
        onnx.checker.check_model(m, full_check=True)


def test_composed_graphs_of_an_nhwc_model_pass_the_onnx_checker(handed_to_onnxruntime):
    model = graph.load_model(nhwc_model().SerializeToString())
    sample = np.random.default_rng(1).standard_normal((24, 32, 3)).astype(np.float32)
    run_everything(model, sample, "NHWC")
    assert any(m.graph.name.startswith("onnxplain__") for m in handed_to_onnxruntime)
    for m in handed_to_onnxruntime:
        onnx.checker.check_model(m, full_check=True)


def test_sorting_keeps_a_sorted_list_and_orders_composed_nodes_by_what_they_read():
    from onnx import helper
    a = helper.make_node("Relu", ["x"], ["a"], name="a")
    b = helper.make_node("Neg", ["a"], ["b"], name="b")
    c = helper.make_node("Abs", ["x"], ["c"], name="c")
    d = helper.make_node("Add", ["b", "c"], ["d"], name="d")
    assert [n.name for n in _sorted([a, b, c, d])] == ["a", "b", "c", "d"]
    assert [n.name for n in _sorted([d, b, a, c])] == ["a", "b", "c", "d"]
    # a node whose If branch reads an outer tensor waits for the node that makes it
    branch = helper.make_graph([helper.make_node("Identity", ["b"], ["y"])], "then", [],
                               [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    cond = helper.make_node("If", ["flag"], ["e"], name="e", then_branch=branch, else_branch=branch)
    assert [n.name for n in _sorted([cond, b, a])] == ["a", "b", "e"]
    with pytest.raises(ValueError, match="cycle"):
        _sorted([helper.make_node("Relu", ["q"], ["p"]), helper.make_node("Relu", ["p"], ["q"])])


def test_the_composed_tensor_is_declared_with_the_model_inputs_type_and_a_free_batch(handed_to_onnxruntime):
    """Shape inference leaves a prefix's output (a Tile by a run-time count, a Where over masks) with no known dims;
    with_prefix declares it as the model input it replaces, batch left free (without that declaration onnxruntime
    ran the same kernels slower: EfficientNet-Lite0's summed gradient graph took 313 ms instead of 259)."""
    from onnxplain.kernels.compose import PREFIX

    model = graph.load_model(ROOT / "onnxplain" / "default_model" / "shapes_cnn.onnx")
    run_everything(model, shapes_input(shapes.generate(1, seed=5, size=96).images[0]), "NCHW", SHAPES_PRE)
    checked = 0
    for m in handed_to_onnxruntime:
        if not m.graph.name.startswith("onnxplain__") or any(i.name == "input" for i in m.graph.input):
            continue
        inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
        first = [n for n in m.graph.node if n.name == "/0/Conv"]     # the model's first node reads its input
        if not first:     # a head composed at a layer (Ablation-CAM): not the image input
            continue
        fed = first[0].input[0]
        info = {v.name: v for v in inferred.graph.value_info}[fed]
        dims = [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim]
        assert dims == [f"{PREFIX}batch", 3, 96, 96], (m.graph.name, fed, dims)
        checked += 1
    assert checked >= 5, checked
