"""Gradient and CAM methods: time over the time of their own model passes, and over Captum on the same net.

    python benchmarks/bench_methods.py [--repeats 3] [--size 224] [--skip-captum] [--parts 1 2]

Part 1, on EfficientNet-Lite0 from ../shared (or the shipped default model when absent), one photo, one target:
each method's wall time (kernels, in process) over the time spent inside onnxruntime's runs for it
(Passes.seconds). Target <= 1.1.
Part 2, the same attribution by onnxplain (onnxruntime CPU) and by Captum (PyTorch CPU), same network and
weights, same input, same steps/samples, on a ResNet-50 defined in torch (torchvision's shapes, random weights;
exported to ONNX once) and on EfficientNet-Lite0 from ../shared run in torch from its ONNX weights (both in
benchmarks/nets.py). Target onnxplain / Captum <= 0.5. Both use the machine's cores (torch's and onnxruntime's
default threads). The last rows explain the image's top 5 classes in one call (Captum: a batch of 5 copies with
a target each, as it is used for several targets).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from timing import medians  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
PARAMS = {"smoothgrad": {"samples": 25}, "integrated_gradients": {"steps": 50}}
TOP = 5     # part 2 also explains the top TOP classes of the image in one call


def run_method(runner, name, sample, targets, layer, pre, params):
    from onnxplain.kernels.methods import METHODS, Job

    method = METHODS[name]
    job = Job(runner, sample, np.array(targets), method.resolve(params, sample.shape[1:]), "NCHW",
              layer if method.uses_layer else None, preprocessing=pre)
    start = time.perf_counter()
    for _ in method.run(job):
        pass
    return time.perf_counter() - start, job.passes


def part1(repeats):
    from onnxplain.kernels import graph, images
    from onnxplain.kernels.methods import METHODS
    from onnxplain.kernels.runtime import Passes, Runner
    from onnxplain.server import config

    eff = SHARED / "models" / "efficientnet_lite0_imagenet.onnx"
    if eff.exists():
        model_path, photo = eff, SHARED / "images" / "chelsea.jpg"
        pre = images.Preprocessing(224, 224, fit="center_crop", scale=1.0, mean=(127.5,) * 3, std=(128.0,) * 3)
    else:
        cfg = config.load(None).models[0]
        model_path, photo = cfg.path, pathlib.Path(cfg.path).parent / "samples" / "star.png"
        pre = images.Preprocessing(96, 96, fit="stretch", mean=(0.5,) * 3, std=(0.5,) * 3)
    model = graph.load_model(str(model_path))
    runner = Runner(model, graph.score_tensor(model), graph.input_spec(model)[0], max_batch=32)
    layer = graph.default_layer(model)
    sample = images.preprocess(images.decode(photo.read_bytes(), 10 ** 8), pre).sample
    target = int(np.argmax(runner.scores(sample[None], Passes())))
    print(f"Part 1: {model_path.name}, {photo.name}, target {target}, median of {repeats}")
    print(f"{'method':22s} {'passes':>7s} {'total s':>8s} {'model s':>8s} {'ratio':>6s}")
    for name, method in METHODS.items():
        if method.family not in ("gradient", "cam") and name != "occlusion":
            continue
        params = PARAMS.get(name, {})
        run_method(runner, name, sample, [target], layer, pre, params)   # warm-up (builds graphs)
        results = [run_method(runner, name, sample, [target], layer, pre, params) for _ in range(repeats)]
        total = statistics.median(r[0] for r in results)
        inside = statistics.median(r[1].seconds for r in results)
        p = results[0][1]
        print(f"{name:22s} {p.forward_samples + p.backward_samples:7d} {total:8.3f} {inside:8.3f} {total / inside:6.3f}")


def part2(repeats, size):
    import torch
    from captum import attr

    from onnxplain.kernels import graph
    from onnxplain.kernels.runtime import Runner

    from nets import compared

    for c in compared(size):
        title, model, layer_module, onnx_model, x, relu = c.title, c.net, c.layer, c.onnx_model, c.x, c.relu
        # Captum's guided backprop and deconvnet rewrite the backward of nn.ReLU modules only: EfficientNet's
        # ReLU6 (Clip) would keep its plain gradient there, so those three methods are not compared on it
        runner = Runner(onnx_model, graph.score_tensor(onnx_model), graph.input_spec(onnx_model)[0], max_batch=16)
        layer = graph.default_layer(onnx_model)
        with torch.no_grad():
            top = model(x)[0].argsort(descending=True)[:TOP].tolist()
        target = top[0]
        sample = x[0].numpy()
        many = x.repeat(TOP, 1, 1, 1)      # Captum explains several targets of one image as a batch of copies
        cases = [
            ("gradient", {}, lambda: attr.Saliency(model).attribute(x.clone().requires_grad_(), target=target)),
            ("input_x_gradient", {},
             lambda: attr.InputXGradient(model).attribute(x.clone().requires_grad_(), target=target)),
            ("integrated_gradients", {"steps": 32, "baseline": "zero"},
             lambda: attr.IntegratedGradients(model).attribute(x, target=target, n_steps=32, internal_batch_size=16)),
            ("smoothgrad", {"samples": 16}, lambda: attr.NoiseTunnel(attr.Saliency(model)).attribute(
                x, target=target, nt_type="smoothgrad", nt_samples=16, nt_samples_batch_size=16, stdevs=0.15)),
            ("guided_backprop", {},
             lambda: attr.GuidedBackprop(model).attribute(x.clone().requires_grad_(), target=target)),
            ("deconvnet", {}, lambda: attr.Deconvolution(model).attribute(x.clone().requires_grad_(), target=target)),
            ("gradcam", {}, lambda: attr.LayerGradCam(model, layer_module).attribute(x, target=target)),
            ("guided_gradcam", {}, lambda: attr.GuidedGradCam(model, layer_module).attribute(x, target=target)),
            (f"gradient, top {TOP}", {},
             lambda: attr.Saliency(model).attribute(many.clone().requires_grad_(), target=top)),
            (f"gradcam, top {TOP}", {}, lambda: attr.LayerGradCam(model, layer_module).attribute(many, target=top)),
        ]
        print(f"\nPart 2: {title}, medians of {repeats} to 25 interleaved runs")
        print(f"{'method':22s} {'onnxplain s':>11s} {'captum s':>9s} {'ratio':>6s}")
        for label, params, captum_fn in cases:
            name, targets = (label.split(",")[0], top) if "," in label else (label, [target])
            if not relu and name in ("guided_backprop", "deconvnet", "guided_gradcam"):
                continue
            ours, theirs = medians([lambda: run_method(runner, name, sample, targets, layer, None, params),
                                    captum_fn], repeats, budget=3.0)
            print(f"{label:22s} {ours:11.3f} {theirs:9.3f} {ours / theirs:6.3f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--skip-captum", action="store_true")
    parser.add_argument("--parts", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    args = parser.parse_args(argv)
    if 1 in args.parts:
        part1(args.repeats)
    if 2 in args.parts and not args.skip_captum:
        part2(args.repeats, args.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
