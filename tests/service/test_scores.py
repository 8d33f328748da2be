"""Which tensor is explained and how its scores become probabilities: a multi-label model (ending in Sigmoid) is
explained on its logits and its probabilities are each class's sigmoid, in Predict, GetModel and the Evaluate
metrics; a model TOML's `scores` and `probabilities` override the automatic choice, and a bad `scores` is a clear
start-up error. References: the torch net itself (autograd, torch.sigmoid / torch.softmax)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from onnxplain.kernels import graph
from onnxplain.server import config
from onnxplain.server.config import ConfigError, ModelConfig
from onnxplain.server.registry import load_entry
from support import start_server

PRE = {"fit": "stretch", "mean": [0, 0, 0], "std": [1, 1, 1], "scale": 1.0}


class Net(torch.nn.Module):
    """Conv, GAP, a 4-class linear head; outputs (embedding [N, 6], logits or their sigmoid [N, 4])."""

    def __init__(self, sigmoid: bool, embedding_first: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.fc = torch.nn.Linear(6, 4)
        self.sigmoid, self.embedding_first = sigmoid, embedding_first

    def forward(self, x):
        e = torch.relu(self.conv(x)).mean((2, 3))
        logits = self.fc(e) * 3
        return (e, logits) if self.embedding_first else (torch.sigmoid(logits) if self.sigmoid else logits)

    def logits(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3))) * 3


def export(path, net):
    buffer = io.BytesIO()
    names = ["embedding", "logits"] if net.embedding_first else ["probs" if net.sigmoid else "logits"]
    torch.onnx.export(net.eval(), torch.zeros(1, 3, 16, 16), buffer, input_names=["input"], output_names=names,
                      dynamic_axes={"input": {0: "n"}}, dynamo=False, opset_version=17)
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("scores")
    return {"multilabel": export(d / "multilabel.onnx", Net(sigmoid=True)),
            "two_outputs": export(d / "two_outputs.onnx", Net(sigmoid=False, embedding_first=True))}


def x_batch(n=2):
    return np.random.default_rng(3).standard_normal((n, 3, 16, 16)).astype(np.float32)


def test_a_sigmoid_head_is_explained_on_its_logits_and_reported_as_sigmoid(files):
    model = graph.load_model(str(files["multilabel"]))
    score, probabilities = graph.scores_of(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    assert probabilities == "sigmoid" and producer["probs"].op_type == "Sigmoid"
    assert score == producer["probs"].input[0] == graph.score_tensor(model)


def test_multilabel_model_served_predict_explain_and_evaluate(files):
    from onnxplain.client import Client, MapResult

    net = Net(sigmoid=True).eval()
    server = start_server([ModelConfig("multi", files["multilabel"], preprocessing=PRE),
                           ModelConfig("multi_softmax", files["multilabel"], preprocessing=PRE,
                                       probabilities="softmax")])
    try:
        with Client(server.address, timeout=60) as client:
            info = client.model("multi")
            assert info.probabilities == "sigmoid" and info.score_tensor != "probs" and info.num_classes == 4
            assert client.model("multi_softmax").probabilities == "softmax"
            x = x_batch()
            logits = net.logits(torch.from_numpy(x)).detach().numpy()
            for name, expected in (("multi", torch.sigmoid(torch.from_numpy(logits)).numpy()),
                                   ("multi_softmax", torch.softmax(torch.from_numpy(logits), 1).numpy())):
                for i, prediction in enumerate(client.predict(name, list(x), top_k=4)):
                    assert [s.class_id for s in prediction.top] == list(np.argsort(-logits[i], kind="stable"))
                    for s in prediction.top:
                        assert s.logit == pytest.approx(logits[i, s.class_id], rel=1e-5, abs=1e-5)
                        assert s.probability == pytest.approx(expected[i, s.class_id], rel=1e-5, abs=1e-6)
            # gradients are of the logit, not of its sigmoid
            events = list(client.explain("multi", [x[0]], [("gradient", {})], targets=[2], return_attribution=True))
            served = next(e for e in events if isinstance(e, MapResult) and e.final).attribution
            t = torch.from_numpy(x[:1]).requires_grad_()
            net.logits(t)[0, 2].backward()
            np.testing.assert_allclose(served, t.grad.numpy()[0], rtol=1e-4, atol=1e-6 * np.abs(served).max())
            # average drop's Y and O are the class's sigmoid, O on the image masked by the min-max normalised map
            dot = np.zeros((16, 16), np.float32)
            dot[5, 7] = 1
            evaluation = client.evaluate("multi", [x[0]], maps=[(0, 1, "dot", dot), (0, 1, "hole", 1 - dot)],
                                         metrics=["average_drop"])
            y = torch.sigmoid(torch.tensor(logits[0, 1])).item()
            by_method = {s.method: s for s in evaluation.scores}
            for method, kept in (("dot", dot), ("hole", 1 - dot)):
                o = torch.sigmoid(net.logits(torch.from_numpy(x[:1] * kept))[0, 1]).item()
                score = by_method[method]
                assert (score.class_score, score.masked_score) == (pytest.approx(y, rel=1e-5),
                                                                   pytest.approx(o, rel=1e-5))
                assert score.value == pytest.approx(max(0.0, y - o) / y, rel=1e-4, abs=1e-6)
    finally:
        server.stop(0)


def test_scores_key_picks_the_logits_of_a_model_whose_first_output_is_an_embedding(files, tmp_path):
    """Without it the first float output (the [N, 6] embedding) is taken for 6 class scores; with it the served
    model has the 4 logits, its gradients are theirs, and its layers are on their path."""
    path = files["two_outputs"]
    cfg = config.load(None, [])
    assert load_entry(ModelConfig("auto", path, preprocessing=PRE), cfg.limits).num_classes == 6
    entry = load_entry(ModelConfig("named", path, preprocessing=PRE, scores="logits"), cfg.limits)
    assert (entry.num_classes, entry.runner.score_name, entry.runner.probabilities) == (4, "logits", "softmax")
    x = x_batch()
    seed = np.eye(4, dtype=np.float32)[[1, 3]]
    from onnxplain.kernels.runtime import Passes

    got = entry.runner.gradients(x, seed, Passes())["input__grad"]
    t = torch.from_numpy(x).requires_grad_()
    (Net(sigmoid=False).eval().logits(t) * torch.from_numpy(seed)).sum().backward()
    np.testing.assert_allclose(got, t.grad.numpy(), rtol=1e-4, atol=1e-6 * np.abs(got).max())

    (tmp_path / "bad.toml").write_text(f'path = "{path}"\nscores = "nowhere"\n')
    with pytest.raises(ConfigError, match="scores 'nowhere' is not a tensor the graph computes.*'logits'"):
        load_entry(config.load(None, [tmp_path]).models[0], cfg.limits, roots=[path.parent, tmp_path])
    (tmp_path / "bad.toml").write_text(f'path = "{path}"\nprobabilities = "relu"\n')
    [unreadable] = config.load(None, [tmp_path]).models     # reported as the model's load failure
    assert "probabilities must be one of ['auto', 'softmax', 'sigmoid'], got 'relu'" in unreadable.error
