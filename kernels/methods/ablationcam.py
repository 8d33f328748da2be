"""Ablation-CAM (Desai & Ramaswamy, "Ablation-CAM: Visual Explanations for Deep Convolutional Network via
Gradient-free Localization", WACV 2020).

Zero one activation map A_k of the layer at a time and see how much the target's score falls:

    w_k = (y_c - y_c^k) / y_c,   map = ReLU(sum_k w_k A_k)   (at the layer's grid)

y_c is the model's score (logit) for the image, y_c^k the score with A_k zeroed. The model is cut at the layer
(kernels.graph.cut): the body runs once, and only the head runs for the K ablated copies, batched; the copies
are made inside onnxruntime (the layer tensor times a per-channel keep vector, composed in front of the head),
so Python hands over K numbers per ablation, never a feature map. All targets come from the same head runs.
Zeroing a channel commutes with the ReLU, global pooling and spatial reductions that usually start a head, so
the keep vector multiplies the tensor after them, and they run once on the image instead of on every copy:
behind a pooled layer only the classifier runs per copy (exactly the same scores; on the shipped shapes model
and EfficientNet-Lite0 the copies are [K] vectors instead of K x h x w maps).
For token layers (N x T x C) the channel is zeroed on the grid tokens only; prefix tokens (CLS) are kept, as
the map's A_k is the channel over the grid. pytorch-grad-cam's AblationCAM uses the same weight formula.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from onnx import helper

from ..compose import PREFIX
from ..graph import _Graph, cut
from .base import Event, Job, Maps, Method, ParamError, Progress
from .cam import layer_body
from .layers import as_maps
from .perturb import Builder, batches, compose_front, value_info


# Zeroing channel k commutes with these (f(A * keep) = f(A) * keep for a keep vector of 0s and 1s along the
# channel axis), so the ablation moves past them and they run once on the sample instead of on every copy:
# behind the usual head's global pooling only the classifier runs per copy. Reductions keep the channel axis.
_POOLS = ("GlobalAveragePool", "GlobalMaxPool")
_REDUCTIONS = ("ReduceMean", "ReduceMax", "ReduceSum")


def _commuting_chain(head, start: str, channel_axis: int, rank: int) -> tuple[str, int, int]:
    """The last tensor of the chain of single-consumer commuting ops that starts at `start`, with its channel
    axis and rank (start itself when the first consumer does not commute)."""
    index = _Graph(head)          # consumers, and the constant value of a reduction's axes input
    outputs = {o.name for o in head.graph.output}
    tensor = start
    while tensor not in outputs and len(index.consumers.get(tensor, [])) == 1:
        node = index.consumers[tensor][0]
        if node.input[0] != tensor or len(node.output) != 1:
            break
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Relu" or node.op_type == "Identity" or (node.op_type in _POOLS and channel_axis == 1):
            pass
        elif node.op_type in _REDUCTIONS:
            axes = attrs.get("axes")
            if axes is None and len(node.input) > 1 and index.const(node.input[1]) is not None:
                axes = index.const(node.input[1]).tolist()
            axes = sorted(a % rank for a in axes or [])
            if not axes or 0 in axes or channel_axis in axes:
                break
            if not attrs.get("keepdims", 1):
                channel_axis -= sum(a < channel_axis for a in axes)
                rank -= len(axes)
        else:
            break
        tensor = node.output[0]
    return tensor, channel_axis, rank


def ablation_graphs(runner, layer):
    """(body model, head model that takes the layer tensor of one sample, a keep vector per copy [B, K] and the
    extra tensors the head needs, and returns the scores of the B ablated copies, extra names)."""
    body, head = cut(runner.model, layer.name)
    extras = [i.name for i in head.graph.input][1:]
    channels = layer.shape[1] if layer.kind == "spatial" else layer.shape[-1]
    b = Builder(head)
    act, keep = f"{PREFIX}act", f"{PREFIX}keep"
    at = layer.name
    if layer.kind in ("spatial", "spatial_nhwc"):
        rank = len(layer.shape)
        at, axis, rank = _commuting_chain(head, layer.name, 1 if layer.kind == "spatial" else rank - 1, rank)
        if at != layer.name:       # the chain runs on the sample's layer tensor, fed under the prefix's name
            b.op("Identity", act, out=layer.name)
        ablated = b.op("Mul", act if at == layer.name else at,
                       b.unsqueeze(keep, [i for i in range(1, rank) if i != axis]))
    else:   # tokens: 1 - (1 - keep) on the grid tokens only
        tokens = layer.shape[1]
        on_grid = np.zeros((1, tokens, 1), np.float32)
        on_grid[:, layer.prefix_tokens:layer.prefix_tokens + layer.grid[0] * layer.grid[1]] = 1
        drop = b.op("Sub", b.const(1.0), b.unsqueeze(keep, [1]))
        ablated = b.op("Mul", act, b.op("Sub", b.const(1.0), b.op("Mul", drop, b.const(on_grid))))
    shape = [1, *[d if isinstance(d, int) else None for d in layer.shape[1:]]]
    inputs = [value_info(act, shape), value_info(keep, ["B", channels]),
              *[i for i in head.graph.input if i.name in extras]]
    composed = compose_front(head, at, b, inputs, ablated, [runner.score_name])
    return body, composed, extras


def head_session(runner, layer):
    def build():
        _, head, extras = ablation_graphs(runner, layer)
        return runner.graph(f"ablationcam/head/{layer.name}", lambda: head), extras
    return runner.cached(f"ablationcam/{layer.name}", build)


def run(job: Job) -> Iterator[Event]:
    runner, layer = job.runner, job.layer
    head, extras = head_session(runner, layer)
    outputs = layer_body(job)       # the body's run, shared with the request's other layer methods
    if outputs is None:
        raise ParamError(f"ablationcam: the model cannot be cut at layer {layer.name}")
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
        head_session(runner, layer)
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
