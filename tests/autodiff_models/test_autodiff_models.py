"""Whole-model checks of kernels.autodiff.augment against PyTorch autograd (issue 3's acceptance).

For every zoo net x both torch exporters: a batch of 3 with different seed rows (one-hot for two different
classes, one dense weighted row); the gradients w.r.t. the default layer, an earlier layer and the input must
match autograd with ||a - b|| / ||b|| <= 1e-4 per sample. The ONNX tensor of each torch probe is found by value
among kernels.graph's candidate layers (tensor names differ between exporters). The shared EfficientNet-Lite0 is
checked against autograd on its own graph rebuilt in torch float64 (onnxruntime has no float64 Conv).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import zoo
from onnxplain.kernels import graph as G

from onnxplain.kernels.autodiff import augment  # a missing module fails the tests: never skipped

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
EFFNET = SHARED / "models" / "efficientnet_lite0_imagenet.onnx"
CASES = [(n, e) for n in zoo.NAMES for e in zoo.EXPORTERS]
TOL = 1e-4


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _run(model, feeds):
    s = _session(model)
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _seeds(batch: int, classes: int) -> np.ndarray:
    seed = np.zeros((batch, classes), np.float32)
    seed[0, 3] = 1.0
    seed[1, 7] = 1.0
    seed[2] = np.linspace(-1.0, 1.5, classes, dtype=np.float32)
    return seed


def _only_standard_ops(model: onnx.ModelProto) -> list[str]:
    return sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})


def _locate(model, layers, x, acts: dict) -> dict:
    """probe name -> ONNX candidate tensor with the probe's values."""
    out = _run(G.expose(model, [l.name for l in layers]), {"input": x})
    found = {}
    for probe, ref in acts.items():
        hits = [l.name for l in layers if out[l.name].shape == ref.shape and _rel(out[l.name], ref) < 1e-4]
        assert hits, f"probe {probe!r} not found among the candidate layers"
        found[probe] = hits[0]
    return found


@pytest.mark.parametrize("name,exporter", CASES)
def test_zoo_gradients_match_autograd(name, exporter, zoo_model):
    model = G.load_model(zoo_model(name, exporter))
    layers = G.candidate_layers(model)
    xt = zoo.example_input(name, 3, seed=11)
    x = xt.numpy()
    seed = _seeds(3, 10)
    ref = zoo.run_with_probes(zoo.build(name), xt, torch.from_numpy(seed))
    where = _locate(model, layers, x, ref["acts"])
    assert where["default"] == G.default_layer(model).name

    aug = augment(model, layers=[where["early"], where["default"]], wrt_input=True)
    onnx.checker.check_model(aug)
    assert _only_standard_ops(aug) == [], f"non-standard ops: {_only_standard_ops(aug)}"
    out = _run(aug, {"input": x, "seed": seed})

    np.testing.assert_allclose(out["logits"], ref["logits"], rtol=1e-4, atol=1e-4)
    errors = {}
    for probe in ("default", "early"):
        t = where[probe]
        np.testing.assert_allclose(out[t], ref["acts"][probe], rtol=1e-4, atol=1e-4)
        for i in range(3):
            errors[f"{probe}[{i}]"] = _rel(out[f"{t}__grad"][i], ref["grads"][probe][i])
    for i in range(3):
        errors[f"input[{i}]"] = _rel(out["input__grad"][i], ref["input_grad"][i])
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, f"relative gradient errors above {TOL}: {bad}"


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_each_sample_gradient_depends_only_on_its_seed_row(name, zoo_model):
    """Batch rows are independent: the batched answer equals the per-sample answers."""
    model = G.load_model(zoo_model(name, "dynamo"))
    layer = G.default_layer(model).name
    aug = augment(model, layers=[layer])
    x = zoo.example_input(name, 3, seed=4).numpy()
    seed = _seeds(3, 10)
    s = _session(aug)
    names = [o.name for o in s.get_outputs()]
    both = dict(zip(names, s.run(None, {"input": x, "seed": seed})))
    for i in range(3):
        one = dict(zip(names, s.run(None, {"input": x[i:i + 1], "seed": seed[i:i + 1]})))
        assert _rel(both[f"{layer}__grad"][i], one[f"{layer}__grad"][0]) < 1e-5
        assert _rel(both["input__grad"][i], one["input__grad"][0]) < 1e-5


# --------------------------------------------------------------------------------- shared EfficientNet


def _torch_interpret(model: onnx.ModelProto, x: torch.Tensor, keep=(), clip_inputs=None) -> tuple[torch.Tensor, dict]:
    """Run an ONNX graph of Conv/Clip/Add/GlobalAveragePool/Flatten/Gemm in torch float64 (the EfficientNet-Lite0
    op set), keeping the named tensors with retain_grad: an autograd reference rebuilt from the ONNX weights.

    `clip_inputs` (name -> the float32 values onnxruntime computed there) fixes each Clip's pass-through mask to
    the one of the float32 forward: on a noise image a few activations sit within float32 rounding of 0 or 6,
    and a flipped mask moves the whole gradient by ~1e-3 whatever the autodiff does.
    """
    import torch.nn.functional as F

    env = {t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).astype(np.float64)) for t in model.graph.initializer}
    env[model.graph.input[0].name] = x
    for n in model.graph.node:
        a = {at.name: onnx.helper.get_attribute_value(at) for at in n.attribute}
        i = [env[k] if k else None for k in n.input]
        if n.op_type == "Constant":
            y = torch.from_numpy(np.asarray(onnx.numpy_helper.to_array(a["value"]), np.float64))
        elif n.op_type == "Conv":
            p = list(a.get("pads", [0, 0, 0, 0]))
            assert p[:2] == p[2:], "asymmetric pads"
            y = F.conv2d(i[0], i[1], i[2] if len(i) > 2 else None, list(a.get("strides", [1, 1])), p[:2],
                         list(a.get("dilations", [1, 1])), a.get("group", 1))
        elif n.op_type == "Clip":
            lo, hi = float(i[1]), float(i[2])
            if clip_inputs is None:
                y = torch.clamp(i[0], lo, hi)
            else:
                ref = torch.from_numpy(clip_inputs[n.input[0]].astype(np.float64))
                inside = (ref > lo) & (ref < hi)
                y = torch.where(inside, i[0], torch.clamp(i[0], lo, hi).detach())
        elif n.op_type == "Add":
            y = i[0] + i[1]
        elif n.op_type == "GlobalAveragePool":
            y = i[0].mean((2, 3), keepdim=True)
        elif n.op_type == "Flatten":
            y = i[0].flatten(a.get("axis", 1))
        elif n.op_type == "Gemm":
            assert a.get("transB") == 1 and not a.get("transA")
            y = i[0] @ i[1].T + i[2]
        else:
            raise NotImplementedError(n.op_type)
        if n.output[0] in keep:
            y.retain_grad()
        env[n.output[0]] = y
    return env[model.graph.output[0].name], env


@pytest.mark.skipif(not EFFNET.exists(), reason="../shared (EfficientNet-Lite0) is absent")
def test_efficientnet_gradients_match_autograd_float64():
    """Reference: the ONNX graph rebuilt in torch float64 from its own weights, differentiated by autograd."""
    model = G.load_model(str(EFFNET))
    layer = G.default_layer(model).name
    early = [l.name for l in G.candidate_layers(model) if l.grid == (14, 14)][0]
    aug = augment(model, layers=[early, layer])
    onnx.checker.check_model(aug)
    assert _only_standard_ops(aug) == []
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 224, 224)).astype(np.float32)
    seed = np.zeros((2, 1000), np.float32)
    seed[0, 285] = 1.0
    seed[1] = rng.standard_normal(1000).astype(np.float32) * 0.1
    out = _run(aug, {"input": x, "seed": seed})

    clips = [n.input[0] for n in model.graph.node if n.op_type == "Clip"]
    clip_inputs = _run(G.expose(model, clips), {"input": x})
    assert not any(np.any((v == 0) | (v == 6)) for k, v in clip_inputs.items() if k in clips), "tie at a kink"
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_()
    logits, env = _torch_interpret(model, xt, keep=(layer, early), clip_inputs=clip_inputs)
    np.testing.assert_allclose(out["logits"], logits.detach().numpy(), rtol=1e-4, atol=1e-4)
    (logits * torch.from_numpy(seed.astype(np.float64))).sum().backward()
    errors = {}
    for i in range(2):
        errors[f"input[{i}]"] = _rel(out["input__grad"][i], xt.grad[i].numpy())
        for t in (layer, early):
            errors[f"{t}[{i}]"] = _rel(out[f"{t}__grad"][i], env[t].grad[i].numpy())
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, f"relative gradient errors above {TOL}: {bad}"
