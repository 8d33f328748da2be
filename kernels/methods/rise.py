"""RISE (Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for Explanation of Black-box Models",
BMVC 2018).

N random masks M_i: a coarse s x s binary grid whose cells are kept with probability p1, upsampled bilinearly
(half-pixel centres) to (s + 1) * ceil(H / s) pixels a side and cropped to H x W at a random shift in
[0, ceil(H / s)) (per axis), so that the cell borders fall anywhere. The map is the score-weighted average

    map = sum_i S_c(x * M_i) M_i / (N * p1)

with S the model's score tensor (the logits when the model ends in a softmax), as for every other method here.
The paper's experiments and the authors' code weigh by the class probability instead (softmax over classes);
we do not, because a confident model's probability saturates near 1 on most masked images and the weights then
carry little signal: on held-out images of the shapes model shipped before 2026-11-24, with N = 2000 masks, the
map's maximum fell inside the object for 90% of the images with logits and 77% with probabilities.

The masks are drawn from numpy's default_rng(seed), one row of s*s + 2 uniforms per mask (grid cells, then the
two shifts), so a seed gives the same masks whatever the batch size.

Python only draws the coarse grids and shifts; one graph composed around the model upsamples and crops them
(two batched MatMuls with constant interpolation matrices, see rise_graph), masks the image, runs the model,
takes the targets' scores and accumulates the weighted masks of the batch (MatMul) — per-pixel data never
leaves onnxruntime except as one [T, H*W] sum per batch. All targets share the same masked inputs.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
from onnx import TensorProto

from ..compose import PREFIX
from ..images import linear_weights
from .base import Event, Job, Maps, Method, Param, Progress
from .perturb import Builder, batches, channels_of, compose_front, sample_info, value_info


def cell_size(spatial: tuple[int, int], grid: int) -> tuple[int, int]:
    return math.ceil(spatial[0] / grid), math.ceil(spatial[1] / grid)


def coarse_masks(rng: np.random.Generator, count: int, grid: int, keep: float,
                 cells: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """`count` coarse grids [B, 1, s, s] (float 0/1) and shifts [B, 2] (dy, dx) from the stream `rng`."""
    u = rng.random((count, grid * grid + 2))
    grids = (u[:, :grid * grid] < keep).astype(np.float32).reshape(count, 1, grid, grid)
    shifts = np.floor(u[:, grid * grid:] * np.array(cells)).astype(np.int64)
    return grids, shifts


def rise_graph(runner, layout: str, spatial: tuple[int, int], channels: int, grid: int):
    """(x, grids [B,1,s,s], shifts [B,2], targets [T]) -> sum_b P_t(x * M_b) M_b, [T, H*W].

    Bilinear upsampling is separable, so upsampling grid G to L pixels a side and cropping H x W at shift (dy, dx)
    is M = Uy[dy:dy+H] G Ux[dx:dx+W]^T with U the [L, s] interpolation matrix: the crops of U for every shift
    are a constant table, and the masks of a batch are two batched MatMuls of [H, s] x [s, s] x [s, W]. (An
    ONNX Resize to L x L followed by two GatherElements crops did the same with 3-4 passes over an L x L
    tensor per mask: 9% of a batch's time on the shapes model.)"""
    height, width = spatial
    cy, cx = cell_size(spatial, grid)
    b = Builder(runner.model)
    grids, shifts, targets = f"{PREFIX}grids", f"{PREFIX}shifts", f"{PREFIX}targets"
    uy, ux = linear_weights(grid, (grid + 1) * cy), linear_weights(grid, (grid + 1) * cx)
    rows_at = b.const(np.stack([uy[d:d + height] for d in range(cy)]))                     # [cy, H, s]
    cols_at = b.const(np.stack([ux[d:d + width].T for d in range(cx)]))                    # [cx, s, W]
    rows = b.op("Gather", rows_at, b.op("Gather", shifts, b.const(0, np.int64), axis=1), axis=0)   # [B, H, s]
    cols = b.op("Gather", cols_at, b.op("Gather", shifts, b.const(1, np.int64), axis=1), axis=0)   # [B, s, W]
    coarse = b.op("Reshape", grids, b.const([-1, grid, grid], np.int64))                  # [B, s, s]
    mask = b.op("Reshape", b.op("MatMul", b.op("MatMul", rows, coarse), cols),
                b.const([-1, 1, height, width], np.int64), out=f"{PREFIX}mask")              # [B, 1, H, W]
    masked = b.masked_input(f"{PREFIX}x", mask, layout)
    # after the model: the targets' scores times the masks, summed over the batch
    picked = b.op("Transpose", b.op("Gather", runner.score_name, targets, axis=1), perm=[1, 0])  # [T, B]
    flat = b.op("Reshape", mask, b.const([0, -1], np.int64))                        # [B, H*W]
    b.op("MatMul", picked, flat, out=f"{PREFIX}weighted")
    inputs = [sample_info(layout, spatial, channels), value_info(grids, ["B", 1, grid, grid]),
              value_info(shifts, ["B", 2], TensorProto.INT64), value_info(targets, ["T"], TensorProto.INT64)]
    return compose_front(runner.model, runner.input_name, b, inputs, masked, [f"{PREFIX}weighted"])


def run(job: Job) -> Iterator[Event]:
    count, grid, keep = job.params["masks"], job.params["grid"], job.params["keep_probability"]
    runner = job.runner
    height, width = job.spatial
    channels = channels_of(job.sample, job.layout)
    session = runner.graph(f"rise/{job.layout}/{job.spatial}/{channels}/{grid}", lambda: rise_graph(
        runner, job.layout, job.spatial, channels, grid))
    rng = np.random.default_rng(job.params["seed"])
    cells = cell_size(job.spatial, grid)
    total = np.zeros((len(job.targets), height * width))
    feeds = {f"{PREFIX}x": runner.resident(job.sample[None]),
             f"{PREFIX}targets": runner.resident(job.targets.astype(np.int64))}
    for step, (start, stop) in enumerate(batches(count, runner.max_batch), 1):
        feeds[f"{PREFIX}grids"], feeds[f"{PREFIX}shifts"] = coarse_masks(rng, stop - start, grid, keep, cells)
        total += runner.run(session, [f"{PREFIX}weighted"], feeds, job.passes, samples=stop - start)[0]
        yield Progress(stop, count, "masking at random")
        if job.partial_every and step % job.partial_every == 0 and stop < count:
            yield Maps(_average(total, stop, keep, height, width), final=False, step=step)
    yield Maps(_average(total, count, keep, height, width), final=True)


def _average(total: np.ndarray, count: int, keep: float, height: int, width: int) -> np.ndarray:
    return (total / (count * keep)).reshape(-1, height, width).astype(np.float32)


METHOD = Method(
    name="rise",
    family="perturbation",
    description="Average of random smooth masks weighted by the target's score on the masked image, "
                "divided by N * p1 (the expected score given that the pixel is kept).",
    reference="Petsiuk, Das & Saenko, RISE: Randomized Input Sampling for Explanation of Black-box Models, "
              "BMVC 2018",
    params=(
        Param("masks", "int", 4000, "number of random masks N", 1, 100000),
        Param("grid", "int", 8, "side s of the coarse binary grid, in cells", 2, 64),
        Param("keep_probability", "float", 0.5, "probability p1 that a grid cell is kept", 0.01, 0.99),
        Param("seed", "int", 0, "seed of the masks (numpy's default_rng)", 0, 2**31 - 1),
    ),
    run=run,
)
