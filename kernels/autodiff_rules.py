"""Vector-Jacobian rules, one per ONNX operator: `RULES[op_type](c) -> [cotangent of each input]`.

`c` is an `autodiff.Ctx`: `c.g`/`c.gs` are the cotangents of the node's outputs, `c.x(i)`/`c.y(i)` the
forward tensors (reused, never recomputed), `c(op, *inputs, **attrs)` emits a node and returns its output,
`c.needs(i)` says whether input i lies on the differentiated path. A rule returns None for inputs that need
no gradient; the walk raises if the path needed one.

Rule variants for ReLU-like activations (`c.rule`), after Springenberg et al. 2015:
- "standard": the true gradient.
- "guided": dx = f'(x) * max(g, 0), i.e. the operator's own local derivative applied to the positive part
  of the incoming signal. For ReLU this is exactly "pass g where x > 0 and g > 0". For Clip (ReLU6) the
  forward mask is min < x < max. LeakyRelu/PRelu keep their negative slope. For HardSwish and GELU we keep
  their smooth local derivative (not a hard x > 0 mask): the variant is then a pure modification of the
  backward signal, as in the paper's definition, and we do not invent a gate the model does not have.
- "deconvnet": dx = max(g, 0), ignoring x entirely (Zeiler & Fergus's backward ReLU). The same holds for
  Clip/ReLU6, LeakyRelu, PRelu, HardSwish and GELU: each is treated as the rectifier it approximates.
  Elu, Selu, Celu, Mish, Swish and ThresholdedRelu are ReLU-like too and follow the same two variants (guided: their
  own local derivative times max(g, 0)). So does a QuantizeLinear whose range starts at exactly 0 (zero point at
  the integer type's minimum): quantizers fold a ReLU or ReLU6 into that range and remove the node.
Other operators (sigmoid, tanh, softmax, ...) use their true gradient under every variant, as captum does.

Scatters (ScatterND, ScatterElements): under reduction none the indices are taken to be distinct (the spec leaves
duplicates undefined); under max/min the cotangent is shared evenly among the values that tie for the result, data
included, as torch's scatter_reduce does; under mul each update's product of the others is formed without dividing by
a zero (`_product_of_others`, which ReduceProd uses too: a lone zero in a group gets the product of the rest, a group
with two zeros gets no gradient at all).
"""
from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto, helper, numpy_helper

RULE_VARIANTS = ("standard", "guided", "deconvnet")

# Outputs of these carry no derivative (shapes, indices, comparisons, constants).
NON_DIFFERENTIABLE = {
    "Shape", "Size", "Constant", "ConstantOfShape", "Range", "NonZero", "ArgMax", "ArgMin", "Equal",
    "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf",
    "EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
    "Sign", "Floor", "Ceil", "Round", "OneHot", "Bernoulli", "Hardmax",
}

RULES: dict = {}


def rule(*ops):
    def register(fn):
        for op in ops:
            RULES[op] = fn
        return fn
    return register


# --- helpers ----------------------------------------------------------------------------------------------
def _k(c, v, like=None):
    return c.const(v, like=like or c.x(0))


def _rectify(c, local):
    """ReLU-like backward under the chosen variant; `local(g)` applies the true local derivative."""
    if c.rule == "deconvnet":
        return c("Relu", c.g)
    return local(c("Relu", c.g) if c.rule == "guided" else c.g)


def _mask(c, cond, g):
    # Mul by a cast mask: onnxruntime's Where with a broadcast scalar is ~5x slower on CPU.
    return c("Mul", g, c("Cast", cond, to=c.dtype(c.x(0))))


# Masks of ReLU-like units as HardSigmoid steps on the activation's output: onnxruntime's CPU provider runs
# HardSigmoid and same-shape Mul in its blocked NCHWc layout, whereas comparisons, Cast and scalar-broadcast
# arithmetic force a reorder of the tensor in and out of it (on EfficientNet-Lite0 the reorders were a third of
# the augmented graph's time), and a HardSigmoid is one elementwise pass.
def _step(c, y, sign, at, scale):
    """1[sign * (y - at) > 0] as float32 by HardSigmoid(alpha * y + beta) = clip(., 0, 1): alpha * y and beta =
    -alpha * at are exact (alpha = sign * scale, a power of two, no overflow), so their sum has the exact sign
    and, for float32 y != at, a magnitude of at least 1 (at = 0: for |y| >= 2**-124)."""
    return c("HardSigmoid", y, alpha=sign * scale, beta=-sign * scale * at)


def _band_mask(c, y, lo, hi, g, clipped=False):
    """g * 1[lo < y < hi] for a float32 y by HardSigmoid steps, or None for other types. clipped: y is known to lie
    in [lo, hi] (a Clip's own output)."""
    if c.dtype(y) != 1:   # TensorProto.FLOAT: the exactness argument is for float32
        return None
    bound = max(abs(lo or 0.0), abs(hi or 0.0), 1.0)
    scale = 2.0 ** min(124, math.floor(math.log2(np.finfo(np.float32).max / bound)) - 2)
    channels = _map_channels(c, y)
    if clipped and lo == 0.0 and hi is not None and hi > 0.0 and channels:
        return c("Mul", g, _open_band(c, y, hi, scale, channels))
    for sign, at in ((1.0, lo), (-1.0, hi)):
        if at is not None:
            g = c("Mul", g, _step(c, y, sign, at, scale))
    return g


def _open_band(c, y, hi, scale, channels):
    """1[0 < y < hi] for a map y = clip(x, 0, hi) (ReLU6) in two passes instead of two steps and their product:
    top = 1[y >= hi] (a step just below hi), then y - hi * top, which is y inside and exactly 0 at both bounds, by
    a depthwise 1x1 Conv of top plus y, and one step at 0. onnxruntime's CPU provider fuses that Conv, the Add and
    the step into one blocked convolution that sums y before the convolution's own product; with no bias the sum
    of those two terms is exact in either order."""
    top = _step(c, y, 1.0, float(np.nextafter(np.float32(hi), np.float32(0))), scale)
    below = c("Add", c("Conv", top, c.const(np.full((channels, 1, 1, 1), -hi, np.float32), dtype=1), group=channels), y)
    return _step(c, below, 1.0, 0.0, scale)


def _scalar(c, name):
    v = c.value(name) if name else None
    return None if v is None or np.asarray(v).size != 1 else float(np.asarray(v).reshape(()))


def _norm_axes(axes, rank):
    return sorted(a + rank if a < 0 else a for a in axes)


def _reduce_axes(c):
    """Static axes of a Reduce* node (attribute or constant input), or None (= all axes)."""
    if "axes" in c.attrs:
        return list(c.attrs["axes"])
    if c.x(1) is not None:
        v = c.ints(c.x(1))
        if v is None:
            c.fail("reduction axes must be constant")
        return v
    return None


def _spatial(c, x):
    return c.need_rank(x) - 2


def _pool_geometry(c, x, nsp, kernel):
    """Strides, dilations and explicit (begin..., end...) pads, resolving auto_pad from static dims."""
    s = list(c.attr("strides", [1] * nsp))
    d = list(c.attr("dilations", [1] * nsp))
    auto = c.attr("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        return s, d, list(c.attr("pads", [0] * (2 * nsp)))
    if auto == "VALID":
        return s, d, [0] * (2 * nsp)
    ins = c.static_dims(x, range(2, 2 + nsp))
    if ins is None:
        c.fail(f"auto_pad={auto} needs static spatial dims of {x!r}")
    pb, pe = [], []
    for i, n, st, dl, k in zip(range(nsp), ins, s, d, kernel):
        out = -(-n // st)
        total = max(0, (out - 1) * st + dl * (k - 1) + 1 - n)
        small, big = total // 2, total - total // 2
        pb.append(small if auto == "SAME_UPPER" else big)
        pe.append(big if auto == "SAME_UPPER" else small)
    return s, d, pb + pe


def _fit_spatial(c, r, x, nsp):
    """Crop or zero-extend the trailing end of r's spatial axes to x's runtime size."""
    target = c.shape(x, 2)
    r = c("Slice", r, c.i64([0] * nsp), target, c.i64(list(range(2, 2 + nsp))))
    short = c("Sub", target, c.shape(r, 2))
    pads = c("Concat", c.i64([0] * (2 + nsp) + [0, 0]), short, axis=0)
    return c("Pad", r, pads)


def _transpose_back(c, g, x, s, d, pads, kernel, weight, group, nsp):
    """Adjoint of a strided window op (Conv, pooling): ConvTranspose with the same geometry, sized to x."""
    ins = c.static_dims(x, range(2, 2 + nsp))
    outs = c.static_dims(c.y(0), range(2, 2 + nsp))
    if ins is not None and outs is not None:
        pb, pe = list(pads[:nsp]), list(pads[nsp:])
        op = []
        for i in range(nsp):
            full = (outs[i] - 1) * s[i] + d[i] * (kernel[i] - 1) + 1 - pb[i] - pe[i]
            if full > ins[i]:  # windows hanging past the padded input (ceil_mode): crop them away
                pe[i] += full - ins[i]
                full = ins[i]
            op.append(ins[i] - full)
        if all(o < max(st, dl) for o, st, dl in zip(op, s, d)):
            return c("ConvTranspose", g, weight, strides=s, dilations=d, group=group, pads=pb + pe,
                     output_padding=op if any(op) else None)
    r = c("ConvTranspose", g, weight, strides=s, dilations=d, group=group, pads=list(pads[:nsp]) + [0] * nsp)
    return _fit_spatial(c, r, x, nsp)


# --- elementwise arithmetic -------------------------------------------------------------------------------
@rule("Identity", "Dropout")
def _identity(c):
    return [c.g]


@rule("Cast", "CastLike")
def _cast(c):
    return [c("Cast", c.g, to=c.dtype(c.x(0))), None]


# Quantized tensors (QDQ models, and PyTorch's export of fake quantisation: QuantizeLinear -> DequantizeLinear pairs).
# QuantizeLinear's integer output q stands for the real value s * (q - z); the walk lets it carry a float cotangent
# taken with respect to that value (QUANTIZED). So DequantizeLinear passes its cotangent on unchanged, and
# QuantizeLinear passes it where round(x / s) + z fell inside the integer type's range and nowhere else: the
# straight-through estimator with saturation, exactly the backward of torch.fake_quantize_per_{tensor,channel}_affine.
# (The true derivative of rounding is zero almost everywhere, which would make every quantized model's map zero.)
# DynamicQuantizeLinear (dynamic quantization) is a QuantizeLinear whose scale and zero point it computes from its
# own input's range: its quantized output is treated the same way, with that scale and zero point held constant
# (they are not differentiated, as a quantization-aware-trained net's observers are not).
QUANTIZED = {"QuantizeLinear", "DynamicQuantizeLinear"}
_INT_RANGES = {TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127), TensorProto.UINT16: (0, 65535),
               TensorProto.INT16: (-32768, 32767), TensorProto.UINT4: (0, 15), TensorProto.INT4: (-8, 7)}


def _along_axis(c, v, x):
    """Per-axis quantization parameter `v` (1-D, one value per slice of x along the node's axis) shaped to broadcast
    against x; a scalar as it is."""
    if c.rank(v) != 1:
        return v
    rank = c.need_rank(x)
    axis = c.attr("axis", 1) % rank
    return c("Reshape", v, c.i64([-1] + [1] * (rank - 1 - axis)))


@rule("QuantizeLinear")
def _quantize_linear(c):
    x, scale, zero = c.x(0), c.x(1), c.x(2)
    if c.attr("block_size", 0):
        c.fail("blocked quantization (block_size > 0) has no gradient rule")
    qtype = c.dtype(zero) if zero else c.attr("output_dtype", 0) or TensorProto.UINT8
    if qtype not in _INT_RANGES:
        c.fail(f"quantization to {helper.tensor_dtype_to_string(qtype)} has no gradient rule (integer types only)")
    lo, hi = _INT_RANGES[qtype]
    zeros = c.ints(zero) if zero else [0]
    s, z = _scalar(c, scale), (zeros[0] if zeros is not None and len(zeros) == 1 else None)
    if s is not None and z is not None and s > 0 and c.dtype(x) == TensorProto.FLOAT:
        # One scale and zero point: round(x / s) + z lies in [lo, hi] iff x lies strictly between the two rounding
        # boundaries (up to ties at exactly half a step), a band mask in two passes that stay in onnxruntime's
        # blocked layout instead of nine elementwise ops.
        bounds = [float(np.float32((b - z + d) * s)) for b, d in ((lo, -0.5), (hi, 0.5))]
        local = lambda g: _band_mask(c, x, *bounds, g)
    else:
        q = c("Round", c("Div", x, _along_axis(c, scale, x)))
        if zero:
            q = c("Add", q, c("Cast", _along_axis(c, zero, x), to=c.dtype(x)))
        inside = c("And", c("GreaterOrEqual", q, _k(c, lo)), c("LessOrEqual", q, _k(c, hi)))
        local = lambda g: _mask(c, inside, g)
    if zeros is not None and all(v == lo for v in zeros):
        # The range starts at exactly 0: a rectifier. Quantizers write ReLU/ReLU6 into the range and drop the node
        # (onnxruntime's does), so under guided and deconvnet this is where the model's ReLU went.
        return [_rectify(c, local), None, None]
    return [local(c.g), None, None]


@rule("DynamicQuantizeLinear")
def _dynamic_quantize_linear(c):
    # uint8 over [min(x, 0), max(x, 0)]: round(x / s) + z lies in [0, 255] iff x lies between the rounding
    # boundaries (0 - z - 0.5) * s and (255 - z + 0.5) * s (up to ties at exactly half a step), which are scalars:
    # x == clip(x, lo, hi) in two passes over x instead of the seven of dividing, rounding and comparing. Only the
    # top of the range can saturate (by one step). The model keeps its ReLUs (dynamic quantization absorbs none), so
    # guided and deconvnet need nothing here.
    x, scale = c.x(0), c.y(1)
    zero = c("Cast", c.y(2), to=c.dtype(x))
    lo = c("Mul", c("Sub", _k(c, -0.5), zero), scale)
    hi = c("Mul", c("Sub", _k(c, 255.5), zero), scale)
    return [_mask(c, c("Equal", c("Clip", x, lo, hi), x), c.g)]


@rule("DequantizeLinear")
def _dequantize_linear(c):
    if c.attr("block_size", 0):
        c.fail("blocked quantization (block_size > 0) has no gradient rule")
    return [c.g, None, None]   # the cotangent of a quantized tensor is already with respect to its real value


@rule("Add")
def _add(c):
    return [c.unbroadcast(c.g, c.x(0)) if c.needs(0) else None,
            c.unbroadcast(c.g, c.x(1)) if c.needs(1) else None]


@rule("Sum")
def _sum(c):
    return [c.unbroadcast(c.g, x) if c.needs(i) else None for i, x in enumerate(c.node.input)]


@rule("Sub")
def _sub(c):
    return [c.unbroadcast(c.g, c.x(0)) if c.needs(0) else None,
            c.unbroadcast(c("Neg", c.g), c.x(1)) if c.needs(1) else None]


@rule("Mul")
def _mul(c):
    a, b = c.x(0), c.x(1)
    return [c.unbroadcast(c("Mul", c.g, b), a) if c.needs(0) else None,
            c.unbroadcast(c("Mul", c.g, a), b) if c.needs(1) else None]


@rule("Div")
def _div(c):
    a, b = c.x(0), c.x(1)
    return [c.unbroadcast(c("Div", c.g, b), a) if c.needs(0) else None,
            c.unbroadcast(c("Neg", c("Div", c("Mul", c.g, c.y(0)), b)), b) if c.needs(1) else None]


@rule("Mod")
def _mod(c):
    # y = a - b q with q = trunc(a / b) (fmod=1) or floor(a / b) (fmod=0: integers, and floats from opset 28 on), so
    # da = g and db = -g q. q is read off the forward's own y, (a - y) / b rounded to the integer it is: the very
    # quotient the forward used, under either rounding.
    a, b = c.x(0), c.x(1)
    q = c("Round", c("Div", c("Sub", a, c.y(0)), b)) if c.needs(1) else None
    return [c.unbroadcast(c.g, a) if c.needs(0) else None,
            c.unbroadcast(c("Neg", c("Mul", c.g, q)), b) if c.needs(1) else None]


@rule("Neg")
def _neg(c):
    return [c("Neg", c.g)]


@rule("Reciprocal")
def _reciprocal(c):
    return [c("Neg", c("Mul", c.g, c("Mul", c.y(0), c.y(0))))]


@rule("Pow")
def _pow(c):
    x, p, y = c.x(0), c.x(1), c.y(0)
    dx = dp = None
    if c.needs(0):
        pv = c.value(p)
        if pv is not None and pv.size == 1 and float(pv) == 2.0:  # the common square, without a Pow
            local = c("Mul", x, _k(c, 2.0))
        else:
            pl = c("CastLike", p, x)
            local = c("Mul", pl, c("Pow", x, c("Sub", pl, _k(c, 1.0))))
        dx = c.unbroadcast(c("Mul", c.g, local), x)
    if c.needs(1):
        dp = c.unbroadcast(c("Mul", c.g, c("Mul", y, c("Log", x))), p)
    return [dx, dp]


@rule("Sqrt")
def _sqrt(c):
    return [c("Div", c("Mul", c.g, _k(c, 0.5)), c.y(0))]


@rule("Exp")
def _exp(c):
    return [c("Mul", c.g, c.y(0))]


@rule("Log")
def _log(c):
    return [c("Div", c.g, c.x(0))]


@rule("Abs")
def _abs(c):
    return [c("Mul", c.g, c("Sign", c.x(0)))]


@rule("Sigmoid")
def _sigmoid(c):
    y = c.y(0)
    return [c("Mul", c.g, c("Mul", y, c("Sub", _k(c, 1.0), y)))]


@rule("Tanh")
def _tanh(c):
    y = c.y(0)
    return [c("Mul", c.g, c("Sub", _k(c, 1.0), c("Mul", y, y)))]


@rule("Erf")
def _erf(c):
    x = c.x(0)
    local = c("Mul", _k(c, 2.0 / math.sqrt(math.pi)), c("Exp", c("Neg", c("Mul", x, x))))
    return [c("Mul", c.g, local)]


@rule("Sin")
def _sin(c):
    return [c("Mul", c.g, c("Cos", c.x(0)))]


@rule("Cos")
def _cos(c):
    return [c("Neg", c("Mul", c.g, c("Sin", c.x(0))))]


@rule("Tan")
def _tan(c):
    y = c.y(0)
    return [c("Mul", c.g, c("Add", _k(c, 1.0), c("Mul", y, y)))]


@rule("Sinh")
def _sinh(c):
    return [c("Mul", c.g, c("Cosh", c.x(0)))]


@rule("Cosh")
def _cosh(c):
    return [c("Mul", c.g, c("Sinh", c.x(0)))]


# The inverse functions' slopes from their outputs: cos(asin x) = sin(acos x) = sqrt(1 - x^2), cosh(asinh x) =
# sqrt(1 + x^2), sinh(acosh x) = sqrt(x^2 - 1), one op each and without the cancellation in 1 - x^2 near |x| = 1.
@rule("Asin")
def _asin(c):
    return [c("Div", c.g, c("Cos", c.y(0)))]


@rule("Acos")
def _acos(c):
    return [c("Neg", c("Div", c.g, c("Sin", c.y(0))))]


@rule("Atan")
def _atan(c):
    x = c.x(0)
    return [c("Div", c.g, c("Add", _k(c, 1.0), c("Mul", x, x)))]


@rule("Asinh")
def _asinh(c):
    return [c("Div", c.g, c("Cosh", c.y(0)))]


@rule("Acosh")
def _acosh(c):
    return [c("Div", c.g, c("Sinh", c.y(0)))]


@rule("Atanh")
def _atanh(c):
    x = c.x(0)
    return [c("Div", c.g, c("Sub", _k(c, 1.0), c("Mul", x, x)))]


@rule("Softplus")
def _softplus(c):
    return [c("Mul", c.g, c("Sigmoid", c.x(0)))]


@rule("Max", "Min")
def _max_min(c):
    # The cotangent goes to the operand(s) equal to the result.
    y = c.y(0)
    return [c.unbroadcast(c("Mul", c.g, c("Cast", c("Equal", x, y), to=c.dtype(x))), x) if c.needs(i) else None
            for i, x in enumerate(c.node.input)]


@rule("Mean")
def _mean(c):
    scaled = c("Mul", c.g, _k(c, 1.0 / len(c.node.input)))
    return [c.unbroadcast(scaled, x) if c.needs(i) else None for i, x in enumerate(c.node.input)]


@rule("Where")
def _where(c):
    cond, zero = c.x(0), _k(c, 0, like=c.x(1))
    return [None,
            c.unbroadcast(c("Where", cond, c.g, zero), c.x(1)) if c.needs(1) else None,
            c.unbroadcast(c("Where", cond, zero, c.g), c.x(2)) if c.needs(2) else None]


# --- activations (ReLU-like ones honour the guided/deconvnet variants) -------------------------------------
@rule("Relu")
def _relu(c):
    # Masking on the output (y > 0 iff x > 0) leaves x unused, so Conv+Relu fusion in the forward survives.
    def local(g):
        banded = _band_mask(c, c.y(0), 0.0, None, g)
        return banded if banded is not None else _mask(c, c("Greater", c.y(0), _k(c, 0)), g)
    return [_rectify(c, local)]


@rule("LeakyRelu")
def _leaky_relu(c):
    x, a = c.x(0), c.attr("alpha", 0.01)
    return [_rectify(c, lambda g: c("Where", c("Greater", x, _k(c, 0)), g, c("Mul", g, _k(c, a))))]


@rule("PRelu")
def _prelu(c):
    x, slope = c.x(0), c.x(1)
    pos = c("Greater", x, _k(c, 0))
    dx = _rectify(c, lambda g: c("Where", pos, g, c("Mul", g, slope))) if c.needs(0) else None
    ds = c.unbroadcast(_mask(c, c("Not", pos), c("Mul", c.g, x)), slope) if c.needs(1) else None
    return [dx, ds]


@rule("Clip")
def _clip(c):
    # Strict inequalities as PyTorch's hardtanh/ReLU6: at the bounds the output is flat.
    x, lo, hi = c.x(0), c.x(1), c.x(2)
    if lo is None and "min" in c.attrs:
        lo = _k(c, c.attrs["min"])
    if hi is None and "max" in c.attrs:
        hi = _k(c, c.attrs["max"])
    lo_v, hi_v = _scalar(c, lo), _scalar(c, hi)

    def local(g):
        if (lo or hi) and (lo_v is not None or not lo) and (hi_v is not None or not hi):
            # y = clip(x) lies strictly inside the bounds iff x does: masking on the output keeps Conv+Clip fusion
            banded = _band_mask(c, c.y(0), lo_v, hi_v, g, clipped=True)
            if banded is not None:
                return banded
        conds = ([c("Greater", x, lo)] if lo else []) + ([c("Less", x, hi)] if hi else [])
        if not conds:
            return g
        return _mask(c, conds[0] if len(conds) == 1 else c("And", *conds), g)
    return [_rectify(c, local)]


@rule("Shrink")
def _shrink(c):
    # y = x - bias above lambd, x + bias below -lambd, 0 between (torch's hardshrink and softshrink): slope 1 outside
    # the closed band, 0 inside it (the derivative torch takes at the two kinks).
    return [_mask(c, c("Greater", c("Abs", c.x(0)), _k(c, c.attr("lambd", 0.5))), c.g)]


@rule("HardSigmoid")
def _hard_sigmoid(c):
    a, b = c.attr("alpha", 0.2), c.attr("beta", 0.5)
    z = c("Add", c("Mul", c.x(0), _k(c, a)), _k(c, b))
    inside = c("And", c("Greater", z, _k(c, 0)), c("Less", z, _k(c, 1)))
    return [_mask(c, inside, c("Mul", c.g, _k(c, a)))]


@rule("HardSwish")
def _hard_swish(c):
    # PyTorch's hardswish_backward: 0 below -3, x/3 + 1/2 on [-3, 3], 1 above 3.
    x = c.x(0)
    slope = c("Add", c("Mul", x, _k(c, 1.0 / 3.0)), _k(c, 0.5))
    local = c("Where", c("Less", x, _k(c, -3.0)), _k(c, 0.0),
              c("Where", c("Greater", x, _k(c, 3.0)), _k(c, 1.0), slope))
    return [_rectify(c, lambda g: c("Mul", g, local))]


@rule("Elu", "Selu", "Celu")
def _elu_family(c):
    # Elu: alpha (e^x - 1) below 0; Selu: gamma times that (its own alpha); Celu: alpha (e^(x/alpha) - 1).
    # Below 0 the slope is alpha e^x (times gamma) or e^(x/alpha); above 0 it is 1 (gamma for Selu).
    x, op = c.x(0), c.node.op_type
    alpha = c.attr("alpha", {"Elu": 1.0, "Celu": 1.0, "Selu": 1.67326319217681884765625}[op])
    gamma = c.attr("gamma", 1.05070102214813232421875) if op == "Selu" else 1.0
    below = (c("Exp", c("Mul", x, _k(c, 1.0 / alpha))) if op == "Celu"
             else c("Mul", c("Exp", x), _k(c, alpha * gamma)))
    local = c("Where", c("Greater", x, _k(c, 0)), _k(c, gamma), below)
    return [_rectify(c, lambda g: c("Mul", g, local))]


@rule("ThresholdedRelu")
def _thresholded_relu(c):
    x = c.x(0)
    return [_rectify(c, lambda g: _mask(c, c("Greater", x, _k(c, c.attr("alpha", 1.0))), g))]


@rule("Mish")
def _mish(c):
    # x tanh(softplus(x)): tanh(sp) + x (1 - tanh(sp)^2) sigmoid(x)
    x = c.x(0)
    t = c("Tanh", c("Softplus", x))
    local = c("Add", t, c("Mul", c("Mul", x, c("Sub", _k(c, 1.0), c("Mul", t, t))), c("Sigmoid", x)))
    return [_rectify(c, lambda g: c("Mul", g, local))]


@rule("Swish")
def _swish(c):
    # x s with s = sigmoid(alpha x): s + alpha x s (1 - s) = s + alpha y (1 - s). HardSwish is its hard form.
    a = c.attr("alpha", 1.0)
    s = c("Sigmoid", c("Mul", c.x(0), _k(c, a)))
    local = c("Add", s, c("Mul", c("Mul", c.y(0), _k(c, a)), c("Sub", _k(c, 1.0), s)))
    return [_rectify(c, lambda g: c("Mul", g, local))]


@rule("Softsign")
def _softsign(c):
    d = c("Add", _k(c, 1.0), c("Abs", c.x(0)))
    return [c("Div", c.g, c("Mul", d, d))]


@rule("Gelu")
def _gelu(c):
    x = c.x(0)
    if c.attr("approximate", "none") == "tanh":
        k, a = math.sqrt(2 / math.pi), 0.044715
        x2 = c("Mul", x, x)
        t = c("Tanh", c("Mul", c("Mul", x, c("Add", _k(c, 1.0), c("Mul", x2, _k(c, a)))), _k(c, k)))
        dt = c("Mul", c("Sub", _k(c, 1.0), c("Mul", t, t)), c("Add", _k(c, k), c("Mul", x2, _k(c, 3 * a * k))))
        local = c("Mul", _k(c, 0.5), c("Add", c("Add", _k(c, 1.0), t), c("Mul", x, dt)))
    else:  # Φ(x) + x φ(x)
        cdf = c("Mul", _k(c, 0.5), c("Add", _k(c, 1.0), c("Erf", c("Mul", x, _k(c, 1 / math.sqrt(2))))))
        pdf = c("Mul", c("Exp", c("Mul", c("Mul", x, x), _k(c, -0.5))), _k(c, 1 / math.sqrt(2 * math.pi)))
        local = c("Add", cdf, c("Mul", x, pdf))
    return [_rectify(c, lambda g: c("Mul", g, local))]


@rule("Softmax")
def _softmax(c):
    y, ax = c.y(0), c.attr("axis", -1)
    gy = c("Mul", c.g, y)
    return [c("Sub", gy, c("Mul", y, c.reduce("ReduceSum", gy, [ax])))]


@rule("LogSoftmax")
def _log_softmax(c):
    ax = c.attr("axis", -1)
    return [c("Sub", c.g, c("Mul", c("Exp", c.y(0)), c.reduce("ReduceSum", c.g, [ax])))]


# --- linear algebra ----------------------------------------------------------------------------------------
@rule("Gemm")
def _gemm(c):
    a, b, g = c.x(0), c.x(1), c.g
    ta, tb = c.attr("transA", 0), c.attr("transB", 0)
    alpha, beta = c.attr("alpha", 1.0), c.attr("beta", 1.0)
    da = db = dc = None
    if c.needs(0):
        da = (c("Gemm", g, b, alpha=alpha, transB=1 - tb) if not ta
              else c("Gemm", b, g, alpha=alpha, transA=tb, transB=1))
    if c.needs(1):
        db = (c("Gemm", a, g, alpha=alpha, transA=1 - ta) if not tb
              else c("Gemm", g, a, alpha=alpha, transA=1, transB=ta))
    if c.needs(2):
        dc = c.unbroadcast(g if beta == 1.0 else c("Mul", g, _k(c, beta)), c.x(2))
    return [da, db, dc]


def _swap_last(c, t, rank):
    return c("Transpose", t, perm=list(range(rank - 2)) + [rank - 1, rank - 2])


@rule("MatMul")
def _matmul(c):
    a, b, g = c.x(0), c.x(1), c.g
    ra, rb = c.need_rank(a), c.need_rank(b)
    # Vectors are promoted to matrices as numpy does; the promoted axes are dropped again by the reshape.
    a2 = c("Unsqueeze", a, c.i64([0])) if ra == 1 else a
    b2 = c("Unsqueeze", b, c.i64([1])) if rb == 1 else b
    g2 = c("Unsqueeze", g, c.i64([-2])) if ra == 1 else g
    g2 = c("Unsqueeze", g2, c.i64([-1])) if rb == 1 else g2
    da = db = None
    if c.needs(0):
        da = c("MatMul", g2, _swap_last(c, b2, max(rb, 2)))
        da = da if _batch_matches(c, a, rb) else c.reshape_like(_sum_to(c, da, a2), a)
    if c.needs(1):
        db = c("MatMul", _swap_last(c, a2, max(ra, 2)), g2)
        db = db if _batch_matches(c, b, ra) else c.reshape_like(_sum_to(c, db, b2), b)
    return [da, db]


def _batch_matches(c, t, other_rank):
    """Whether operand t already has the output's batch dims (so its cotangent needs no summing): always when t
    is a matrix or more and the other operand has no batch dims (rank <= 2: the output's batch dims are t's,
    whatever names shape inference gave them; it names a MatMul's output batch dim afresh, e.g. unk__0 for an
    operand's unk__1), else when their dims are known to be equal."""
    dt, dy = c.dims(t), c.dims(c.y(0))
    if dt is None or len(dt) < 2:
        return False
    if other_rank <= 2:
        return True
    return dy is not None and len(dt) == len(dy) and all(p == q and p is not None for p, q in zip(dt[:-2], dy[:-2]))


def _sum_to(c, t, x):
    """Sum a batched product back onto x's (possibly broadcast) leading dims, dynamically."""
    sx = c.shape(x)
    st = c.shape(t)
    extra = c("Sub", c("Size", st), c("Size", sx))
    ones = c("ConstantOfShape", c("Reshape", extra, c.i64([1])),
             value=numpy_helper.from_array(np.ones(1, np.int64)))
    padded = c("Concat", ones, sx, axis=0)
    axes = c("Reshape", c("NonZero", c("Not", c("Equal", padded, st))), c.i64([-1]))
    return c("Reshape", c("ReduceSum", t, axes, keepdims=1, noop_with_empty_axes=1), sx)


@rule("Einsum")
def _einsum(c):
    # d/d(operand i) is the einsum of g with the other operands, written out to operand i's subscripts.
    eq = c.attr("equation").replace(" ", "").replace("...", ".")
    lhs, explicit, out = eq.partition("->")
    terms = lhs.split(",")
    if not explicit:
        letters = lhs.replace(",", "").replace(".", "")
        out = ("." if "." in lhs else "") + "".join(sorted(ch for ch in set(letters) if letters.count(ch) == 1))
    res = []
    for i, term in enumerate(terms):
        if not c.needs(i):
            res.append(None)
            continue
        if len(set(term)) != len(term):
            c.fail("repeated subscripts within one operand (diagonals) are not supported")
        others = [t for j, t in enumerate(terms) if j != i]
        avail = set(out + "".join(others))
        missing = [k for k, ch in enumerate(term) if ch not in avail]
        kept = "".join(ch for ch in term if ch in avail)
        if "." in avail and "." not in kept:
            kept = "." + kept  # ORT cannot sum an ellipsis away: keep it and sum it below
        dx = c("Einsum", c.g, *[c.x(j) for j in range(len(terms)) if j != i],
               equation=(",".join([out] + others) + "->" + kept).replace(".", "..."))
        if missing:  # subscripts summed only inside this operand: broadcast the result back
            if "." in term:
                c.fail("an operand-only subscript together with an ellipsis is not supported")
            dx = c("Expand", c("Unsqueeze", dx, c.i64(missing)), c.shape(c.x(i)))
        res.append(_sum_to(c, dx, c.x(i)) if "." in kept else dx)
    return res


# --- convolution and pooling -------------------------------------------------------------------------------
@rule("Conv")
def _conv(c):
    x, w, g = c.x(0), c.x(1), c.g
    nsp = c.need_rank(w) - 2
    kernel = c.attr("kernel_shape") or c.static_dims(w, range(2, 2 + nsp))
    if kernel is None:
        c.fail("needs kernel_shape or a static weight shape")
    if c.needs(1):
        c.fail("gradients w.r.t. convolution weights are not supported")
    s, d, pads = _pool_geometry(c, x, nsp, kernel)
    group = c.attr("group", 1)
    dx = None
    if c.needs(0):
        flipped = _flipped_weights(c, w, group, nsp) if all(st == 1 for st in s) else None
        back = [dl * (k - 1) - p for dl, k, p in zip(d + d, kernel + kernel, pads)]
        if flipped is not None and min(back) >= 0:
            # Stride 1: the adjoint is itself a convolution (flipped, transposed kernel), and onnxruntime's
            # Conv is markedly faster than its ConvTranspose.
            dx = c("Conv", g, flipped, dilations=d, pads=back, group=group)
        else:
            dx = _depthwise_spread_back(c, g, x, w, s, d, pads, kernel, group, nsp)
            if dx is None:
                dx = _transpose_back(c, g, x, s, d, pads, kernel, w, group, nsp)
                channels = _map_channels(c, x)
                if channels:
                    dx = _blocked(c, dx, channels)
    db = c("ReduceSum", g, c.i64([0] + list(range(2, 2 + nsp))), keepdims=0) if c.needs(2) else None
    return [dx, None, db]


@rule("Col2Im")
def _col2im(c):
    # Col2Im (F.fold) sums blocks [N, C*K, L] into an image; its adjoint cuts the blocks out again (F.unfold): a
    # depthwise convolution with the same geometry whose K one-hot kernels per channel each take one block
    # position (channel c*K + k, positions row-major, as Col2Im reads them), the block grid flattened to L. A
    # product with 1 plus zeros: exact.
    block = c.ints(c.x(2))
    dims = c.dims(c.x(0))
    if block is None:
        c.fail("needs a constant block_shape")
    k = math.prod(block)
    if dims is None or len(dims) != 3 or not isinstance(dims[1], int) or k <= 0 or dims[1] % k:
        c.fail("needs a static channel dim (C x the block size)")
    nsp, channels = len(block), dims[1] // k
    picks = np.tile(np.eye(k).reshape(k, 1, *block), (channels,) + (1,) * (nsp + 1))
    cols = c("Conv", c.g, c.const(picks, like=c.x(0)), group=channels, strides=c.attr("strides", [1] * nsp),
             dilations=c.attr("dilations", [1] * nsp), pads=c.attr("pads", [0] * (2 * nsp)))
    return [c("Reshape", cols, c.i64([0, channels * k, -1])), None, None]


def _depthwise_spread_back(c, g, x, w, s, d, pads, kernel, group, nsp):
    """Adjoint of a strided depthwise convolution (constant weights, one output per channel, static spatial dims)
    as g spread out with zeros between its cells (a depthwise 1x1 ConvTranspose of ones: a plain copy) followed
    by the stride-1 adjoint, a depthwise Conv of the flipped kernel; None when the geometry does not fit.
    onnxruntime's ConvTranspose loops over the groups one by one and leaves its output outside the blocked
    layout, whereas its depthwise Conv is one vectorised pass in it (EfficientNet-Lite0, forward + backward on
    2 CPU cores: 22.8 -> 18.8 ms at batch 1, 321 -> 266 ms at batch 16)."""
    channels = _map_channels(c, x)
    wv = c.value(w)
    if channels is None or group != channels or wv is None or wv.shape[:2] != (channels, 1):
        return None
    ins, outs = c.static_dims(x, range(2, 2 + nsp)), c.static_dims(c.y(0), range(2, 2 + nsp))
    if ins is None or outs is None:
        return None
    spread = [(o - 1) * st + 1 for o, st in zip(outs, s)]       # g's cells land at x's window origins
    begin = [dl * (k - 1) - p for dl, k, p in zip(d, kernel, pads[:nsp])]
    end = [n - length + p for n, length, p in zip(ins, spread, pads[:nsp])]  # the stride-1 output is x's size
    if min(begin + end) < 0:
        return None
    z = c("ConvTranspose", g, c.const(np.ones((channels, 1) + (1,) * nsp, np.float32), dtype=1), strides=s,
          group=channels)
    return c("Conv", z, _flipped_weights(c, w, group, nsp), dilations=d, pads=begin + end, group=channels)


def _map_channels(c, t):
    """C when t is a float32 N x C x H x W map with a static C, else None."""
    dims = c.dims(t)
    if dims is None or len(dims) != 4 or not isinstance(dims[1], int) or dims[1] <= 0 or c.dtype(t) != 1:
        return None
    return dims[1]


def _blocked(c, t, channels: int, scale: float = 1.0):
    """scale * t by a depthwise 1x1 convolution. onnxruntime runs ConvTranspose, Expand and scalar-broadcast Mul
    outside its blocked NCHWc layout, and their outputs would take every mask, Mul and Sum downstream (a ResNet
    stage's whole residual path) out of that layout, one reorder each; a convolution hands its output on in it.
    Exact for scale = 1."""
    return c("Conv", t, c.const(np.full((channels, 1, 1, 1), scale, np.float32), dtype=1), group=channels)


def _flipped_weights(c, w, group, nsp):
    """(M, C/G, k...) -> (C, M/G, k...) with the kernel reversed, precomputed for constant weights."""
    wv = c.value(w)
    if wv is None:
        return None
    m, cg = wv.shape[:2]
    k = wv.shape[2:]
    t = wv.reshape(group, m // group, cg, *k).swapaxes(1, 2).reshape(group * cg, m // group, *k)
    return c.const(np.ascontiguousarray(t[(slice(None), slice(None)) + (slice(None, None, -1),) * nsp]), like=w)


@rule("ConvTranspose")
def _conv_transpose(c):
    x, w, g = c.x(0), c.x(1), c.g
    nsp = c.need_rank(w) - 2
    kernel = c.attr("kernel_shape") or c.static_dims(w, range(2, 2 + nsp))
    if c.needs(1):
        c.fail("gradients w.r.t. convolution weights are not supported")
    s = list(c.attr("strides", [1] * nsp))
    d = list(c.attr("dilations", [1] * nsp))
    pads = list(c.attr("pads", [0] * (2 * nsp)))
    if c.attr("auto_pad", "NOTSET") not in ("NOTSET", "") or "output_shape" in c.attrs:
        ins, outs = c.static_dims(x, range(2, 2 + nsp)), c.static_dims(c.y(0), range(2, 2 + nsp))
        if ins is None or outs is None or kernel is None:
            c.fail("auto_pad/output_shape need static spatial dims")
        op = list(c.attr("output_padding", [0] * nsp))
        total = [s[i] * (ins[i] - 1) + op[i] + (kernel[i] - 1) * d[i] + 1 - outs[i] for i in range(nsp)]
        lower = c.attr("auto_pad") != "SAME_UPPER"
        pads = ([t - t // 2 if lower else t // 2 for t in total]
                + [t // 2 if lower else t - t // 2 for t in total])
    # Conv is the adjoint of ConvTranspose with the very same weight tensor, geometry and group.
    dx = c("Conv", g, w, strides=s, dilations=d, pads=pads, group=c.attr("group", 1)) if c.needs(0) else None
    db = c("ReduceSum", g, c.i64([0] + list(range(2, 2 + nsp))), keepdims=0) if c.needs(2) else None
    return [dx, None, db]


@rule("MaxPool")
def _max_pool(c):
    # Scatter-add g through the argmax indices (flat over the whole N*C*H*W tensor, per the ONNX spec).
    # The indices output is added to the forward node itself, so the forward is not run twice.
    if c.attr("storage_order", 0) != 0:
        c.fail("storage_order=1 is not supported")
    node = c.node
    if len(node.output) < 2 or not node.output[1]:
        while len(node.output) < 2:
            node.output.append("")
        node.output[1] = c.graph.fresh(f"{node.name or 'MaxPool'}/indices")
    x = c.x(0)
    dt = helper.tensor_dtype_to_np_dtype(c.dtype(x))
    n = c.size(x)
    zeros = c("ConstantOfShape", c("Reshape", n, c.i64([1])), value=numpy_helper.from_array(np.zeros(1, dt)))
    flat = c("ScatterElements", zeros, c("Reshape", node.output[1], c.i64([-1])),
             c("Reshape", c.g, c.i64([-1])), axis=0, reduction="add")
    return [c("Reshape", flat, c.shape(x))]


def _avg_divisors(n, o, k, s, d, pb, pe, include_pad):
    """Per output position along one axis: how many window taps the average divides by."""
    out = np.empty(o)
    for i in range(o):
        taps = i * s - pb + d * np.arange(k)
        lo, hi = (-pb, n + pe) if include_pad else (0, n)
        out[i] = np.count_nonzero((taps >= lo) & (taps < hi))
    return out


@rule("AveragePool")
def _average_pool(c):
    x, y = c.x(0), c.y(0)
    nsp = _spatial(c, x)
    kernel = list(c.attr("kernel_shape"))
    s, d, pads = _pool_geometry(c, x, nsp, kernel)
    ins, outs = c.static_dims(x, range(2, 2 + nsp)), c.static_dims(y, range(2, 2 + nsp))
    if ins is None or outs is None:
        c.fail("needs static spatial dims (the divisor depends on the border)")
    div = np.ones(())
    for i in range(nsp):  # windows are boxes, so the divisor map is an outer product of per-axis counts
        div = np.multiply.outer(div, _avg_divisors(ins[i], outs[i], kernel[i], s[i], d[i], pads[i],
                                                   pads[nsp + i], c.attr("count_include_pad", 0)))
    return [_window_sum_back(c, c("Mul", c.g, c.const((1.0 / div)[None, None], like=x)), x, s, d, pads, kernel)]


def _window_sum_back(c, t, x, s, d, pads, kernel):
    """Adjoint of summing x over each pooling window, applied to t (shaped like the node's output)."""
    nsp = len(kernel)
    outs = c.static_dims(c.y(0), range(2, 2 + nsp))
    shape = c.i64([-1, 1] + outs) if outs is not None else c("Concat", c.i64([-1, 1]), c.shape(c.y(0), 2), axis=0)
    flat = c("Reshape", t, shape)  # channels as batch: one depthwise ones-kernel
    ones = c.const(np.ones([1, 1] + kernel), like=x)
    return c("Reshape", _transpose_back(c, flat, x, s, d, pads, kernel, ones, 1, nsp), c.shape(x))


def _lp_parts(c):
    """(local, back) of y = (sum of |x|^p)^(1/p) over some extent: dx = local * (back summed back over that extent),
    local = sign(x) |x|^(p-1), back = g * y^(1-p), and 0 where y = 0 (all of it 0), not 0/0."""
    x, y, g = c.x(0), c.y(0), c.g
    p = int(c.attr("p", 2))
    if p < 1:
        c.fail(f"p={p} (needs p >= 1)")
    if p == 1:
        return c("Sign", x), g
    if p == 2:
        return x, _safe_div(c, g, y)
    return (c("Mul", c("Sign", x), c("Pow", c("Abs", x), _k(c, float(p - 1)))),
            _safe_div(c, g, c("Pow", y, _k(c, float(p - 1)))))


@rule("LpPool")
def _lp_pool(c):
    # Each window's back goes over the window (zero padding adds nothing to y). onnxruntime's CPU provider runs
    # LpPool (and GlobalLpPool) in float32 only.
    x = c.x(0)
    nsp = _spatial(c, x)
    kernel = list(c.attr("kernel_shape"))
    s, d, pads = _pool_geometry(c, x, nsp, kernel)
    local, back = _lp_parts(c)
    return [c("Mul", local, _window_sum_back(c, back, x, s, d, pads, kernel))]


@rule("GlobalLpPool")
def _global_lp_pool(c):
    local, back = _lp_parts(c)   # back is (N, C, 1, ...): it broadcasts over the whole spatial extent
    return [c("Mul", local, back)]


@rule("GlobalAveragePool")
def _global_average_pool(c):
    x = c.x(0)
    sp = c.static_dims(x, range(2, c.need_rank(x)))
    channels = _map_channels(c, x)
    if sp is not None and channels:   # scaled by a convolution (see _blocked)
        return [_blocked(c, c("Expand", c.g, c.shape(x)), channels, 1.0 / float(np.prod(sp)))]
    if sp is not None:
        scaled = c("Mul", c.g, _k(c, 1.0 / float(np.prod(sp))))
    else:
        count = c("CastLike", c("ReduceProd", c.shape(x, 2), keepdims=0), x)
        scaled = c("Div", c.g, count)
    return [c("Expand", scaled, c.shape(x))]


def _max_mask_grad(c, x, y_keep, g_keep, axes):
    # Ties share the cotangent evenly (as torch.amax does); x == max picks them out.
    hit = c("CastLike", c("Equal", x, y_keep), x)
    count = c("ReduceSum", hit, axes, keepdims=1) if axes is not None else c("ReduceSum", hit, keepdims=1)
    return c("Mul", hit, c("Div", g_keep, count))


@rule("GlobalMaxPool")
def _global_max_pool(c):
    x = c.x(0)
    axes = c.i64(list(range(2, c.need_rank(x))))
    return [_max_mask_grad(c, x, c.y(0), c.g, axes)]


@rule("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceSumSquare",
      "ReduceLogSumExp", "ReduceLogSum", "ReduceProd")
def _reduce(c):
    x, g, y = c.x(0), c.g, c.y(0)
    op = c.node.op_type
    axes = _reduce_axes(c)
    if not axes and c.attr("noop_with_empty_axes", 0) and op not in ("ReduceL1", "ReduceL2", "ReduceSumSquare",
                                                                      "ReduceLogSum"):
        # Nothing is reduced (axes empty or not given): y = x. L1, L2, SumSquare and LogSum still map each element (to
        # |x|, |x|, x^2, log x, in onnxruntime and the reference runtime alike): their derivatives below apply as is.
        return [g, None]
    if axes == []:
        axes = None
    if not c.attr("keepdims", 1) and axes is not None:
        g = c("Unsqueeze", g, c.i64(axes))
        y = c("Unsqueeze", y, c.i64(axes)) if op in ("ReduceMax", "ReduceMin", "ReduceL2", "ReduceLogSumExp",
                                                     "ReduceLogSum") else y
    elif not c.attr("keepdims", 1):  # all axes reduced to a scalar, which broadcasts as is
        pass
    if op == "ReduceSum":
        return [c("Expand", g, c.shape(x)), None]
    if op == "ReduceMean":
        n_out = c.size(c.y(0))
        count = c("CastLike", c("Div", c.size(x), n_out), x)
        return [c("Expand", c("Div", g, count), c.shape(x)), None]
    # The rest are elementwise local derivatives times g, which broadcasts back over the reduced axes.
    if op == "ReduceSumSquare":
        return [c("Mul", c("Mul", x, _k(c, 2.0)), g), None]
    if op == "ReduceL1":
        return [c("Mul", c("Sign", x), g), None]
    if op == "ReduceL2":   # x * g / |x|, and 0 where the norm is 0 (then x is 0 too; torch's norm does the same)
        return [c("Mul", x, _safe_div(c, g, y)), None]
    if op == "ReduceLogSumExp":
        return [c("Mul", c("Exp", c("Sub", x, y)), g), None]
    if op == "ReduceLogSum":   # log of the sum: g / sum, the sum being exp(y)
        return [c("Expand", c("Div", g, c("Exp", y)), c.shape(x)), None]
    if op == "ReduceProd":   # the product of the others, not y / x: x may hold zeros
        def group_total(t, how):
            red = "ReduceProd" if how == "mul" else "ReduceSum"
            return c.reduce(red, t, axes) if axes is not None else c(red, t, keepdims=1)
        return [c("Mul", _product_of_others(c, x, group_total), g), None]
    return [_max_mask_grad(c, x, y, g, c.i64(axes) if axes is not None else None), None]


def _safe_div(c, a, b):
    """a / b where b > 0, else 0 (b a norm)."""
    zero = _k(c, 0.0)   # (the node's input x sets the type: a and b may be emitted tensors)
    return c("Where", c("Greater", b, zero), c("Div", a, b), zero)


@rule("LpNormalization")
def _lp_normalization(c):
    # y = x / |x|_p along `axis`: dx = (g - s(x) * sum(g * y)) / |x|_p, s(x) = y for p = 2 and sign(x) for p = 1.
    x, y, g = c.x(0), c.y(0), c.g
    axis, p = c.attr("axis", -1), c.attr("p", 2)
    if p not in (1, 2):
        c.fail(f"p={p} (the operator defines p = 1 or 2)")
    axes = [axis % c.need_rank(x)]
    norm = c.reduce("ReduceL2" if p == 2 else "ReduceL1", x, axes)
    dot = c.reduce("ReduceSum", c("Mul", g, y), axes)
    return [_safe_div(c, c("Sub", g, c("Mul", y if p == 2 else c("Sign", x), dot)), norm)]


def _channel_window_sum(c, t, x, size, before, after):
    """sum of t over channels c - before .. c + after (zero beyond the ends), for t shaped like x (N, C, ...)."""
    channels = c.static_dims(x, [1])
    if channels is None:
        c.fail(f"needs the static channel count of {x!r}")
    flat = c("Reshape", t, c.i64([0, 1, channels[0], -1]))
    ones = c.const(np.ones((1, 1, size, 1)), like=x)
    return c("Reshape", c("Conv", flat, ones, pads=[before, 0, after, 0]), c.shape(x))


@rule("LRN")
def _lrn(c):
    # y = x * d^-beta, d = bias + alpha / size * (sum of x^2 over channels c - lo .. c + hi),
    # lo = floor((size - 1) / 2), hi = ceil((size - 1) / 2). Channel j's window holds i when i - hi <= j <= i + lo,
    # so the backward sums over the mirrored window:
    # dx_i = g_i d_i^-beta - 2 alpha beta / size * x_i * sum_j (g_j y_j / d_j).
    x, y, g = c.x(0), c.y(0), c.g
    size = int(c.attr("size"))
    alpha, beta, bias = c.attr("alpha", 1e-4), c.attr("beta", 0.75), c.attr("bias", 1.0)
    lo, hi = (size - 1) // 2, size // 2
    d = c("Add", c("Mul", _channel_window_sum(c, c("Mul", x, x), x, size, lo, hi), _k(c, alpha / size)),
          _k(c, bias))
    back = _channel_window_sum(c, c("Div", c("Mul", g, y), d), x, size, hi, lo)
    return [c("Sub", c("Mul", g, c("Pow", d, _k(c, -beta))), c("Mul", c("Mul", x, back),
                                                                _k(c, 2.0 * alpha * beta / size)))]


# --- normalisation -----------------------------------------------------------------------------------------
@rule("BatchNormalization")
def _batch_norm(c):
    # Inference form: y = x * scale / sqrt(var + eps) + const, a per-channel affine map.
    if c.attr("training_mode", 0):
        c.fail("training_mode=1 is not supported (export the model in eval mode)")
    x, scale, var = c.x(0), c.x(1), c.x(4)
    if any(c.needs(i) for i in (1, 2, 3, 4)):
        c.fail("gradients w.r.t. batch-norm parameters are not supported")
    eps = c.attr("epsilon", 1e-5)
    shape = [-1] + [1] * (c.need_rank(x) - 2)
    sv, vv = c.value(scale), c.value(var)
    if sv is not None and vv is not None:
        factor = c.const((sv.astype(np.float64) / np.sqrt(vv.astype(np.float64) + eps)).reshape(shape), like=x)
    else:
        factor = c("Reshape", c("Div", scale, c("Sqrt", c("Add", var, _k(c, eps, like=var)))), c.i64(shape))
    return [c("Mul", c.g, factor)]


def _normalised_backward(c, x, gxhat, axes, mean=None, inv_std=None):
    """dx for xhat = (x - mean(x)) * inv_std over `axes`, given the cotangent of xhat."""
    eps = c.attr("epsilon", 1e-5)
    if mean is None:
        mean = c.reduce("ReduceMean", x, axes)
    xc = c("Sub", x, mean)
    if inv_std is None:
        var = c.reduce("ReduceMean", c("Mul", xc, xc), axes)
        inv_std = c("Reciprocal", c("Sqrt", c("Add", var, _k(c, eps))))
    xhat = c("Mul", xc, inv_std)
    m1 = c.reduce("ReduceMean", gxhat, axes)
    m2 = c.reduce("ReduceMean", c("Mul", gxhat, xhat), axes)
    return c("Mul", inv_std, c("Sub", c("Sub", gxhat, m1), c("Mul", xhat, m2))), xhat


@rule("LayerNormalization")
def _layer_norm(c):
    x, scale, g = c.x(0), c.x(1), c.g
    r = c.need_rank(x)
    ax = c.attr("axis", -1)
    axes = list(range(ax % r, r))
    saved = c.y(1) is not None and c.y(2) is not None and c.attr("stash_type", 1) == 1 \
        and c.dtype(c.y(1)) == c.dtype(x)
    mean, inv = (c.y(1), c.y(2)) if saved else (None, None)
    dx, xhat = _normalised_backward(c, x, c("Mul", g, scale), axes, mean, inv)
    dscale = _sum_to(c, c("Mul", g, xhat), scale) if c.needs(1) else None
    dbias = _sum_to(c, g, c.x(2)) if c.needs(2) else None
    return [dx if c.needs(0) else None, dscale, dbias]


@rule("InstanceNormalization")
def _instance_norm(c):
    x, scale = c.x(0), c.x(1)
    r = c.need_rank(x)
    if c.needs(1) or c.needs(2):
        c.fail("gradients w.r.t. instance-norm parameters are not supported")
    per_channel = c("Reshape", scale, c.i64([-1] + [1] * (r - 2)))
    dx, _ = _normalised_backward(c, x, c("Mul", c.g, per_channel), list(range(2, r)))
    return [dx]


@rule("GroupNormalization")
def _group_norm(c):
    x, scale = c.x(0), c.x(1)
    r = c.need_rank(x)
    groups = c.attr("num_groups")
    if c.needs(1) or c.needs(2):
        c.fail("gradients w.r.t. group-norm parameters are not supported")
    grouped = c.i64([0, groups, -1])
    xg = c("Reshape", x, grouped)
    if c.opset >= 21:  # scale per channel
        gxhat = c("Reshape", c("Mul", c.g, c("Reshape", scale, c.i64([-1] + [1] * (r - 2)))), grouped)
    else:  # opset 18: scale per group
        gxhat = c("Mul", c("Reshape", c.g, grouped), c("Reshape", scale, c.i64([-1, 1])))
    dx, _ = _normalised_backward(c, xg, gxhat, [2])
    return [c("Reshape", dx, c.shape(x))]


@rule("RMSNormalization")
def _rms_norm(c):
    # y = x * r * scale, r = (mean(x^2 over axis..) + eps)^-1/2: dx = r * (gs - xhat * mean(gs * xhat)), xhat = x r.
    x, scale, g = c.x(0), c.x(1), c.g
    rank = c.need_rank(x)
    axes = list(range(c.attr("axis", -1) % rank, rank))
    r = c("Reciprocal", c("Sqrt", c("Add", c.reduce("ReduceMean", c("Mul", x, x), axes), _k(c, c.attr("epsilon", 1e-5)))))
    xhat = c("Mul", x, r)
    gs = c("Mul", g, scale)
    dx = c("Mul", r, c("Sub", gs, c("Mul", xhat, c.reduce("ReduceMean", c("Mul", gs, xhat), axes))))
    return [dx if c.needs(0) else None, _sum_to(c, c("Mul", g, xhat), scale) if c.needs(1) else None]


@rule("MeanVarianceNormalization")
def _mean_variance_normalization(c):
    # y = (x - mean) / (std + 1e-9) over `axes`: onnx's function body (and onnxruntime) add the epsilon to the standard
    # deviation, not to the variance as _normalised_backward's formula has it, which makes its last term off by a
    # relative 1e-9 / std. Given the forward's own 1 / (std + 1e-9), the rest is exact.
    x = c.x(0)
    axes = list(c.attr("axes", [0, 2, 3]))
    mean = c.reduce("ReduceMean", x, axes)
    xc = c("Sub", x, mean)
    inv = c("Reciprocal", c("Add", c("Sqrt", c.reduce("ReduceMean", c("Mul", xc, xc), axes)), _k(c, 1e-9)))
    return [_normalised_backward(c, x, c.g, axes, mean, inv)[0]]


@rule("Attention")
def _attention(c):
    # Y = P V with P = softmax(scale Q K^T + mask) per head. The forward node is made to output P as well
    # (qk_matmul_output_mode 3), so nothing is recomputed; then, with dY's heads gY:
    # dV = P^T gY, dP = gY V^T, dS = P * (dP - rowsum(dP * P)), dQ = scale dS K, dK = scale dS^T Q.
    # Masks, is_causal, sliding windows and fully masked rows act through P. Grouped-query attention (fewer K/V
    # heads) shares each K/V head among consecutive query heads; their gradients are summed back onto it.
    node = c.node
    if c.x(4) is not None or c.x(5) is not None:
        c.fail("past_key/past_value (a KV cache) are not supported")
    if c.attr("softcap", 0.0):
        c.fail("softcap is not supported")
    if c.needs(3):
        c.fail("gradients w.r.t. attn_mask are not supported")
    if any(gi is not None for gi in c.gs[1:]):
        c.fail("gradients through present_key/present_value/qk_matmul_output are not supported")
    probs = c.y(3)
    if probs is None:
        while len(node.output) < 4:
            node.output.append("")
        node.output[3] = probs = c.graph.fresh(f"{node.name or 'Attention'}/probs")
        del node.attribute[:]
        node.attribute.extend(helper.make_attribute(k, v) for k, v in c.attrs.items() if k != "qk_matmul_output_mode")
        node.attribute.append(helper.make_attribute("qk_matmul_output_mode", 3))
    elif c.attr("qk_matmul_output_mode", 0) != 3:
        c.fail("its qk_matmul_output is already used in another mode")
    q, k, v = c.x(0), c.x(1), c.x(2)
    three_d = c.need_rank(q) == 3
    if three_d:   # [B, S, heads * size] <-> [B, heads, S, size]
        hq, hkv = int(c.attr("q_num_heads")), int(c.attr("kv_num_heads"))

        def heads(t, h):
            return c("Transpose", c("Reshape", t, c.i64([0, 0, h, -1])), perm=[0, 2, 1, 3])

        q4, k4, v4, gy = heads(q, hq), heads(k, hkv), heads(v, hkv), heads(c.g, hq)
    else:
        (hq,), (hkv,) = c.static_dims(q, [1]) or [None], c.static_dims(k, [1]) or [None]
        if hq is None or hkv is None:
            c.fail("needs the static head counts of Q and K")
        q4, k4, v4, gy = q, k, v, c.g
    group = hq // hkv
    if group > 1:   # [B, Hkv, S, d] -> [B, Hkv * group, S, d], each K/V head repeated for its queries

        def repeat(t):
            return c("Reshape", c("Expand", c("Unsqueeze", t, c.i64([2])),
                                  c("Concat", c.shape(t, 0, 2), c.i64([group]), c.shape(t, 2), axis=0)),
                     c("Concat", c.shape(t, 0, 1), c.i64([hq]), c.shape(t, 2), axis=0))

        k4, v4 = repeat(k4), repeat(v4)
    scale = c.attr("scale")
    if scale is not None:
        scale = _k(c, scale, like=q)
    else:   # 1 / sqrt(head size of Q)
        size = c.static_dims(q4, [3]) if not three_d else None
        qd = c.static_dims(q, [2]) if three_d else None
        size = size[0] if size else (qd[0] // hq if qd else None)
        scale = (_k(c, 1.0 / math.sqrt(size), like=q) if size else
                 c("Reciprocal", c("Sqrt", c("CastLike", c.shape(q4, 3, 4), q))))

    def t(x):
        return c("Transpose", x, perm=[0, 1, 3, 2])

    dp = c("MatMul", gy, t(v4))
    ds = c("Mul", probs, c("Sub", dp, c("ReduceSum", c("Mul", dp, probs), c.i64([-1]), keepdims=1)))
    out = []
    for i, (x4, grad4, h) in enumerate([(q4, lambda: c("Mul", c("MatMul", ds, k4), scale), hq),
                                        (k4, lambda: c("Mul", c("MatMul", t(ds), q4), scale), hkv),
                                        (v4, lambda: c("MatMul", t(probs), gy), hkv)]):
        if not c.needs(i):
            out.append(None)
            continue
        d = grad4()
        if i and group > 1:   # sum each group of query heads back onto its K/V head
            d = c("ReduceSum", c("Reshape", d, c("Concat", c.shape(d, 0, 1), c.i64([h, group]), c.shape(d, 2),
                                                   axis=0)), c.i64([2]), keepdims=0)
        if three_d:
            d = c("Reshape", c("Transpose", d, perm=[0, 2, 1, 3]), c.shape(c.x(i)))
        out.append(d)
    return out + [None] * 4


# --- shape and data movement -------------------------------------------------------------------------------
@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(c):
    return [c.reshape_like(c.g, c.x(0))]


@rule("Transpose")
def _transpose(c):
    perm = c.attr("perm")
    if perm is None:  # reversal is its own inverse
        return [c("Transpose", c.g)]
    return [c("Transpose", c.g, perm=[int(i) for i in np.argsort(perm)])]


@rule("Concat")
def _concat(c):
    ax = c.attr("axis")
    sizes = []
    for x in c.node.input:
        d = c.dims(x)
        n = d[ax] if d is not None else None
        sizes.append(c.i64([n]) if isinstance(n, int) else c("Gather", c.shape(x), c.i64([ax])))
    parts = c("Split", c.g, c("Concat", *sizes, axis=0), axis=ax, outputs=len(sizes))
    parts = parts if isinstance(parts, list) else [parts]
    return [p if c.needs(i) else None for i, p in enumerate(parts)]


@rule("Split")
def _split(c):
    parts = [gi if gi is not None else c.zeros_like(y) for gi, y in zip(c.gs, c.node.output)]
    return [c("Concat", *parts, axis=c.attr("axis", 0)), None]


@rule("Slice")
def _slice(c):
    x, g = c.x(0), c.g
    starts, ends = c.ints(c.x(1)), c.ints(c.x(2))
    if starts is not None and ends is not None:
        axes = c.ints(c.x(3)) if c.x(3) else list(range(len(starts)))
        steps = c.ints(c.x(4)) if c.x(4) else [1] * len(starts)
        rank, dims = c.rank(x), c.dims(x)
        if axes is not None and steps is not None and all(s == 1 for s in steps) and dims is not None \
                and all(isinstance(dims[a % rank], int) for a in axes):
            pads = [0] * (2 * rank)
            for a, b, e in zip(axes, starts, ends):
                a, n = a % rank, dims[a % rank]
                b = min(max(b + n if b < 0 else b, 0), n)
                e = min(max(e + n if e < 0 else e, b), n)
                pads[a], pads[rank + a] = b, n - e
            return [c("Pad", g, c.i64(pads))]  # zero-pad the cotangent back to where the slice came from
    return [c.scatter_back(x, g, lambda idx: c("Slice", idx, *c.node.input[1:]))]


@rule("Gather")
def _gather(c):
    return [c.scatter_back(c.x(0), c.g, lambda idx: c("Gather", idx, c.x(1), axis=c.attr("axis", 0))), None]


@rule("Compress")
def _compress(c):
    # Keeps the slices (or, without an axis, the elements of the flattened x) where the condition holds: g goes back
    # to where each came from.
    return [c.scatter_back(c.x(0), c.g, lambda idx: c("Compress", idx, c.x(1), axis=c.attr("axis"))), None]


@rule("GatherElements")
def _gather_elements(c):
    return [c.scatter_back(c.x(0), c.g, lambda idx: c("GatherElements", idx, c.x(1), axis=c.attr("axis", 0))),
            None]


@rule("GatherND")
def _gather_nd(c):
    x, b = c.x(0), c.attr("batch_dims", 0)
    if b == 0:   # duplicate indices add up, as autograd does (reduction add is in opset 16, the walk's minimum)
        return [c("ScatterND", c.zeros_like(x), c.x(1), c.g, reduction="add"), None]
    # ScatterND has no batch_dims: scatter back through the node's own gather of x's flat indices
    return [c.scatter_back(x, c.g, lambda idx: c("GatherND", idx, c.x(1), batch_dims=b)), None]


@rule("TopK")
def _top_k(c):
    # The values are x read at the indices output (a required output, integer, so it carries no cotangent itself): g
    # goes back to those positions, distinct along the axis.
    x = c.x(0)
    return [c("ScatterElements", c.zeros_like(x), c.y(1), c.g, axis=c.attr("axis", -1)), None]


def _scatter_ops(c):
    """(scatter, gather) at the node's own indices: scatter(target, values, reduction) writes values there (ScatterND
    or ScatterElements along the node's axis), gather(t) reads a tensor shaped like the output back from there."""
    idx, op = c.x(1), c.node.op_type
    extra = {} if op == "ScatterND" else {"axis": c.attr("axis", 0)}
    read = "GatherND" if op == "ScatterND" else "GatherElements"
    return (lambda t, v, red="none": c(op, t, idx, v, reduction=None if red == "none" else red, **extra),
            lambda t: c(read, t, idx, **extra))


def _ones_like(c, t):
    return c("Expand", _k(c, 1.0, like=t), c.shape(t))


def _product_of_others(c, v, group_total):
    """For each element of v, the product of the other members of its group, without dividing by a zero: from the
    group's product of its nonzero members, divided by the element itself where it is nonzero and the group has no
    zero, taken as is where the element is the group's only zero, and 0 otherwise (torch's prod backward does the
    same). `group_total(t, reduction)` ("mul" or "add") combines t over each group, broadcast back to v's elements."""
    is_zero = c("Equal", v, _k(c, 0.0, like=v))
    safe = c("Where", is_zero, _k(c, 1.0, like=v), v)
    prod = group_total(safe, "mul")
    zeros = group_total(c("CastLike", is_zero, v), "add")

    def zeros_are(n):
        return c("CastLike", c("Equal", zeros, _k(c, float(n), like=v)), v)

    return c("Where", is_zero, c("Mul", prod, zeros_are(1)), c("Mul", c("Div", prod, safe), zeros_are(0)))


@rule("ScatterND", "ScatterElements")
def _scatter(c):
    # y is data with the updates written (reduction none) or combined (add, mul, max, min) at the indices. gather(g)
    # is what each update's position receives; duplicate indices combine under a reduction and are left undefined by
    # the spec under none, where we assume there are none.
    data, upd, g = c.x(0), c.x(2), c.g
    scatter, gather = _scatter_ops(c)
    red = c.attr("reduction", "none")
    if red == "none":   # overwritten data never reaches y
        return [scatter(g, c.zeros_like(upd)) if c.needs(0) else None, None, gather(g) if c.needs(2) else None]
    if red == "add":
        return [g, None, gather(g) if c.needs(2) else None]
    if red == "mul":    # y = data * (product of the updates landing there, 1 where none does)
        ones = _ones_like(c, data)
        ddata = c("Mul", g, scatter(ones, upd, "mul")) if c.needs(0) else None
        dupd = None
        if c.needs(2):
            def group_total(t, how):
                return gather(scatter(ones if how == "mul" else c.zeros_like(data), t, how))
            dupd = c("Mul", gather(c("Mul", g, data)), _product_of_others(c, upd, group_total))
        return [ddata, None, dupd]
    if red in ("max", "min"):   # the winners share g evenly among ties, data included (torch's scatter_reduce)
        y = c.y(0)
        hit_data = c("CastLike", c("Equal", data, y), data)
        hit_upd = c("CastLike", c("Equal", upd, gather(y)), upd)
        share = c("Div", g, c("Add", hit_data, scatter(c.zeros_like(data), hit_upd, "add")))
        return [c("Mul", hit_data, share) if c.needs(0) else None, None,
                c("Mul", hit_upd, gather(share)) if c.needs(2) else None]
    c.fail(f"reduction={red!r} is not supported")


@rule("SpaceToDepth")
def _space_to_depth(c):
    # A permutation of elements, whose inverse (and so adjoint) is DepthToSpace in DCR mode.
    return [c("DepthToSpace", c.g, blocksize=c.attr("blocksize"), mode="DCR")]


@rule("DepthToSpace")
def _depth_to_space(c):
    # The adjoint of a permutation is its inverse. For DCR mode that is SpaceToDepth; CRD mode differs from DCR only
    # in the order of the input channels (CRD: c * b * b + i * b + j, DCR: (i * b + j) * C' + c), so its inverse
    # is SpaceToDepth followed by that channel gather.
    b = int(c.attr("blocksize"))
    g = c("SpaceToDepth", c.g, blocksize=b)
    if c.attr("mode", "DCR") == "CRD":
        channels = c.static_dims(c.x(0), [1])
        if channels is None:
            c.fail(f"CRD mode needs the static channel count of {c.x(0)!r}")
        out = channels[0] // (b * b)
        order = [ij * out + ch for ch in range(out) for ij in range(b * b)]   # CRD channel -> DCR channel
        g = c("Gather", g, c.i64(order), axis=1)
    return [g]


@rule("CumSum")
def _cum_sum(c):
    # y_i sums x_j for j <= i (j < i when exclusive), so x_j reaches every y_i with i >= j (i > j): the adjoint is the
    # same sum run the other way, at the node's own axis (an input, constant or not).
    return [c("CumSum", c.g, c.x(1), exclusive=c.attr("exclusive", 0), reverse=1 - c.attr("reverse", 0)), None]


@rule("CumProd")
def _cum_prod(c):
    """y_i multiplies the x_j up to i (as CumSum sums them), so dx_j = (the sum of g_i y_i over the i that x_j
    reaches) / x_j: CumSum of g y run the other way, divided by x. Zeros get their exact gradient, not 0/0 (torch's
    cumprod backward does the same): y is 0 from a line's first zero on (in the product's direction), so the x_j
    before it get the quotient, those after it (later zeros included) get 0, and the first zero itself gets that
    CumSum taken over the products with it set to 1."""
    x, axis, g = c.x(0), c.x(1), c.g
    excl, rev = c.attr("exclusive", 0), c.attr("reverse", 0)
    one = _k(c, 1.0)
    is_zero = c("Equal", x, _k(c, 0.0))
    first = c("And", is_zero, c("Equal", c("CumSum", c("CastLike", is_zero, x), axis, reverse=rev), one))

    def back(y):
        return c("CumSum", c("Mul", g, y), axis, exclusive=excl, reverse=1 - rev)

    at_first = back(c("CumProd", c("Where", first, one, x), axis, exclusive=excl, reverse=rev))
    return [c("Where", first, at_first, c("Div", back(c.y(0)), c("Where", is_zero, one, x))), None]


@rule("ReverseSequence")
def _reverse_sequence(c):
    # Reverses the first lens[b] steps of each sequence and keeps the rest: a permutation that is its own inverse.
    return [c("ReverseSequence", c.g, c.x(1), batch_axis=c.attr("batch_axis", 1), time_axis=c.attr("time_axis", 0)),
            None]


@rule("Trilu")
def _trilu(c):
    # A mask that keeps or zeroes each element by its position alone: its own adjoint.
    return [c("Trilu", c.g, *c.node.input[1:], upper=c.attr("upper", 1)), None]


@rule("Expand")
def _expand(c):
    return [c.unbroadcast(c.g, c.x(0)), None]


@rule("Tile")
def _tile(c):
    x = c.x(0)
    r = c.need_rank(x)
    # View g as (r0, d0, r1, d1, ...) and sum over the repeat axes.
    reps = c("Unsqueeze", c.x(1), c.i64([1]))
    inter = c("Reshape", c("Concat", reps, c("Unsqueeze", c.shape(x), c.i64([1])), axis=1), c.i64([-1]))
    summed = c("ReduceSum", c("Reshape", c.g, inter), c.i64(list(range(0, 2 * r, 2))), keepdims=0)
    return [summed, None]


@rule("Pad")
def _pad(c):
    mode = c.attr("mode", "constant")
    x = c.x(0)
    if mode == "constant":
        # Padding and cropping are adjoint: pad by p <-> crop by p, so negate the pads.
        return [c("Pad", c.g, c("Neg", c.x(1)), None, *c.node.input[3:4]), None, None, None]
    return [c.scatter_back(x, c.g, lambda idx: c("Pad", idx, *c.node.input[1:2], None, *c.node.input[3:4],
                                                 mode=mode)), None, None, None]


@rule("CenterCropPad")
def _center_crop_pad(c):
    # Per axis, n -> m keeps x[(n - m) // 2:][:m] (crop) or writes x at offset (m - n) // 2 (zero pad), the floor of
    # half the difference either way (onnxruntime and the reference alike): CenterCropPad of g back to x's size.
    x, axes = c.x(0), c.attr("axes")
    dims = c.static_dims(x, axes)
    size = c.i64(dims) if dims is not None else c.shape(x) if axes is None else c("Gather", c.shape(x), c.i64(axes))
    return [c("CenterCropPad", c.g, size, axes=axes), None]


@rule("DFT")
def _dft(c):
    """The DFT is linear in x, so its vector-Jacobian product is its adjoint: for the complex map x -> y the real
    adjoint (on (re, im) pairs) is the conjugate transpose, and F^H = n * (onnx's inverse DFT, which divides by n).
    Along the node's axis, with L = x's length there and n = dft_length (else L; for irfft 2 (L - 1), as numpy's
    and onnxruntime's):
      forward (y = F T x):               dx = T^T (n * inverse DFT of g)
      forward one-sided (rfft):          dx = T^T (n * inverse DFT of g zero-padded to n, by the DFT's dft_length)
      inverse (y = F^H T x / n):         dx = T^T (DFT of g / n)
      inverse one-sided (irfft, real y): dx = w * one-sided DFT of g, w = 1 / n at bin 0 and at n / 2 (irfft drops
                                         their imaginary parts, so those get none) and 2 / n between (the bins that
                                         the Hermitian spectrum holds twice)
    where T zero-pads or crops x to n points and T^T crops or zero-pads back to L; a real x takes the real part.
    irfft's half spectrum must have n // 2 + 1 bins, as torch's exporters write it. dft_length, L and the axis must
    be constants."""
    x, r = c.x(0), c.need_rank(c.x(0))
    axis = c.attr("axis", 1) if c.opset < 20 else (-2 if c.x(2) is None else _scalar(c, c.x(2)))
    n = None if c.x(1) is None else _scalar(c, c.x(1))
    if axis is None or c.x(1) is not None and n is None:
        c.fail("the axis and dft_length must be constants")
    axis = int(axis) + r if axis < 0 else int(axis)
    dims = c.static_dims(x, [axis, r - 1])
    if dims is None or dims[1] not in (1, 2):
        c.fail(f"needs static dims for the transformed axis and the last (real or complex) one of {x!r}")
    length, parts = dims
    inverse, onesided = c.attr("inverse", 0), c.attr("onesided", 0)
    n = int(n) if n is not None else 2 * (length - 1) if inverse and onesided else length
    if onesided and inverse == (parts == 1):
        c.fail("a one-sided DFT transforms a real signal (or, inverse, a complex half spectrum)")
    if onesided and inverse and length != n // 2 + 1:
        # numpy crops or zero-pads the half spectrum; onnxruntime mirrors other bins (its irfft assumes the last
        # bin is n / 2): the two readings differ, so neither is taken for it
        c.fail(f"an inverse one-sided DFT to {n} points needs {n // 2 + 1} bins, not {length}")

    def dft(t, inv, half=0, size=None):
        ax = {"axis": axis} if c.opset < 20 else {}
        extra = [] if c.opset < 20 else [c.i64(axis)]
        return c("DFT", t, None if size is None else c.i64(size), *extra, inverse=inv, onesided=half, **ax)

    if inverse and onesided:
        w = np.full((n // 2 + 1, 2), 2.0 / n)      # (re, im) weight per bin, broadcast along the axis
        w[0] = (1.0 / n, 0.0)
        if n % 2 == 0:
            w[-1] = (1.0 / n, 0.0)
        w = w.reshape((-1,) + (1,) * (r - 2 - axis) + (2,))
        dx, size = c("Mul", dft(c.g, 0, half=1), c.const(w, like=x)), length
    elif inverse:
        dx, size = c("Mul", dft(c.g, 0), _k(c, 1.0 / n)), n
    else:
        dx, size = c("Mul", dft(c.g, 1, size=n if onesided else None), _k(c, float(n))), n
    if size > length:
        dx = c("Slice", dx, c.i64([0]), c.i64([length]), c.i64([axis]))
    elif size < length:
        pads = [0] * (2 * r)
        pads[r + axis] = length - size
        dx = c("Pad", dx, c.i64(pads))
    if parts == 1:
        dx = c("Slice", dx, c.i64([0]), c.i64([1]), c.i64([r - 1]))
    return [dx, None, None]


@rule("RotaryEmbedding")
def _rotary_embedding(c):
    # Each rotated pair of x turns by its position's angle (y1 = x1 cos - x2 sin, y2 = x1 sin + x2 cos), the rest
    # passes through: an orthogonal map whose adjoint turns by the opposite angle, the same node with -sin.
    if c.needs(1) or c.needs(2):
        c.fail("the cos and sin caches must not depend on the differentiated input")
    attrs = {k: c.attr(k) for k in ("interleaved", "num_heads", "rotary_embedding_dim")}
    return [c("RotaryEmbedding", c.g, c.x(1), c("Neg", c.x(2)), *c.node.input[3:4], **attrs), None, None, None]


@rule("Resize")
def _resize(c):
    # Resize is separable and linear in x for every mode: one matrix per resized axis, built once by running
    # the node's own Resize on an identity; the backward applies each transposed matrix.
    x, y, g = c.x(0), c.y(0), c.g
    if c.attr("coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize":
        c.fail("tf_crop_and_resize is not supported")
    ins, outs = c.dims(x), c.dims(y)
    if ins is None or outs is None:
        c.fail("needs the ranks of its input and output")
    r = len(ins)
    scales = c.value(c.x(2)) if c.x(2) is not None else None
    if scales is not None and scales.size == 0:
        scales = None
    axes_attr = c.attr("axes")
    if scales is not None and axes_attr is not None:
        full = np.ones(r, np.float32)
        full[[a % r for a in axes_attr]] = scales
        scales = full
    attrs = {k: v for k, v in c.attrs.items() if k not in ("axes", "keep_aspect_ratio_policy")}
    for a in range(r):
        if (scales[a] == 1.0) if scales is not None else (ins[a] is not None and ins[a] == outs[a]):
            continue   # not resized (a symbolic batch axis, say): only resized axes need static sizes
        if not isinstance(ins[a], int) or not isinstance(outs[a], int):
            c.fail(f"needs static sizes on the resized axis {a} (got {ins[a]} -> {outs[a]})")
        if ins[a] == outs[a] and scales is None:
            continue
        m = _resize_matrix(ins[a], outs[a], None if scales is None else float(scales[a]), attrs)  # (out, in)
        if a == r - 1:
            g = c("MatMul", g, c.const(m, like=x))
        elif a == r - 2:
            g = c("MatMul", c.const(m.T, like=x), g)
        else:
            perm = list(range(r))
            perm[a], perm[-1] = perm[-1], perm[a]
            g = c("Transpose", c("MatMul", c("Transpose", g, perm=perm), c.const(m, like=x)), perm=perm)
    return [g, None, None, None]


def _resize_matrix(n_in, n_out, scale, attrs):
    import onnx
    import onnxruntime as ort

    inputs = ["x", "", "scales"] if scale is not None else ["x", "", "", "sizes"]
    node = helper.make_node("Resize", inputs, ["y"], **attrs)
    inits = ([numpy_helper.from_array(np.array([1.0, scale], np.float32), "scales")] if scale is not None
             else [numpy_helper.from_array(np.array([n_in, n_out], np.int64), "sizes")])
    graph = helper.make_graph([node], "resize_matrix",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [n_in, n_in])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rows = sess.run(None, {"x": np.eye(n_in, dtype=np.float32)})[0]  # row i = resize of basis vector e_i
    return np.ascontiguousarray(rows.T)


@rule("GridSample")
def _grid_sample(c):
    # Y[n, :, p] reads X[n] at grid[n, p] = (gx, gy), unnormalised as onnxruntime and the spec's reference do:
    # u = ((g + 1) S - 1) / 2, or (g + 1) / 2 (S - 1) with align_corners, S = (W, H). Border padding then clips u to
    # [0, S - 1]; reflection mirrors it at lo and hi (-0.5 and S - 0.5, or 0 and S - 1): with t = (u - lo) mod 2 span,
    # span = hi - lo, u' = lo + min(t, 2 span - t), whose slope is -1 where t > span. linear blends the four corners
    # floor(u') + {0, 1} by the opposite fractions; a corner off the image reads 0 (zeros) or the pixel it is clamped
    # to (border; and reflection, whose corners of nonzero weight lie in -1 .. S, where reflecting is clamping).
    # nearest reads the pixel at u rounded half to even (std::nearbyint, as Round does): the grid gets no gradient.
    # dX: g scatter-added at each corner with its weight (points sharing a pixel add up). dgrid: the sum over channels
    # of g times the blend's slope along u, times du/dg = S / 2 (or (S - 1) / 2), times the padding's slope. At a kink
    # (u' an integer, u on a clip bound or a mirror) the slope is one side's.
    x, grid, g = c.x(0), c.x(1), c.g
    mode = c.attr("mode", "linear" if c.opset >= 20 else "bilinear")
    if mode not in ("linear", "bilinear", "nearest"):
        c.fail(f"mode={mode!r} is not supported (linear/bilinear and nearest are)")
    if c.need_rank(x) != 4:
        c.fail(f"only 2-D sampling (N x C x H x W) is supported, not a rank-{c.rank(x)} (volumetric) input")
    pad = c.attr("padding_mode", "zeros")
    if pad not in ("zeros", "border", "reflection"):
        c.fail(f"padding_mode={pad!r} is not supported")
    hw = c.static_dims(x, [2, 3])
    if hw is not None:
        size, width = c.const([hw[1], hw[0]], like=grid), c.i64(hw[1])
    else:
        size = c("CastLike", c("Gather", c.shape(x), c.i64([3, 2])), grid)
        width = c("Gather", c.shape(x), c.i64(3))
    zero, one, two = (_k(c, v, like=grid) for v in (0.0, 1.0, 2.0))
    last = c("Sub", size, one)
    shifted = c("Add", c("Reshape", grid, c.i64([0, 1, -1, 2])), one)   # (N, 1, P, 2): P points, (x, y) last
    corners_aligned = c.attr("align_corners", 0)
    if corners_aligned:
        u = c("Mul", c("Div", shifted, two), last)
    else:
        u = c("Div", c("Sub", c("Mul", shifted, size), one), two)
    if mode == "nearest":
        u = c("Round", u)
    slope = None
    if pad == "border":
        slope = c("CastLike", c("And", c("Greater", u, zero), c("Less", u, last)), grid)
        u = c("Max", c("Min", u, last), zero)
    elif pad == "reflection":
        lo, hi = (zero, last) if corners_aligned else (_k(c, -0.5, like=grid), c("Sub", size, _k(c, 0.5, like=grid)))
        span = c("Sub", hi, lo)
        period = c("Add", span, span)
        a = c("Sub", u, lo)
        t = c("Sub", a, c("Mul", period, c("Floor", c("Div", a, period))))
        u = c("Add", lo, c("Min", t, c("Sub", period, t)))
        slope = c("Sub", one, c("Mul", two, c("CastLike", c("Greater", t, span), grid)))

    def part(t, axis):   # the x (0) or y (1) part of a (..., 2) tensor
        return c("Gather", t, c.i64(axis), axis=-1)

    last_x, last_y = part(last, 0), part(last, 1)
    ux, uy = part(u, 0), part(u, 1)                            # (N, 1, P)
    spread_shape = c("Concat", c.shape(x, 0, 2), c.shape(ux, 2), axis=0)
    xflat = c("Reshape", x, c.i64([0, 0, -1]))                 # (N, C, H * W)
    gflat = c("Reshape", g, c.i64([0, 0, -1]))                 # (N, C, P)

    def as_x(t):
        return t if c.dtype(x) == c.dtype(grid) else c("CastLike", t, x)

    def corner(iy, ix):
        """Where pixel (iy, ix) sits in xflat, as (N, C, P) indices, clamped onto the image, and (zeros padding)
        whether it lies on it, as 0/1 of shape (N, 1, P); (iy, ix) are (N, 1, P) float."""
        on = None
        if pad == "zeros":
            on = c("CastLike", c("And", c("And", c("GreaterOrEqual", iy, zero), c("LessOrEqual", iy, last_y)),
                                 c("And", c("GreaterOrEqual", ix, zero), c("LessOrEqual", ix, last_x))), grid)
        iy, ix = (c("Cast", c("Max", c("Min", i, m), zero), to=7) for i, m in ((iy, last_y), (ix, last_x)))
        return c("Expand", c("Add", c("Mul", iy, width), ix), spread_shape), on

    if mode == "nearest":
        where, on = corner(uy, ux)
        corners, weights = [(where, on)], [on]
    else:
        bx, by = c("Floor", ux), c("Floor", uy)
        fx, fy = c("Sub", ux, bx), c("Sub", uy, by)
        rx, ry = c("Sub", one, fx), c("Sub", one, fy)
        bx1, by1 = c("Add", bx, one), c("Add", by, one)
        corners = [corner(by, bx), corner(by, bx1), corner(by1, bx), corner(by1, bx1)]
        weights = [c("Mul", ry, rx), c("Mul", ry, fx), c("Mul", fy, rx), c("Mul", fy, fx)]
        weights = [w if on is None else c("Mul", w, on) for w, (_, on) in zip(weights, corners)]
    dx = dgrid = None
    if c.needs(0):
        updates = [gflat if w is None else c("Mul", gflat, as_x(w)) for w in weights]
        idx = [where for where, _ in corners]
        flat = c("ScatterElements", c("Reshape", c.zeros_like(x), c.i64([0, 0, -1])),
                 c("Concat", *idx, axis=2) if len(idx) > 1 else idx[0],
                 c("Concat", *updates, axis=2) if len(updates) > 1 else updates[0], axis=2, reduction="add")
        dx = c("Reshape", flat, c.shape(x))
    if c.needs(1) and mode == "nearest":
        dgrid = c.zeros_like(grid)
    elif c.needs(1):
        p00, p01, p10, p11 = (c("GatherElements", xflat, where, axis=2) if on is None else
                              c("Mul", c("GatherElements", xflat, where, axis=2), as_x(on)) for where, on in corners)

        def along(rest, frac, near_a, near_b, far_a, far_b):
            """g times the blend's slope along one axis, (1 - f) (near_b - near_a) + f (far_b - far_a) with f the
            other axis's fraction, summed over channels: (N, 1, P, 1)."""
            rate = c("Add", c("Mul", as_x(rest), c("Sub", near_b, near_a)),
                     c("Mul", as_x(frac), c("Sub", far_b, far_a)))
            return c("Unsqueeze", c("ReduceSum", c("Mul", gflat, rate), c.i64([1]), keepdims=1), c.i64([-1]))

        du = c("Concat", along(ry, fy, p00, p01, p10, p11), along(rx, fx, p00, p10, p01, p11), axis=-1)
        du = du if c.dtype(x) == c.dtype(grid) else c("CastLike", du, grid)
        scale = c("Mul", last if corners_aligned else size, _k(c, 0.5, like=grid))   # du/dg
        factor = scale if slope is None else c("Mul", slope, scale)
        dgrid = c("Reshape", c("Mul", du, factor), c.shape(grid))
    return [dx, dgrid]


@rule("AffineGrid")
def _affine_grid(c):
    # grid[n, p] = theta[n] (b_p, 1): each output point is theta applied to its homogeneous base point b_p, which
    # depends only on size and align_corners. So dtheta[n] = sum over points of g[n, p] (b_p, 1)^T, a MatMul. The base
    # points come from the node's own operator at the identity (batch 1): exactly the forward's, static size or not.
    theta, size, g = c.x(0), c.x(1), c.g
    k = (c.static_dims(theta, [1]) or [None])[0]
    if k is None and c.static_dims(size):
        k = c.static_dims(size)[0] - 2
    if k not in (2, 3):
        c.fail(f"needs the number of spatial axes (2 or 3): a static dim 1 of {theta!r} or length of {size!r}")
    one_image = c("Concat", c.i64([1]), c("Slice", size, c.i64([1]), c.i64([k + 2])), axis=0)
    base = c("AffineGrid", c.const(np.eye(k, k + 1)[None], like=theta), one_image,
             align_corners=c.attr("align_corners", 0))
    points = c("Pad", c("Reshape", base, c.i64([-1, k])), c.i64([0, 0, 0, 1]), _k(c, 1.0, like=theta))   # (P, k + 1)
    per_point = c("Transpose", c("Reshape", g, c.i64([0, -1, k])), perm=[0, 2, 1])                     # (N, k, P)
    return [c("MatMul", per_point, points), None]
