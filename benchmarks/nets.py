"""The networks the benchmarks run in PyTorch next to onnxplain (imported by bench_autodiff and bench_methods).

- ResNet-50 with torchvision's shapes and random weights (defined here: torchvision is not installable), with
  `export_resnet50` for the same network in ONNX (legacy exporter, opset 17, dynamic batch).
- `OnnxInTorch`: the shared EfficientNet-Lite0 rebuilt for torch from its own ONNX graph and weights by a tiny
  interpreter of its op set.
- `compared`: both, each as the same network in torch and in ONNX with one input (bench_methods, bench_perturbation).
"""

from __future__ import annotations

import os
import pathlib
import tempfile
import warnings
from dataclasses import dataclass

import onnx
import torch
import torch.nn.functional as F
from torch import nn


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
        self.features = x  # the default CAM layer (layer4's output, 2048 x 7 x 7)
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


def export_resnet50(model: nn.Module, dirpath: str, size: int = 224) -> str:
    path = os.path.join(dirpath, "resnet50.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, size, size),), path, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


# ------------------------------------------------------------------------------- EfficientNet in torch


class OnnxInTorch(nn.Module):
    """EfficientNet-Lite0's op set (Conv, Clip, Add, GlobalAveragePool, Flatten, Gemm) run by torch, and its QDQ
    form: QuantizeLinear -> DequantizeLinear of an activation as torch.fake_quantize_per_tensor_affine (what a
    quantisation-aware-trained net runs), DequantizeLinear of constant int8 weights as their values."""

    def __init__(self, model: onnx.ModelProto, layer: str):
        super().__init__()
        self.nodes = [n for n in model.graph.node]
        self.weights = {t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
        self.input, self.output, self.layer = model.graph.input[0].name, model.graph.output[0].name, layer
        self.tap = nn.Identity()   # the layer's tensor passes through it, so Captum's layer methods can hook it

    def forward(self, x):
        env = dict(self.weights)
        env[self.input] = x
        for n in self.nodes:
            a = {at.name: onnx.helper.get_attribute_value(at) for at in n.attribute}
            i = [env[k] if k else None for k in n.input]
            if n.op_type == "Constant":
                y = torch.from_numpy(onnx.numpy_helper.to_array(a["value"]).copy())
            elif n.op_type == "QuantizeLinear":
                y = ("quantized", i[0], float(i[1]), int(i[2]), i[2].dtype)
            elif n.op_type == "DequantizeLinear" and isinstance(i[0], tuple):
                _, v, scale, zero, dtype = i[0]
                lo, hi = (0, 255) if dtype == torch.uint8 else (-128, 127)
                y = torch.fake_quantize_per_tensor_affine(v, scale, zero, lo, hi)
            elif n.op_type == "DequantizeLinear":
                shape = [-1] + [1] * (i[0].dim() - 1) if i[1].dim() == 1 and i[0].dim() > 1 else [-1]
                y = (i[0].double() - i[2].double().reshape(shape)) * i[1].double().reshape(shape)
                y = y.float().reshape(i[0].shape)
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
            env[n.output[0]] = self.tap(y) if n.output[0] == self.layer else y
        self.features = env[self.layer]
        return env[self.output]


# ------------------------------------------------------------------------------- what the benchmarks compare

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"


@dataclass
class Compared:
    title: str
    net: nn.Module          # in torch; net.features holds the default layer's tensor after a forward
    layer: nn.Module        # the module whose output is that layer (for Captum's layer methods)
    onnx_model: onnx.ModelProto
    x: torch.Tensor         # [1, 3, H, W], the input both run
    relu: bool              # its activations are nn.ReLU (Captum's guided backprop/deconvnet rewrite only those)


def compared(size: int = 224) -> list[Compared]:
    """The ResNet-50 (random weights, exported once; random input size x size) and, when ../shared has it,
    EfficientNet-Lite0 run by torch from its ONNX weights (chelsea.jpg with the model's preprocessing)."""
    from onnxplain.kernels import graph, images

    net = resnet50()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_model = graph.load_model(export_resnet50(net, tmp, size))
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    out = [Compared(f"ResNet-50 (torch-defined, random weights), random input {size}x{size}", net, net.layer4,
                    onnx_model, x, True)]
    eff = SHARED / "models" / "efficientnet_lite0_imagenet.onnx"
    if eff.exists():
        onnx_model = graph.load_model(str(eff))
        net = OnnxInTorch(onnx_model, graph.default_layer(onnx_model).name).eval()
        pre = images.Preprocessing(224, 224, fit="center_crop", scale=1.0, mean=(127.5,) * 3, std=(128.0,) * 3)
        photo = SHARED / "images" / "chelsea.jpg"
        x = torch.from_numpy(images.preprocess(images.decode(photo.read_bytes(), 10 ** 8), pre).sample[None])
        out.append(Compared("EfficientNet-Lite0 (../shared, run by torch from its ONNX weights), chelsea.jpg", net,
                            net.tap, onnx_model, x, False))
    return out
