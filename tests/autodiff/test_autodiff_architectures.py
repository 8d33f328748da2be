"""Architecture families beyond the tiny nets (tests/autodiff/architecture_nets.py), exported by both torch
exporters: layer discovery finds the map or token grid a user would pick, and augment() with that layer gives the
model's logits and an input gradient equal to torch autograd's, at a batch size the export never saw, with a
different seed row per sample."""
import contextlib
import io
import warnings

import numpy as np
import onnx
import pytest
import torch

from adcheck import assert_standard, rel, session
from architecture_nets import NETS
from onnxplain.kernels import graph as G
from onnxplain.kernels.autodiff import augment

# net -> (kind, grid, prefix tokens) of the default layer
EXPECTED_LAYER = {
    "swin": ("spatial_nhwc", (8, 8), 0),          # the last residual sum of the N x H x W x C stages
    "resnext": ("spatial", (3, 3), 0),           # ceil-mode pools: 16 -> 8 -> 5 -> 3
    "inception": ("spatial", (2, 2), 0),          # the last spatial map: the adaptive pool's output
    "mixer": ("tokens", (4, 4), 0),
    "convmixer": ("spatial", (8, 8), 0),
    "poolformer": ("spatial", (8, 8), 0),
    "efficientnet": ("spatial", (4, 4), 0),
    "deit": ("tokens", (4, 4), 2),                # class and distillation tokens before the 4 x 4 patches
    "shufflenet": ("spatial", (2, 2), 0),
    "squeezenet": ("spatial", (3, 3), 0),
    "einsum_attention": ("tokens", (4, 4), 0),
}
CASES = [(name, exporter) for name in NETS for exporter in ("legacy", "dynamo")]


@pytest.fixture(scope="module")
def exported():
    cache = {}

    def get(name, exporter):
        if (name, exporter) not in cache:
            torch.manual_seed(0)
            net = NETS[name]().eval()
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):          # non-trivial running statistics
                    m.running_mean.normal_()
                    m.running_var.uniform_(0.5, 2)
            x = torch.randn(2, 3, 16, 16)
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                if exporter == "dynamo":
                    model = torch.onnx.export(net, (x,), dynamo=True, input_names=["x"], opset_version=18,
                                              dynamic_shapes={"x": {0: torch.export.Dim("N")}}).model_proto
                else:
                    f = io.BytesIO()
                    torch.onnx.export(net, (x,), f, dynamo=False, opset_version=17, input_names=["x"],
                                      output_names=["logits"], dynamic_axes={"x": {0: "N"}})
                    model = onnx.load_from_string(f.getvalue())
            cache[name, exporter] = net, G.load_model(model.SerializeToString())
        return cache[name, exporter]
    return get


@pytest.mark.parametrize("name,exporter", CASES, ids=[f"{n}-{e}" for n, e in CASES])
def test_default_layer_and_input_gradient_match_torch(exported, name, exporter):
    net, model = exported(name, exporter)
    layer = G.default_layer(model)
    assert (layer.kind, layer.grid, layer.prefix_tokens) == EXPECTED_LAYER[name], layer

    scores = model.graph.output[0].name
    aug = augment(model, layers=[layer.name], scores=scores)
    assert_standard(aug)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 3, 16, 16)).astype(np.float32)
    seed = rng.standard_normal((3, 5)).astype(np.float32)
    inp = model.graph.input[0].name
    logits, act, act_grad, grad = session(aug).run(
        [scores, layer.name, f"{layer.name}__grad", f"{inp}__grad"], {inp: x, "seed": seed})

    xt = torch.from_numpy(x).requires_grad_()
    out = net(xt)
    (out * torch.from_numpy(seed)).sum().backward()
    np.testing.assert_allclose(logits, out.detach().numpy(), rtol=1e-4, atol=1e-5)
    assert rel(grad, xt.grad.numpy()) < 1e-4
    # each sample's layer gradient comes from its own seed row only
    assert act.shape[0] == act_grad.shape[0] == 3 and np.all(np.isfinite(act_grad))
    one = session(aug).run([f"{layer.name}__grad"], {inp: x[1:2], "seed": seed[1:2]})[0]
    assert rel(act_grad[1:2], one) < 1e-5
