"""kernels/metrics.py against straightforward numpy re-implementations of the definitions, with the model run
by a plain onnxruntime session: masking the *pixels* (m * pixels, then the model's preprocessing), deleting
pixels to black / inserting them into a blurred picture by a stable ranking, trapezoid areas, pointing games."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from support import EFFICIENTNET, EFFICIENTNET_PREPROCESSING, SHARED_IMAGES, needs_shared

from onnxplain.kernels import images, metrics
from onnxplain.kernels.runtime import Passes, Runner

STEPS = 8


# ------------------------------------------------------------------------------------------ the reference

def softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def gaussian_blur_pixels(pixels, sigma):
    """[H, W, C] Gaussian blur, kernel truncated at 4 sigma, borders mirrored (the edge pixel repeated)."""
    radius = int(4 * sigma + 0.5)
    t = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (t / sigma) ** 2)
    kernel /= kernel.sum()
    out = pixels.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="symmetric")
        out = sum(kernel[i] * np.take(padded, np.arange(i, i + out.shape[axis]), axis=axis) for i in range(len(kernel)))
    return out


class Reference:
    """The definitions, written out on the pixel image [H, W, C] (0..255) of an NCHW, mean/std model."""

    def __init__(self, session, pixels, scale, mean, std):
        self.session, self.pixels = session, pixels.astype(np.float64)
        self.scale, self.mean, self.std = scale, np.asarray(mean), np.asarray(std)

    def prob(self, pixel_batch, c):
        x = ((pixel_batch * self.scale - self.mean) / self.std).transpose(0, 3, 1, 2).astype(np.float32)
        out = self.session.run(None, {self.session.get_inputs()[0].name: x})[0]
        return softmax(out)[:, c]

    def masked(self, saliency, c):
        lo, hi = saliency.min(), saliency.max()
        m = (saliency - lo) / (hi - lo) if hi > lo else np.zeros_like(saliency)
        y = self.prob(self.pixels[None], c)[0]
        o = self.prob((self.pixels * m[..., None])[None], c)[0]
        return y, o, max(0, y - o) / y, max(0, o - y) / y, float(y < o)

    def curve(self, saliency, c, kind, sigma=5.0):
        h, w = saliency.shape
        order = np.argsort(-saliency.ravel(), kind="stable")
        blurred = gaussian_blur_pixels(self.pixels, sigma)
        batch = []
        for k in range(STEPS + 1):
            n = k * h * w // STEPS
            chosen = np.zeros(h * w, bool)
            chosen[order[:n]] = True
            chosen = chosen.reshape(h, w)[..., None]
            if kind == "deletion":
                batch.append(np.where(chosen, 0.0, self.pixels))
            else:
                batch.append(np.where(chosen, self.pixels, blurred))
        curve = self.prob(np.stack(batch), c)
        return curve, np.trapezoid(curve, dx=1 / STEPS)


def pointing_reference(saliency, box):
    x0, y0, x1, y1 = box
    i, j = divmod(int(np.argmax(saliency)), saliency.shape[1])
    hit = float(x0 <= j + 0.5 < x1 and y0 <= i + 0.5 < y1)
    inside = total = 0.0
    for i in range(saliency.shape[0]):
        for j in range(saliency.shape[1]):
            v = max(float(saliency[i, j]), 0.0)
            total += v
            if x0 <= j + 0.5 < x1 and y0 <= i + 0.5 < y1:
                inside += v
    return hit, inside / total if total else 0.0


# ------------------------------------------------------------------------------------------ efficientnet

@pytest.fixture(scope="module")
def effnet():
    model = onnx.load(str(EFFICIENTNET))
    runner = Runner(model, "logits", "input", max_batch=16)
    pre = images.Preprocessing(224, 224, **{k: tuple(v) if isinstance(v, list) else v
                                            for k, v in EFFICIENTNET_PREPROCESSING.items()})
    session = ort.InferenceSession(str(EFFICIENTNET), providers=["CPUExecutionProvider"])
    return runner, pre, session


def test_black_sample_is_the_preprocessed_black_image():
    pre = images.Preprocessing(4, 5, scale=1 / 255, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    black = images.preprocess(Image.new("RGB", (5, 4)), pre).sample
    np.testing.assert_allclose(metrics.black_sample(pre), black, atol=1e-6)


@needs_shared
def test_metrics_match_the_numpy_definitions_on_efficientnet(effnet):
    runner, pre, session = effnet
    with Image.open(SHARED_IMAGES[1]) as img:   # chelsea: a cat
        prepared = images.preprocess(img.convert("RGB"), pre)
        box = images.crop_box(img.width, img.height, pre)
        pixels = np.asarray(img.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR, box=box), np.float32)
    ref = Reference(session, pixels, pre.scale, pre.mean, pre.std)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:224, :224]
    smooth = np.exp(-((yy - 90) ** 2 + (xx - 120) ** 2) / 2000.0) + 0.05 * rng.random((224, 224))
    blocks = np.kron(rng.integers(0, 4, (7, 7)), np.ones((32, 32))) - 1.5   # many ties, negative values
    maps = np.stack([smooth, blocks, -smooth]).astype(np.float32)
    top = int(np.argmax(session.run(None, {"input": prepared.sample[None]})[0][0]))
    classes = [top, top, 285]
    box = (60.0, 40.5, 170.0, 150.0)
    passes = Passes()
    got = metrics.evaluate(runner, prepared.sample, maps, classes, pre, metrics.METRICS, steps=STEPS,
                           boxes=[box], return_curves=True, passes=passes)
    for saliency, c, result in zip(maps, classes, got):
        y, o, ad, ag, ai = ref.masked(saliency.astype(np.float64), c)
        assert result.class_score == pytest.approx(y, abs=2e-5)
        assert result.masked_score == pytest.approx(o, abs=2e-4)
        assert result.values["average_drop"] == pytest.approx(ad, abs=5e-4 + 2e-4 / y)
        assert result.values["average_gain"] == pytest.approx(ag, abs=5e-4 + 2e-4 / y)
        assert result.values["average_increase"] == ai
        for kind in ("insertion", "deletion"):
            curve, auc = ref.curve(saliency, c, kind)
            np.testing.assert_allclose(result.curves[kind], curve, atol=2e-4)
            assert result.values[kind] == pytest.approx(auc, abs=2e-4)
        hit, energy = pointing_reference(saliency, box)
        assert result.values["pointing_game"] == hit
        assert result.values["energy_pointing_game"] == pytest.approx(energy, abs=1e-9)
    # The curves' end points run once per image; every inner point is one sample, in batches of max_batch.
    inner = len(maps) * (STEPS - 1) * 2
    assert passes.forward_samples == 1 + len(maps) + 2 + inner
    assert passes.runs == 1 + 1 + 1 + 2 * -(-len(maps) * (STEPS - 1) // runner.max_batch)


@needs_shared
def test_a_constant_map_masks_everything_and_pointing_needs_positive_energy(effnet):
    runner, pre, session = effnet
    sample = images.preprocess(Image.open(SHARED_IMAGES[0]).convert("RGB"), pre).sample
    flat = np.full((1, 224, 224), -1.0, np.float32)
    result = metrics.evaluate(runner, sample, flat, [0], pre, ["average_drop", "energy_pointing_game"],
                              boxes=[(0, 0, 50, 50)])[0]
    black = metrics.black_sample(pre)[None]
    p_black = softmax(session.run(None, {"input": black})[0])[0, 0]
    assert result.masked_score == pytest.approx(p_black, abs=1e-5)   # constant map -> mask 0 -> black image
    assert result.values["energy_pointing_game"] == 0.0


# ------------------------------------------------------------------------------------------ NHWC layout

def linear_nhwc_model(h, w, c, k, seed=0):
    weights = np.random.default_rng(seed).normal(size=(h * w * c, k)).astype(np.float32) / 8
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "W"], ["logits"])],
        "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", h, w, c])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k])],
        initializer=[numpy_helper.from_array(weights, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), weights


def test_nhwc_model_and_batches_smaller_than_the_curve():
    h, w, c, k = 6, 7, 3, 4
    model, weights = linear_nhwc_model(h, w, c, k)
    runner = Runner(model, "logits", "x", max_batch=3)
    pre = images.Preprocessing(h, w, fit="stretch", layout="NHWC", scale=1 / 255, mean=(0.5, 0.4, 0.3),
                               std=(0.2, 0.3, 0.25))
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (h, w, c)).astype(np.float64)
    mean, std = np.array(pre.mean), np.array(pre.std)

    def prob(px, cls):
        x = ((px / 255 - mean) / std).reshape(len(px), -1)
        return softmax(x @ weights.astype(np.float64))[:, cls]

    sample = ((pixels / 255 - mean) / std).astype(np.float32)
    maps = rng.normal(size=(2, h, w)).astype(np.float32)
    steps = 5
    got = metrics.evaluate(runner, sample, maps, [1, 3], pre, ["average_drop", "average_gain", "deletion", "insertion"],
                           steps=steps, blur_sigma=1.0, return_curves=True)
    blurred_x = metrics.blurred_sample(sample, 1.0, "NHWC")
    for saliency, cls, result in zip(maps, [1, 3], got):
        m = (saliency - saliency.min()) / (saliency.max() - saliency.min())
        y, o = prob(pixels[None], cls)[0], prob((pixels * m[..., None])[None], cls)[0]
        assert result.values["average_drop"] == pytest.approx(max(0, y - o) / y, abs=1e-5)
        assert result.values["average_gain"] == pytest.approx(max(0, o - y) / y, abs=1e-5)
        order = np.argsort(-saliency.ravel(), kind="stable")
        deletion, insertion = [], []
        for kk in range(steps + 1):
            chosen = np.zeros(h * w, bool)
            chosen[order[:kk * h * w // steps]] = True
            chosen = chosen.reshape(h, w, 1)
            deletion.append(prob(np.where(chosen, 0.0, pixels)[None], cls)[0])
            x = np.where(chosen, sample, blurred_x).reshape(1, -1)
            insertion.append(softmax(x @ weights.astype(np.float64))[0, cls])
        np.testing.assert_allclose(result.curves["deletion"], deletion, atol=1e-5)
        np.testing.assert_allclose(result.curves["insertion"], insertion, atol=1e-5)
        assert result.values["deletion"] == pytest.approx(np.trapezoid(deletion, dx=1 / steps), abs=1e-5)


def nhwc_case(h=6, w=7, c=3, k=4, model=None):
    """A runner over `model` (default: the linear NHWC model), its preprocessing and a sample of pixels 128..255."""
    model = model if model is not None else linear_nhwc_model(h, w, c, k)[0]
    runner = Runner(model, "logits", "x", max_batch=3)
    pre = images.Preprocessing(h, w, fit="stretch", layout="NHWC", scale=1 / 255, mean=(0.5, 0.4, 0.3),
                               std=(0.2, 0.3, 0.25))
    pixels = np.random.default_rng(1).integers(128, 256, (h, w, c)).astype(np.float64)
    return runner, pre, ((pixels / 255 - np.array(pre.mean)) / np.array(pre.std)).astype(np.float32)


def test_a_map_spanning_the_float32_range_scores_as_the_same_map_at_any_scale():
    runner, pre, sample = nhwc_case()
    saliency = np.random.default_rng(3).normal(size=(6, 7))
    saliency = (saliency / np.abs(saliency).max()).astype(np.float32)
    huge = saliency * np.float32(3e38)   # +-3e38: max - min is over float32's 3.4e38
    with np.errstate(over="ignore"):
        assert np.isinf(huge.max() - huge.min())
    masking = ["average_drop", "average_gain", "average_increase"]
    plain, large = metrics.evaluate(runner, sample, np.stack([saliency, huge]), [3, 3], pre, masking + ["deletion"],
                                    steps=4)
    assert plain.values["average_drop"] > 0.1, "masking lowers this class's score: 0.0 would be the best score"
    for name in masking + ["deletion"]:
        assert large.values[name] == pytest.approx(plain.values[name], abs=1e-6), name
    assert large.masked_score == pytest.approx(plain.masked_score, abs=1e-6)


def nan_below_model(threshold: float, h=6, w=7, c=3, k=4, bias=(0.0, 0.0, 0.0, 0.0)):
    """The linear NHWC model plus bias, whose scores are NaN when any input value is below `threshold`
    (+ 0 * sqrt(min(x) - threshold))."""
    model, _ = linear_nhwc_model(h, w, c, k)
    g = model.graph
    g.node[-1].output[0] = "linear"
    g.node.extend([helper.make_node("Add", ["linear", "bias"], ["biased"]),
                   helper.make_node("ReduceMin", ["x"], ["low"], keepdims=0),
                   helper.make_node("Sub", ["low", "threshold"], ["margin"]),
                   helper.make_node("Sqrt", ["margin"], ["root"]),
                   helper.make_node("Mul", ["root", "zero"], ["nan_or_zero"]),
                   helper.make_node("Add", ["biased", "nan_or_zero"], ["logits"])])
    g.initializer.extend([numpy_helper.from_array(np.asarray(bias, np.float32), "bias"),
                          numpy_helper.from_array(np.float32(threshold), "threshold"),
                          numpy_helper.from_array(np.float32(0), "zero")])
    return model


def test_a_metric_that_would_not_be_finite_is_an_error():
    saliency = np.random.default_rng(4).normal(size=(1, 6, 7)).astype(np.float32)
    # the image's values are all >= 0, black's are -2.5, -1.33 and -1.2: the masked and deleted images are NaN
    runner, pre, sample = nhwc_case(model=nan_below_model(-0.5))
    assert np.isfinite(runner.scores(sample[None], Passes())).all()
    with pytest.raises(metrics.NotFinite, match="average_drop, average_gain, average_increase of map 0 .* NaN or Inf"):
        metrics.evaluate(runner, sample, saliency, [3], pre, ["average_drop", "average_gain", "average_increase"])
    with pytest.raises(metrics.NotFinite, match="deletion of map 0"):
        metrics.evaluate(runner, sample, saliency, [3], pre, ["deletion"], steps=4)
    # class 1's logit is 2000 below the others: p_1 = 0 in float64, and average drop and gain divide by it
    runner, pre, sample = nhwc_case(model=nan_below_model(-10.0, bias=(0, -2000, 0, 0)))
    with pytest.raises(metrics.NotFinite, match="average_drop of map 1 .* class 1 has probability 0"):
        metrics.evaluate(runner, sample, np.concatenate([saliency] * 2), [3, 1], pre, ["average_drop"])
    assert metrics.evaluate(runner, sample, saliency, [1], pre, ["average_increase"])[0].values == {
        "average_increase": 0.0}
    with pytest.raises(ValueError, match="maps must be finite"):
        metrics.evaluate(runner, sample, np.full((1, 6, 7), np.nan, np.float32), [1], pre, ["deletion"])


def test_blur_equals_the_pixel_blur_and_ranks_are_stable():
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (9, 11, 3)).astype(np.float64)
    x = ((pixels / 255 - 0.5) / 0.25).transpose(2, 0, 1).astype(np.float32)
    blurred = metrics.blurred_sample(x, 1.5, "NCHW")
    expected = ((gaussian_blur_pixels(pixels, 1.5) / 255 - 0.5) / 0.25).transpose(2, 0, 1)
    np.testing.assert_allclose(blurred, expected, atol=1e-5)
    ranks = metrics.ranks(np.array([[[1.0, 3.0], [3.0, 1.0]]], np.float32))
    assert ranks.tolist() == [[[2, 0], [1, 3]]]
    assert metrics.counts(4, 10).tolist() == [0, 2, 5, 7, 10]
    assert metrics.area(np.array([0.0, 1.0, 1.0])) == pytest.approx(0.75)


def test_bad_arguments_are_refused():
    model, _ = linear_nhwc_model(4, 4, 3, 2)
    runner = Runner(model, "logits", "x")
    pre = images.Preprocessing(4, 4, fit="stretch", layout="NHWC")
    sample = np.zeros((4, 4, 3), np.float32)
    with pytest.raises(ValueError, match="maps must be"):
        metrics.evaluate(runner, sample, np.zeros((1, 3, 4), np.float32), [0], pre, ["deletion"])
    with pytest.raises(ValueError, match="unknown metrics"):
        metrics.evaluate(runner, sample, np.zeros((1, 4, 4), np.float32), [0], pre, ["auc"])
    with pytest.raises(ValueError, match="box"):
        metrics.evaluate(runner, sample, np.zeros((1, 4, 4), np.float32), [0], pre, ["pointing_game"])
