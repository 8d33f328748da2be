"""Perturbation methods: each one's time over the time of its model passes alone, at the same batch size.

    python benchmarks/bench_perturbation.py [--repeats 1] [--rise-masks 4000] [--models shapes,efficientnet]
                                            [--size 224] [--skip-torch]

For each model (the shipped default model; EfficientNet-Lite0 from ../shared when present), one image, its top
class, the default layer, max_batch 32:
  * scorecam    : the method (composed masking graph) / the plain model on the K masked images prepared
                  beforehand in numpy (the model passes alone); also the same Score-CAM with numpy doing the
                  upsampling, normalisation and masking (Score-CAM in torch: see below)
  * ablationcam : the method / the head on the K ablated copies prepared beforehand, plus one body run (the
                  method zeroes channels after the head's pooling, so it runs less than these passes:
                  below 1 where the head starts with global pooling)
  * rise        : the method / the plain model on masked images of one batch, run N / 32 times
  * opticam     : both dF/du paths: seconds per image, passes (samples through the model) per second, and
                  the method / the same passes alone (autodiff-augmented model's forward+backward for the
                  gradient graph, plain forwards of D + 1 samples for finite differences, per step; plus the
                  two forwards the method makes besides its steps: the layer's maps, the final map), at the
                  method's defaults (50 steps; D = 128 directions, capped at the rank of the gradient's subspace)
Medians over repeats after one warm-up, the method and its passes alone taking turns (benchmarks/timing.py).
Target: method / passes alone <= 1.1.

Then Score-CAM by onnxplain against Score-CAM in PyTorch on the same network, weights and input (Captum has no
Score-CAM; torch_scorecam below works as pytorch-grad-cam's ScoreCAM does: the layer's maps kept by one forward,
F.interpolate, per-map min-max, the masked images through the network under no_grad in batches of 32 like ours;
with our half-pixel upsampling and weights, so that the maps agree), on a ResNet-50 defined in torch (random
weights, exported to ONNX once) and on EfficientNet-Lite0 from ../shared run by torch from its ONNX weights
(benchmarks/nets.py: compared).
Both maps are compared (Pearson r) so that the two time one computation. Both use the machine's cores.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from timing import medians  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


def drain(method, job):
    for _ in method.run(job):
        pass
    return job


def bench_model(name, path, repeats, rise_masks):
    from onnxplain.kernels import graph
    from onnxplain.kernels.images import upsample_bilinear
    from onnxplain.kernels.methods import METHODS, Job
    from onnxplain.kernels.methods.ablationcam import sessions
    from onnxplain.kernels.methods.layers import as_maps, one_hot
    from onnxplain.kernels.runtime import Passes, Runner

    model = graph.load_model(path)
    input_name, shape, layout = graph.input_spec(model)
    runner = Runner(model, graph.score_tensor(model), input_name, max_batch=32)
    layer = graph.default_layer(model)
    side = shape[2]
    sample = np.random.default_rng(0).standard_normal((3, side, side)).astype(np.float32) * 0.5
    scores = runner.scores(sample[None], Passes())[0]
    target = np.array([int(np.argmax(scores))])
    batch = runner.max_batch
    plain = runner.session

    def forwards(inputs):
        for i in range(0, len(inputs), batch):
            plain.run([runner.score_name], {input_name: inputs[i:i + batch]})

    def job(method, **params):
        return Job(runner, sample, target, METHODS[method].resolve(params, (side, side)), layout, layer,
                   scores=scores)

    rows = []
    print(f"\n== {name}: input {side}x{side}, layer {layer.name} {layer.shape}, batch {batch}, "
          f"{runner.provider}", flush=True)

    # Score-CAM ------------------------------------------------------------------------------------------------
    acts = as_maps(runner.forward(sample[None], (layer.name,), Passes())[layer.name], layer)[0]
    up = upsample_bilinear(acts, side, side)
    lo, hi = up.min(axis=(1, 2), keepdims=True), up.max(axis=(1, 2), keepdims=True)
    masks = np.where(hi > lo, (up - lo) / np.where(hi > lo, hi - lo, 1), 0).astype(np.float32)
    masked = (sample[None] * masks[:, None]).astype(np.float32)

    def numpy_masking():
        a = as_maps(runner.forward(sample[None], (layer.name,), Passes())[layer.name], layer)[0]
        u = upsample_bilinear(a, side, side)
        lo_, hi_ = u.min(axis=(1, 2), keepdims=True), u.max(axis=(1, 2), keepdims=True)
        n = np.where(hi_ > lo_, (u - lo_) / np.where(hi_ > lo_, hi_ - lo_, 1), 0).astype(np.float32)
        for i in range(0, len(n), batch):
            plain.run([runner.score_name], {input_name: sample[None] * n[i:i + batch, None]})

    t_method, t_alone, t_numpy = medians(
        [lambda: drain(METHODS["scorecam"], job("scorecam")), lambda: forwards(masked), numpy_masking], repeats)
    rows.append(("scorecam", t_method, t_alone, f"{len(acts)} masked images; numpy-masking variant "
                 f"{t_numpy:.3f} s ({t_numpy / t_method:.2f}x the method)"))
    del up, masks

    # Ablation-CAM ---------------------------------------------------------------------------------------------
    body, head, extras = sessions(runner, layer)
    out = body.run([layer.name, *extras], {input_name: sample[None]})
    copies = np.repeat(out[0], len(acts), axis=0)
    channel_axis = {"spatial": 1, "spatial_nhwc": 3, "tokens": 2}[layer.kind]
    index = [slice(None)] * copies.ndim
    for k in range(len(acts)):
        index[0], index[channel_axis] = k, k
        copies[tuple(index)] = 0
    plain_head = graph.cut(model, layer.name)[1]
    head_session = runner.graph(f"bench/head/{layer.name}", lambda: plain_head)

    def head_alone():
        body.run([layer.name, *extras], {input_name: sample[None]})
        for i in range(0, len(copies), batch):
            feeds = {layer.name: copies[i:i + batch]}
            feeds.update({n: np.repeat(v, len(feeds[layer.name]), 0) for n, v in zip(extras, out[1:])})
            head_session.run([runner.score_name], feeds)

    t_method, t_alone = medians([lambda: drain(METHODS["ablationcam"], job("ablationcam")), head_alone], repeats)
    rows.append(("ablationcam", t_method, t_alone, f"{len(acts)} ablated copies through the head"))

    # RISE -----------------------------------------------------------------------------------------------------
    rng = np.random.default_rng(1)
    one_batch = (sample[None] * (rng.random((batch, 1, side, side)) < 0.5)).astype(np.float32)
    runs = -(-rise_masks // batch)

    def rise_alone():
        for _ in range(runs):
            plain.run([runner.score_name], {input_name: one_batch})

    rise_job = {}
    t_method, t_alone = medians(
        [lambda: rise_job.update(j=drain(METHODS["rise"], job("rise", masks=rise_masks))), rise_alone], repeats)
    samples = rise_job["j"].passes.forward_samples
    rows.append(("rise", t_method, t_alone, f"N={rise_masks}: {t_method:.2f} s/image, "
                 f"{samples / t_method:.0f} passes/s"))

    # Opti-CAM -------------------------------------------------------------------------------------------------
    iterations = 50
    for how in ("gradient_graph", "finite_differences"):      # the method's defaults (128 directions at most)
        done = {"j": drain(METHODS["opticam"], job("opticam", gradient=how))}     # also the warm-up
        # besides its steps the method makes two forwards: the layer's maps at the start, the final map at the end
        if how == "gradient_graph":
            seed = one_hot(target, runner.num_classes)

            def alone():
                forwards(sample[None])
                for _ in range(iterations):
                    runner.gradients(sample[None], seed, Passes())
                forwards(sample[None])
        else:      # per step: the centre and one sample per direction
            per_step = (done["j"].passes.forward_samples - 2) // iterations
            centre_and_moved = np.repeat(sample[None], per_step, axis=0)

            def alone():
                forwards(sample[None])
                for _ in range(iterations):
                    forwards(centre_and_moved)
                forwards(sample[None])
        t_method, t_alone = medians([lambda: done.update(j=drain(METHODS["opticam"], job("opticam", gradient=how))),
                                     alone], repeats, warmup=0)
        passes = done["j"].passes
        rows.append((f"opticam/{how}", t_method, t_alone,
                     f"{iterations} steps: {t_method:.2f} s/image, "
                     f"{(passes.forward_samples + passes.backward_samples) / t_method:.0f} passes/s "
                     f"({passes.backward_samples} fwd+bwd, {passes.forward_samples} fwd)"))

    print(f"{'method':28s} {'method s':>9s} {'passes s':>9s} {'ratio':>6s}  notes")
    for method, t_method, t_alone, note in rows:
        print(f"{method:28s} {t_method:9.3f} {t_alone:9.3f} {t_method / t_alone:6.2f}  {note}", flush=True)
    return rows


def torch_scorecam(net, x, target, batch):
    """Score-CAM in torch: map [h, w] (the paper's formula, as kernels/methods/scorecam.py)."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        reference = net(x)[0, target]
        acts = net.features[0]                                                        # [K, h, w]
        up = F.interpolate(acts[:, None], size=x.shape[2:], mode="bilinear", align_corners=False)
        lo, hi = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
        masks = torch.where(hi > lo, (up - lo) / torch.where(hi > lo, hi - lo, 1), 0)
        increase = torch.cat([net(x * masks[i:i + batch])[:, target] for i in range(0, len(masks), batch)])
        weights = torch.softmax(increase - reference, 0)
        return torch.relu((weights[:, None, None] * acts).sum(0))


def scorecam_against_torch(repeats, size):
    from onnxplain.kernels import graph
    from onnxplain.kernels.methods import METHODS, Job
    from onnxplain.kernels.methods.base import Maps
    from onnxplain.kernels.runtime import Passes, Runner

    from nets import compared

    print(f"\n== Score-CAM: onnxplain (onnxruntime CPU) against torch, same network, medians of {repeats}")
    print(f"{'network':80s} {'maps':>5s} {'onnxplain s':>11s} {'torch s':>8s} {'ratio':>6s} {'Pearson r':>9s}")
    for c in compared(size):
        title, net, onnx_model, x = c.title, c.net, c.onnx_model, c.x
        runner = Runner(onnx_model, graph.score_tensor(onnx_model), graph.input_spec(onnx_model)[0], max_batch=32)
        layer = graph.default_layer(onnx_model)
        sample = x[0].numpy()
        target = int(np.argmax(runner.scores(sample[None], Passes())[0]))
        method = METHODS["scorecam"]
        out = {}

        def ours():
            job = Job(runner, sample, np.array([target]), method.resolve({}, sample.shape[1:]), "NCHW", layer)
            out["ours"] = [e for e in method.run(job) if isinstance(e, Maps)][-1].maps[0]

        def theirs():
            out["torch"] = torch_scorecam(net, x, target, runner.max_batch).numpy()

        t_ours, t_torch = medians([ours, theirs], repeats)
        r = float(np.corrcoef(out["ours"].ravel(), out["torch"].ravel())[0, 1])
        print(f"{title:80s} {layer.shape[1]:5d} {t_ours:11.2f} {t_torch:8.2f} {t_ours / t_torch:6.2f} {r:9.5f}",
              flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--rise-masks", type=int, default=4000)
    parser.add_argument("--models", default="shapes,efficientnet", help="comma-separated; empty for none")
    parser.add_argument("--size", type=int, default=224, help="ResNet-50's input side in the torch comparison")
    parser.add_argument("--skip-torch", action="store_true", help="no Score-CAM comparison with torch")
    args = parser.parse_args(argv)
    models = {"shapes": ROOT / "onnxplain" / "default_model" / "shapes_cnn.onnx",
              "efficientnet": SHARED / "models" / "efficientnet_lite0_imagenet.onnx"}
    for name in filter(None, args.models.split(",")):
        if not models[name].exists():
            print(f"{name}: {models[name]} is absent, skipped", file=sys.stderr)
            continue
        bench_model(name, models[name], args.repeats, args.rise_masks)
    if not args.skip_torch:
        scorecam_against_torch(args.repeats, args.size)


if __name__ == "__main__":
    main()
