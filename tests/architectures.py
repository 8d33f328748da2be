"""Small torch nets built like the architecture families that the zoo (tests/zoo.py: ResNet, DenseNet, MobileNetV3,
ConvNeXt, ViT, Swin) and tests/autodiff/autodiff_tiny_nets.py leave out, each with the operator patterns its family
exports: grouped strided convolutions and ceil-mode pooling (ResNeXt/RegNet), multi-branch blocks with asymmetric
kernels and a non-global pool before the head (Inception), token-mixing MLPs (MLP-Mixer), large-kernel depthwise 'same'
convolutions and a max head (ConvMixer), pooling as token mixer with GroupNorm and layer scale (PoolFormer),
TF-style asymmetric padding, SiLU and squeeze-excite (EfficientNet), class and distillation tokens (DeiT),
channel shuffle and pixel (un)shuffle (ShuffleNet), Fire modules (SqueezeNet), attention written with einsum
after a hand-written RMSNorm, and outlook attention by unfold and fold (VOLO). All take 3 x 16 x 16 inputs and give 5
logits.

`export(name, exporter, opset=None)` gives (torch module, shape-inferred ONNX model), exported once per test process
by the legacy exporter (opset 17 unless given or the net's `opset` asks for more) or dynamo (opset 18 unless given)
with a dynamic batch; the input is named "input"."""
import contextlib
import functools
import io
import warnings

import onnx
import torch
import torch.nn.functional as F
from torch import nn


class ResNeXt(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1, ceil_mode=True))
        self.block = nn.Sequential(nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),
                                   nn.Conv2d(32, 32, 3, 2, 1, groups=4), nn.BatchNorm2d(32), nn.ReLU(),
                                   nn.Conv2d(32, 32, 1))
        self.down = nn.Sequential(nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False), nn.Conv2d(16, 32, 1))
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(self.block(x) + self.down(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Inception(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.b1 = nn.Conv2d(8, 4, 1)
        self.b2 = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 6, (1, 3), padding=(0, 1)),
                                nn.Conv2d(6, 6, (3, 1), padding=(1, 0)))
        self.b3 = nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False), nn.Conv2d(8, 4, 1))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(8, 2, 1))
        self.fc = nn.Linear(16 * 4, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1))
        return self.fc(F.adaptive_avg_pool2d(x, (2, 2)).flatten(1))


class Mixer(nn.Module):
    def __init__(self, dim=16, tokens=16):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.tokens = nn.Sequential(nn.Linear(tokens, 32), nn.GELU(approximate="tanh"), nn.Linear(32, tokens))
        self.channels = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.channels(self.norm2(x))
        return self.head(x.mean(1))


class ConvMixer(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.embed = nn.Sequential(nn.Conv2d(3, dim, 2, 2), nn.GELU(), nn.BatchNorm2d(dim))
        self.depthwise = nn.Sequential(nn.Conv2d(dim, dim, 7, groups=dim, padding="same"), nn.GELU(),
                                       nn.BatchNorm2d(dim))
        self.pointwise = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.GELU(), nn.BatchNorm2d(dim))
        self.fc = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.embed(x)
        x = self.pointwise(x + self.depthwise(x))
        return self.fc(x.amax((2, 3)))


class PoolFormer(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 3, 2, 1)
        self.norm = nn.GroupNorm(1, dim)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.scale = nn.Parameter(torch.rand(dim, 1, 1))
        self.fc = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.embed(x)
        y = self.norm(x)
        x = x + self.scale * (self.pool(y) - y)
        return self.fc(x.mean((-2, -1)))


class EfficientNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, 2, bias=False), nn.BatchNorm2d(16)
        self.depthwise = nn.Conv2d(16, 16, 5, 2, groups=16, bias=False)
        self.squeeze, self.excite = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.project = nn.Conv2d(16, 24, 1)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        x = F.silu(self.bn(self.stem(F.pad(x, (0, 1, 0, 1)))))            # TF "SAME" padding, written out
        x = F.silu(self.depthwise(F.pad(x, (1, 2, 1, 2))))
        x = x * torch.sigmoid(self.excite(F.silu(self.squeeze(x.mean((2, 3), keepdim=True)))))
        x = F.hardswish(self.project(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DeiT(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.cls, self.dist = nn.Parameter(torch.randn(1, 1, dim)), nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 18, dim))
        self.encoder = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True, norm_first=True,
                                                  activation="gelu")
        self.head, self.head_dist = nn.Linear(dim, 5), nn.Linear(dim, 5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        b = x.shape[0]
        x = torch.cat([self.cls.expand(b, -1, -1), self.dist.expand(b, -1, -1), x], 1) + self.pos
        x = self.encoder(x)
        return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2


class ShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.grouped = nn.Conv2d(3, 16, 3, 1, 1), nn.Conv2d(16, 16, 1, groups=4)
        self.fc = nn.Linear(16 * 4, 5)

    def forward(self, x):
        x = F.elu(self.conv(x))
        b, c, h, w = x.shape
        x = x.reshape(b, 4, c // 4, h, w).transpose(1, 2).reshape(b, c, h, w)     # channel shuffle
        x = F.pixel_shuffle(F.pixel_unshuffle(F.mish(self.grouped(x)), 2), 2)
        x = F.interpolate(F.normalize(x, dim=1), scale_factor=0.5, mode="bilinear", align_corners=True)
        x = F.softplus(x) + F.leaky_relu(x, 0.2)
        return self.fc(F.max_pool2d(x, 4).flatten(1))


class SqueezeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.squeeze = nn.Conv2d(3, 8, 3, 2), nn.Conv2d(8, 4, 1)
        self.expand1, self.expand3 = nn.Conv2d(4, 8, 1), nn.Conv2d(4, 8, 3, padding=1)
        self.final, self.drop = nn.Conv2d(16, 5, 1), nn.Dropout(0.5)

    def forward(self, x):
        x = F.relu(self.squeeze(F.max_pool2d(F.relu(self.conv(x)), 3, 2, ceil_mode=True)))
        x = torch.cat([F.relu(self.expand1(x)), F.relu(self.expand3(x))], 1)
        return torch.flatten(F.adaptive_avg_pool2d(F.relu(self.final(self.drop(x))), 1), 1)


class EinsumAttention(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.gain = nn.Parameter(torch.rand(dim) + 0.5)
        self.fc = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gain
        a = torch.einsum("btc,bsc->bts", self.q(x), self.k(x)).softmax(-1)
        x = x + torch.einsum("bts,bsc->btc", a, self.v(x))
        return self.fc(torch.tanh(x).max(1).values)


class Volo(nn.Module):
    """VOLO's outlook attention (Yuan et al. 2021) on a channels-last map: every location attends over its 3 x 3
    window with weights computed from itself alone, the windows cut out by F.unfold and summed back by F.fold
    (Col2Im, opset 18: the legacy exporter writes it only there, and only for a constant output size)."""
    opset = 18

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.embed, self.heads = nn.Conv2d(3, dim, 4, 4), heads
        self.norm1, self.norm2, self.norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.v, self.attn, self.proj = nn.Linear(dim, dim), nn.Linear(dim, heads * 81), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.fc = nn.Linear(dim, 5)

    def outlook(self, x):
        b, h, w, c = x.shape
        v = F.unfold(self.v(x).permute(0, 3, 1, 2), 3, padding=1)
        v = v.reshape(b, self.heads, c // self.heads, 9, h * w).permute(0, 1, 4, 3, 2)
        a = self.attn(x).reshape(b, h * w, self.heads, 9, 9).transpose(1, 2).softmax(-1)
        y = (a @ v).permute(0, 1, 4, 3, 2).reshape(b, c * 9, h * w)
        return self.proj(F.fold(y, (4, 4), 3, padding=1).permute(0, 2, 3, 1))

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)
        x = x + self.outlook(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.fc(self.norm(x).mean((1, 2)))


NETS = {"resnext": ResNeXt, "inception": Inception, "mixer": Mixer, "convmixer": ConvMixer,
        "poolformer": PoolFormer, "efficientnet": EfficientNet, "deit": DeiT, "shufflenet": ShuffleNet,
        "squeezenet": SqueezeNet, "einsum_attention": EinsumAttention, "volo": Volo}


@functools.lru_cache(maxsize=None)
def export(name: str, exporter: str, opset: int | None = None):
    from onnxplain.kernels import graph

    torch.manual_seed(0)
    net = NETS[name]().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):          # non-trivial running statistics
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            model = torch.onnx.export(net, (x,), dynamo=True, input_names=["input"], opset_version=opset or 18,
                                      dynamic_shapes={"x": {0: torch.export.Dim("N")}}).model_proto
        else:
            f = io.BytesIO()
            torch.onnx.export(net, (x,), f, dynamo=False, opset_version=opset or getattr(net, "opset", 17),
                              input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "N"}})
            model = onnx.load_from_string(f.getvalue())
    return net, graph.load_model(model.SerializeToString())
