"""A user-supplied gradient graph (kernels/supplied.py): checked at load, used by Runner.gradients for what it
covers. The story: a model with an operator the engine has no rule for (Det, from torch.linalg.det: a determinant of
each token's 2 x 2 matrix), whose owner exports the same network with the determinant written out (ad - bc) and lets
the engine differentiate that instead."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from onnxplain.kernels import autodiff
from onnxplain.kernels.runtime import Passes, Runner
from onnxplain.kernels.supplied import GradientGraphError, load


class Net(torch.nn.Module):
    def __init__(self, written_out: bool):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.embed = torch.nn.Conv2d(8, 2 * 4, 4, stride=4)   # per 4 x 4 block, a token: two 2 x 2 matrices
        self.fc = torch.nn.Linear(2, 5)
        self.written_out = written_out

    def forward(self, x):
        m = self.embed(torch.tanh(self.conv(x))).reshape(-1, 2, 2, 2, 16).permute(0, 1, 4, 2, 3)   # (N, 2, 16, 2, 2)
        if self.written_out:
            d = m[..., 0, 0] * m[..., 1, 1] - m[..., 0, 1] * m[..., 1, 0]
        else:
            d = torch.linalg.det(m)
        return self.fc((d * d.roll(1, 2)).mean(2))


def export(written_out: bool) -> onnx.ModelProto:
    buffer = io.BytesIO()   # the legacy exporter writes torch.linalg.det as Det
    torch.onnx.export(Net(written_out).eval(), torch.zeros(1, 3, 16, 16), buffer, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}}, dynamo=False,
                      opset_version=18)
    return onnx.load_from_string(buffer.getvalue())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    model, written = export(False), export(True)
    assert any(n.op_type == "Det" for n in model.graph.node)
    assert not any(n.op_type == "Det" for n in written.graph.node)
    path = tmp_path_factory.mktemp("supplied") / "grad.onnx"
    onnx.save(autodiff.augment(written, scores="logits"), path)
    return model, written, path


def torch_gradient(x, target):
    t = torch.tensor(x, requires_grad=True)
    Net(False).eval()(t)[:, target].sum().backward()
    return t.grad.numpy()


def test_the_engine_refuses_det_and_the_supplied_graph_gives_autograds_gradient(models):
    model, _, path = models
    runner = Runner(model, "logits", "input", providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    seed = np.zeros((2, 5), np.float32)
    seed[0, 1] = seed[1, 3] = 1
    with pytest.raises(Exception, match="'Det'"):
        runner.gradients(x, seed, Passes())
    runner.supplied.append(load(path, runner, (3, 16, 16)))
    passes = Passes()
    got = runner.gradients(x, seed, passes)["input__grad"]
    assert passes.backward_samples == 2
    for i, target in enumerate((1, 3)):
        expected = torch_gradient(x[i:i + 1], target)[0]
        np.testing.assert_allclose(got[i], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_requests_it_does_not_cover_still_go_to_the_engine(models):
    _, written, path = models
    runner = Runner(written, "logits", "input", providers=["CPUExecutionProvider"])
    graph = load(path, runner, (3, 16, 16))
    assert graph.covers((), "standard", True) and not graph.covers((), "guided", True)
    layer = next(n.output[0] for n in written.graph.node if n.op_type == "Conv")
    assert not graph.covers((layer,), "standard", True)
    runner.supplied.append(graph)
    x = np.ones((1, 3, 16, 16), np.float32)
    out = runner.gradients(x, np.eye(5, dtype=np.float32)[:1], Passes(), layers=(layer,))
    assert out[layer + "__grad"].shape == out[layer].shape == (1, 8, 16, 16)


def _edited(path, tmp_path, edit) -> str:
    m = onnx.load(str(path))
    edit(m)
    out = tmp_path / "edited.onnx"
    onnx.save(m, out)
    return out


def _negate_input_grad(m):
    out = next(o for o in m.graph.output if o.name == "input__grad")
    for node in m.graph.node:
        node.output[:] = ["input__grad_raw" if o == "input__grad" else o for o in node.output]
    m.graph.node.append(helper.make_node("Neg", ["input__grad_raw"], ["input__grad"]))
    assert out.name == "input__grad"


def _scale_scores(m):
    for node in m.graph.node:
        node.output[:] = ["logits_raw" if o == "logits" else o for o in node.output]
        node.input[:] = ["logits_raw" if i == "logits" else i for i in node.input]
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.array(2, np.float32), "two"))
    m.graph.node.append(helper.make_node("Mul", ["logits_raw", "two"], ["logits"]))


def _rename_seed(m):
    m.graph.input[[i.name for i in m.graph.input].index("seed")].name = "cotangent"
    for node in m.graph.node:
        node.input[:] = ["cotangent" if i == "seed" else i for i in node.input]


@pytest.mark.parametrize("edit, message", [
    (_negate_input_grad, "disagrees with a finite difference"),
    (_scale_scores, "scores differ from the model's"),
    (_rename_seed, "inputs must be"),
])
def test_a_graph_that_does_not_fit_is_refused_at_load(models, tmp_path, edit, message):
    model, _, path = models
    runner = Runner(model, "logits", "input", providers=["CPUExecutionProvider"])
    with pytest.raises(GradientGraphError, match=message):
        load(_edited(path, tmp_path, edit), runner, (3, 16, 16))


def test_a_file_that_is_not_onnx_is_refused(tmp_path, models):
    model = models[0]
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(GradientGraphError, match="not a valid ONNX model"):
        load(bad, Runner(model, "logits", "input", providers=["CPUExecutionProvider"]), (3, 16, 16))


def test_served_with_its_gradient_graph_and_refused_without_or_with_a_wrong_one(models, tmp_path):
    import grpc

    from onnxplain.client import Client, MapResult
    from onnxplain.server.config import ModelConfig
    from support import start_server

    model, written, grad = models
    onnx.save(model, tmp_path / "det.onnx")
    onnx.save(onnx.load(str(grad)), tmp_path / "det.grad.onnx")
    onnx.save(onnx.load(_edited(grad, tmp_path, _negate_input_grad)), tmp_path / "wrong.grad.onnx")
    pre = {"fit": "stretch", "mean": [0, 0, 0], "std": [1, 1, 1], "scale": 1.0}
    configs = [ModelConfig("det", tmp_path / "det.onnx", preprocessing=pre,
                           gradient_graph=tmp_path / "det.grad.onnx"),
               ModelConfig("plain", tmp_path / "det.onnx", preprocessing=pre),
               ModelConfig("wrong", tmp_path / "det.onnx", preprocessing=pre,
                           gradient_graph=tmp_path / "wrong.grad.onnx")]
    server = start_server(configs)
    try:
        with Client(server.address, timeout=60) as client:
            assert sorted(m.name for m in client.models()) == ["det", "plain"]   # "wrong" is refused at load
            x = np.random.default_rng(2).standard_normal((1, 3, 16, 16)).astype(np.float32)
            events = list(client.explain("det", [x], [("gradient", {})], targets=[2], return_attribution=True))
            served = next(e for e in events if isinstance(e, MapResult) and e.final)
            np.testing.assert_allclose(served.attribution, torch_gradient(x, 2)[0], rtol=1e-4, atol=1e-6)
            with pytest.raises(grpc.RpcError) as err:
                list(client.explain("plain", [x], [("gradient", {})], targets=[2]))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "'Det'" in err.value.details()
    finally:
        server.stop(0)


def test_integrated_gradients_and_smoothgrad_run_around_the_supplied_graph(models):
    """The methods that compose their inputs and sums around the gradient graph compose them around the supplied
    one too: on the determinant model (which the engine refuses), integrated gradients against the same sum written out
    with torch autograd at every path point."""
    from onnxplain.kernels.methods import METHODS, Job, Maps

    model, _, path = models
    runner = Runner(model, "logits", "input", max_batch=4, providers=["CPUExecutionProvider"])
    runner.supplied.append(load(path, runner, (3, 16, 16)))
    x = np.random.default_rng(2).standard_normal((3, 16, 16)).astype(np.float32)
    targets = np.array([1, 4])

    def final(method, params):
        job = Job(runner, x, targets, METHODS[method].resolve(params, (16, 16)), "NCHW")
        return [e for e in METHODS[method].run(job) if isinstance(e, Maps) and e.final][-1], job

    ig, job = final("integrated_gradients", {"steps": 5, "method": "riemann_right", "baseline": "zero"})
    assert job.passes.backward_samples == 10
    alphas = np.arange(1, 6) / 5
    for i, target in enumerate(targets):
        expected = x * sum(torch_gradient((a * x)[None].astype(np.float32), int(target))[0] for a in alphas) / 5
        np.testing.assert_allclose(ig.attribution[i], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    smooth, job = final("smoothgrad", {"samples": 3, "noise_level": 0.1})
    assert job.passes.backward_samples == 6 and np.isfinite(smooth.attribution).all()
    assert np.abs(smooth.attribution).max() > 0
