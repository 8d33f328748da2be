"""Layer discovery on shapes that torch's exporters compute in the graph (test-time torch exports).

* a GroupNorm net from the legacy exporter at opset 13: GroupNorm is Reshape -> InstanceNormalization -> Reshape
  whose shape is Shape(conv output); Reshape-13 does not read data-propagated shapes, so that Shape must be folded
  (with a dynamic batch too, where the conv output's batch is symbolic).
* a ViT without position embedding (CLS token, MultiheadAttention, head on the CLS token) from the legacy
  exporter with a dynamic batch: flatten(2) is a Reshape to [N, 16, -1] with a symbolic N, whose -1 ONNX shape
  inference leaves unknown, and with it the token count of every later tensor.

Each is checked for its candidate layers, its default layer and, through kernels.autodiff.augment, for layer
and input gradients equal to torch autograd's; the dynamo exporter's versions of both nets alongside. Models are
exported once per module.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import zoo
from onnxplain.kernels import graph as G
from onnxplain.kernels.autodiff import augment

TOL = 1e-4


class GroupNormNet(nn.Module):
    """conv -> GroupNorm -> ReLU twice: the second GroupNorm's Shape is known only once the first is resolved."""

    input_shape = (3, 16, 24)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.norm1, self.relu1 = nn.Conv2d(3, 8, 3, 2, 1), nn.GroupNorm(2, 8), nn.ReLU()
        self.conv2, self.norm2, self.relu2 = nn.Conv2d(8, 8, 3, 1, 1), nn.GroupNorm(4, 8), nn.ReLU()
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():   # affine parameters that are not the identity
            for norm in (self.norm1, self.norm2):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        x = self.relu1(self.norm1(self.conv1(x)))
        x = self.relu2(self.norm2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))

    @property
    def probes(self):
        return {"early": self.relu1, "default": self.relu2}


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln2, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.out = nn.Identity()

    def forward(self, t):
        h = self.ln1(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        return self.out(t + self.mlp(self.ln2(t)))


class TokenNet(nn.Module):
    """Patch-embedding Conv (8x8 patches of 32x32: a 4x4 grid), CLS token, two attention blocks, no position
    embedding (nothing with a static token count is added to the tokens), head on the CLS token."""

    input_shape = (3, 32, 32)

    def __init__(self, d=16):
        super().__init__()
        torch.manual_seed(0)
        self.pe, self.cls = nn.Conv2d(3, d, 8, 8), nn.Parameter(torch.randn(1, 1, d))
        self.blocks = nn.Sequential(Block(d), Block(d))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, 5)

    def forward(self, x):
        t = self.pe(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1)
        return self.head(self.ln(self.blocks(t))[:, 0])

    @property
    def probes(self):
        # CLS pooling: after the last attention only the CLS token reaches the scores (see graph's docstring)
        return {"early": self.blocks[0].out, "default": self.blocks[-1].ln1}


class ShiftNet(nn.Module):
    """Maps that are not the image in place: a rolled map (torch.roll: Slices joined by a Concat), a convolution of
    it (shifted too), a crop; and maps that are: the roll undone, a strided subsample starting within its first
    step (Swin's patch merging)."""

    input_shape = (3, 8, 12)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.c3, self.c4, self.fc = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), nn.Linear(16, 5)

    def parts(self, x):
        y = torch.relu(self.c1(x))
        rolled = torch.roll(y, (2, -3), (2, 3))
        z = torch.relu(self.c2(rolled))
        back = torch.roll(z, (-2, 3), (2, 3))
        crop = torch.relu(self.c3(back[:, :, 1:-1, 2:]))
        sub = torch.relu(self.c4(back[:, :, 1::2, ::2]))
        return {"y": y, "rolled": rolled, "z": z, "back": back, "crop": crop, "sub": sub}

    def forward(self, x):
        p = self.parts(x)
        return self.fc(torch.cat([p["crop"].mean((2, 3)), p["sub"].mean((2, 3))], 1))


NETS = {"groupnorm": GroupNormNet, "tokens": TokenNet, "shift": ShiftNet}
# (exporter, opset, dynamic batch)
EXPORTS = {
    "legacy-13-batch": ("legacy", 13, True),
    "legacy-13-fixed": ("legacy", 13, False),
    "legacy-14-batch": ("legacy", 14, True),   # LayerNorm written out (ReduceMean, Sub, Pow, ..., Div)
    "legacy-17-batch": ("legacy", 17, True),
    "dynamo-18-batch": ("dynamo", 18, True),
}
BATCH = 2


def _export(net: nn.Module, how: str) -> onnx.ModelProto:
    exporter, opset, dynamic = EXPORTS[how]
    x = torch.zeros(BATCH, *net.input_shape)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            buffer = io.BytesIO()
            torch.onnx.export(net, (x,), buffer, dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=["logits"],
                              dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}} if dynamic else None)
            return onnx.load_from_string(buffer.getvalue())
        shapes = {"x": {0: torch.export.Dim("n", min=1, max=64)}} if dynamic else None
        return torch.onnx.export(net, (x,), dynamo=True, opset_version=opset, input_names=["input"],
                                 output_names=["logits"], dynamic_shapes=shapes, verbose=False).model_proto


@pytest.fixture(scope="module")
def exported():
    """(net name, export) -> (torch net, loaded ONNX model), each exported once for the module."""
    cache = {}

    def get(name, how):
        if (name, how) not in cache:
            net = NETS[name]().eval()
            cache[name, how] = net, G.load_model(_export(net, how))
        return cache[name, how]

    return get


def _run(model, feeds) -> dict:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    s = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _check_gradients(net, model, layers):
    """The torch probes are candidate layers (found by value), `default_layer` is the default probe, and the
    augmented graph's layer and input gradients equal torch autograd's."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(BATCH, *net.input_shape, generator=gen)
    seed = torch.randn(BATCH, 5, generator=gen)
    ref = zoo.run_with_probes(net, x, seed)
    out = _run(G.expose(model, [l.name for l in layers]), {"input": x.numpy()})
    where = {}
    for probe, value in ref["acts"].items():
        hits = [l.name for l in layers if out[l.name].shape == value.shape and _rel(out[l.name], value) < TOL]
        assert hits, f"the torch probe {probe!r} is not among the candidate layers {[l.name for l in layers]}"
        where[probe] = hits[0]
    assert G.default_layer(model).name == where["default"]

    aug = augment(model, layers=[where["early"], where["default"]], wrt_input=True)
    got = _run(aug, {"input": x.numpy(), "seed": seed.numpy()})
    errors = {probe: _rel(got[f"{where[probe]}__grad"], ref["grads"][probe]) for probe in where}
    errors["input"] = _rel(got["input__grad"], ref["input_grad"])
    assert all(e <= TOL for e in errors.values()), f"relative gradient errors: {errors}"


# ------------------------------------------------------------------------------------------------ GroupNorm


@pytest.mark.parametrize("how", ["legacy-13-batch", "legacy-13-fixed", "dynamo-18-batch"])
def test_group_norm_maps_are_found_after_the_norm(how, exported):
    """Every map after the GroupNorms is listed with its grid (at opset 13 every shape after the first GroupNorm
    was unknown: only the first convolution was listed, and it was the default layer)."""
    _, model = exported("groupnorm", how)
    if how.startswith("legacy-13"):
        reshapes = [n for n in model.graph.node if n.op_type == "Reshape"]
        shapes = {n.output[0] for n in model.graph.node if n.op_type == "Shape"}
        assert any(n.input[1] in shapes for n in reshapes)     # the case in question: Reshape(x, Shape(conv))
    batch = None if how.endswith("batch") else BATCH
    layers = G.candidate_layers(model)
    relus = [l for l in layers if l.op_type == "Relu"]
    assert [(l.shape, l.kind, l.grid) for l in relus] == [((batch, 8, 8, 12), "spatial", (8, 12))] * 2
    assert G.default_layer(model) == relus[-1]


@pytest.mark.parametrize("how", ["legacy-13-batch", "legacy-13-fixed", "dynamo-18-batch"])
def test_group_norm_gradients_match_autograd(how, exported):
    net, model = exported("groupnorm", how)
    _check_gradients(net, model, G.candidate_layers(model))


# --------------------------------------------------------------------------------------------------- tokens


@pytest.mark.parametrize("how", ["legacy-17-batch", "dynamo-18-batch"])
def test_token_layers_are_found_with_a_symbolic_batch(how, exported):
    """The token tensors after the CLS concat are listed as a 4x4 grid with 1 prefix token, and the default layer
    is the last block's first LayerNorm (the token count was unknown: only the patch-embedding Conv was listed)."""
    _, model = exported("tokens", how)
    if how.startswith("legacy"):
        gi = G._Graph(model)
        flatten = next(n for n in model.graph.node if n.op_type == "Reshape")
        assert gi.const(flatten.input[1]) is None      # the case in question: the target [N, 16, -1] is computed
    layers = G.candidate_layers(model)
    tokens = [l for l in layers if l.kind == "tokens"]
    with_cls = [l for l in tokens if l.shape[1] == 17]
    assert len(with_cls) >= 6, tokens       # per block at least its first LayerNorm, residual sum and output
    assert all(l.shape == (None, 17, 16) and l.grid == (4, 4) and l.prefix_tokens == 1 for l in with_cls)
    assert all(l.grid == (4, 4) and l.prefix_tokens == 0 for l in tokens if l not in with_cls)
    default = G.default_layer(model)
    assert (default.kind, default.shape, default.grid, default.prefix_tokens, default.op_type) == (
        "tokens", (None, 17, 16), (4, 4), 1, "LayerNormalization")
    assert default.name == [l.name for l in with_cls if l.op_type == "LayerNormalization"][2]   # block 2's ln1


@pytest.mark.parametrize("how", ["legacy-14-batch", "legacy-17-batch", "dynamo-18-batch"])
def test_token_gradients_match_autograd(how, exported):
    """(Below opset 17 a LayerNorm is written out; its statistics are per-token reductions over the channels, so
    the final LayerNorm before the CLS head reaches only the CLS token: the default was its Pow.)"""
    net, model = exported("tokens", how)
    _check_gradients(net, model, G.candidate_layers(model))


@pytest.mark.parametrize("how", ["legacy-17-batch", "dynamo-18-batch"])
def test_shifted_and_cropped_maps_are_not_layers(how, exported):
    """A layer's map is upsampled over the whole image, so it must show the image in place: a rolled map, what is
    computed from it before the roll is undone, a crop and the pieces a roll is made of are not listed; the roll
    undone and a strided subsample are."""
    net, model = exported("shift", how)
    layers = G.candidate_layers(model)
    x = torch.randn(BATCH, *net.input_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        parts = {k: v.numpy() for k, v in net.parts(x).items()}
    out = _run(G.expose(model, [l.name for l in layers]), {"input": x.numpy()})
    listed = [out[l.name] for l in layers]

    def found(ref):
        return any(v.shape == ref.shape and _rel(v, ref) < 1e-5 for v in listed)

    assert all(found(parts[k]) for k in ("y", "back", "sub")), [l.name for l in layers]
    assert not any(found(parts[k]) for k in ("rolled", "z", "crop")), [l.name for l in layers]
    assert {l.grid for l in layers} == {(8, 12), (4, 6)}, [(l.name, l.grid) for l in layers]
    assert G.default_layer(model).grid == (4, 6)


# ------------------------------------------------------------------------------------------------- folding


def test_shape_and_size_of_a_tensor_with_a_static_shape_fold():
    """Shape (with start/end, counted from the back when negative and clamped) and Size of a computed tensor
    whose shape is known fold to constants; without it they stay."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Shape", ["r"], ["all"]),
             helper.make_node("Shape", ["r"], ["middle"], start=1, end=-1),
             helper.make_node("Shape", ["r"], ["clamped"], start=-9, end=9),
             helper.make_node("Size", ["r"], ["size"])]
    g = helper.make_graph(nodes, "shapes", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 5])],
                          [helper.make_tensor_value_info(o, TensorProto.INT64, None)
                           for o in ("all", "middle", "clamped", "size")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    assert G._fold_constants(model) is None
    folded = G._fold_constants(model, {"r": (2, 3, 4, 5)})
    values = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in folded.graph.initializer}
    assert values == {"all": [2, 3, 4, 5], "middle": [3, 4], "clamped": [2, 3, 4, 5], "size": 120}
    assert [n.op_type for n in folded.graph.node] == ["Relu"]


def test_a_symbolic_batch_keeps_the_dimensions_that_do_not_depend_on_it():
    """x: N x 16 x 4 x 4. Reshape to [N, 16, -1] (N from Shape) is N x 16 x 16 with N still the batch; Reshape to
    [-1, 16] is (16 N) x 16, whose first dimension is neither a number nor the batch."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Shape", ["x"], ["n"], end=1),
             helper.make_node("Concat", ["n", "rest"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["tokens"]),
             helper.make_node("Reshape", ["x", "rows_shape"], ["rows"]),
             helper.make_node("Relu", ["tokens"], ["a"]),
             helper.make_node("Relu", ["rows"], ["b"])]
    g = helper.make_graph(nodes, "batch", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 4, 4])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("a", "b")],
                          [numpy_helper.from_array(np.array([16, -1], np.int64), "rest"),
                           numpy_helper.from_array(np.array([-1, 16], np.int64), "rows_shape")])
    model = G.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    shapes = {v.name: v.type.tensor_type.shape.dim for v in model.graph.value_info}
    assert [d.dim_value for d in shapes["tokens"][1:]] == [16, 16] and shapes["tokens"][0].dim_param == "N"
    assert shapes["rows"][1].dim_value == 16
    assert not shapes["rows"][0].HasField("dim_value") and shapes["rows"][0].dim_param != "N"


def test_a_dimension_computed_from_the_batch_is_not_taken_for_a_number():
    """x: N x 16 x 4 x 4 reshaped to [N // 2, -1]: the first dimension is 1 at batch 2 and at batch 3, and 3 at
    batch 7; it depends on the batch, so it must stay unknown (with two probe sizes it was recorded as 1)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Shape", ["x"], ["n"], end=1),
             helper.make_node("Div", ["n", "two"], ["half"]),
             helper.make_node("Concat", ["half", "rest"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["pairs"]),
             helper.make_node("Relu", ["pairs"], ["y"])]
    g = helper.make_graph(nodes, "half", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.array([2], np.int64), "two"),
                           numpy_helper.from_array(np.array([-1], np.int64), "rest")])
    model = G.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    dims = {v.name: v.type.tensor_type.shape.dim for v in model.graph.value_info}.get("pairs")
    assert dims is None or not any(d.HasField("dim_value") for d in dims), dims
