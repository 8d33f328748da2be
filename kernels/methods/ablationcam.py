"""Ablation-CAM (Desai & Ramaswamy, "Ablation-CAM: Visual Explanations for Deep Convolutional Network via
Gradient-free Localization", WACV 2020).

Zero one activation map A_k of the layer at a time and see how much the target's score falls:

    w_k = (y_c - y_c^k) / y_c,   map = ReLU(sum_k w_k A_k)   (at the layer's grid)

y_c is the model's score (logit) for the image, y_c^k the score with A_k zeroed. The model is cut at the layer
(kernels.graph.cut): the body runs once, and only the head runs for the K ablated copies, batched; the copies
are made inside onnxruntime (the layer tensor times a per-channel keep vector, composed in front of the head),
so Python hands over K numbers per ablation, never a feature map. All targets come from the same head runs.
For token layers (N x T x C) the channel is zeroed on the grid tokens only; prefix tokens (CLS) are kept, as
the map's A_k is the channel over the grid. pytorch-grad-cam's AblationCAM uses the same weight formula.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ..compose import PREFIX
from ..graph import cut
from .base import Event, Job, Maps, Method, ParamError, Progress
from .layers import as_maps
from .perturb import Builder, batches, compose_front, value_info


def ablation_graphs(runner, layer):
    """(body model, head model that takes the layer tensor of one sample, a keep vector per copy [B, K] and the
    extra tensors the head needs, and returns the scores of the B ablated copies, extra names)."""
    body, head = cut(runner.model, layer.name)
    extras = [i.name for i in head.graph.input][1:]
    channels = layer.shape[1] if layer.kind == "spatial" else layer.shape[-1]
    b = Builder(head)
    act, keep = f"{PREFIX}act", f"{PREFIX}keep"
    if layer.kind == "spatial":
        ablated = b.op("Mul", act, b.unsqueeze(keep, [2, 3]))
    elif layer.kind == "spatial_nhwc":
        ablated = b.op("Mul", act, b.unsqueeze(keep, [1, 2]))
    else:   # tokens: 1 - (1 - keep) on the grid tokens only
        tokens = layer.shape[1]
        on_grid = np.zeros((1, tokens, 1), np.float32)
        on_grid[:, layer.prefix_tokens:layer.prefix_tokens + layer.grid[0] * layer.grid[1]] = 1
        drop = b.op("Sub", b.const(1.0), b.unsqueeze(keep, [1]))
        ablated = b.op("Mul", act, b.op("Sub", b.const(1.0), b.op("Mul", drop, b.const(on_grid))))
    shape = [1, *[d if isinstance(d, int) else None for d in layer.shape[1:]]]
    inputs = [value_info(act, shape), value_info(keep, ["B", channels]),
              *[i for i in head.graph.input if i.name in extras]]
    composed = compose_front(head, layer.name, b, inputs, ablated, [runner.score_name])
    return body, composed, extras


def sessions(runner, layer):
    def build():
        body, head, extras = ablation_graphs(runner, layer)
        return runner.graph(f"ablationcam/body/{layer.name}", lambda: body), \
            runner.graph(f"ablationcam/head/{layer.name}", lambda: head), extras
    return runner.cached(f"ablationcam/{layer.name}", build)


def run(job: Job) -> Iterator[Event]:
    runner, layer = job.runner, job.layer
    body, head, extras = sessions(runner, layer)
    outputs = runner.run(body, [layer.name, *extras], {runner.input_name: job.sample[None]}, job.passes)
    activation, rest = outputs[0], outputs[1:]
    maps = as_maps(activation, layer)[0].astype(np.float64)              # [K, h, w]
    count = len(maps)
    original = job.sample_scores()[job.targets].astype(np.float64)     # [T]
    ablated = np.zeros((count, len(job.targets)))
    act = runner.resident(activation)
    repeated = {}       # batch size -> the other tensors the head reads, one copy per sample, placed once
    for start, stop in batches(count, runner.max_batch):
        keep = np.ones((stop - start, count), np.float32)
        keep[np.arange(stop - start), np.arange(start, stop)] = 0
        if stop - start not in repeated:
            repeated[stop - start] = {name: runner.resident(np.repeat(value, stop - start, axis=0))
                                      for name, value in zip(extras, rest)}
        feeds = {f"{PREFIX}act": act, f"{PREFIX}keep": keep, **repeated[stop - start]}
        scores = runner.run(head, [runner.score_name], feeds, job.passes, samples=stop - start)[0]
        ablated[start:stop] = scores[:, job.targets]
        yield Progress(stop, count, "ablating activation maps")
    safe = np.where(original != 0, original, np.finfo(np.float32).tiny)
    weights = (original[None, :] - ablated) / safe[None, :]              # [K, T]
    result = np.maximum(np.einsum("kt,khw->thw", weights, maps), 0)
    yield Maps(result.astype(np.float32), final=True)


def _check_layer(runner, layer) -> None:
    try:
        sessions(runner, layer)
    except ValueError as exc:
        raise ParamError(f"ablationcam cannot cut the model at layer {layer.name}: {exc}") from exc


METHOD = Method(
    name="ablationcam",
    family="cam",
    description="ReLU(sum_k w_k A_k), w_k = relative drop of the target's score when the layer's map A_k is "
                "zeroed (only the part of the model after the layer runs per ablated map).",
    reference="Desai & Ramaswamy, Ablation-CAM: Visual Explanations for Deep Convolutional Network via "
              "Gradient-free Localization, WACV 2020",
    params=(),
    run=run,
    uses_layer=True,
    check_for_layer=_check_layer,
)
