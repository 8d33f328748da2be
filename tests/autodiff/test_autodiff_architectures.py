"""Architecture families beyond the zoo and the tiny nets (tests/architectures.py), exported by both torch
exporters: layer discovery finds the map or token grid a user would pick, and augment() with that layer gives the
model's logits and an input gradient equal to torch autograd's, at a batch size the export never saw, with a
different seed row per sample. Also on older opsets than the issue asks for (9 and 11, legacy exporter), as models
from older model zoos are written."""
import numpy as np
import pytest
import torch

from adcheck import assert_standard, rel, session
from architectures import NETS, export
from onnxplain.kernels import graph as G
from onnxplain.kernels.autodiff import augment

# net -> (kind, grid, prefix tokens) of the default layer
EXPECTED_LAYER = {
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
    "volo": ("spatial_nhwc", (4, 4), 0),         # the final LayerNorm's channels-last map
}
CASES = [(name, exporter, None) for name in NETS for exporter in ("legacy", "dynamo")] + [
    (name, "legacy", 9) for name in ("inception", "mixer", "convmixer", "poolformer", "efficientnet", "squeezenet")] + [
    (name, "legacy", 11) for name in ("resnext", "shufflenet")]   # their opset-9 exports fail (ceil-mode AvgPool
                                                                 # refused by onnxruntime; bilinear align_corners)


@pytest.mark.parametrize("name,exporter,opset", CASES, ids=[f"{n}-{e}{o or ''}" for n, e, o in CASES])
def test_default_layer_and_input_gradient_match_torch(name, exporter, opset):
    net, model = export(name, exporter, opset)
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
