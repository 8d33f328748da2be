"""Score-CAM (Wang et al., "Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural Networks",
CVPR Workshops 2020).

Each of the layer's K activation maps A_k, upsampled to the input (bilinear, half-pixel centres) and min-max
normalised to [0, 1], masks the image; the target's score on that masked image, relative to the image's own
score, weighs the map:

    u_k = S_c(x * n(up(A_k))) - S_c(x),   w = softmax_k(u),   map = ReLU(sum_k w_k A_k)   (at the layer's grid)

S is the model's score tensor (the logits when the model ends in a softmax). All K masked inputs serve every
target at once (the masks do not depend on the class), so several targets cost no extra model passes. The
upsampling, normalisation and masking run in onnxruntime in a graph composed in front of the model; Python only
hands it the K coarse maps, a batch at a time.

How this differs from pytorch-grad-cam's `ScoreCAM` (pytorch_grad_cam/score_cam.py), which we do not follow on two
points: (1) it upsamples with `torch.nn.UpsamplingBilinear2d`, i.e. align_corners=True, where we use half-pixel
centres as every map in this project; (2) its min-max denominator is (max - min + 1e-8), ours is (max - min)
floored only for a constant map (which, as there, becomes an all-zero mask; so does a map whose span is at the
float32 rounding level of its values: kernels.methods.perturb's normalised_upsample, which also reads each map's
extremes from the few upsampled pixels that can hold them and normalises the coarse map before the one upsampling
that makes the mask). Its weights are the softmax over k of the masked scores S_c(x * n(up(A_k))) themselves;
subtracting S_c(x) as the paper's "increase of confidence" does changes nothing after the softmax (it is shift
invariant), so the weights agree. Like it, we weigh with the raw score (logit) and apply the ReLU of the paper to
the weighted sum. The authors' own code instead weighs each map by the class probability of the masked input
(softmax over classes, no softmax over maps); we follow the paper's formula as written above.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ..compose import PREFIX
from .base import Event, Job, Maps, Method, Progress
from .cam import layer_activation
from .perturb import Builder, batches, channels_of, compose_front, sample_info, softmax, value_info


def masking_graph(runner, layout: str, spatial: tuple[int, int], channels: int, grid: tuple[int, int]):
    """scores(x * normalised_upsample(maps)): one sample x and a batch of coarse maps [B, 1, h, w], grid = (h, w)."""
    height, width = spatial
    b = Builder(runner.model)
    maps = f"{PREFIX}maps"
    mask = b.normalised_upsample(maps, grid, height, width)
    masked = b.masked_input(f"{PREFIX}x", mask, layout)
    inputs = [sample_info(layout, spatial, channels), value_info(maps, ["B", 1, *grid])]
    return compose_front(runner.model, runner.input_name, b, inputs, masked, [runner.score_name])


def activation_maps(job: Job) -> np.ndarray:
    """[K, h, w] activation maps of job.layer for the sample (one run up to the layer, shared by the request's
    layer methods)."""
    return layer_activation(job)[0]


def run(job: Job) -> Iterator[Event]:
    runner = job.runner
    activations = activation_maps(job)
    count = len(activations)
    reference = job.sample_scores()[job.targets].astype(np.float64)
    channels = channels_of(job.sample, job.layout)
    grid = activations.shape[1:]
    session = runner.graph(f"scorecam/{job.layout}/{job.spatial}/{channels}/{grid}", lambda: masking_graph(
        runner, job.layout, job.spatial, channels, grid))
    x = runner.resident(job.sample[None])
    increase = np.zeros((count, len(job.targets)))
    for start, stop in batches(count, runner.max_batch):
        feeds = {f"{PREFIX}x": x, f"{PREFIX}maps": activations[start:stop, None].astype(np.float32)}
        scores = runner.run(session, [runner.score_name], feeds, job.passes, samples=stop - start)[0]
        increase[start:stop] = scores[:, job.targets] - reference
        yield Progress(stop, count, "masking with activation maps")
    weights = softmax(increase.T, axis=1)                                   # [T, K]
    maps = np.maximum(np.einsum("tk,khw->thw", weights, activations.astype(np.float64)), 0)
    yield Maps(maps.astype(np.float32), final=True)


METHOD = Method(
    name="scorecam",
    family="cam",
    description="ReLU(sum_k w_k A_k), w = softmax over the layer's maps of the increase of the target's score "
                "when the image is masked by each upsampled, min-max normalised map.",
    reference="Wang et al., Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural Networks, "
              "CVPR Workshops 2020",
    params=(),
    run=run,
    uses_layer=True,
)
