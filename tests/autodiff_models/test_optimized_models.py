"""Models as onnxruntime's optimizers save them (kernels.contrib): every zoo net and the shared EfficientNet-Lite0
saved by a session at the extended level (FusedConv, FusedMatMul, BiasGelu, SkipLayerNormalization), the ViT also
by the transformers optimizer (SkipLayerNormalization, BiasGelu), and a Hugging Face-style ViT whose attention that
optimizer fuses into com.microsoft Attention.

Each optimized file really holds onnxruntime's operators (else the case proves nothing). Loaded by
kernels.graph.load_model it has only standard operators, the same default layer (its name survives the fusion),
the scores of onnxruntime's own run of the file, and layer and input gradients equal to those of the model before
optimization at batch 2 with different seed rows: relative error <= 1e-4 per tensor.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import zoo
from onnxplain.kernels import graph as G
from onnxplain.kernels.autodiff import augment

SHARED = pathlib.Path(__file__).resolve().parents[2].parent / "shared"
EFFNET = SHARED / "models" / "efficientnet_lite0_imagenet.onnx"
# onnxruntime fuses nothing in the dynamo ConvNeXt (its saved file has no com.microsoft operator)
CASES = [(n, e) for n in zoo.NAMES for e in zoo.EXPORTERS if (n, e) != ("convnext", "dynamo")]


def _saved_by_session(path, target) -> str:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return str(target)


def _run(model, feeds) -> list:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(np.asarray(b, np.float64)), 1e-30))


def _same_gradients(original: str, optimized: str, layer_after: str = "") -> None:
    """layer_after: the optimized model's name for the original's default layer, where the fusion hid that tensor."""
    assert any(n.domain == "com.microsoft" for n in onnx.load(optimized).graph.node), "nothing was fused"
    before, after = G.load_model(original), G.load_model(optimized)
    assert all(n.domain in ("", "ai.onnx") for n in after.graph.node)
    layer = G.default_layer(before).name
    assert G.default_layer(after).name == (layer_after or layer)
    name = before.graph.input[0].name
    shape = [2] + [d.dim_value for d in before.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    scores = _run(optimized, {name: x})[0]
    np.testing.assert_allclose(_run(after, {name: x})[0], scores, rtol=1e-5, atol=1e-5)
    seed = np.zeros_like(scores)
    seed[0, 1], seed[1] = 1.0, np.linspace(-1.0, 1.0, scores.shape[1])
    want = _run(augment(before, layers=[layer], wrt_input=True), {name: x, "seed": seed})[-2:]
    got = _run(augment(after, layers=[layer_after or layer], wrt_input=True), {name: x, "seed": seed})[-2:]
    for w, g in zip(want, got):
        assert _rel(g, w) <= 1e-4


@pytest.mark.parametrize("name,exporter", CASES, ids=[f"{n}-{e}" for n, e in CASES])
def test_a_zoo_net_saved_by_an_onnxruntime_session(zoo_model, tmp_path, name, exporter):
    path = zoo_model(name, exporter)
    _same_gradients(path, _saved_by_session(path, tmp_path / "optimized.onnx"))


@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
def test_the_vit_saved_by_the_transformers_optimizer(zoo_model, tmp_path, exporter):
    from onnxruntime.transformers.optimizer import optimize_model

    path = zoo_model("vit", exporter)
    optimized = optimize_model(path, model_type="vit", num_heads=4, hidden_size=32, opt_level=1)
    optimized.save_model_to_file(str(tmp_path / "optimized.onnx"))
    ops = {n.op_type for n in optimized.model.graph.node if n.domain == "com.microsoft"}
    assert {"SkipLayerNormalization", "BiasGelu"} <= ops
    _same_gradients(path, str(tmp_path / "optimized.onnx"))


class _HFSelfAttention(nn.Module):
    """Hugging Face's ViTSelfAttention as written there (separate query, key, value; scores / sqrt(d)): the
    pattern the transformers optimizer fuses into com.microsoft Attention."""

    def __init__(self, c, heads):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)

    def split(self, t):
        return t.view(t.shape[0], t.shape[1], self.heads, -1).permute(0, 2, 1, 3)

    def forward(self, x):
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        mixed = torch.matmul(torch.softmax(scores, dim=-1), v).permute(0, 2, 1, 3).contiguous()
        return mixed.view(mixed.shape[0], mixed.shape[1], -1)


class _HFLayer(nn.Module):
    def __init__(self, c, heads):
        super().__init__()
        self.norm1, self.attention = nn.LayerNorm(c, eps=1e-12), _HFSelfAttention(c, heads)
        self.output = nn.Linear(c, c)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(c, eps=1e-12), nn.Linear(c, 2 * c), nn.Linear(2 * c, c)

    def forward(self, x):
        x = self.output(self.attention(self.norm1(x))) + x
        return self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x)))) + x


class _HFViT(nn.Module):
    def __init__(self, c=32, heads=4, classes=10):
        super().__init__()
        self.patches = nn.Conv2d(3, c, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, c, generator=torch.Generator().manual_seed(1)))
        self.position = nn.Parameter(torch.randn(1, 17, c, generator=torch.Generator().manual_seed(2)) * 0.1)
        self.layers = nn.Sequential(_HFLayer(c, heads), _HFLayer(c, heads))
        self.norm, self.head = nn.LayerNorm(c, eps=1e-12), nn.Linear(c, classes)

    def forward(self, x):
        x = self.patches(x).flatten(2).transpose(1, 2)
        x = self.layers(torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.position)
        return self.head(self.norm(x)[:, 0])


def test_a_hugging_face_style_vit_with_its_attention_fused(tmp_path):
    """The transformers optimizer fuses this ViT's attention into com.microsoft Attention (packed projection): the
    original's default layer (the last attention's value projection) is `unfused/<node>/value` in the fused one."""
    from onnxruntime.transformers.optimizer import optimize_model

    torch.manual_seed(0)
    net = _HFViT().eval()
    torch.onnx.export(net, (torch.randn(2, 3, 32, 32),), str(tmp_path / "vit.onnx"), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    optimized = optimize_model(str(tmp_path / "vit.onnx"), model_type="vit", num_heads=4, hidden_size=32, opt_level=0)
    optimized.save_model_to_file(str(tmp_path / "optimized.onnx"))
    attention = [n.name for n in optimized.model.graph.node if n.op_type == "Attention"]
    assert len(attention) == 2
    _same_gradients(str(tmp_path / "vit.onnx"), str(tmp_path / "optimized.onnx"), f"unfused/{attention[-1]}/value")


@pytest.mark.skipif(not EFFNET.exists(), reason="../shared is absent")
def test_the_shared_model_saved_by_an_onnxruntime_session(tmp_path):
    _same_gradients(str(EFFNET), _saved_by_session(EFFNET, tmp_path / "optimized.onnx"))


@pytest.mark.skipif(not EFFNET.exists(), reason="../shared is absent")
def test_a_model_saved_in_onnxruntimes_cpu_specific_layout_is_refused_with_advice(tmp_path):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "all.onnx")
    ort.InferenceSession(str(EFFNET), options, providers=["CPUExecutionProvider"])
    assert any(n.domain == "com.microsoft.nchwc" for n in onnx.load(tmp_path / "all.onnx").graph.node)
    with pytest.raises(ValueError, match="com.microsoft.nchwc.*ORT_ENABLE_EXTENDED"):
        G.load_model(str(tmp_path / "all.onnx"))
