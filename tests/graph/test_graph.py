"""kernels.graph on the zoo (both exporters), the shared EfficientNet-Lite0, hand-built NHWC/Softmax graphs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import zoo
from onnxplain.kernels import graph as G

from support import nhwc_model

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
EFFNET = SHARED / "models" / "efficientnet_lite0_imagenet.onnx"
needs_shared = pytest.mark.skipif(not EFFNET.exists(), reason="../shared (EfficientNet-Lite0) is absent")
CASES = [(n, e) for n in zoo.NAMES for e in zoo.EXPORTERS]


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _run(model, feeds: dict) -> dict:
    s = _session(model)
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(None, feeds)))


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(np.asarray(b, np.float64)), 1e-30))


def _matches(values: dict, ref: np.ndarray) -> list[str]:
    return [n for n, v in values.items() if v.shape == ref.shape and _rel(v, ref) < 1e-4]


@pytest.fixture(scope="module")
def zoo_loaded(zoo_model):
    cache = {}

    def get(name, exporter):
        if (name, exporter) not in cache:
            cache[name, exporter] = G.load_model(zoo_model(name, exporter))
        return cache[name, exporter]

    return get


# ------------------------------------------------------------------------------------------------ zoo


@pytest.mark.parametrize("name,exporter", CASES)
def test_zoo_input_spec_scores_and_layer_shapes(name, exporter, zoo_loaded):
    model = zoo_loaded(name, exporter)
    assert G.input_spec(model) == ("input", (None, *zoo.input_shape(name)), "NCHW")
    assert G.score_tensor(model) == "logits"
    layers = G.candidate_layers(model)
    assert layers, "no candidate layer"
    gi = G._Graph(model)
    on_path = gi.ancestors(["logits"])
    order = {o: k for k, n in enumerate(model.graph.node) for o in n.output}
    assert [order[l.name] for l in layers] == sorted(order[l.name] for l in layers), "not in topological order"
    assert len({l.name for l in layers}) == len(layers)
    for l in layers:
        assert l.name in on_path
        assert l.shape[0] is None, f"{l.name}: batch dim should stay symbolic, got {l.shape}"
        assert l.op_type == gi.producer[l.name].op_type
        if l.kind == "spatial":
            assert l.grid == l.shape[2:] and min(l.grid) > 1
        elif l.kind == "spatial_nhwc":
            assert l.grid == l.shape[1:3] and min(l.grid) > 1
        else:
            assert l.kind == "tokens" and l.shape[1] == l.prefix_tokens + l.grid[0] * l.grid[1]
    # near-duplicates: no listed tensor is consumed only by a same-shape activation / BatchNormalization
    for l in layers:
        users = gi.consumers.get(l.name, [])
        assert not (len(users) == 1 and users[0].op_type in ("Relu", "HardSwish", "BatchNormalization")
                    and gi.shapes.get(users[0].output[0]) == l.shape), f"{l.name} duplicates its activation"


@pytest.mark.parametrize("name,exporter", CASES)
def test_zoo_default_and_early_layer_are_the_torch_probes(name, exporter, zoo_loaded):
    """The default layer carries the values of the torch module chosen as default; the early probe is listed."""
    model = zoo_loaded(name, exporter)
    layers = G.candidate_layers(model)
    x = zoo.example_input(name, 2)
    ref = zoo.run_with_probes(zoo.build(name), x)
    out = _run(G.expose(model, [l.name for l in layers]), {"input": x.numpy()})
    np.testing.assert_allclose(out["logits"], ref["logits"], rtol=1e-4, atol=1e-4)
    values = {l.name: out[l.name] for l in layers}
    default = G.default_layer(model)
    assert default.name in _matches(values, ref["acts"]["default"]), (
        f"default {default.name} is not the torch probe; candidates with its values: "
        f"{_matches(values, ref['acts']['default'])}")
    early = _matches(values, ref["acts"]["early"])
    assert early, "the early torch probe is not among the candidate layers"
    names = [l.name for l in layers]
    assert names.index(early[0]) < names.index(default.name)


@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
def test_vit_token_layers_grid_and_prefix(exporter, zoo_loaded):
    model = zoo_loaded("vit", exporter)
    layers = G.candidate_layers(model)
    tokens = [l for l in layers if l.kind == "tokens"]
    assert len(tokens) >= 8  # per block: norm1, attention out, residual, norm2, block out (x2), final norm ...
    with_cls = [l for l in tokens if l.shape[1] == 25]
    assert with_cls and all(l.grid == (4, 6) and l.prefix_tokens == 1 and l.shape[2] == 32 for l in with_cls)
    assert all(l.grid == (4, 6) and l.prefix_tokens == 0 for l in tokens if l.shape[1] == 24)
    default = G.default_layer(model)
    assert default.kind == "tokens" and default.grid == (4, 6) and default.prefix_tokens == 1
    assert default.op_type == "LayerNormalization"
    # the default layer's patch tokens do reach the scores, the later token layers' patch tokens do not
    reach = G._token_reach(G._Graph(model), layers, "logits")
    assert reach[default.name] is True
    later = [l.name for l in tokens[tokens.index(default) + 1:]]
    assert later and not any(reach[n] for n in later[2:])  # after the last attention: CLS only


def test_vit_patch_reach_matches_autograd():
    """The structural CLS-only analysis agrees with torch: gradients on patch tokens of the last block output are 0."""
    model = zoo.build("vit")
    r = zoo.run_with_probes(model, zoo.example_input("vit", 2), torch.ones(2, 10))
    assert np.abs(r["grads"]["default"][:, 1:]).max() > 1e-3
    out_block = {}

    def keep(_m, _i, o):
        o.retain_grad()
        out_block["t"] = o

    h = model.blocks[-1].out.register_forward_hook(keep)
    x = zoo.example_input("vit", 2)
    model(x).sum().backward()
    h.remove()
    assert np.abs(out_block["t"].grad[:, 1:].numpy()).max() == 0.0


@pytest.mark.parametrize("exporter", zoo.EXPORTERS)
def test_convnext_lists_channels_last_maps(exporter, zoo_loaded):
    model = zoo_loaded("convnext", exporter)
    nhwc = [l for l in G.candidate_layers(model) if l.kind == "spatial_nhwc"]
    assert nhwc and {l.grid for l in nhwc} == {(16, 16), (8, 8)}
    assert any(l.shape[3] == 128 for l in nhwc)  # the GELU output of the 4x MLP in stage 2
    assert G.default_layer(model).kind == "spatial"


@pytest.mark.parametrize("name,exporter", CASES)
def test_zoo_cut_body_then_head_is_the_model(name, exporter, zoo_loaded):
    model = zoo_loaded(name, exporter)
    layers = G.candidate_layers(model)
    x = zoo.example_input(name, 3, seed=5).numpy()
    full = _run(model, {"input": x})["logits"]
    for layer in {G.default_layer(model).name, layers[len(layers) // 3].name}:
        body, head = G.cut(model, layer)
        onnx.checker.check_model(body)
        onnx.checker.check_model(head)
        assert body.graph.output[0].name == layer and head.graph.input[0].name == layer
        assert [o.name for o in body.graph.output] == [i.name for i in head.graph.input]
        assert [i.name for i in body.graph.input] == ["input"] and [o.name for o in head.graph.output] == ["logits"]
        mid = _run(body, {"input": x})
        out = _run(head, mid)["logits"]
        np.testing.assert_allclose(out, full, rtol=1e-5, atol=1e-5)


def test_cut_returns_bypassing_tensors(zoo_loaded):
    """ViT default layer = last norm1: the residual stream bypasses it, so the head needs it too."""
    model = zoo_loaded("vit", "legacy")
    body, head = G.cut(model, G.default_layer(model).name)
    assert len(head.graph.input) == 2
    model = zoo_loaded("resnet", "legacy")
    body, head = G.cut(model, G.default_layer(model).name)
    assert len(head.graph.input) == 1  # the last map separates the graph


def test_cut_and_expose_reject_unknown_tensors(zoo_loaded):
    model = zoo_loaded("resnet", "dynamo")
    with pytest.raises(ValueError, match="not a tensor"):
        G.cut(model, "no_such_tensor")
    with pytest.raises(ValueError, match="not in the graph"):
        G.expose(model, ["no_such_tensor"])


def test_expose_adds_typed_outputs_and_keeps_the_model(zoo_loaded):
    model = zoo_loaded("densenet", "legacy")
    layers = G.candidate_layers(model)
    names = [layers[0].name, layers[-1].name]
    exposed = G.expose(model, names + ["logits"])  # an existing output is not duplicated
    assert [o.name for o in exposed.graph.output] == ["logits", *names]
    for o in exposed.graph.output[1:]:
        dims = [d.dim_value or None for d in o.type.tensor_type.shape.dim]
        assert o.type.tensor_type.elem_type == TensorProto.FLOAT and len(dims) == 4 and dims[1:] != [None] * 3
    assert len(model.graph.output) == 1  # input model untouched
    onnx.checker.check_model(exposed)
    out = _run(exposed, {"input": zoo.example_input("densenet", 1).numpy()})
    assert out[names[-1]].shape == (1, 44, 16, 16)


# --------------------------------------------------------------------------------- shared EfficientNet


@needs_shared
def test_efficientnet_layers_and_default():
    model = G.load_model(str(EFFNET))
    assert G.input_spec(model) == ("input", (None, 3, 224, 224), "NCHW")
    assert G.score_tensor(model) == "logits"
    layers = G.candidate_layers(model)
    assert all(l.kind == "spatial" for l in layers)
    default = G.default_layer(model)
    assert default.shape == (None, 1280, 7, 7) and default.grid == (7, 7) and default.op_type == "Clip"
    assert default == layers[-1]
    gi = G._Graph(model)
    assert [n.op_type for n in gi.consumers[default.name]] == ["GlobalAveragePool"]
    # Conv -> Clip: the Clip output is listed, never the Conv output it replaces
    for l in layers:
        users = gi.consumers[l.name]
        assert not (len(users) == 1 and users[0].op_type == "Clip"), l.name
    assert {l.grid for l in layers} == {(112, 112), (56, 56), (28, 28), (14, 14), (7, 7)}


@needs_shared
def test_efficientnet_cut_at_default():
    model = G.load_model(EFFNET.read_bytes())
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    body, head = G.cut(model, G.default_layer(model).name)
    mid = _run(body, {"input": x})
    assert mid[G.default_layer(model).name].shape == (2, 1280, 7, 7)
    np.testing.assert_allclose(_run(head, mid)["logits"], _run(model, {"input": x})["logits"], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------- hand-built graphs


def test_nhwc_graph_layout_layers_and_scores():
    model = G.load_model(nhwc_model().SerializeToString())
    assert G.input_spec(model) == ("input", (None, 24, 32, 3), "NHWC")
    assert G.score_tensor(model) == "logits"
    layers = G.candidate_layers(model)
    assert [(l.name, l.kind, l.grid) for l in layers] == [
        ("r1", "spatial", (24, 32)), ("c2", "spatial", (12, 16)), ("r2_nhwc", "spatial_nhwc", (12, 16))]
    assert layers[2].shape == (None, 12, 16, 16) and layers[2].op_type == "Relu"
    assert G.default_layer(model).name == "r2_nhwc"
    body, head = G.cut(model, "r2_nhwc")
    x = np.random.default_rng(1).standard_normal((2, 24, 32, 3)).astype(np.float32)
    ref = _run(G.expose(model, ["logits"]), {"input": x})["logits"]
    np.testing.assert_allclose(_run(head, _run(body, {"input": x}))["logits"], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("final", ["Softmax", "LogSoftmax", "Identity"])
def test_score_tensor_skips_softmax(final):
    model = nhwc_model(final)
    if final == "Identity":
        model.graph.node[-1].ClearField("attribute")
    assert G.score_tensor(model) == ("logits" if final != "Identity" else "probs")
    model.graph.node.pop()
    model.graph.output[0].name = "logits"
    assert G.score_tensor(model) == "logits"


def test_score_tensor_is_the_first_float_output():
    """A model that outputs its predicted label (int64) before its probabilities is explained on the logits."""
    model = nhwc_model("Softmax")
    model.graph.node.append(helper.make_node("ArgMax", ["probs"], ["label"], axis=1, keepdims=0))
    model.graph.output.insert(0, helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]))
    assert G.score_tensor(model) == "logits"


def test_a_float16_input_is_refused_naming_it():
    model = nhwc_model()
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    with pytest.raises(ValueError, match=r"input 'input' is float16; onnxplain feeds images as float32"):
        G.input_spec(model)


def test_a_half_precision_model_gets_a_float32_boundary():
    """float16 input and outputs (one of them also read inside, by a Softmax): load_model gives the model a float32
    input and float32 outputs under the same names, with Casts, and gives what the float16 model gives (within
    half precision: onnxruntime's CPU provider runs float16 ReduceMean and Softmax in float32 by Casts of its own,
    and drops a Cast pair, so the float32 input is not rounded first)."""
    import onnxruntime as ort

    nodes = [helper.make_node("Relu", ["input"], ["r"]),
             helper.make_node("ReduceMean", ["r", "axes"], ["logits"], keepdims=0),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=1)]
    graph = helper.make_graph(
        nodes, "half", [helper.make_tensor_value_info("input", TensorProto.FLOAT16, ["N", 3, 4, 5])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["N", 3]),
         helper.make_tensor_value_info("probs", TensorProto.FLOAT16, ["N", 3])],
        [numpy_helper.from_array(np.asarray([2, 3], np.int64), "axes")])
    half = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model = G.load_model(half.SerializeToString())
    types = {vi.name: vi.type.tensor_type.elem_type for vi in (*model.graph.input, *model.graph.output)}
    assert types == {"input": TensorProto.FLOAT, "logits": TensorProto.FLOAT, "probs": TensorProto.FLOAT}
    assert G.input_spec(model)[0] == "input" and G.score_tensor(model) == "logits"
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)

    def run(m, feed):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    got, want = run(model, {"input": x}), run(half, {"input": x.astype(np.float16)})
    for g, w in zip(got, want):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, w.astype(np.float32), rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_a_group_norm_written_as_reshapes_keeps_its_map(exporter):
    """Exporters write GroupNorm as Reshape [N, G, -1] -> InstanceNormalization -> Reshape back: the map after it
    (and its ReLU) is the same layer layout as the convolution's, so the default layer is the last ReLU (it was
    the last convolution's raw output, before normalisation and ReLU)."""
    import contextlib
    import io

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, 2, 1)
            self.norm = torch.nn.GroupNorm(2, 8)
            self.fc = torch.nn.Linear(8, 5)

        def forward(self, x):
            return self.fc(torch.relu(self.norm(self.conv(x))).mean((2, 3)))

    x = torch.zeros(1, 3, 16, 24)
    with contextlib.redirect_stdout(io.StringIO()):
        if exporter == "legacy":
            buffer = io.BytesIO()
            torch.onnx.export(Net().eval(), (x,), buffer, dynamo=False, opset_version=17, input_names=["input"],
                              dynamic_axes={"input": {0: "n"}})
            model = onnx.load_from_string(buffer.getvalue())
        else:
            model = torch.onnx.export(Net().eval(), (x,), dynamo=True, input_names=["input"], opset_version=18,
                                      dynamic_shapes={"x": {0: torch.export.Dim("n")}}).model_proto
    model = G.load_model(model)
    assert any(n.op_type == "InstanceNormalization" for n in model.graph.node)   # the written-out form
    default = G.default_layer(model)
    assert default.op_type == "Relu" and default.grid == (8, 12) and default.kind == "spatial"


def test_vit_without_position_embedding_fixed_batch_finds_its_token_layers():
    """With a fixed batch, the legacy exporter writes cls_token.expand(batch, -1, -1) and torch's
    MultiheadAttention shapes with Equal and Where: folding them gives the token count, so the layers after the
    CLS concat are found (the default was the patch tokens before any attention)."""
    import io

    class ViT(torch.nn.Module):
        def __init__(self, d=16):
            super().__init__()
            torch.manual_seed(0)
            self.pe, self.cls = torch.nn.Conv2d(3, d, 8, 8), torch.nn.Parameter(torch.randn(1, 1, d))
            self.ln1, self.attn = torch.nn.LayerNorm(d), torch.nn.MultiheadAttention(d, 2, batch_first=True)
            self.ln, self.head = torch.nn.LayerNorm(d), torch.nn.Linear(d, 5)

        def forward(self, x):
            t = self.pe(x).flatten(2).transpose(1, 2)
            t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1)
            h = self.ln1(t)
            t = t + self.attn(h, h, h, need_weights=False)[0]
            return self.head(self.ln(t)[:, 0])

    buffer = io.BytesIO()
    torch.onnx.export(ViT().eval(), torch.zeros(1, 3, 32, 64), buffer, dynamo=False, opset_version=17,
                      input_names=["input"])
    model = G.load_model(buffer.getvalue())
    assert any(n.op_type == "Where" for n in model.graph.node)
    default = G.default_layer(model)
    assert (default.kind, default.grid, default.prefix_tokens, default.op_type) == ("tokens", (4, 8), 1,
                                                                                   "LayerNormalization")


def test_layout_detection_from_shape():
    assert G._layout_of((None, 3, 224, 224)) == "NCHW"
    assert G._layout_of((None, 1, 28, 28)) == "NCHW"
    assert G._layout_of((None, 224, 224, 3)) == "NHWC"
    assert G._layout_of((1, None, None, 3)) == "NHWC"


# ---------------------------------------------------------------------------------------------- errors


def test_corrupt_and_oversized_models_are_rejected(tmp_path, zoo_model):
    good = Path(zoo_model("resnet", "legacy")).read_bytes()
    with pytest.raises(ValueError, match="not a valid ONNX model"):
        G.load_model(b"\x00\xffthis is no protobuf" * 10)
    with pytest.raises(ValueError, match="not a valid ONNX model|no nodes|checker"):
        G.load_model(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"more than the allowed 1000 bytes"):
        G.load_model(good, max_bytes=1000)
    p = tmp_path / "m.onnx"
    p.write_bytes(good)
    with pytest.raises(ValueError, match=r"m\.onnx.*more than the allowed 1000 bytes"):
        G.load_model(str(p), max_bytes=1000)
    assert G.load_model(p, max_bytes=len(good)).graph.node
    with pytest.raises(ValueError, match="does not exist"):
        G.load_model(str(tmp_path / "missing.onnx"))
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        G.load_model(tmp_path / "empty.onnx")
    with pytest.raises(ValueError, match="empty"):
        G.load_model(b"")


def test_checker_failure_and_non_float_input_are_rejected():
    bad = nhwc_model()
    bad.graph.node[2].input[1] = "undefined_weight"
    with pytest.raises(ValueError, match="checker"):
        G.load_model(bad.SerializeToString())
    ints = helper.make_model(helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["y"], to=TensorProto.FLOAT)], "ids",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])]), opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ValueError, match=r"no floating-point input.*ids \(int64\)"):
        G.load_model(ints)


def test_layer_is_frozen():
    layer = G.Layer("t", (None, 8, 4, 4), "spatial", (4, 4))
    with pytest.raises(dataclasses.FrozenInstanceError):
        layer.name = "u"
    assert layer.prefix_tokens == 0 and layer.op_type == ""


# ------------------------------------------------------------------------------- constants before shapes


def test_layers_behind_a_reflect_pad_with_computed_pads(tmp_path):
    """PyTorch's legacy exporter computes a reflect Pad's pads (ConstantOfShape, Concat, Reshape, Slice,
    Transpose, Cast), which ONNX data propagation does not follow: every spatial size after it was unknown and
    no layer was found. load_model folds that constant arithmetic before inferring shapes; the model that runs
    keeps its nodes, and its input and layer gradients match torch autograd."""
    from onnxplain.kernels.autodiff import augment

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    path = tmp_path / "reflect.onnx"
    torch.onnx.export(net, torch.zeros(1, 3, 16, 16), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "b"}, "logits": {0: "b"}})
    raw = onnx.load(str(path))
    constants = {t.name for t in raw.graph.initializer}
    pads = [n for n in raw.graph.node if n.op_type == "Pad"]
    assert pads and all(n.input[1] not in constants for n in pads)     # the case in question: computed pads
    bare = onnx.shape_inference.infer_shapes(raw, data_prop=True)
    assert all(not any(d.dim_value for d in v.type.tensor_type.shape.dim[2:])
               for v in bare.graph.value_info if v.name.endswith("Relu_output_0"))   # what shape inference alone gives

    model = G.load_model(str(path))
    assert [n.op_type for n in model.graph.node] == [n.op_type for n in raw.graph.node]
    relus = [layer for layer in G.candidate_layers(model) if layer.op_type == "Relu"]
    assert [(layer.shape, layer.kind) for layer in relus] == [((None, 8, 16, 16), "spatial")] * 2
    # the padded maps (18 x 18: the map and a border) are not layers: a map is upsampled over the whole image
    assert [layer.grid for layer in G.candidate_layers(model)] == [(16, 16)] * 2
    layer = G.default_layer(model)
    assert layer.name == relus[-1].name

    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    seed = torch.randn(2, 4)
    acts = {}
    net[3].register_forward_hook(lambda m, i, o: acts.update(a=o))
    (net(x) * seed).sum().backward(inputs=[x])
    x_grad = x.grad.numpy()
    x.grad = None
    net(x)
    layer_grad = torch.autograd.grad((net[4:](acts["a"]) * seed).sum(), acts["a"])[0].numpy()
    out = _run(augment(model, [layer.name]), {"input": x.detach().numpy(), "seed": seed.numpy()})
    assert _rel(out["input__grad"], x_grad) < 1e-4
    assert _rel(out[f"{layer.name}__grad"], layer_grad) < 1e-4


def test_constant_folding_does_not_build_huge_tensors():
    """A hostile file asking ConstantOfShape for 10^10 elements on a constant path: loading neither evaluates it
    nor takes long."""
    import time

    zero = helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])
    big = helper.make_node("ConstantOfShape", ["shape"], ["big"], value=zero)
    picked = helper.make_node("Slice", ["big", "zero", "one"], ["small"])
    add = helper.make_node("Add", ["x", "small"], ["y"])
    g = helper.make_graph([big, picked, add], "hostile",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.array([100_000, 100_000], np.int64), "shape"),
                           numpy_helper.from_array(np.array([0, 0], np.int64), "zero"),
                           numpy_helper.from_array(np.array([1, 1], np.int64), "one")])
    start = time.perf_counter()
    G.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert time.perf_counter() - start < 2.0
    assert G._fold_constants(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])) is None
