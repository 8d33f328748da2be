"""augment() on tiny nets exported by both torch exporters, against torch autograd (and captum)."""
import contextlib
import io

import numpy as np
import onnx
import pytest
import torch

from adcheck import assert_standard, rel, session
from onnxplain.kernels.autodiff import augment
from autodiff_tiny_nets import NETS, STNS

torch.set_num_threads(1)

EXPORTS = [(name, "legacy", 13) for name in NETS if name not in ("vit", "sdpa_vit", "gfnet", *STNS)] + [
    ("vit", "legacy", 14), ("vit", "legacy", 17)] + [(name, "dynamo", 18) for name in NETS] + [
    ("sdpa_vit", "dynamo", 23),    # ONNX Attention and RMSNormalization
    ("gfnet", "dynamo", 20)]       # DFT with its axis as an input (at 18: opset 17's, the axis an attribute)
# Spatial transformers: the legacy exporter writes F.affine_grid as AffineGrid (opset 20; below it refuses it, so
# stn_border builds its grid by hand) and F.grid_sample as GridSample; dynamo writes GridSample (opset 16's at 18,
# opset 20's at 20) and affine_grid as elementwise arithmetic.
STN_EXPORTS = [("stn", "legacy", 20), ("stn", "dynamo", 20), ("stn_reflect", "legacy", 20),
               ("stn_reflect", "dynamo", 20), ("stn_border", "legacy", 16), ("stn_border", "legacy", 17),
               ("stn_nearest", "legacy", 20)]
EXPORTS += STN_EXPORTS


def make_net(name):
    torch.manual_seed(0)
    net = NETS[name]().eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial running statistics
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    return net


_CACHE = {}


def export(name, exporter, opset):
    key = (name, exporter, opset)
    if key not in _CACHE:
        net = make_net(name)
        x = torch.randn(2, 3, 16, 16)
        if exporter == "dynamo":
            with contextlib.redirect_stdout(io.StringIO()):
                prog = torch.onnx.export(net, (x,), dynamo=True, input_names=["x"], opset_version=opset,
                                         dynamic_shapes={"x": {0: torch.export.Dim("N")}})
            model = prog.model_proto
        else:
            f = io.BytesIO()
            torch.onnx.export(net, (x,), f, dynamo=False, opset_version=opset, input_names=["x"],
                              output_names=["logits"], dynamic_axes={"x": {0: "N"}})
            model = onnx.load_from_string(f.getvalue())
        _CACHE[key] = (net, model)
    return _CACHE[key]


def torch_grads(net, x, seed, layer_module=None):
    acts = {}
    if layer_module is not None:
        def keep(module, inputs, out):
            out.retain_grad()
            acts["a"] = out

        hook = layer_module.register_forward_hook(keep)
    xx = torch.from_numpy(x).requires_grad_()
    (net(xx) * torch.from_numpy(seed)).sum().backward()
    if layer_module is not None:
        hook.remove()
        return xx.grad.numpy(), acts["a"].detach().numpy(), acts["a"].grad.numpy()
    return xx.grad.numpy(), None, None


@pytest.mark.parametrize("name,exporter,opset", EXPORTS, ids=[f"{n}-{e}-{o}" for n, e, o in EXPORTS])
def test_input_gradient_matches_torch(name, exporter, opset):
    net, model = export(name, exporter, opset)
    aug = augment(model, scores=model.graph.output[0].name)
    assert_standard(aug)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 3, 16, 16)).astype(np.float32)  # a batch size the export never saw
    seed = rng.standard_normal((3, 5)).astype(np.float32)
    inp = model.graph.input[0].name
    logits, grad = session(aug).run([model.graph.output[0].name, f"{inp}__grad"], {inp: x, "seed": seed})
    want, _, _ = torch_grads(net, x, seed)
    with torch.no_grad():
        np.testing.assert_allclose(logits, net(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)
    assert rel(grad, want) < 1e-4


def _layer_tensor(model, op_types):
    """Input of the last node of one of op_types: the final feature map before pooling."""
    return [n for n in model.graph.node if n.op_type in op_types][-1].input[0]


@pytest.mark.parametrize("exporter,opset", [("legacy", 13), ("dynamo", 18)])
def test_layer_gradient_matches_torch(exporter, opset):
    net, model = export("resnet", exporter, opset)
    layer = _layer_tensor(model, {"GlobalAveragePool", "ReduceMean"})
    aug = augment(model, layers=[layer], scores=model.graph.output[0].name)
    names = [o.name for o in aug.graph.output]
    assert names[-3:] == [layer, f"{layer}__grad", f"{model.graph.input[0].name}__grad"]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    seed = rng.standard_normal((2, 5)).astype(np.float32)
    act, gact, gx = session(aug).run(names[-3:], {model.graph.input[0].name: x, "seed": seed})
    want_x, want_act, want_gact = torch_grads(net, x, seed, net.layer)
    assert rel(act, want_act) < 1e-5
    assert rel(gact, want_gact) < 1e-5
    assert rel(gx, want_x) < 1e-4


STN_LAYER_CASES = [("stn", "legacy", 20), ("stn", "dynamo", 18), ("stn_reflect", "dynamo", 20),
                   ("stn_border", "legacy", 16), ("stn_nearest", "dynamo", 18)]


@pytest.mark.parametrize("name,exporter,opset", STN_LAYER_CASES, ids=[f"{n}-{e}-{o}" for n, e, o in STN_LAYER_CASES])
def test_spatial_transformer_layer_gradient_matches_torch(name, exporter, opset):
    """The feature map a spatial transformer warps, and the input, against torch autograd, with a different seed row per
    sample; the export holds the operators named above."""
    net, model = export(name, exporter, opset)
    ops = {n.op_type for n in model.graph.node}
    assert "GridSample" in ops and ("AffineGrid" in ops) == (exporter == "legacy" and not net.written)
    layer = next(n for n in model.graph.node if n.op_type == "GridSample").input[0]
    aug = augment(model, layers=[layer], scores=model.graph.output[0].name)
    assert_standard(aug)
    inp = model.graph.input[0].name
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    seed = rng.standard_normal((2, 5)).astype(np.float32)
    act, gact, gx = session(aug).run([layer, f"{layer}__grad", f"{inp}__grad"], {inp: x, "seed": seed})
    want_x, want_act, want_gact = torch_grads(net, x, seed, net.feat)
    assert rel(act, want_act) < 1e-5
    assert rel(gact, want_gact) < 1e-4
    assert rel(gx, want_x) < 1e-4


def test_layer_only_gradient_differentiates_only_below_the_layer():
    net, model = export("resnet", "legacy", 13)
    layer = _layer_tensor(model, {"GlobalAveragePool"})
    aug = augment(model, layers=[layer], wrt_input=False, scores="logits")
    assert [o.name for o in aug.graph.output] == ["logits", layer, f"{layer}__grad"]
    # Only the head (pool, flatten, gemm) is differentiated: no ConvTranspose for the body's convolutions.
    new_ops = [n.op_type for n in aug.graph.node[len(model.graph.node):]]
    assert "ConvTranspose" not in new_ops and "ScatterElements" not in new_ops


@pytest.mark.parametrize("variant", ["guided", "deconvnet"])
def test_guided_and_deconvnet_match_captum(variant):
    from captum.attr import Deconvolution, GuidedBackprop

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Conv2d(4, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    x = torch.randn(2, 2, 8, 8)
    f = io.BytesIO()
    torch.onnx.export(net, (x,), f, dynamo=False, opset_version=13, input_names=["x"], output_names=["y"])
    model = onnx.load_from_string(f.getvalue())
    aug = augment(model, rule=variant, scores="y")
    target = [2, 0]
    seed = np.eye(3, dtype=np.float32)[target]
    got = session(aug).run(["x__grad"], {"x": x.numpy(), "seed": seed})[0]
    method = GuidedBackprop(net) if variant == "guided" else Deconvolution(net)
    want = method.attribute(x, target=target).detach().numpy()
    assert rel(got, want) < 1e-5
    std = session(augment(model, scores="y")).run(["x__grad"], {"x": x.numpy(), "seed": seed})[0]
    assert rel(got, std) > 1e-2  # the variant really changes the backward
