"""Cost of the augmented (forward + backward) graph from kernels.autodiff.augment.

    python benchmarks/bench_autodiff.py [--repeats N] [--batches 1 16] [--models effnet resnet50] [--breakdown]

For each network and batch size, medians over repeats after warm-up (onnxruntime CPU, default threads, sessions
configured as onnxplain's Runner configures them: no intra-op spinning; torch default threads):
  fwd       plain onnxruntime forward of the model
  aug       onnxruntime run of augment(model, layers=[default layer], wrt_input=True): logits, layer, d/dlayer, d/dx
  torch     PyTorch autograd on the same network and weights: forward + backward to the input and the layer
and the ratios aug/fwd (target <= 2.5) and aug/torch (target <= 1.0), each the median of the ratio of the two
times taken within one turn, with its quartiles (timing.turn_ratio): on a shared machine the times drift from run
to run (EfficientNet-Lite0's ratio of medians at batch 16 read 3.46, then 2.99, in two runs minutes apart).

--breakdown also profiles both graphs (onnxruntime's profiler, kernel times) and prints where the augmented
graph's time goes: convolutions of the forward, the adjoints of the forward's convolutions (the backward's Conv
and ConvTranspose nodes emitted for them), everything else (the masks, their step convolutions included). From
those it prints two floors for the ratios: the
ratios if everything but the convolutions cost nothing ("convolutions as run"), and the ratio to torch if in
addition every backward convolution cost what its forward one does ("adjoints at forward cost": twice the plain
forward's convolution time; an adjoint has the forward's arithmetic).

Networks: the shared EfficientNet-Lite0 (../shared; rebuilt for torch from its own ONNX weights by a tiny
interpreter), optionally its int8 QDQ form (--models effnet-int8: onnxruntime.quantization's output; fwd is then
onnxruntime's integer kernels, torch runs fake quantisation) and a ResNet-50 with the real torchvision shapes and
random weights (defined here: torchvision is not installable), exported once with the legacy exporter (opset 17,
dynamic batch) to a temporary directory; both defined in benchmarks/nets.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from onnxplain.kernels import graph as G
from onnxplain.kernels.autodiff import augment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nets import OnnxInTorch, export_resnet50, resnet50  # noqa: E402
from timing import turn_ratio, turns  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EFFNET = ROOT.parent / "shared" / "models" / "efficientnet_lite0_imagenet.onnx"


def kernel_times(model: onnx.ModelProto, aug_model: onnx.ModelProto | None, feeds: dict, runs: int = 3,
                 warmup: int = 2) -> dict[str, float]:
    """Seconds per run spent in onnxruntime's kernels of `aug_model` (or of `model` when None), by part, from its
    profiler after warm-up runs: "conv" (the forward's convolutions), "ad conv" (the backward's convolutions that
    kernels.autodiff emitted for a Conv or ConvTranspose of `model`: its adjoint, with the zero-spreading of a
    strided depthwise one), "other" (everything else, the masks' step convolutions of ReLU6 included). A backward
    node's name is ad/<forward node>/..., and the optimizer's blocked-layout nodes add _nchwc to it."""
    forward_ops = {n.name: n.op_type for n in model.graph.node if n.name}
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as d:
        options.profile_file_prefix = os.path.join(d, "profile")
        session = ort.InferenceSession((aug_model or model).SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        for _ in range(runs + warmup):
            session.run(None, feeds)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    ends = sorted(e["ts"] + e["dur"] for e in events if e.get("name") == "model_run")
    parts = {"conv": 0.0, "ad conv": 0.0, "other": 0.0}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < ends[warmup - 1]:
            continue
        name, part = e["name"].removesuffix("_kernel_time"), "other"
        if e["args"].get("op_name") in ("Conv", "ConvTranspose"):
            if not name.startswith("ad/"):
                part = "conv"
            else:
                rest = name[3:]
                forward = max((f for f in forward_ops if rest.startswith(f + "/")), key=len, default=None)
                part = "ad conv" if forward_ops.get(forward) in ("Conv", "ConvTranspose") else "other"
        parts[part] += e["dur"] * 1e-6 / runs
    return parts


def bench(label: str, model: onnx.ModelProto, torch_model: nn.Module, batches, repeats,
          breakdown: bool = False) -> list[list]:
    layer = G.default_layer(model).name
    aug_model = augment(model, layers=[layer], wrt_input=True)
    options = ort.SessionOptions()   # as kernels.runtime.Runner: spinning threads would also slow torch's turns
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    fwd_s = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    aug_s = ort.InferenceSession(aug_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    classes = fwd_s.get_outputs()[0].shape[-1]
    rows = []
    for b in batches:
        rng = np.random.default_rng(b)
        x = rng.standard_normal((b, 3, 224, 224)).astype(np.float32)
        seed = np.zeros((b, classes), np.float32)
        seed[np.arange(b), rng.integers(0, classes, b)] = 1.0
        reps = repeats if b == 1 else max(3, repeats // 2)
        xt, st = torch.from_numpy(x), torch.from_numpy(seed)

        def autograd():
            xg = xt.clone().requires_grad_()
            logits = torch_model(xg)
            torch.autograd.grad((logits * st).sum(), [xg, torch_model.features])

        fwd, aug, tor = turns(
            [lambda: fwd_s.run(None, {"input": x}), lambda: aug_s.run(None, {"input": x, "seed": seed}), autograd],
            reps, warmup=2)
        t_fwd, t_aug, t_torch = (statistics.median(t) for t in (fwd, aug, tor))
        rows.append([label, b, t_fwd, t_aug, t_torch, turn_ratio(aug, fwd), turn_ratio(aug, tor), (x, seed)])
        print(f"  {label:16s} batch {b:3d}: fwd {t_fwd * 1e3:8.1f} ms  aug {t_aug * 1e3:8.1f} ms  "
              f"torch {t_torch * 1e3:8.1f} ms", file=sys.stderr, flush=True)
    fwd_s = aug_s = None      # the profiled sessions below run alone (at batch 16 the arenas hold gigabytes)
    for row in rows:
        x, seed = row[-1]
        row[-1] = (kernel_times(model, aug_model, {"input": x, "seed": seed}),
                   kernel_times(model, None, {"input": x})) if breakdown else None
    return rows


def quantized_effnet() -> str:
    """The shared EfficientNet-Lite0 as onnxruntime.quantization writes it by default (QDQ: uint8 activations,
    int8 weights per channel), calibrated on the shared photos preprocessed as its README says."""
    from PIL import Image
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    def prepared(path):
        image = Image.open(path).convert("RGB")
        s = min(image.size)
        left, top = (image.size[0] - s) // 2, (image.size[1] - s) // 2
        image = image.crop((left, top, left + s, top + s)).resize((224, 224), Image.Resampling.BILINEAR)
        return ((np.asarray(image, np.float32) - 127.5) / 128).transpose(2, 0, 1)[None].copy()

    class Photos(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter({"input": prepared(p)} for p in sorted((EFFNET.parents[1] / "images").glob("*.jpg")))

        def get_next(self):
            return next(self.feeds, None)

    target = Path(tempfile.mkdtemp()) / "efficientnet_lite0_qdq.onnx"
    quantize_static(str(EFFNET), str(target), Photos(), quant_format=QuantFormat.QDQ, per_channel=True)
    return str(target)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--models", nargs="+", default=["effnet", "resnet50"],
                    choices=["effnet", "effnet-int8", "resnet50"])
    ap.add_argument("--breakdown", action="store_true", help="also profile where the augmented graph's time goes")
    args = ap.parse_args(argv)
    rows = []
    if "effnet" in args.models:
        if EFFNET.exists():
            m = G.load_model(str(EFFNET))
            rows += bench("efficientnet-l0", m, OnnxInTorch(m, G.default_layer(m).name).eval(), args.batches,
                          args.repeats, args.breakdown)
        else:
            print(f"skipping EfficientNet-Lite0: {EFFNET} is absent", file=sys.stderr)
    if "effnet-int8" in args.models and EFFNET.exists():
        m = G.load_model(quantized_effnet())
        rows += bench("effnet-l0 int8", m, OnnxInTorch(m, G.default_layer(m).name).eval(), args.batches,
                      args.repeats, args.breakdown)
    if "resnet50" in args.models:
        net = resnet50()
        with tempfile.TemporaryDirectory() as d:
            m = G.load_model(export_resnet50(net, d))
        rows += bench("resnet50", m, net, args.batches, args.repeats, args.breakdown)

    print(f"\nonnxruntime {ort.__version__} CPU (default threads, no spinning), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {os.cpu_count()} cores; medians of {args.repeats} "
          f"(batch 1) / {max(3, args.repeats // 2)} (larger) after 2 warm-ups, interleaved; "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    print(f"{'model':16s} {'batch':>5s} {'fwd ms':>9s} {'aug ms':>9s} {'torch ms':>9s} {'aug/fwd (quartiles)':>20s}   "
          f"{'aug/torch (quartiles)':>22s}")
    for label, b, f, a, t, (r1, l1, h1), (r2, l2, h2), _ in rows:
        ok1 = "" if r1 <= 2.5 else "!"
        ok2 = "" if r2 <= 1.0 else "!"
        print(f"{label:16s} {b:5d} {f * 1e3:9.1f} {a * 1e3:9.1f} {t * 1e3:9.1f} "
              f"{f'{r1:.2f} ({l1:.2f}-{h1:.2f})':>20s} {ok1:1s} {f'{r2:.2f} ({l2:.2f}-{h2:.2f})':>22s} {ok2}")
    print("ratios: median over the turns of the two times taken within one turn, with its quartiles; "
          "targets: aug/fwd <= 2.5, aug/torch <= 1.0 ('!' marks a miss)")
    if args.breakdown:
        print(f"\n{'model':16s} {'batch':>5s} {'fwd conv':>9s} {'aug conv':>9s} {'ad conv':>8s} {'aug other':>10s} "
              f"{'floors, convolutions as run:':>29s} {'aug/fwd':>7s} {'aug/torch':>9s}   "
              f"{'adjoints at forward cost: aug/torch':>35s}")
        for label, b, f, a, t, (r1, *_), (r2, *_), (aug_parts, fwd_parts) in rows:
            share = (aug_parts["conv"] + aug_parts["ad conv"]) / sum(aug_parts.values())
            fwd_share = fwd_parts["conv"] / sum(fwd_parts.values())
            print(f"{label:16s} {b:5d} {fwd_parts['conv'] * 1e3:9.1f} {aug_parts['conv'] * 1e3:9.1f} "
                  f"{aug_parts['ad conv'] * 1e3:8.1f} {aug_parts['other'] * 1e3:10.1f} {'':29s} {share * r1:7.2f} "
                  f"{share * r2:9.2f}   {2 * fwd_share * f / t:35.2f}")
        print("ms per run inside onnxruntime's kernels (profiled runs, slower than the timed ones); a floor is the "
              "measured ratio scaled by the convolutions' share of the kernel time")


if __name__ == "__main__":
    main()
