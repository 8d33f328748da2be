"""A gradient graph supplied by the user instead of one built by kernels.autodiff.

Some models hold operators the engine has no rule for, or their owners want a backward pass they trust or have
tuned. They may export one (e.g. with `onnxplain-augment`, edited, or from another tool) with the augmented
interface:

    inputs : the model's input, and `seed` [batch, classes] (the cotangent of the scores)
    outputs: the score tensor, `<layer>` and `<layer>__grad` per layer it serves, and optionally
             `<input>__grad`

and declare it in the model's config (`gradient_graph = "model.grad.onnx"`, `gradient_rule = "standard"`). It is
checked once at load (`load`): ONNX checker, the interface, output shapes on a test input, scores equal to the
model's, and — for the standard rule — the input gradient (or a layer gradient) against a central finite
difference of the model along a random direction. Runner.gradients then uses it for every request it covers
(its rule, a subset of its layers, the input gradient when asked), and builds one with the engine otherwise.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field

import numpy as np
import onnx

SEED = "seed"
GRAD = "__grad"


class GradientGraphError(ValueError):
    pass


@dataclass(frozen=True)
class GradientGraph:
    session: object                  # onnxruntime.InferenceSession
    rule: str
    layers: frozenset[str]
    input_grad: bool
    path: str
    model: onnx.ModelProto | None = field(default=None, repr=False, compare=False)   # for graphs composed around it

    def covers(self, layers: tuple[str, ...], rule: str, wrt_input: bool) -> bool:
        return rule == self.rule and set(layers) <= self.layers and (self.input_grad or not wrt_input)


def load(source: pathlib.Path | onnx.ModelProto, runner, sample_shape: tuple[int, ...], rule: str = "standard",
         seed: int = 0) -> GradientGraph:
    """Check a supplied gradient graph (a file, or a model already read) for the model of `runner`
    (GradientGraphError when it does not fit). `sample_shape`: one preprocessed sample, without the batch axis."""
    if rule not in ("standard", "guided", "deconvnet"):
        raise GradientGraphError(f"gradient_rule must be standard, guided or deconvnet, got {rule!r}")
    path = source.graph.name if isinstance(source, onnx.ModelProto) else source
    try:
        model = source if isinstance(source, onnx.ModelProto) else onnx.load(str(source))
        onnx.checker.check_model(model)
    except Exception as exc:
        raise GradientGraphError(f"gradient graph {path}: not a valid ONNX model: {exc}") from None
    inputs = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
    if inputs != {runner.input_name, SEED}:
        raise GradientGraphError(f"gradient graph {path}: inputs must be {runner.input_name!r} and {SEED!r}, "
                                 f"got {sorted(inputs)}")
    outputs = [o.name for o in model.graph.output]
    if runner.score_name not in outputs:
        raise GradientGraphError(f"gradient graph {path}: no output {runner.score_name!r} (the model's scores)")
    input_grad = runner.input_name + GRAD in outputs
    layers = frozenset(n[:-len(GRAD)] for n in outputs if n.endswith(GRAD) and n != runner.input_name + GRAD)
    missing = sorted(name for name in layers if name not in outputs)
    if missing:
        raise GradientGraphError(f"gradient graph {path}: gradients of {missing} without the tensors themselves")
    if not layers and not input_grad:
        raise GradientGraphError(f"gradient graph {path}: no `<tensor>{GRAD}` output")
    unknown = sorted(layers - _tensor_names(runner.model))
    if unknown:
        raise GradientGraphError(f"gradient graph {path}: layers {unknown} are not tensors of the model")
    try:
        session = runner._session(model)
    except Exception as exc:
        raise GradientGraphError(f"gradient graph {path}: onnxruntime cannot load it: {exc}") from None
    _check_values(session, runner, sorted(layers), input_grad, sample_shape, rule, seed, path)
    return GradientGraph(session, rule, layers, input_grad, str(path), model)


def _tensor_names(model: onnx.ModelProto) -> set[str]:
    names = {i.name for i in model.graph.input}
    for node in model.graph.node:
        names.update(node.output)
    return names


def _check_values(session, runner, layers, input_grad, sample_shape, rule, seed, path) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, *sample_shape)).astype(np.float32)
    reference = runner.session.run([runner.score_name], {runner.input_name: x})[0]
    target = int(np.argmax(reference[0]))
    one_hot = np.zeros_like(reference)
    one_hot[0, target] = 1
    names = [runner.score_name, *layers, *(n + GRAD for n in layers)]
    if input_grad:
        names.append(runner.input_name + GRAD)
    try:
        got = dict(zip(names, session.run(names, {runner.input_name: x, SEED: one_hot})))
    except Exception as exc:
        raise GradientGraphError(f"gradient graph {path}: a test run failed: {exc}") from None
    scale = float(np.abs(reference).max()) or 1.0
    if got[runner.score_name].shape != reference.shape or \
            not np.allclose(got[runner.score_name], reference, rtol=1e-4, atol=1e-4 * scale):
        raise GradientGraphError(f"gradient graph {path}: its scores differ from the model's on a test input")
    for name in layers:
        if got[name + GRAD].shape != got[name].shape:
            raise GradientGraphError(f"gradient graph {path}: {name}{GRAD} has shape {list(got[name + GRAD].shape)}"
                                     f", {name} has {list(got[name].shape)}")
    if input_grad and got[runner.input_name + GRAD].shape != x.shape:
        raise GradientGraphError(f"gradient graph {path}: {runner.input_name}{GRAD} has shape "
                                 f"{list(got[runner.input_name + GRAD].shape)}, the input has {list(x.shape)}")
    if rule == "standard" and input_grad:
        # directional derivatives of the target's score along a random direction and along the supplied gradient
        # itself, against central differences of the model (float32 runs, a step well above rounding)
        g = got[runner.input_name + GRAD].astype(np.float64)
        h = 1e-2 * max(1.0, float(np.abs(x).max()))
        for v in (rng.standard_normal(x.shape), g):
            norm = np.linalg.norm(v)
            if norm == 0:
                continue
            v = v / norm
            plus, minus = (runner.session.run([runner.score_name], {
                runner.input_name: (x + s * h * v).astype(np.float32)})[0][0, target].astype(np.float64)
                for s in (1, -1))
            numeric, analytic = (plus - minus) / (2 * h), float((g * v).sum())
            if abs(numeric - analytic) > 0.05 * max(abs(numeric), abs(analytic), 1e-3 * scale):
                raise GradientGraphError(f"gradient graph {path}: its input gradient disagrees with a finite "
                                         f"difference of the model (directional derivative {analytic:.6g} vs "
                                         f"{numeric:.6g})")
