"""The CAM family: maps over a layer's grid from its activations A (K maps) and their gradients G.

One base (`layer_run`) does what every variant shares, as pytorch-grad-cam's BaseCAM does: activations and
gradients of the layer for every target (one seed row per target), token layers reshaped to their grid
(layers.as_maps). One target is one forward+backward of the model; several targets run the model up to the layer
once and only its head's gradient graph per target (Runner.head_gradients), so the top-5 maps cost about one
forward. The methods of one request share that run up to the layer and the gradients (Job.shared), with each
other and with the perturbation methods on a layer (Score-CAM, Ablation-CAM, Opti-CAM). Each variant is a short
function of (A, G) -> maps; the server upsamples the maps to the input's resolution (bilinear, half-pixel) unless
the request asks for the layer's. ReLU is applied only where the method's paper applies it.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from ..autodiff import dequantized_constants
from .base import Event, Job, Maps, Method, ParamError, Progress
from .gradients import input_gradient_key, per_target, reduce_channels
from .layers import as_maps, one_hot, repeated

EPS = 1e-7


def layer_keys(job: Job) -> tuple[tuple, tuple]:
    """Job.shared's keys of job.layer's activation maps [1, K, h, w] and of its gradient maps for job.targets."""
    return ("activation", job.layer.name), ("gradient", job.layer.name, tuple(job.targets.tolist()))


def layer_body(job: Job) -> list[np.ndarray] | None:
    """The outputs of one run of the model up to job.layer on the sample (Runner.body: the layer tensor, then the
    other tensors its head reads), once per request (Job.shared); None when the model cannot be cut there."""
    key = ("body", job.layer.name)
    if key not in job.shared:
        tensors = job.runner.body(job.sample[None], job.passes, job.layer.name)
        for tensor in tensors or ():
            tensor.flags.writeable = False      # shared, as Job.remember keeps them
        job.shared[key] = tensors
    return job.shared[key]


def layer_activation(job: Job) -> np.ndarray:
    """[1, K, h, w] activation maps of job.layer for the sample, once per request (Job.shared): from the run up to
    the layer (layer_body), or where the model cannot be cut there from a forward that exposes it."""
    runner, layer, memo = job.runner, job.layer, job.shared
    activation, _ = layer_keys(job)
    if activation not in memo:
        tensors = layer_body(job) or [runner.forward(job.sample[None], (layer.name,), job.passes)[layer.name]]
        job.remember(activation, as_maps(tensors[0], layer))
    return memo[activation]


def layer_tensors(job: Job) -> tuple[np.ndarray, np.ndarray]:
    """[T, K, h, w] activations and gradients of each target's score of job.layer, computed once per sample and
    reused by the other CAM methods of the request (job.shared)."""
    runner, layer, memo = job.runner, job.layer, job.shared
    activation, gradient = layer_keys(job)
    if gradient not in memo:
        seed = one_hot(job.targets, runner.num_classes)
        # Several targets, or the body already run: the head's gradient graph alone, on the body's outputs.
        body = memo.get(("body", layer.name))
        out = (runner.head_gradients(job.sample[None], seed, job.passes, layer.name, body=body)
               if len(seed) > 1 or body else None)
        if out is None:     # one target (one forward+backward), or a model that cannot be cut at the layer
            out = runner.gradients(repeated(job.sample[None], len(seed)), seed, job.passes, layers=(layer.name,),
                                   wrt_input=False)
        job.remember(activation, as_maps(out[layer.name][:1], layer))
        job.remember(gradient, as_maps(out[f"{layer.name}__grad"], layer))
    g = memo[gradient]
    return np.broadcast_to(memo[activation], g.shape), g


def relu(a: np.ndarray) -> np.ndarray:
    return np.maximum(a, 0)


def weighted(weights: np.ndarray, activations: np.ndarray) -> np.ndarray:
    """sum_k w[t, k] A[t, k] -> [T, h, w]"""
    return np.einsum("tk,tkhw->thw", weights, activations)


def gradcam(a, g):
    return relu(weighted(g.mean(axis=(2, 3)), a))


def gradcampp(a, g):
    # alpha = g^2 / (2 g^2 + sum_ij(A) g^3), where the gradient is non-zero (exp(S) form, as in the paper and
    # pytorch-grad-cam); weights = sum_ij alpha * ReLU(g). Where g > 0 the term alpha * g is g / (2 + sum(A) g),
    # which is how it is computed (fewer array passes and temporaries than the literal formula, 0.46 -> 0.3 ms
    # of a 6 ms run); a zero denominator (alpha = g^2 there) takes the literal formula.
    total = a.sum(axis=(2, 3), keepdims=True)
    d = 2 + total * g
    positive = g > 0
    if np.any(positive & (d == 0)):
        g2 = g * g
        denominator = g2 * d
        alpha = np.where(g != 0, g2 / np.where(denominator != 0, denominator, 1.0), 0)
        return relu(weighted((alpha * relu(g)).sum(axis=(2, 3)), a))
    terms = np.divide(g, d, out=np.zeros_like(g), where=positive)
    return relu(weighted(terms.sum(axis=(2, 3)), a))


def xgradcam(a, g):
    return relu(weighted((g * a).sum(axis=(2, 3)) / (a.sum(axis=(2, 3)) + EPS), a))


def hirescam(a, g):
    return relu((g * a).sum(axis=1))


def layercam(a, g):
    return relu((relu(g) * a).sum(axis=1))


def eigencam(a: np.ndarray) -> np.ndarray:
    """Projection of the activations on their first principal component (over positions, channels centred).
    A principal component's sign is arbitrary: it is chosen so that the map's largest-magnitude value is
    positive (sklearn's svd_flip convention), which is deterministic where a correlation with the mean
    activation is not (after LayerNorm the mean over channels is nearly constant)."""
    t, k, h, w = a.shape
    means = np.full(h * w, 1.0 / (h * w), a.dtype)    # a matrix-vector product: numpy's mean along a short axis
    maps = []                                          # took as long as the Gram matrix (EfficientNet-Lite0)
    for sample in a.reshape(t, k, h * w):
        centred = sample - (sample @ means)[:, None]   # [K, hw]: each channel centred over positions
        # positions @ v1 = s1 * u1: the first left-singular vector, from the small [hw, hw] Gram matrix (summed
        # in float32: a float64 copy of the activations cost three times the rest; decomposed in float64)
        value, vector = _top_eigenpair((centred.T @ centred).astype(np.float64))
        projection = vector * np.sqrt(max(value, 0.0))
        maps.append((projection * np.sign(projection[np.argmax(np.abs(projection))])).reshape(h, w))
    return np.stack(maps)


def _top_eigenpair(symmetric: np.ndarray) -> tuple[float, np.ndarray]:
    """The largest eigenvalue of a float64 symmetric matrix and its eigenvector, by LAPACK's dsyevr for that one
    pair (what scipy.linalg.eigh(subset_by_index=...) calls, without its checks: 81 -> 64 us for 49 x 49)."""
    from scipy.linalg import eigh, lapack

    n = len(symmetric)
    values, vectors, found, _, info = lapack.dsyevr(symmetric, compute_v=1, range="I", il=n, iu=n)
    if info != 0 or found != 1:     # LAPACK's failure: the checked call, which raises with its reason
        values, vectors = eigh(symmetric, subset_by_index=[n - 1, n - 1])
    return float(values[0]), vectors[:, 0]


def run_eigencam(job: Job) -> Iterator[Event]:
    """Class-agnostic: one decomposition of the image's activations, its map given to every target."""
    activation = layer_activation(job)
    yield Progress(1, 1, "forward")
    maps = eigencam(activation).astype(np.float32)
    yield Maps(np.repeat(maps, len(job.targets), axis=0), final=True)


def layer_run(combine: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Callable[[Job], Iterator[Event]]:
    def run(job: Job) -> Iterator[Event]:
        a, g = layer_tensors(job)
        yield Progress(1, 1, "forward+backward")
        yield Maps(combine(a, g).astype(np.float32), final=True)
    return run


# ---------------------------------------------------------------------------------------------- CAM

LINEAR = {"Gemm", "MatMul"}
RESHAPES = {"Flatten", "Reshape", "Squeeze", "Identity"}
QDQ = {"QuantizeLinear", "DynamicQuantizeLinear", "DequantizeLinear"}   # a quantized head: rounding, still linear


def classifier_weights(model: onnx.ModelProto, layer: str, score: str) -> np.ndarray:
    """[classes, K] weights of a global-average-pooling + linear head that reads `layer` and produces
    `score`; ParamError naming what was found when the head is anything else."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    constants.update(dequantized_constants(model))   # int8 weights: their dequantized values
    path, name = [], layer
    while True:
        following = consumers.get(name, [])
        if len(following) != 1:
            break
        node = following[0]
        path.append(node)
        name = node.output[0]
        if node.op_type in LINEAR:
            break
    ops = [n.op_type for n in path]
    pooled = ops[:1] == ["GlobalAveragePool"] or (ops[:1] == ["ReduceMean"])
    if not pooled or not path or path[-1].op_type not in LINEAR or not set(ops[1:-1]) <= RESHAPES | QDQ:
        raise ParamError(f"cam needs a global-average-pooling + linear head after layer {layer}; found {ops or 'none'}"
                         " (use gradcam, which works with any head)")
    linear = path[-1]
    weight_name = next((i for i in linear.input[1:2] if i in constants), None)
    if weight_name is None:
        raise ParamError(f"cam: the linear head {linear.name} has no constant weight")
    weight = constants[weight_name].astype(np.float64)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in linear.attribute}
    if linear.op_type == "Gemm":
        weight = weight if attrs.get("transB", 0) else weight.T
        weight = weight * attrs.get("alpha", 1.0)
    else:
        weight = weight.T
    rest = linear.output[0]
    while rest != score:   # only a bias Add (or identities) may stand between the linear layer and the scores
        following = consumers.get(rest, [])
        if len(following) != 1 or following[0].op_type not in {"Add", "Identity"} | QDQ:
            raise ParamError(f"cam: the linear head of layer {layer} does not lead straight to the scores")
        rest = following[0].output[0]
    return weight


def head_weights(runner, layer) -> np.ndarray:
    return runner.cached(f"cam-weights/{layer.name}", lambda: classifier_weights(runner.model, layer.name,
                                                                                 runner.score_name))


def run_cam(job: Job) -> Iterator[Event]:
    runner = job.runner
    weights = head_weights(runner, job.layer)
    a = layer_activation(job)
    if weights.shape[1] != a.shape[1]:
        raise ParamError(f"cam: the head has {weights.shape[1]} inputs but layer {job.layer.name} has "
                         f"{a.shape[1]} channels")
    yield Progress(1, 1, "forward")
    yield Maps(np.einsum("tk,khw->thw", weights[job.targets], a[0]).astype(np.float32), final=True)


def run_guided_gradcam(job: Job) -> Iterator[Event]:
    """Guided backpropagation's input gradient and Grad-CAM's layer gradient come from one forward: the graph has
    two backward passes from the same seed, one under the guided rule to the input, one under the standard rule
    to the layer (kernels.autodiff.augment's layer_rule), and one forward of the image serves max_rows targets
    where the graph allows (Runner.sample_gradients). Either part that another method of the request computed
    already (guided backprop; Grad-CAM and the other CAM methods) is read from Job.shared, and what this one
    computes is left there for them. With a supplied gradient graph (one rule each) the parts are two runs, so
    that the supplied graphs are the ones used."""
    from ..images import upsample_bilinear

    runner, layer, memo = job.runner, job.layer, job.shared
    height, width = job.spatial
    guided_key = input_gradient_key("guided", job.targets)
    activation, gradient = layer_keys(job)
    if runner.supplied or guided_key in memo or gradient in memo:
        a, g = layer_tensors(job)
        yield Progress(1, 2, "grad-cam")
        guided = yield from per_target(job, rule="guided")
    else:
        g, guided = [], []
        seed = one_hot(job.targets, runner.num_classes)
        for start in range(0, len(seed), runner.max_rows):
            rows = seed[start:start + runner.max_rows]
            out = runner.sample_gradients(job.sample[None], rows, job.passes, layers=(layer.name,), rule="guided",
                                          layer_rule="standard")
            if out is None:
                out = runner.gradients(repeated(job.sample[None], len(rows)), rows, job.passes, layers=(layer.name,),
                                       rule="guided", layer_rule="standard")
            if activation not in memo:      # the same activation in every chunk: kept from the first
                job.remember(activation, as_maps(out[layer.name][:1], layer))
            g.append(as_maps(out[f"{layer.name}__grad"], layer))
            guided.append(out[f"{runner.input_name}__grad"])
            yield Progress(start + len(rows), len(seed), "guided backprop and grad-cam")
        g = job.remember(gradient, np.concatenate(g))
        a = np.broadcast_to(memo[activation], g.shape)
        guided = job.remember(guided_key, np.concatenate(guided))
    coarse = upsample_bilinear(gradcam(a, g).astype(np.float32), height, width)
    shape = (len(job.targets), 1, height, width) if job.layout == "NCHW" else (len(job.targets), height, width, 1)
    attribution = (guided * coarse.reshape(shape)).astype(np.float32)
    yield Maps(reduce_channels(attribution, job, "max_abs"), final=True, attribution=attribution)


def _cam_method(name: str, run, description: str, reference: str, gradients: bool = True) -> Method:
    return Method(name, "cam", description, reference, (), run, uses_layer=True, uses_gradients=gradients)


METHODS = (
    Method("cam", "cam", "sum_k w_ck A_k with the linear head's weights (global-average-pooling heads only).",
           "Zhou et al., Learning Deep Features for Discriminative Localization, CVPR 2016", (), run_cam,
           uses_layer=True, check_for_layer=head_weights),
    _cam_method("gradcam", layer_run(gradcam), "ReLU(sum_k alpha_k A_k), alpha_k = spatial mean of dS_c/dA_k.",
                "Selvaraju et al., Grad-CAM: Visual Explanations from Deep Networks via Gradient-based "
                "Localization, ICCV 2017"),
    _cam_method("gradcampp", layer_run(gradcampp), "Grad-CAM with pixel-wise weights from second- and third-order "
                "terms of exp(S_c).", "Chattopadhay et al., Grad-CAM++, WACV 2018"),
    _cam_method("xgradcam", layer_run(xgradcam), "ReLU(sum_k alpha_k A_k), alpha_k = sum(A_k dS_c/dA_k) / sum(A_k).",
                "Fu et al., Axiom-based Grad-CAM, BMVC 2020"),
    _cam_method("hirescam", layer_run(hirescam), "ReLU(sum_k dS_c/dA_k * A_k), element-wise: no spatial averaging.",
                "Draelos & Carin, Use HiResCAM instead of Grad-CAM for faithful explanations, 2020"),
    _cam_method("layercam", layer_run(layercam), "ReLU(sum_k ReLU(dS_c/dA_k) * A_k).",
                "Jiang et al., LayerCAM: Exploring Hierarchical Class Activation Maps for Localization, TIP 2021"),
    _cam_method("eigencam", run_eigencam, "First principal component of the layer's "
                "activations (class-agnostic), signed so that its largest-magnitude value is positive.",
                "Muhammad & Yeasin, Eigen-CAM: Class Activation Map using Principal Components, IJCNN 2020",
                gradients=False),
    Method("guided_gradcam", "cam", "Guided backpropagation times the upsampled Grad-CAM; max over channels of |.|.",
           "Selvaraju et al., Grad-CAM, ICCV 2017", (), run_guided_gradcam, uses_layer=True, uses_gradients=True),
)
