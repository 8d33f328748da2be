"""Faithfulness metrics of saliency maps, computed on a model's `Runner` (numpy + onnxruntime, no gRPC).

Every score below is the softmax probability p_c of the map's class c over the model's score tensor, as in
the Grad-CAM++ (Chattopadhay et al., WACV 2018), Opti-CAM (Zhang et al., 2023) and RISE (Petsiuk et al.,
BMVC 2018) papers; for a multi-label model (Runner.probabilities "sigmoid") the sigmoid of its score.

Masking by a map. Grad-CAM++ and Opti-CAM mask *the image*: E = n(map) ⊙ I, with n the min-max
normalisation to [0, 1]. Models take preprocessed inputs x = (pixel * scale - mean) / std, so multiplying x
itself would blend every pixel towards the dataset mean (x = 0 is a grey image for mean/std-normalised
models), not towards black as the papers' masked images are. We mask the pixels: with b the preprocessed black
image (pixel = 0, i.e. b = -mean / std per channel),

    masked = b + m ⊙ (x - b)        (= preprocess(m ⊙ pixels), exactly, because preprocessing is affine)

which equals m ⊙ x for models without a mean (scale-only preprocessing) and is the papers' definition for all.
Any finite map normalises, also one spanning +-3.4e38 (Builder.minmax works on its halves).

Per map, with Y = p_c(x) and O = p_c(masked):
    average drop      max(0, Y - O) / Y    (its mean over a dataset is AD; the papers print it x 100)
    average gain      max(0, O - Y) / Y    (its mean is Opti-CAM's AG)
    average increase  1[Y < O]             (its mean is AI, the share of images whose score rises)

Insertion and deletion (RISE). Pixels are ranked by decreasing map value (ties in raster order: a stable
sort). Point k = 0..steps of a curve reveals the first n_k = floor(k * H * W / steps) ranked pixels:
    deletion   start from the image, the revealed pixels become black (b):       Where(rank < n_k, b, x)
    insertion  start from a Gaussian blur of the image (sigma in input pixels), the revealed pixels are the
               image's own:                                                       Where(rank < n_k, x, blur)
and the curve is p_c of each. The value is the area under the curve over x = k / steps in [0, 1] (trapezoids):
high is good for insertion, low for deletion. Blurring the preprocessed tensor per channel equals blurring
the pixels (the kernel sums to 1 and the preprocessing is affine per channel). The end points (k = 0 and
k = steps) are the same images for every map of an image and are run once per image.

Pointing games (with object boxes in input pixels; a pixel (i, j) is in a box when x0 <= j + 0.5 < x1 and
y0 <= i + 0.5 < y1; several boxes count as their union):
    pointing game         1 when the map's maximum (the first in raster order) is in a box (Zhang et al., 2016,
                          without their 15-pixel tolerance)
    energy pointing game  sum of max(map, 0) in the boxes / its sum over the image (Score-CAM, Wang et al. 2020;
                          scale invariant; 0 for a map without positive values)

The perturbed inputs are built inside onnxruntime by small graphs composed in front of the model: a blend graph
(min-max normalisation and b + m ⊙ (x - b) for a batch of maps) and a reveal graph (Where(Gather(ranks,
which) < counts, end, start) for a batch of (map, k) pairs), so Python only feeds per-pixel ranks once per map
and small per-sample numbers. All of it runs in batches of `runner.max_batch`.

No metric is made of a NaN: one that would not be finite (a model score behind it is NaN or Inf, or Y = 0 for
average drop and gain) raises NotFinite instead of being reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from onnx import TensorProto
from scipy import ndimage, special

from .compose import PREFIX
from .images import black_sample
from .methods.perturb import Builder, batches, compose_front, sample_info, value_info
from .runtime import Passes, Runner

AVERAGE_DROP = "average_drop"
AVERAGE_GAIN = "average_gain"
AVERAGE_INCREASE = "average_increase"
INSERTION = "insertion"
DELETION = "deletion"
POINTING_GAME = "pointing_game"
ENERGY_POINTING_GAME = "energy_pointing_game"
METRICS = (AVERAGE_DROP, AVERAGE_GAIN, AVERAGE_INCREASE, INSERTION, DELETION, POINTING_GAME, ENERGY_POINTING_GAME)
MASKING = (AVERAGE_DROP, AVERAGE_GAIN, AVERAGE_INCREASE)
CURVES = (INSERTION, DELETION)
POINTING = (POINTING_GAME, ENERGY_POINTING_GAME)


class NotFinite(ValueError):
    """A score behind a metric is not finite, so neither is the metric: the model's scores for a perturbed input
    are NaN or Inf, or the map's class has probability 0 (average drop and gain divide by it). `index` is the
    map's position in the maps given to `evaluate`."""

    def __init__(self, index: int, metrics: list[str], reason: str):
        super().__init__(f"{', '.join(metrics)} of map {index} would not be finite: {reason}")
        self.index, self.metrics, self.reason = index, metrics, reason


@dataclass
class MapScores:
    """The metrics of one map: values by metric name, the curves asked for, and the scores behind them."""

    values: dict[str, float] = field(default_factory=dict)
    curves: dict[str, np.ndarray] = field(default_factory=dict)   # insertion/deletion, steps + 1 points
    class_score: float = 0.0                                       # Y = p_c(x)
    masked_score: float | None = None                              # O = p_c(masked x), when a masking metric ran


# ------------------------------------------------------------------------------------------------- plain parts

def probabilities(scores: np.ndarray, kind: str = "softmax") -> np.ndarray:
    """Class probabilities from scores [..., classes], in float64: the softmax over the classes (one class per
    image), or each class's own sigmoid (kind "sigmoid": a multi-label model)."""
    z = scores.astype(np.float64)
    if kind == "sigmoid":
        return special.expit(z)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def blurred_sample(sample: np.ndarray, sigma: float, layout: str) -> np.ndarray:
    """Gaussian blur of one sample over its spatial axes only (reflected borders, truncated at 4 sigma)."""
    sigmas = (0, sigma, sigma) if layout == "NCHW" else (sigma, sigma, 0)
    return ndimage.gaussian_filter(sample.astype(np.float64), sigmas, mode="reflect", truncate=4.0).astype(np.float32)


def ranks(maps: np.ndarray) -> np.ndarray:
    """[M, H, W] -> int64 [M, H, W]: each pixel's position when sorted by decreasing value (stable: ties in raster
    order)."""
    flat = maps.reshape(len(maps), -1)
    order = np.argsort(-flat.astype(np.float64), axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(flat.shape[1])[None, :].repeat(len(flat), 0), axis=1)
    return rank.reshape(maps.shape).astype(np.int64)


def counts(steps: int, pixels: int) -> np.ndarray:
    """Pixels revealed at each point k = 0..steps: floor(k * pixels / steps)."""
    return (np.arange(steps + 1, dtype=np.int64) * pixels) // steps


def area(curve: np.ndarray) -> float:
    """Area under a curve sampled at k / steps, k = 0..steps (trapezoids), in [0, 1] for curves in [0, 1]."""
    curve = np.asarray(curve, np.float64)
    return float((curve[:-1] + curve[1:]).sum() / 2 / (len(curve) - 1))


def box_mask(boxes: Sequence[tuple[float, float, float, float]], height: int, width: int) -> np.ndarray:
    """[H, W] bool: pixel centres inside the union of the boxes (x0, y0, x1, y1), x1/y1 exclusive."""
    rows = np.arange(height)[:, None] + 0.5
    cols = np.arange(width)[None, :] + 0.5
    inside = np.zeros((height, width), bool)
    for x0, y0, x1, y1 in boxes:
        inside |= (cols >= x0) & (cols < x1) & (rows >= y0) & (rows < y1)
    return inside


def pointing_game(saliency: np.ndarray, inside: np.ndarray) -> float:
    return float(inside.reshape(-1)[int(np.argmax(saliency.reshape(-1)))])


def energy_pointing_game(saliency: np.ndarray, inside: np.ndarray) -> float:
    positive = np.maximum(saliency.astype(np.float64), 0)
    total = positive.sum()
    return float(positive[inside].sum() / total) if total > 0 else 0.0


# ------------------------------------------------------------------------------------------------- graphs

def blend_graph(runner: Runner, layout: str, spatial: tuple[int, int], channels: int):
    """scores(b + minmax(maps) * (x - b)): one sample x, the black sample b, maps [B, 1, H, W]."""
    b = Builder(runner.model)
    x, base, maps = f"{PREFIX}x", f"{PREFIX}base", f"{PREFIX}maps"
    blended = b.masked_input(x, b.minmax(maps), layout, base=base)
    inputs = [sample_info(layout, spatial, channels), sample_info(layout, spatial, channels, base),
              value_info(maps, ["B", 1, *spatial])]
    return compose_front(runner.model, runner.input_name, b, inputs, blended, [runner.score_name])


def reveal_graph(runner: Runner, layout: str, spatial: tuple[int, int], channels: int):
    """scores(Where(Gather(ranks, which) < counts, end, start)): start and end one sample each, ranks int64
    [M, 1, H, W] (NCHW) or [M, H, W, 1] (NHWC), which int64 [B] (a map per sample), counts int64 [B, 1, 1, 1]."""
    b = Builder(runner.model)
    start, end = f"{PREFIX}start", f"{PREFIX}end"
    rank, which, count = f"{PREFIX}ranks", f"{PREFIX}which", f"{PREFIX}counts"
    revealed = b.op("Less", b.op("Gather", rank, which, axis=0), count)
    perturbed = b.op("Where", revealed, end, start)
    rank_shape = ["M", 1, *spatial] if layout == "NCHW" else ["M", *spatial, 1]
    inputs = [sample_info(layout, spatial, channels, start), sample_info(layout, spatial, channels, end),
              value_info(rank, rank_shape, TensorProto.INT64), value_info(which, ["B"], TensorProto.INT64),
              value_info(count, ["B", 1, 1, 1], TensorProto.INT64)]
    return compose_front(runner.model, runner.input_name, b, inputs, perturbed, [runner.score_name])


# ------------------------------------------------------------------------------------------------- evaluation

def evaluate(runner: Runner, sample: np.ndarray, maps: np.ndarray, classes: Sequence[int], preprocessing,
             metrics: Sequence[str], *, steps: int = 50, blur_sigma: float = 5.0,
             boxes: Sequence[tuple[float, float, float, float]] = (), return_curves: bool = False,
             passes: Passes | None = None, between_batches: Callable[[], None] | None = None,
             scores: np.ndarray | None = None) -> list[MapScores]:
    """The metrics of M maps [M, H, W] (input resolution) of one preprocessed sample, map i explaining
    classes[i]. Pointing games need `boxes` (input pixels); `between_batches` is called between model runs
    (e.g. to stop a cancelled call by raising); `scores` are the sample's scores when the caller has them."""
    passes = passes if passes is not None else Passes()
    check = between_batches or (lambda: None)
    layout = preprocessing.layout
    maps = np.asarray(maps, np.float32)
    classes = np.asarray(classes, np.int64)
    spatial = tuple(sample.shape[1:] if layout == "NCHW" else sample.shape[:2])
    if maps.ndim != 3 or maps.shape[1:] != spatial:
        raise ValueError(f"maps must be [M, {spatial[0]}, {spatial[1]}], got {list(maps.shape)}")
    if len(classes) != len(maps):
        raise ValueError(f"{len(maps)} maps need {len(maps)} classes, got {len(classes)}")
    if not np.isfinite(maps).all():
        raise ValueError("maps must be finite; they contain NaN or Inf")
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; metrics: {list(METRICS)}")
    if set(metrics) & set(POINTING) and not boxes:
        raise ValueError("the pointing games need at least one box")
    channels = sample.shape[0] if layout == "NCHW" else sample.shape[-1]
    key = f"{layout}/{spatial}/{channels}"
    black = black_sample(preprocessing)[None]
    x = sample[None].astype(np.float32)
    if scores is None:
        scores = runner.scores(x, passes)[0]
    y = probabilities(scores, runner.probabilities)[classes]
    placed_x, placed_black = runner.resident(x), runner.resident(black)     # fed to every run below
    results = [MapScores(class_score=float(v)) for v in y]

    if set(metrics) & set(MASKING):
        session = runner.graph(f"metrics/blend/{key}", lambda: blend_graph(runner, layout, spatial, channels))
        masked = np.empty(len(maps))
        for lo, hi in batches(len(maps), runner.max_batch):
            check()
            feeds = {f"{PREFIX}x": placed_x, f"{PREFIX}base": placed_black, f"{PREFIX}maps": maps[lo:hi, None]}
            out = runner.run(session, [runner.score_name], feeds, passes, samples=hi - lo)[0]
            masked[lo:hi] = probabilities(out, runner.probabilities)[np.arange(hi - lo), classes[lo:hi]]
        for r, yv, o in zip(results, y, masked):
            r.masked_score = float(o)
            # check_finite refuses what a NaN O or Y = 0 makes of these
            values = {AVERAGE_DROP: max(0.0, yv - o) / yv if yv > 0 else np.nan,
                      AVERAGE_GAIN: max(0.0, o - yv) / yv if yv > 0 else np.nan, AVERAGE_INCREASE: float(yv < o)}
            r.values.update({m: float(values[m]) for m in MASKING if m in metrics})

    curves = [m for m in CURVES if m in metrics]
    if curves:
        height, width = spatial
        n = counts(steps, height * width)
        rank = ranks(maps)
        rank = rank[:, None] if layout == "NCHW" else rank[..., None]
        session = runner.graph(f"metrics/reveal/{key}", lambda: reveal_graph(runner, layout, spatial, channels))
        blurred = blurred_sample(sample, blur_sigma, layout)[None] if INSERTION in curves else None
        placed_rank = runner.resident(rank)
        ends = {DELETION: (placed_x, placed_black),
                INSERTION: (runner.resident(blurred) if blurred is not None else None, placed_x)}
        # The end points are the same images for every map: run them once.
        fixed = {DELETION: black, INSERTION: blurred}
        edge = probabilities(runner.scores(np.concatenate([fixed[c] for c in curves]), passes), runner.probabilities)
        inner = [(i, k) for i in range(len(maps)) for k in range(1, steps)]
        for ci, curve_name in enumerate(curves):
            start, end = ends[curve_name]
            values = np.empty((len(maps), steps + 1))
            first = y if curve_name == DELETION else edge[ci][classes]
            last = edge[ci][classes] if curve_name == DELETION else y
            values[:, 0], values[:, steps] = first, last
            for lo, hi in batches(len(inner), runner.max_batch):
                check()
                pairs = np.asarray(inner[lo:hi], np.int64)
                feeds = {f"{PREFIX}start": start, f"{PREFIX}end": end, f"{PREFIX}ranks": placed_rank,
                         f"{PREFIX}which": pairs[:, 0], f"{PREFIX}counts": n[pairs[:, 1]].reshape(-1, 1, 1, 1)}
                out = runner.run(session, [runner.score_name], feeds, passes, samples=hi - lo)[0]
                values[pairs[:, 0], pairs[:, 1]] = probabilities(out, runner.probabilities)[
                    np.arange(hi - lo), classes[pairs[:, 0]]]
            for r, curve in zip(results, values):
                r.values[curve_name] = area(curve)
                if return_curves:
                    r.curves[curve_name] = curve

    if set(metrics) & set(POINTING):
        inside = box_mask(boxes, *spatial)
        for r, saliency in zip(results, maps):
            if POINTING_GAME in metrics:
                r.values[POINTING_GAME] = pointing_game(saliency, inside)
            if ENERGY_POINTING_GAME in metrics:
                r.values[ENERGY_POINTING_GAME] = energy_pointing_game(saliency, inside)
    for i, r in enumerate(results):
        check_finite(i, int(classes[i]), r)
    return results


def check_finite(index: int, c: int, r: MapScores) -> None:
    """Raise NotFinite unless every number of `r` is finite. A NaN slips through comparisons (max(0, Y - NaN) is
    0, the best average drop), so nothing computed from one may be reported as a score."""
    bad = {name for name, value in r.values.items() if not np.isfinite(value)}
    if not np.isfinite(r.class_score):   # every metric but the pointing games reads Y
        bad |= set(r.values) - set(POINTING)
    if r.masked_score is not None and not np.isfinite(r.masked_score):
        bad |= set(r.values) & set(MASKING)
    if not bad:
        return
    if r.class_score == 0 and np.isfinite(r.masked_score if r.masked_score is not None else 0.0):
        reason = (f"class {c} has probability 0 on this image (in float64), and average drop and gain are "
                  "relative to it")
    else:
        reason = "the model's scores for the perturbed inputs they need are NaN or Inf"
    raise NotFinite(index, sorted(bad), reason)
