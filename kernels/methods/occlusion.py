"""Occlusion (Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014).

Slide a square window over the input, replace it by a baseline value, and attribute to each pixel the mean
drop of the target's score over the windows that cover it: m(p) = mean_{w ∋ p} [S_c(x) - S_c(x with w
occluded)]. Pixels that no window covers get 0. This is Captum's `Occlusion` with a square window, one
stride for both axes and a scalar baseline. The perturbed inputs are made inside onnxruntime (a `Where`
composed in front of the model): Python only builds boolean window masks, a batch at a time.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ..compose import PREFIX, masked_model
from .base import Event, Job, Maps, Method, Param, ParamError, Progress


def window_masks(height: int, width: int, corners: np.ndarray, window: int) -> np.ndarray:
    """[B, H, W] boolean masks, True inside the window whose top-left corner is corners[b] = (y, x)."""
    rows = np.arange(height)[None, :]
    cols = np.arange(width)[None, :]
    in_rows = (rows >= corners[:, :1]) & (rows < corners[:, :1] + window)
    in_cols = (cols >= corners[:, 1:]) & (cols < corners[:, 1:] + window)
    return in_rows[:, :, None] & in_cols[:, None, :]


def window_corners(height: int, width: int, window: int, stride: int) -> np.ndarray:
    ys = np.arange(0, height - window + 1, stride)
    xs = np.arange(0, width - window + 1, stride)
    return np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)


def run(job: Job) -> Iterator[Event]:
    window, stride, baseline = job.params["window"], job.params["stride"], job.params["baseline"]
    height, width = job.spatial
    runner = job.runner
    x = job.sample[None]
    reference = job.sample_scores()[job.targets].astype(np.float64)
    session = runner.graph(f"occlusion/{job.layout}", lambda: masked_model(
        runner.model, runner.input_name, runner.score_name, job.layout))
    corners = window_corners(height, width, window, stride)
    drop_sum = np.zeros((len(job.targets), height, width))
    covered = np.zeros((height, width))
    feeds = {f"{PREFIX}x": runner.resident(x), f"{PREFIX}baseline": runner.resident(np.array(baseline, np.float32))}
    for step, start in enumerate(range(0, len(corners), runner.max_batch), 1):
        batch = corners[start:start + runner.max_batch]
        masks = window_masks(height, width, batch, window)
        feeds[f"{PREFIX}mask"] = masks[:, None] if job.layout == "NCHW" else masks[..., None]
        scores = runner.run(session, [runner.score_name], feeds, job.passes, samples=len(masks))[0]
        drop = reference[None, :] - scores[:, job.targets]              # [B, T]
        # Window by window, with slices: each window adds to its own window*window pixels only (a matrix
        # product with the [B, H*W] masks would do H*W work per window).
        for (y, x0), d in zip(batch, drop):
            drop_sum[:, y:y + window, x0:x0 + window] += d[:, None, None]
            covered[y:y + window, x0:x0 + window] += 1
        done = min(start + runner.max_batch, len(corners))
        yield Progress(done, len(corners), "occluding")
        if job.partial_every and step % job.partial_every == 0 and done < len(corners):
            yield Maps(_mean(drop_sum, covered, height, width), final=False, step=step)
    yield Maps(_mean(drop_sum, covered, height, width), final=True)


def _mean(drop_sum: np.ndarray, covered: np.ndarray, height: int, width: int) -> np.ndarray:
    mean = np.divide(drop_sum, covered[None], out=np.zeros_like(drop_sum), where=covered[None] > 0)
    return mean.reshape(-1, height, width).astype(np.float32)


def _check(params: dict, spatial: tuple[int, int]) -> None:
    side = min(spatial)
    for name in ("window", "stride"):
        if params[name] > side:
            raise ParamError(f"occlusion.{name} must be in [1, {side}] for this model's {spatial[0]}x{spatial[1]} "
                             f"input, got {params[name]}")


METHOD = Method(
    name="occlusion",
    family="perturbation",
    description="Mean drop of the target's score when a square window around each pixel is replaced by a "
                "baseline value (positive: the region supports the class).",
    reference="Zeiler & Fergus, Visualizing and Understanding Convolutional Networks, ECCV 2014",
    params=(
        Param("window", "int", 16, "side of the square window, in model-input pixels", 1, 4096),
        Param("stride", "int", 8, "step between window positions, in model-input pixels", 1, 4096),
        Param("baseline", "float", 0.0, "value written into the window, in the preprocessed input space",
              -1e6, 1e6),
    ),
    run=run,
    check_for_input=_check,
)
