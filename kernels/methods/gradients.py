"""The gradient family: attributions over the input pixels from the model's gradient graph.

Every method here asks the runner for forward+backward passes of the augmented graph (kernels.autodiff) with
one seed row per (perturbed input, target): all targets, noise samples and path points of one image run as
batches of one graph, and a Progress event follows each batch so that a cancelled call stops within one.
SmoothGrad and integrated gradients run that graph between two small composed graphs (summing_graph): their
inputs are made inside it (base + coefficient * step) and their gradients summed per target there, so a batch
hands Python back T sums instead of B input-sized gradients; with three targets or more, each of their inputs runs
forward once for all targets (autodiff.share_forward), as the image does for the other methods.
Maps reduce the input-shaped attribution over channels: max |.| for gradient-like methods (a sensitivity),
the sum for methods whose attribution is a signed contribution (input x gradient, integrated gradients).
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import onnx
from onnx import TensorProto

from ..compose import PREFIX
from ..images import black_sample
from .base import Event, Job, Maps, Method, Param, ParamError, Progress
from .layers import one_hot, repeated
from .perturb import Builder, compose_front, value_info

SEED_RANGE = (0, 2 ** 31 - 1)


def input_gradients(job: Job, inputs: np.ndarray, rows: np.ndarray, rule: str = "standard",
                    stage: str = "backward") -> Iterator[Event]:
    """d(score of target rows[i])/d(inputs[i]) for every i, a batch at a time, yielding Progress after each
    batch; returns the gradients, shaped like `inputs`."""
    runner = job.runner
    seed = one_hot(rows, runner.num_classes)
    grads = []
    for start in range(0, len(inputs), runner.max_batch):
        chunk = slice(start, start + runner.max_batch)
        grads.append(runner.gradients(inputs[chunk], seed[chunk], job.passes, rule=rule)[f"{runner.input_name}__grad"])
        yield Progress(min(start + runner.max_batch, len(inputs)), len(inputs), stage)
    return np.concatenate(grads)


def reduce_channels(attribution: np.ndarray, job: Job, how: str) -> np.ndarray:
    """[T, *sample] -> [T, H, W]."""
    axis = job.channel_axis
    if how == "max_abs":
        return np.abs(attribution).max(axis=axis).astype(np.float32)
    return attribution.sum(axis=axis).astype(np.float32)


def input_gradient_key(rule: str, targets: np.ndarray) -> tuple:
    """Job.shared's key of the input gradients of the sample itself for these targets under this rule."""
    return ("input-gradient", rule, tuple(targets.tolist()))


def per_target(job: Job, rule: str = "standard") -> Iterator[Event]:
    """One gradient per target of the image itself: from one forward of the image for max_rows targets at a time
    (Runner.sample_gradients), or, where the gradient graph does not allow that, from one copy per target.
    Computed once per sample and rule, and reused by the request's other methods (Job.shared): gradient and
    input x gradient read the same gradients, guided backprop and guided Grad-CAM the same guided ones."""
    runner = job.runner
    key = input_gradient_key(rule, job.targets)
    if key in job.shared:
        yield Progress(len(job.targets), len(job.targets), "backward")
        return job.shared[key]
    seed = one_hot(job.targets, runner.num_classes)
    grads = []
    for start in range(0, len(seed), runner.max_rows):
        out = runner.sample_gradients(job.sample[None], seed[start:start + runner.max_rows], job.passes, rule=rule)
        if out is None:
            inputs = repeated(job.sample[None], len(job.targets))
            grads = yield from input_gradients(job, inputs, job.targets, rule)
            return job.remember(key, grads)
        grads.append(out[f"{runner.input_name}__grad"])
        yield Progress(min(start + runner.max_rows, len(seed)), len(seed), "backward")
    return job.remember(key, np.concatenate(grads))


def run_gradient(job: Job) -> Iterator[Event]:
    grad = yield from per_target(job)
    yield Maps(reduce_channels(grad, job, "max_abs"), final=True, attribution=grad)


def run_input_x_gradient(job: Job) -> Iterator[Event]:
    grad = yield from per_target(job)
    attribution = job.sample[None] * grad
    yield Maps(reduce_channels(attribution, job, "sum"), final=True, attribution=attribution)


def run_guided_backprop(job: Job) -> Iterator[Event]:
    grad = yield from per_target(job, rule="guided")
    yield Maps(reduce_channels(grad, job, "max_abs"), final=True, attribution=grad)


def run_deconvnet(job: Job) -> Iterator[Event]:
    grad = yield from per_target(job, rule="deconvnet")
    yield Maps(reduce_channels(grad, job, "max_abs"), final=True, attribution=grad)


def smoothgrad_noise(sample: np.ndarray, samples: int, noise_level: float, seed: int,
                     chunk: int | None = None) -> Iterator[np.ndarray]:
    """The noise draws, N(0, (noise_level * (max - min))^2) in float32, as consecutive arrays of at most `chunk`
    samples each (all in one array by default): the same values however they are chunked.

    Box-Muller on pairs of float32 uniforms, each sample from its own ceil(size / 2) pairs (an odd size drops its
    last value, so a sample's draws never depend on the chunking). For 25 samples of a 224x224 image it takes
    16 ms where numpy's float32 ziggurat took 42 ms, which was 10% of SmoothGrad's time on EfficientNet-Lite0.
    The uniforms' 2^-24 steps cut the tails at 5.8 sigma (a mass of 7e-9)."""
    sigma = np.float32(noise_level * float(sample.max() - sample.min()))
    rng = np.random.default_rng(seed)
    chunk = chunk or samples
    size = sample.size
    pairs = (size + 1) // 2
    for start in range(0, samples, chunk):
        count = min(chunk, samples - start)
        u = rng.random((count, pairs, 2), dtype=np.float32)
        radius = np.log1p(-u[..., 0])          # log(1 - u): 1 - u lies in (0, 1], so the log is finite
        radius *= -2
        np.sqrt(radius, out=radius)
        radius *= sigma
        angle = u[..., 1] * np.float32(2 * np.pi)
        noise = np.empty((count, pairs, 2), np.float32)
        np.multiply(radius, np.cos(angle), out=noise[..., 0])
        np.multiply(radius, np.sin(angle), out=noise[..., 1])
        noise = noise.reshape(count, 2 * pairs)
        yield (noise if 2 * pairs == size else noise[:, :size]).reshape(count, *sample.shape)


BASE, STEP, COEF, REPS, GROUPS = (f"{PREFIX}{name}" for name in ("base", "step", "coef", "reps", "groups"))
SUMS, SQUARES = f"{PREFIX}sums", f"{PREFIX}squares"
# From this many targets the targets of a sample share its forward (weighted_gradient_sums). Integrated gradients
# and SmoothGrad, 16 samples on 2 CPU cores, time shared / repeated: ResNet-50 0.89, 0.81, 0.70 and
# EfficientNet-Lite0 1.02-1.06, 0.96-0.99, 0.76-0.78 for 2, 3, 5 targets.
SHARED_FROM = 3


def summing_graph(gradient_model: onnx.ModelProto, input_name: str, squares: bool) -> onnx.ModelProto:
    """The gradient graph between two small graphs. In front, its input made from a few numbers per row:
    x = base + coef * tile(step, reps) (a path point: baseline + alpha * delta; a noisy copy: x + 1 * noise).
    Behind, the input gradients summed per target: sums = groups @ grads ([T, B] x [B, C*H*W]; row t of groups
    weights the batch rows of target t), and groups @ grads^2 when `squares`. A batch hands back T sums, not B
    gradients, and on a GPU its inputs are made there."""
    b = Builder(gradient_model)
    x = b.op("Add", BASE, b.op("Mul", COEF, b.op("Tile", STEP, REPS)))
    flat = b.op("Reshape", f"{input_name}__grad", b.const([0, -1], np.int64))      # [B, C*H*W]
    b.op("MatMul", GROUPS, flat, out=SUMS)
    if squares:
        b.op("MatMul", GROUPS, b.op("Mul", flat, flat), out=SQUARES)
    model_input = next(i for i in gradient_model.graph.input if i.name == input_name)
    rank = len(model_input.type.tensor_type.shape.dim)
    seed = next(i for i in gradient_model.graph.input if i.name == "seed")
    inputs = [value_info(BASE, [None] * rank), value_info(STEP, [None] * rank), value_info(COEF, [None] * rank),
              value_info(REPS, [rank], TensorProto.INT64), value_info(GROUPS, ["T", "B"]), seed]
    return compose_front(gradient_model, input_name, b, inputs, x, [SUMS, SQUARES] if squares else [SUMS])


def weighted_gradient_sums(job: Job, base: np.ndarray, step: np.ndarray | Callable[[int], Iterator[np.ndarray]],
                           coefs: np.ndarray, weights: np.ndarray, squares: bool, stage: str) -> Iterator[Event]:
    """sum_s weights[s] d(score of each target)/dx at x_s = base + coefs[s] * step_s, [T, *sample] in float64
    (and the same of its square when `squares`). `step` is one array shared by every sample (placed once), or a
    function that hands the step_s over in chunks of k samples. Summed by summing_graph, whose sums are added up
    here: the gradients never leave onnxruntime. Each run takes every target of max_batch // T samples (a sample
    repeated per target); from SHARED_FROM targets on, it takes one sample and a seed row per target instead, so
    that the targets share the sample's forward (Runner.shared_session; where the graph cannot share it, as
    before). Targets beyond a batch are taken in groups, each drawing the steps anew."""
    runner, targets = job.runner, job.targets
    count = len(weights)
    outputs = [SUMS, SQUARES] if squares else [SUMS]
    total = np.zeros((len(targets), base.size))
    total_sq = np.zeros_like(total) if squares else None
    feeds = {BASE: runner.resident(base[None])}
    shared = None if callable(step) else runner.resident(step[None])
    unit = [1] * base.ndim
    done = 0
    sums = (f"sums/{int(squares)}", lambda graph: summing_graph(graph, runner.input_name, squares))
    shared_forward = runner.shared_session(composed=sums) if len(targets) >= SHARED_FROM else None
    size = runner.max_rows if shared_forward is not None else runner.max_batch     # targets per group
    for first in range(0, len(targets), size):
        group = targets[first:first + size]
        t = len(group)
        one_forward = shared_forward if t >= SHARED_FROM else None
        session = one_forward or runner.gradient_session(composed=sums)
        k = 1 if one_forward is not None else max(1, runner.max_batch // t)
        chunks = step(k) if shared is None else None
        for start in range(0, count, k):
            n = min(k, count - start)      # row i * n + s: target group[i] at sample start + s
            weighting = np.zeros((t, t * n), np.float32)
            for i in range(t):
                weighting[i, i * n:(i + 1) * n] = weights[start:start + n]
            feeds.update({
                STEP: shared if shared is not None else next(chunks),
                REPS: np.array([1 if shared is not None or one_forward is not None else t, *unit], np.int64),
                COEF: np.tile(coefs[start:start + n], 1 if one_forward is not None else t).astype(
                    np.float32).reshape(-1, *unit),
                GROUPS: weighting, "seed": one_hot(np.repeat(group, n), runner.num_classes)})
            out = runner.run(session, outputs, feeds, job.passes, samples=t * n, backward=True)
            total[first:first + t] += out[0]
            if squares:
                total_sq[first:first + t] += out[1]
            done += t * n
            yield Progress(done, count * len(targets), stage)
    shape = (len(targets), *base.shape)
    return total.reshape(shape), (total_sq.reshape(shape) if squares else None)


def run_smoothgrad(job: Job) -> Iterator[Event]:
    n, variant = job.params["samples"], job.params["variant"]

    def noise(k):
        return smoothgrad_noise(job.sample, n, job.params["noise_level"], job.params["seed"], chunk=k)

    mean, mean_sq = yield from weighted_gradient_sums(job, job.sample, noise, np.ones(n), np.full(n, 1 / n),
                                                      variant != "plain", stage="noisy samples")
    if variant == "plain":
        attribution = mean
    elif variant == "squared":
        attribution = mean_sq
    else:  # variance (VarGrad): E[g^2] - E[g]^2
        attribution = mean_sq - mean ** 2
    attribution = attribution.astype(np.float32)
    yield Maps(reduce_channels(attribution, job, "max_abs"), final=True, attribution=attribution)


QUADRATURES = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")


def quadrature(method: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(alphas, weights) on [0, 1], with Captum's definitions of each rule."""
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return 0.5 * (1 + nodes), 0.5 * weights
    if method == "riemann_trapezoid":
        weights = np.full(steps, 1 / (steps - 1))
        weights[[0, -1]] /= 2
        return np.linspace(0, 1, steps), weights
    start, stop = {"riemann_left": (0, 1 - 1 / steps), "riemann_right": (1 / steps, 1),
                   "riemann_middle": (1 / (2 * steps), 1 - 1 / (2 * steps))}[method]
    return np.linspace(start, stop, steps), np.full(steps, 1 / steps)


def baseline_for(job: Job) -> np.ndarray:
    kind = job.params["baseline"]
    sample = job.sample
    if kind == "zero":
        return np.zeros_like(sample)
    if kind == "black":
        pre = job.preprocessing
        if pre is None:
            raise ParamError("integrated_gradients.baseline = black needs the model's preprocessing")
        return black_sample(pre)
    if kind == "blurred":
        from scipy.ndimage import gaussian_filter

        sigma = job.params["blur_sigma"]
        spatial_sigma = (0, sigma, sigma) if job.layout == "NCHW" else (sigma, sigma, 0)
        return gaussian_filter(sample, spatial_sigma, mode="nearest").astype(np.float32)
    custom = job.params["baseline_tensor"]
    if custom is None:
        raise ParamError("integrated_gradients.baseline = custom needs baseline_tensor")
    # The server checked the shape before the call was accepted (_check_ig_sample); this guards direct callers.
    _check_ig_sample(job.params, sample.shape)
    custom = custom[0] if custom.shape == (1, *sample.shape) else custom
    return custom.astype(np.float32)


def run_integrated_gradients(job: Job) -> Iterator[Event]:
    alphas, weights = quadrature(job.params["method"], job.params["steps"])
    baseline = baseline_for(job)
    delta = job.sample - baseline
    integral, _ = yield from weighted_gradient_sums(job, baseline, delta, alphas, weights, False,
                                                    stage="path points")
    attribution = (delta[None] * integral).astype(np.float32)
    targets = len(job.targets)
    ends = job.runner.scores(np.stack([job.sample, baseline]), job.passes)[:, job.targets]
    gaps = attribution.reshape(targets, -1).sum(1, dtype=np.float64) - (ends[0] - ends[1])
    yield Maps(reduce_channels(attribution, job, "sum"), final=True, attribution=attribution,
               stats=[{"completeness_gap": float(g), "score_delta": float(d)} for g, d in zip(gaps, ends[0] - ends[1])])


def _check_ig(params: dict, spatial: tuple[int, int]) -> None:
    if params["method"] == "riemann_trapezoid" and params["steps"] < 2:
        raise ParamError(f"integrated_gradients.steps must be in [2, 1000] for riemann_trapezoid, got {params['steps']}")
    if params["baseline"] == "custom" and params["baseline_tensor"] is None:
        raise ParamError("integrated_gradients.baseline_tensor must be set when baseline = custom")
    # A tensor that would be ignored is refused: the caller most likely forgot baseline = custom.
    if params["baseline"] != "custom" and params["baseline_tensor"] is not None:
        raise ParamError(f"integrated_gradients.baseline_tensor is set but baseline is {params['baseline']!r}; "
                         "set baseline = custom to use it, or leave baseline_tensor unset")


def _check_ig_sample(params: dict, sample_shape: tuple[int, ...]) -> None:
    """The custom baseline is one sample of the model input, with or without a batch dimension of 1."""
    custom = params["baseline_tensor"]
    shape = list(sample_shape)
    if custom is not None and list(custom.shape) not in (shape, [1, *shape]):
        raise ParamError(f"integrated_gradients.baseline_tensor has shape {list(custom.shape)}; it must be one "
                         f"sample of the model input: {shape} (or {[1, *shape]})")


GRADIENT = Method(
    "gradient", "gradient", "Max over channels of |dS_c/dx|: how sensitive the class score is to each pixel.",
    "Simonyan, Vedaldi & Zisserman, Deep Inside Convolutional Networks, ICLR workshop 2014",
    (), run_gradient, uses_gradients=True)

INPUT_X_GRADIENT = Method(
    "input_x_gradient", "gradient", "Sum over channels of x * dS_c/dx: first-order contribution of each pixel.",
    "Shrikumar et al., Not Just a Black Box: Learning Important Features Through Propagating Activation "
    "Differences, 2016", (), run_input_x_gradient, uses_gradients=True)

SMOOTHGRAD = Method(
    "smoothgrad", "gradient", "The gradient averaged over noisy copies of the input (plain, squared or VarGrad); "
    "max over channels of |.|.", "Smilkov et al., SmoothGrad: removing noise by adding noise, 2017",
    (Param("samples", "int", 25, "noisy copies (all run as batches)", 1, 1000),
     Param("noise_level", "float", 0.15, "noise standard deviation / (max - min) of the input", 0.0, 1.0),
     Param("variant", "enum", "plain", "plain mean, squared mean, or variance (VarGrad)",
           choices=("plain", "squared", "variance")),
     Param("seed", "int", 0, "seed of the noise draws (numpy default_rng)", *SEED_RANGE)),
    run_smoothgrad, uses_gradients=True)

INTEGRATED_GRADIENTS = Method(
    "integrated_gradients", "gradient", "(x - baseline) times the path integral of the gradient; sum over "
    "channels. Stats: completeness_gap = sum(attribution) - (S(x) - S(baseline)).",
    "Sundararajan, Taly & Yan, Axiomatic Attribution for Deep Networks, ICML 2017",
    (Param("steps", "int", 50, "points on the path", 1, 1000),
     Param("baseline", "enum", "black", "black pixels, zero tensor, Gaussian-blurred input, or baseline_tensor",
           choices=("black", "zero", "blurred", "custom")),
     Param("blur_sigma", "float", 10.0, "blur of the blurred baseline, in input pixels", 0.1, 1000.0),
     Param("method", "enum", "gausslegendre", "quadrature rule (Captum's names)", choices=QUADRATURES),
     Param("baseline_tensor", "tensor", None, "custom baseline: one preprocessed input sample")),
    run_integrated_gradients, uses_gradients=True, check_for_input=_check_ig, check_for_sample=_check_ig_sample)

GUIDED_BACKPROP = Method(
    "guided_backprop", "gradient", "The gradient with ReLU-like units passing only positive gradients where "
    "their input is positive; max over channels of |.|.",
    "Springenberg et al., Striving for Simplicity: The All Convolutional Net, ICLR workshop 2015",
    (), run_guided_backprop, uses_gradients=True)

DECONVNET = Method(
    "deconvnet", "gradient", "The gradient with ReLU-like units passing only positive gradients; max over "
    "channels of |.|.", "Zeiler & Fergus, Visualizing and Understanding Convolutional Networks, ECCV 2014",
    (), run_deconvnet, uses_gradients=True)

METHODS = (GRADIENT, INPUT_X_GRADIENT, SMOOTHGRAD, INTEGRATED_GRADIENTS, GUIDED_BACKPROP, DECONVNET)
