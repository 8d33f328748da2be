"""A zoo of small PyTorch image classifiers exported to ONNX with both torch exporters (test-time only).

Nets (deterministic seeded weights, eval mode, BatchNorm running statistics randomised so BN is not an identity):

  resnet    residual BasicBlocks, BatchNormalization (one not foldable into a Conv), MaxPool, Relu
  densenet  dense blocks (Concat), BN-ReLU-Conv, transition AveragePool
  mobilenet inverted residuals, depthwise Conv, HardSwish, squeeze-excite with HardSigmoid
  convnext  depthwise 7x7 Conv, channels-last LayerNorm (Transpose), Linear (MatMul), GELU, layer scale
  vit       patch-embedding Conv, CLS token (Concat), position embedding, attention (Softmax), LayerNorm, GELU
  swin      Swin transformer: window attention with a relative position bias (Gather), shifted windows
            (torch.roll: Slice + Concat) with their attention mask, patch merging (strided slices + Concat), a
            second stage at half the grid; tokens N x T x C between blocks, mean pooling
  swin_nhwc the same net in timm's newer layout: the residual stream is an N x H x W x C map, patch merging by
            Reshape + Transpose + Reshape (space to depth)

Each net has ``probes``: named submodules whose *output* is a tensor of the exported graph, for checks against
PyTorch (forward hooks): ``"default"`` is the layer ``kernels.graph.default_layer`` should pick, ``"early"`` an
earlier listed candidate. Tests find the ONNX tensor of a probe by value (names differ between exporters).

Reuse from any test directory::

    # tests/<yours>/conftest.py
    import sys, pathlib
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # tests/
    from zoo_plugin import zoo_dir, zoo_model  # noqa: F401  (session fixtures)

    def test_something(zoo_model):
        path = zoo_model("resnet", "dynamo")          # exported once per pytest cache key, then reused

or without pytest: ``zoo.export("vit", "legacy", some_dir) -> path``. ``zoo.build(name)`` gives the torch module
(same weights every call) and ``zoo.example_input(name, batch)`` a deterministic input.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from pathlib import Path

import torch
from torch import nn

NAMES = ("resnet", "densenet", "mobilenet", "convnext", "vit", "swin", "swin_nhwc")
EXPORTERS = ("legacy", "dynamo")
LEGACY_OPSET = 17
DYNAMO_OPSET = 18


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d,)):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


# --------------------------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x):
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(y + (x if self.down is None else self.down(x)))


class ResNetLike(nn.Module):
    input_shape = (3, 32, 40)

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.pool_bn = nn.BatchNorm2d(16)  # after a pool: not foldable into a Conv, stays a BatchNormalization
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2), BasicBlock(32, 32))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.pool_bn(self.pool(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.gap(x), 1))

    @property
    def probes(self):
        return {"default": self.layer2[1].relu2, "early": self.layer1[0].relu2}


# ------------------------------------------------------------------------------------------- DenseNet


class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU()
        self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(2 * growth), nn.ReLU()
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        y = self.conv2(self.relu2(self.bn2(self.conv1(self.relu1(self.bn1(x))))))
        return torch.cat([x, y], 1)


class DenseNetLike(nn.Module):
    input_shape = (3, 32, 32)

    def __init__(self, classes=10, growth=8):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        c = 16
        self.block1 = nn.Sequential(*[DenseLayer(c + i * growth, growth) for i in range(3)])
        c += 3 * growth
        self.trans = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False),
                                   nn.AvgPool2d(2, 2))
        c //= 2
        self.block2 = nn.Sequential(*[DenseLayer(c + i * growth, growth) for i in range(3)])
        c += 3 * growth
        self.norm, self.relu = nn.BatchNorm2d(c), nn.ReLU()
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.block2(self.trans(self.block1(self.stem(x))))
        x = self.relu(self.norm(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    @property
    def probes(self):
        return {"default": self.relu, "early": self.trans[3]}


# ------------------------------------------------------------------------------------------ MobileNet


class SqueezeExcite(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.relu = nn.Conv2d(c, c // r, 1), nn.ReLU()
        self.fc2, self.gate = nn.Conv2d(c // r, c, 1), nn.Hardsigmoid()

    def forward(self, x):
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cexp, cout, k, stride, se):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(cin, cexp, 1, bias=False), nn.BatchNorm2d(cexp), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(cexp, cexp, k, stride, k // 2, groups=cexp, bias=False),
                                nn.BatchNorm2d(cexp), nn.Hardswish())
        self.se = SqueezeExcite(cexp) if se else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(cexp, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class MobileNetV3Like(nn.Module):
    input_shape = (3, 32, 32)

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.blocks = nn.Sequential(
            InvertedResidual(16, 32, 16, 3, 1, se=True),
            InvertedResidual(16, 48, 24, 5, 2, se=True),
            InvertedResidual(24, 72, 24, 3, 1, se=False),
        )
        self.head = nn.Sequential(nn.Conv2d(24, 96, 1, bias=False), nn.BatchNorm2d(96), nn.Hardswish())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(96, 64), nn.Hardswish(), nn.Linear(64, classes))

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))

    @property
    def probes(self):
        return {"default": self.head[2], "early": self.blocks[0].se}


# ------------------------------------------------------------------------------------------- ConvNeXt


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW map (as timm/torchvision do it: permute, normalise, permute back)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, 1, 3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pw1, self.act, self.pw2 = nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))
        self.out = nn.Identity()  # probe point: the block's output

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pw2(self.act(self.pw1(self.norm(y))))
        return self.out(x + y.permute(0, 3, 1, 2))


class ConvNeXtLike(nn.Module):
    input_shape = (3, 32, 32)

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 2, 2), LayerNorm2d(16, eps=1e-6))
        self.stage1 = nn.Sequential(ConvNeXtBlock(16), ConvNeXtBlock(16))
        self.down = nn.Sequential(LayerNorm2d(16, eps=1e-6), nn.Conv2d(16, 32, 2, 2))
        self.stage2 = nn.Sequential(ConvNeXtBlock(32), ConvNeXtBlock(32))
        self.norm = nn.LayerNorm(32, eps=1e-6)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.fc(self.norm(x.mean((2, 3))))

    @property
    def probes(self):
        return {"default": self.stage2[1].out, "early": self.stage1[1].out}


# ------------------------------------------------------------------------------------------------ ViT


class Attention(nn.Module):
    def __init__(self, c, heads):
        super().__init__()
        self.heads, self.scale = heads, (c // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)

    def forward(self, x):
        b, t, c = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, t, c))


class ViTBlock(nn.Module):
    def __init__(self, c, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(c, eps=1e-6), Attention(c, heads)
        self.norm2 = nn.LayerNorm(c, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))
        self.out = nn.Identity()

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return self.out(x + self.mlp(self.norm2(x)))


class ViTLike(nn.Module):
    input_shape = (3, 32, 48)  # non-square: a 4 x 6 patch grid catches H/W mix-ups
    patch = 8

    def __init__(self, classes=10, c=32, heads=4, depth=2):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, c, self.patch, self.patch)
        grid = (self.input_shape[1] // self.patch) * (self.input_shape[2] // self.patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, c) * 0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, grid + 1, c) * 0.1)
        self.blocks = nn.Sequential(*[ViTBlock(c, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])

    @property
    def probes(self):
        # CLS pooling: after the last attention only the CLS token reaches the scores, so the default layer is
        # the input of the last attention (pytorch-grad-cam's advice for ViTs)
        return {"default": self.blocks[-1].norm1, "early": self.blocks[0].out}


# ----------------------------------------------------------------------------------------------- Swin


def _windows(x, w):
    """N x H x W x C -> (N * windows) x w*w x C."""
    n, h, wd, c = x.shape
    return x.view(n, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)


def _unwindow(x, w, h, wd):
    c = x.shape[-1]
    return x.view(-1, h // w, wd // w, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, h, wd, c)


class WindowAttention(nn.Module):
    def __init__(self, c, w, heads):
        super().__init__()
        self.w, self.heads, self.scale = w, heads, (c // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.table = nn.Parameter(torch.randn((2 * w - 1) ** 2, heads) * 0.5)
        coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)
        self.register_buffer("index", rel[..., 0] * (2 * w - 1) + rel[..., 1])

    def forward(self, x, mask=None):
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn + self.table[self.index.view(-1)].view(t, t, -1).permute(2, 0, 1)[None]
        if mask is not None:
            windows = mask.shape[0]
            attn = (attn.view(b // windows, windows, self.heads, t, t) + mask[None, :, None]).view(-1, self.heads, t, t)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c))


class SwinBlock(nn.Module):
    def __init__(self, c, grid, w, heads, shift):
        super().__init__()
        self.grid, self.w, self.shift = grid, w, shift
        self.norm1, self.attn = nn.LayerNorm(c), WindowAttention(c, w, heads)
        self.norm2, self.mlp = nn.LayerNorm(c), nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))
        self.register_buffer("mask", None)
        if shift:
            regions, k = torch.zeros(1, *grid, 1), 0
            for hs in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
                for ws in (slice(0, -w), slice(-w, -shift), slice(-shift, None)):
                    regions[:, hs, ws] = k
                    k += 1
            ids = _windows(regions, w).squeeze(-1)
            diff = ids[:, None, :] - ids[:, :, None]
            self.register_buffer("mask", torch.where(diff != 0, -100.0, 0.0))

    def mix(self, x):
        """Shifted-window attention of an N x H x W x C map."""
        if self.shift:
            x = torch.roll(x, (-self.shift, -self.shift), (1, 2))
        x = _unwindow(self.attn(_windows(x, self.w), self.mask), self.w, *self.grid)
        return torch.roll(x, (self.shift, self.shift), (1, 2)) if self.shift else x

    def forward(self, x):                 # tokens N x T x C
        n, t, c = x.shape
        x = x + self.mix(self.norm1(x).view(n, *self.grid, c)).reshape(n, t, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, grid, c):
        super().__init__()
        self.grid, self.norm, self.reduction = grid, nn.LayerNorm(4 * c), nn.Linear(4 * c, 2 * c, bias=False)

    def forward(self, x):                 # tokens N x T x C -> N x T/4 x 2C
        n, t, c = x.shape
        x = x.view(n, *self.grid, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(n, -1, 4 * c)))


class SwinLike(nn.Module):
    input_shape = (3, 32, 48)             # patch grid 8 x 12, then 4 x 6 after merging
    patch = 4

    def __init__(self, classes=10, c=16):
        super().__init__()
        g1 = (self.input_shape[1] // self.patch, self.input_shape[2] // self.patch)
        g2 = (g1[0] // 2, g1[1] // 2)
        self.patch_embed, self.embed_norm = nn.Conv2d(3, c, self.patch, self.patch), nn.LayerNorm(c)
        self.stage1 = nn.Sequential(self.block(c, g1, 4, 2, 0), self.block(c, g1, 4, 2, 2))
        self.merge = self.merging(g1, c)
        self.stage2 = nn.Sequential(self.block(2 * c, g2, 2, 4, 0), self.block(2 * c, g2, 2, 4, 1))
        self.norm, self.head = nn.LayerNorm(2 * c), nn.Linear(2 * c, classes)

    block, merging = SwinBlock, PatchMerging

    def forward(self, x):
        x = self.embed_norm(self.patch_embed(x).flatten(2).transpose(1, 2))
        x = self.norm(self.stage2(self.merge(self.stage1(x))))
        return self.head(x.mean(1))

    @property
    def probes(self):
        # mean pooling: every token of the last stage reaches the scores
        return {"default": self.norm, "early": self.stage1[-1]}


class SwinBlockNHWC(SwinBlock):
    def forward(self, x):                 # N x H x W x C
        x = x + self.mix(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchMergingNHWC(PatchMerging):
    def forward(self, x):                 # N x H x W x C -> N x H/2 x W/2 x 2C, as timm: space to depth
        n, h, w, c = x.shape
        x = x.reshape(n, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class SwinNHWCLike(SwinLike):
    block, merging = SwinBlockNHWC, PatchMergingNHWC

    def forward(self, x):
        x = self.embed_norm(self.patch_embed(x).permute(0, 2, 3, 1))
        x = self.norm(self.stage2(self.merge(self.stage1(x))))
        return self.head(x.mean((1, 2)))


_CLASSES = {"resnet": ResNetLike, "densenet": DenseNetLike, "mobilenet": MobileNetV3Like,
            "convnext": ConvNeXtLike, "vit": ViTLike, "swin": SwinLike, "swin_nhwc": SwinNHWCLike}


def build(name: str) -> nn.Module:
    """The torch net `name`, eval mode, the same weights on every call."""
    torch.manual_seed(1000 + NAMES.index(name))
    model = _CLASSES[name]()
    gen = torch.Generator().manual_seed(2000 + NAMES.index(name))
    _randomise_bn(model, gen)
    return model.eval()


def input_shape(name: str) -> tuple:
    return _CLASSES[name].input_shape


def example_input(name: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *input_shape(name), generator=gen)


def source_digest() -> str:
    """Changes when this file or torch changes: a cache key for exported models."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:16]


def export(name: str, exporter: str, dirpath) -> str:
    """Export net `name` with `exporter` ("legacy" opset 17 / "dynamo" opset 18) into dirpath; reuse if there."""
    if name not in NAMES or exporter not in EXPORTERS:
        raise ValueError(f"unknown zoo net/exporter {name!r}/{exporter!r}; nets {NAMES}, exporters {EXPORTERS}")
    return _export(name, exporter, str(Path(dirpath).resolve()))


@functools.lru_cache(maxsize=None)
def _export(name: str, exporter: str, dirpath: str) -> str:
    path = os.path.join(dirpath, f"{name}_{exporter}.onnx")
    if os.path.exists(path):
        return path
    os.makedirs(dirpath, exist_ok=True)
    model = build(name)
    x = example_input(name, 2)
    tmp = path + f".tmp{os.getpid()}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            torch.onnx.export(model, (x,), tmp, dynamo=False, opset_version=LEGACY_OPSET,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        else:
            batch = torch.export.Dim("batch", min=1, max=4096)
            prog = torch.onnx.export(model, (x,), dynamo=True, opset_version=DYNAMO_OPSET,
                                     input_names=["input"], output_names=["logits"],
                                     dynamic_shapes={"x": {0: batch}}, external_data=False, verbose=False)
            prog.save(tmp, external_data=False)
    os.replace(tmp, path)
    return path


def run_with_probes(model: nn.Module, x: torch.Tensor, seed: torch.Tensor | None = None) -> dict:
    """Forward `model` on x recording each probe's output; with `seed`, backpropagate sum(logits * seed).

    Returns {"logits", "acts": {probe: tensor}, and with seed "grads": {probe: d/d act}, "input_grad"}; all numpy.
    """
    acts, handles = {}, []
    for pname, module in model.probes.items():
        def hook(_m, _i, out, pname=pname):
            if seed is not None:
                out.retain_grad()
            acts[pname] = out
        handles.append(module.register_forward_hook(hook))
    try:
        x = x.detach().clone().requires_grad_(seed is not None)
        with torch.set_grad_enabled(seed is not None):
            logits = model(x)
            result = {"logits": logits.detach().numpy(), "acts": {k: v.detach().numpy() for k, v in acts.items()}}
            if seed is not None:
                (logits * seed).sum().backward()
                result["grads"] = {k: v.grad.numpy() for k, v in acts.items()}
                result["input_grad"] = x.grad.numpy()
    finally:
        for h in handles:
            h.remove()
    return result
