"""Cost of the augmented (forward + backward) graph from kernels.autodiff.augment.

    python benchmarks/bench_autodiff.py [--repeats N] [--batches 1 16] [--models effnet resnet50]

For each network and batch size, medians over repeats after warm-up (onnxruntime CPU, default threads, sessions
configured as onnxplain's Runner configures them: no intra-op spinning; torch default threads):
  fwd       plain onnxruntime forward of the model
  aug       onnxruntime run of augment(model, layers=[default layer], wrt_input=True): logits, layer, d/dlayer, d/dx
  torch     PyTorch autograd on the same network and weights: forward + backward to the input and the layer
and the ratios aug/fwd (target <= 2.5) and aug/torch (target <= 1.0).

Networks: the shared EfficientNet-Lite0 (../shared; rebuilt for torch from its own ONNX weights by a tiny
interpreter) and a ResNet-50 with the real torchvision shapes and random weights (defined here: torchvision is not
installable), exported once with the legacy exporter (opset 17, dynamic batch) to a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from onnxplain.kernels import graph as G
from onnxplain.kernels.autodiff import augment

ROOT = Path(__file__).resolve().parents[1]
EFFNET = ROOT.parent / "shared" / "models" / "efficientnet_lite0_imagenet.onnx"


# ------------------------------------------------------------------------------------------- ResNet-50


class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride):
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.down is None else self.down(x)))


class ResNet50(nn.Module):
    def __init__(self, classes=1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            stage = []
            for b in range(blocks):
                stage.append(Bottleneck(cin, width, stride if b == 0 else 1))
                cin = width * 4
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(2048, classes)

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        self.features = x  # the layer differentiated in the benchmark (layer4 output, 2048 x 7 x 7)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet50() -> nn.Module:
    torch.manual_seed(0)
    model = ResNet50()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def export_resnet50(model: nn.Module, dirpath: str) -> str:
    path = os.path.join(dirpath, "resnet50.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), path, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


# ------------------------------------------------------------------------------- EfficientNet in torch


class OnnxInTorch(nn.Module):
    """EfficientNet-Lite0's op set (Conv, Clip, Add, GlobalAveragePool, Flatten, Gemm) run by torch."""

    def __init__(self, model: onnx.ModelProto, layer: str):
        super().__init__()
        self.nodes = [n for n in model.graph.node]
        self.weights = {t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
        self.input, self.output, self.layer = model.graph.input[0].name, model.graph.output[0].name, layer

    def forward(self, x):
        env = dict(self.weights)
        env[self.input] = x
        for n in self.nodes:
            a = {at.name: onnx.helper.get_attribute_value(at) for at in n.attribute}
            i = [env[k] if k else None for k in n.input]
            if n.op_type == "Constant":
                y = torch.from_numpy(onnx.numpy_helper.to_array(a["value"]).copy())
            elif n.op_type == "Conv":
                p = list(a.get("pads", [0, 0, 0, 0]))
                y = F.conv2d(i[0], i[1], i[2] if len(i) > 2 else None, list(a.get("strides", [1, 1])), p[:2],
                             list(a.get("dilations", [1, 1])), a.get("group", 1))
            elif n.op_type == "Clip":
                y = torch.clamp(i[0], float(i[1]), float(i[2]))
            elif n.op_type == "Add":
                y = i[0] + i[1]
            elif n.op_type == "GlobalAveragePool":
                y = i[0].mean((2, 3), keepdim=True)
            elif n.op_type == "Flatten":
                y = i[0].flatten(a.get("axis", 1))
            elif n.op_type == "Gemm":
                y = i[0] @ i[1].T + i[2]
            else:
                raise NotImplementedError(n.op_type)
            env[n.output[0]] = y
        self.features = env[self.layer]
        return env[self.output]


# ---------------------------------------------------------------------------------------------- timing


def median_times(fns, repeats: int, warmup: int = 2) -> list[float]:
    """Median wall time of each function; the functions take turns within each repeat, so load from other
    processes on a shared machine falls on all of them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


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

        t_fwd, t_aug, t_torch = median_times(
            [lambda: fwd_s.run(None, {"input": x}), lambda: aug_s.run(None, {"input": x, "seed": seed}), autograd],
            reps)
        rows.append((label, b, t_fwd, t_aug, t_torch))
        print(f"  {label:16s} batch {b:3d}: fwd {t_fwd * 1e3:8.1f} ms  aug {t_aug * 1e3:8.1f} ms  "
              f"torch {t_torch * 1e3:8.1f} ms", file=sys.stderr, flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--models", nargs="+", default=["effnet", "resnet50"], choices=["effnet", "resnet50"])
    args = ap.parse_args(argv)
    rows = []
    if "effnet" in args.models:
        if EFFNET.exists():
            m = G.load_model(str(EFFNET))
            rows += bench("efficientnet-l0", m, OnnxInTorch(m, G.default_layer(m).name).eval(), args.batches,
                          args.repeats)
        else:
            print(f"skipping EfficientNet-Lite0: {EFFNET} is absent", file=sys.stderr)
    if "resnet50" in args.models:
        net = resnet50()
        with tempfile.TemporaryDirectory() as d:
            m = G.load_model(export_resnet50(net, d))
        rows += bench("resnet50", m, net, args.batches, args.repeats)

    print(f"\nonnxruntime {ort.__version__} CPU (default threads, no spinning), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {os.cpu_count()} cores; medians of {args.repeats} "
          f"(batch 1) / {max(3, args.repeats // 2)} (larger) after 2 warm-ups, interleaved; "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    print(f"{'model':16s} {'batch':>5s} {'fwd ms':>9s} {'aug ms':>9s} {'torch ms':>9s} {'aug/fwd':>8s} {'aug/torch':>9s}")
    for label, b, f, a, t in rows:
        ok1 = "" if a / f <= 2.5 else " !"
        ok2 = "" if a / t <= 1.0 else " !"
        print(f"{label:16s} {b:5d} {f * 1e3:9.1f} {a * 1e3:9.1f} {t * 1e3:9.1f} {a / f:7.2f}{ok1:2s}{a / t:8.2f}{ok2}")
    print("targets: aug/fwd <= 2.5, aug/torch <= 1.0 ('!' marks a miss)")


if __name__ == "__main__":
    main()
