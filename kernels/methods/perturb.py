"""Pieces of the small ONNX graphs that the perturbation methods compose in front of (and behind) a model.

Every per-pixel step over many perturbed inputs — upsampling coarse maps (bilinear, half-pixel centres, as two
MatMuls), min-max normalising them, cropping, multiplying the image, weighting and summing masks by scores —
is a node here, so it runs inside onnxruntime next to the model (on the GPU when there is one). Python only
builds per-mask numbers (coarse grids, shifts, channel indices, weights) and small [targets, ...] results.

Tensors of the composed part are named with `compose.PREFIX`; constants are Constant nodes (not initializers)
so that `compose.with_prefix` carries them and `kernels.autodiff` sees them as constants.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..compose import PREFIX, with_prefix
from ..images import extreme_samples, linear_weights

EPS = 1e-12   # min-max denominator floor: a constant map normalises to 0 (as pytorch-grad-cam's + 1e-8 does)
FLAT = 2.0 ** -17   # normalised_upsample: a span under ~64 float32 rounding steps of the values is a constant map


class Builder:
    """Collects the nodes of a composed prefix/suffix; `opset` picks the operator forms (ReduceMin's axes)."""

    def __init__(self, model: onnx.ModelProto):
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
        if self.opset < 11:
            raise ValueError(f"perturbation graphs need ONNX opset >= 11 (Resize with sizes); the model has {self.opset}")
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{PREFIX}{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        out = out or self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self.name(f"n_{op_type}"), **attrs))
        return out

    def const(self, value, dtype=np.float32, hint: str = "c") -> str:
        out = self.name(hint)
        tensor = numpy_helper.from_array(np.asarray(value, dtype), out)
        self.nodes.append(helper.make_node("Constant", [], [out], name=self.name("n_const"), value=tensor))
        return out

    def reduce(self, op_type: str, x: str, axes: list[int], keepdims: int = 1) -> str:
        if op_type == "ReduceSum" and self.opset >= 13 or self.opset >= 18:
            return self.op(op_type, x, self.const(axes, np.int64), keepdims=keepdims)
        return self.op(op_type, x, axes=axes, keepdims=keepdims)

    def unsqueeze(self, x: str, axes: list[int]) -> str:
        if not axes:
            return x
        if self.opset >= 13:
            return self.op("Unsqueeze", x, self.const(axes, np.int64))
        return self.op("Unsqueeze", x, axes=axes)

    # ------------------------------------------------------------------------------------- building blocks

    def upsample(self, maps: str, source: tuple[int, int], height: int, width: int, out: str | None = None) -> str:
        """[B, 1, h, w] -> [B, 1, height, width], bilinear with half-pixel centres (no antialiasing), for maps of
        `source` = (h, w). Bilinear resizing is separable: two MatMuls with constant interpolation matrices
        (kernels.images.linear_weights), which onnxruntime runs 4-9x faster than Resize on 32 maps (12 -> 96,
        7 or 14 -> 224) and kernels.autodiff differentiates with no static batch size."""
        return self._interpolate(maps, linear_weights(source[0], height), linear_weights(source[1], width), out)

    def _interpolate(self, maps: str, rows: np.ndarray, cols: np.ndarray, out: str | None = None) -> str:
        """rows [H, h] @ maps [B, 1, h, w] @ cols [W, w]^T: two MatMuls with constant matrices."""
        along_rows = self.op("MatMul", self.const(rows), maps)                                     # [B, 1, H, w]
        return self.op("MatMul", along_rows, self.const(np.ascontiguousarray(cols.T)), out=out)

    def normalised_upsample(self, maps: str, source: tuple[int, int], height: int, width: int,
                            out: str | None = None) -> str:
        """minmax(upsample(maps)) for coarse maps [B, 1, h, w] of `source` = (h, w), with the per-pixel work of a
        plain upsampling: each map's extremes over the upsampled pixels lie among the rows extreme_samples(h,
        height) x the columns extreme_samples(w, width) (kernels.images: 22 x 22 of 96 x 96 for 12 x 12 maps),
        so only those are interpolated to find them; and each row of the interpolation matrices sums to 1, so
        up((m - lo) / span) = (up(m) - lo) / span: the normalisation runs on the coarse maps, then one
        upsampling gives the masks. Equal to minmax(upsample(maps)) up to float32 rounding (~1e-7: values can
        be that far outside [0, 1]). As in minmax, the work is on m / 2 (no overflow of max - min) and a
        constant map gives an all-zero mask; "constant" includes maps whose span is at the rounding level of
        their values (span < FLAT (|lo| + |hi|)), which minmax stretches to [0, 1]. Measured on 32 maps, 12 x 12
        -> 96 x 96, in front of the shipped shapes model's forward (Opti-CAM's graph, onnxruntime CPU, 2 cores):
        minmax(upsample) added 7.9% to the forward, this 2-4%, a plain upsampling with no normalisation 2-3%."""
        rows, cols = linear_weights(source[0], height), linear_weights(source[1], width)
        half = self.op("Mul", maps, self.const(0.5))
        probe = self._interpolate(half, rows[extreme_samples(source[0], height)],
                                  cols[extreme_samples(source[1], width)])
        lo = self.reduce("ReduceMin", probe, [2, 3])
        hi = self.reduce("ReduceMax", probe, [2, 3])
        span = self.op("Sub", hi, lo)
        # Less, not LessOrEqual (opset 12): an all-zero map (span 0, bound 0) is not "flat" but 0 / EPS = 0 anyway
        flat = self.op("Less", span, self.op("Mul", self.op("Add", self.op("Abs", lo), self.op("Abs", hi)),
                                             self.const(FLAT)))
        scale = self.op("Where", flat, self.const(0.0), self.op("Div", self.const(1.0),
                                                                self.op("Add", span, self.const(EPS / 2))))
        return self._interpolate(self.op("Mul", self.op("Sub", half, lo), scale), rows, cols, out)

    def minmax(self, maps: str, out: str | None = None) -> str:
        """(m - min) / (max - min + EPS) per map over its two last axes (named `out` when given), computed on
        m / 2: max - min of finite float32 maps overflows to Inf past 3.4e38 (a map spanning +-3e38 became NaN
        where it was largest), its halves' never does; halving is exact and both sides of the quotient are
        halved (EPS too), so the result is the same to the bit for every map whose span did not overflow and whose
        values are not subnormal (below 1.2e-38, where halving rounds)."""
        half = self.op("Mul", maps, self.const(0.5))
        lo = self.reduce("ReduceMin", half, [2, 3])
        hi = self.reduce("ReduceMax", half, [2, 3])
        span = self.op("Add", self.op("Sub", hi, lo), self.const(EPS / 2))
        return self.op("Div", self.op("Sub", half, lo), span, out=out)

    def masked_input(self, x: str, mask: str, layout: str, base: str | None = None) -> str:
        """x * mask with a [B, 1, H, W] mask broadcast over the channels of one NCHW or NHWC sample; with a
        `base` sample, base + mask * (x - base): the pixels blended towards the base image (e.g. black)."""
        if layout == "NHWC":
            mask = self.op("Transpose", mask, perm=[0, 2, 3, 1])
        if base is None:
            return self.op("Mul", x, mask)
        return self.op("Add", base, self.op("Mul", mask, self.op("Sub", x, base)))


def value_info(name: str, shape, dtype=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def sample_info(layout: str, spatial: tuple[int, int], channels: int, name: str = f"{PREFIX}x") -> onnx.ValueInfoProto:
    """An input that carries one image-shaped sample, [1, C, H, W] or [1, H, W, C] (by default the sample being
    explained)."""
    h, w = spatial
    shape = [1, channels, h, w] if layout == "NCHW" else [1, h, w, channels]
    return value_info(name, shape)


def channels_of(sample: np.ndarray, layout: str) -> int:
    return sample.shape[0] if layout == "NCHW" else sample.shape[-1]


def compose_front(model: onnx.ModelProto, input_name: str, builder: Builder, inputs: list, produces: str,
                  outputs: list[str]) -> onnx.ModelProto:
    return with_prefix(model, input_name, builder.nodes, inputs, produces, outputs)


def batches(total: int, size: int):
    """(start, stop) of consecutive batches of at most `size` items."""
    for start in range(0, total, size):
        yield start, min(start + size, total)


def softmax(u: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.exp(u - u.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)
