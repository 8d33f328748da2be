"""Cost of the augmented (forward + backward) graph from kernels.autodiff.augment.

    python benchmarks/bench_autodiff.py [--repeats N] [--batches 1 16] [--models effnet resnet50]

For each network and batch size, medians over repeats after warm-up (onnxruntime CPU, default threads, sessions
configured as onnxplain's Runner configures them: no intra-op spinning; torch default threads):
  fwd       plain onnxruntime forward of the model
  aug       onnxruntime run of augment(model, layers=[default layer], wrt_input=True): logits, layer, d/dlayer, d/dx
  torch     PyTorch autograd on the same network and weights: forward + backward to the input and the layer
and the ratios aug/fwd (target <= 2.5) and aug/torch (target <= 1.0), each the median of the ratio of the two
times taken within one turn, with its quartiles (timing.turn_ratio): on a shared machine the times drift from run
to run (EfficientNet-Lite0's ratio of medians at batch 16 read 3.46, then 2.99, in two runs minutes apart).

Networks: the shared EfficientNet-Lite0 (../shared; rebuilt for torch from its own ONNX weights by a tiny
interpreter), optionally its int8 QDQ form (--models effnet-int8: onnxruntime.quantization's output; fwd is then
onnxruntime's integer kernels, torch runs fake quantisation) and a ResNet-50 with the real torchvision shapes and random weights (defined here: torchvision is not
installable), exported once with the legacy exporter (opset 17, dynamic batch) to a temporary directory; both
defined in benchmarks/nets.py.
"""

from __future__ import annotations

import argparse
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


def bench(label: str, model: onnx.ModelProto, torch_model: nn.Module, batches, repeats) -> list[tuple]:
    layer = G.default_layer(model).name
    aug = augment(model, layers=[layer], wrt_input=True)
    options = ort.SessionOptions()   # as kernels.runtime.Runner: spinning threads would also slow torch's turns
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    fwd_s = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    aug_s = ort.InferenceSession(aug.SerializeToString(), options, providers=["CPUExecutionProvider"])
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
        rows.append((label, b, t_fwd, t_aug, t_torch, turn_ratio(aug, fwd), turn_ratio(aug, tor)))
        print(f"  {label:16s} batch {b:3d}: fwd {t_fwd * 1e3:8.1f} ms  aug {t_aug * 1e3:8.1f} ms  "
              f"torch {t_torch * 1e3:8.1f} ms", file=sys.stderr, flush=True)
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
    args = ap.parse_args(argv)
    rows = []
    if "effnet" in args.models:
        if EFFNET.exists():
            m = G.load_model(str(EFFNET))
            rows += bench("efficientnet-l0", m, OnnxInTorch(m, G.default_layer(m).name).eval(), args.batches,
                          args.repeats)
        else:
            print(f"skipping EfficientNet-Lite0: {EFFNET} is absent", file=sys.stderr)
    if "effnet-int8" in args.models and EFFNET.exists():
        m = G.load_model(quantized_effnet())
        rows += bench("effnet-l0 int8", m, OnnxInTorch(m, G.default_layer(m).name).eval(), args.batches,
                      args.repeats)
    if "resnet50" in args.models:
        net = resnet50()
        with tempfile.TemporaryDirectory() as d:
            m = G.load_model(export_resnet50(net, d))
        rows += bench("resnet50", m, net, args.batches, args.repeats)

    print(f"\nonnxruntime {ort.__version__} CPU (default threads, no spinning), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {os.cpu_count()} cores; medians of {args.repeats} "
          f"(batch 1) / {max(3, args.repeats // 2)} (larger) after 2 warm-ups, interleaved; "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    print(f"{'model':16s} {'batch':>5s} {'fwd ms':>9s} {'aug ms':>9s} {'torch ms':>9s} {'aug/fwd (quartiles)':>20s}   "
          f"{'aug/torch (quartiles)':>22s}")
    for label, b, f, a, t, (r1, l1, h1), (r2, l2, h2) in rows:
        ok1 = "" if r1 <= 2.5 else "!"
        ok2 = "" if r2 <= 1.0 else "!"
        print(f"{label:16s} {b:5d} {f * 1e3:9.1f} {a * 1e3:9.1f} {t * 1e3:9.1f} "
              f"{f'{r1:.2f} ({l1:.2f}-{h1:.2f})':>20s} {ok1:1s} {f'{r2:.2f} ({l2:.2f}-{h2:.2f})':>22s} {ok2}")
    print("ratios: median over the turns of the two times taken within one turn, with its quartiles; "
          "targets: aug/fwd <= 2.5, aug/torch <= 1.0 ('!' marks a miss)")


if __name__ == "__main__":
    main()
