"""Ablation-CAM against straightforward re-implementations: numpy + onnxruntime on the shipped default model
(the head extracted by onnx's own Extractor, each ablated copy made in numpy), torch hooks on a ViT-like zoo
net (token layer whose residual bypasses it), and through the real server with several targets."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from onnxplain.client import MapResult
from onnxplain.default_model import shapes
from onnxplain.kernels import graph
from onnxplain.kernels.methods import METHODS, Job, Maps, Progress
from onnxplain.kernels.runtime import Runner

from support import ROOT, SHARED, needs_shared, nhwc_model, png_bytes, shapes_input

SHAPES_MODEL = ROOT / "onnxplain" / "default_model" / "shapes_cnn.onnx"


def runner_for(path) -> Runner:
    model = graph.load_model(path)
    return Runner(model, graph.score_tensor(model), graph.input_spec(model)[0], max_batch=32,
                  providers=["CPUExecutionProvider"])


def reference_ablationcam(path, x, layer, targets, channel_axis=1):
    """w_k = (y_c - y_c^k) / y_c with each ablated copy of the layer made in numpy and run through the model's
    head (extracted by onnx.utils.Extractor), 16 copies at a time. `path`: a file or a model."""
    model = onnx.shape_inference.infer_shapes(path if isinstance(path, onnx.ModelProto) else onnx.load(str(path)))
    extractor = onnx.utils.Extractor(model)
    body = ort.InferenceSession(extractor.extract_model(["input"], [layer, "logits"]).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    head = ort.InferenceSession(extractor.extract_model([layer], ["logits"]).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    activations, logits = body.run(None, {"input": x[None]})
    activations = np.moveaxis(activations, channel_axis, 1)              # [1, K, h, w]
    copies = []
    for k in range(activations.shape[1]):
        ablated = activations.copy()
        ablated[:, k] = 0
        copies.append(np.moveaxis(ablated, 1, channel_axis)[0])
    scores = np.concatenate([head.run(None, {layer: np.stack(copies[i:i + 16])})[0]
                             for i in range(0, len(copies), 16)])
    maps = []
    for c in targets:
        y = float(logits[0, c])
        w = (y - scores[:, c].astype(np.float64)) / y
        maps.append(np.maximum((w[:, None, None] * activations[0]).sum(0), 0))
    return np.stack(maps)


class PooledHead(torch.nn.Module):
    """conv -> (the layer) -> ReLU -> spatial mean -> linear; with `bypass`, the layer also feeds a second
    pooled branch, so it has two consumers."""

    def __init__(self, bypass: bool):
        super().__init__()
        torch.manual_seed(3)
        self.conv, self.fc, self.fc2 = torch.nn.Conv2d(3, 12, 3, padding=1), torch.nn.Linear(12, 6), torch.nn.Linear(12, 6)
        self.bypass = bypass

    def forward(self, x):
        a = self.conv(x)
        out = self.fc(torch.relu(a).mean((2, 3)))
        return out + self.fc2(a.amax((2, 3))) if self.bypass else out


def exported(module, opset=17) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(module.eval(), torch.zeros(1, 3, 10, 10), buffer, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}}, dynamo=False, opset_version=opset)
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.parametrize("case", ["pooled head", "pooled head, axes as input", "pooled head, opset 11", "layer with two consumers", "nhwc head",
                                  "earlier shapes layer"])
def test_the_ablation_moves_past_ops_it_commutes_with(case):
    """Zeroing a channel commutes with ReLU, global pooling and spatial reductions, so the copies are made after
    them (only what follows runs per copy); where the layer has another consumer, or the next op is a
    convolution, the copies are the layer's own. Each case against the numpy reference."""
    from onnxplain.kernels.methods.ablationcam import ablation_graphs

    rng = np.random.default_rng(0)
    if case == "earlier shapes layer":
        model = graph.load_model(SHAPES_MODEL)
        layer = graph.candidate_layers(model)[-3]
        x, axis, moved_past = shapes_input(shapes.generate(1, seed=9_000_122, size=96).images[0]), 1, None
    elif case == "nhwc head":
        model = graph.load_model(nhwc_model().SerializeToString())
        model = graph.expose(model, ["logits"])           # as the registry serves it: the logits as an output
        layer = graph.default_layer(model)
        x, axis, moved_past = rng.standard_normal((24, 32, 3)).astype(np.float32), 3, "ReduceMean"
    else:     # the convolution's output: followed by ReLU (and, with the bypass, by a max too)
        pooled = case.startswith("pooled head")
        opset = 18 if "axes" in case else 11 if "opset 11" in case else 17    # 11: Unsqueeze's axes attribute
        model = graph.load_model(exported(PooledHead(not pooled), opset=opset))
        if "axes" in case:      # opset 18: ReduceMean takes its axes as a constant input
            assert any(n.op_type == "ReduceMean" and len(n.input) == 2 for n in model.graph.node)
        layer = dataclasses.replace(graph.default_layer(model), name="/conv/Conv_output_0", op_type="Conv")
        x, axis = rng.standard_normal((3, 10, 10)).astype(np.float32), 1
        moved_past = "ReduceMean" if pooled else None
    runner = Runner(model, graph.score_tensor(model), "input", max_batch=8, providers=["CPUExecutionProvider"])
    _, head, _ = ablation_graphs(runner, layer)
    produced = {o: n.op_type for n in head.graph.node for o in n.output}
    mul = next(n for n in head.graph.node if n.op_type == "Mul" and n.input[1].startswith(
        ("onnxplain__unsqueeze", "onnxplain__keep")))
    assert produced.get(mul.input[0], "Identity") == (moved_past or "Identity") or \
        (moved_past is None and mul.input[0] == "onnxplain__act")
    targets = np.array([0, 2])
    job = Job(runner, x, targets, {}, "NHWC" if axis == 3 else "NCHW", layer)
    final = [e for e in METHODS["ablationcam"].run(job) if isinstance(e, Maps)][-1]
    expected = reference_ablationcam(model, x, layer.name, targets, channel_axis=axis)
    assert expected.max() > 0
    np.testing.assert_allclose(final.maps, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_ablationcam_matches_numpy_reference_for_several_targets():
    runner = runner_for(SHAPES_MODEL)
    layer = graph.default_layer(runner.model)
    targets = np.array([1, 2, 7])
    for image in shapes.generate(2, seed=9_000_121, size=96).images:
        x = shapes_input(image)
        job = Job(runner, x, targets, {}, layer=layer)
        events = list(METHODS["ablationcam"].run(job))
        assert [e.done for e in events if isinstance(e, Progress)] == [32, 64, 96]
        final = events[-1]
        assert isinstance(final, Maps) and final.final and final.maps.shape == (3, 12, 12)
        # the body once, the head on 96 ablated copies, the image's own scores once
        assert job.passes.forward_samples == 1 + 96 + 1 and job.passes.runs == 1 + 3 + 1
        expected = reference_ablationcam(SHAPES_MODEL, x, layer.name, targets)
        np.testing.assert_allclose(final.maps, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
        assert expected.max() > 0


def test_ablationcam_on_a_token_layer_bypassed_by_a_residual_matches_torch(zoo_model):
    import zoo

    net = zoo.build("vit")
    runner = runner_for(zoo_model("vit", "legacy"))
    layer = graph.default_layer(runner.model)
    assert layer.kind == "tokens" and layer.prefix_tokens == 1
    x = zoo.example_input("vit", 1, seed=3)
    targets = np.array([0, 2])
    job = Job(runner, x[0].numpy(), targets, {}, layer=layer)
    served = list(METHODS["ablationcam"].run(job))[-1].maps

    captured, ablate = {}, {"k": None}

    def hook(module, inputs, output):
        captured["a"] = output.detach().clone()
        if ablate["k"] is not None:
            output = output.clone()
            output[:, 1:, ablate["k"]] = 0     # the channel on the grid tokens; CLS kept
            return output
        return None

    handle = net.blocks[-1].norm1.register_forward_hook(hook)
    with torch.no_grad():
        logits = net(x)[0].double()
        a = captured["a"][0, 1:].double()                  # [grid tokens, C]
        ablated = []
        for k in range(a.shape[1]):
            ablate["k"] = k
            ablated.append(net(x)[0].double())
        handle.remove()
    ablated = torch.stack(ablated)                          # [C, classes]
    maps = a.T.reshape(-1, 4, 6)                            # [C, h, w]: 32 x 48 input, 8 x 8 patches
    expected = []
    for c in targets:
        w = (logits[c] - ablated[:, c]) / logits[c]
        expected.append(torch.relu((w[:, None, None] * maps).sum(0)).numpy())
    expected = np.stack(expected)
    np.testing.assert_allclose(served, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
    assert np.abs(expected).max() > 0


@pytest.mark.parametrize("model", ["shapes", pytest.param("efficientnet", marks=needs_shared)])
def test_ablationcam_through_the_server_with_several_targets(client, model):
    if model == "shapes":
        image = png_bytes(shapes.generate(1, seed=9_000_122, size=96).images[0])
        side = 96
    else:
        image, side = SHARED / "images" / "coffee.jpg", 224
    events = list(client.explain(model, [image], ["ablationcam"], top_k=3))
    maps = [e for e in events if isinstance(e, MapResult) and e.final]
    assert len(maps) == 3 and len({m.class_id for m in maps}) == 3
    for m in maps:
        assert m.map.shape == (side, side) and np.isfinite(m.map).all() and m.map.min() >= 0 and m.layer
    assert np.ptp(maps[0].map) > 0 and not np.allclose(maps[0].map, maps[1].map)


