"""One finite-difference gradient check per rule variant (each its own test id)."""
import numpy as np
import pytest

from adcheck import gradcheck, make_model, node

R = np.random.default_rng(42)


def away(*shape, lo=0.2, hi=1.0):
    """Random values with |v| in [lo, hi]: no kinks (ReLU at 0, ...) within a finite-difference step."""
    return R.choice([-1.0, 1.0], size=shape) * R.uniform(lo, hi, size=shape)


def pos(*shape, lo=0.5, hi=1.5):
    return R.uniform(lo, hi, size=shape)


def distinct(*shape):
    """Well separated values (for max-pool/-reduce: no ties, no switching within a step)."""
    n = int(np.prod(shape))
    return (R.permutation(n) * 0.1 - n * 0.05).reshape(shape)


def i64(*v):
    return np.array(v, np.int64)


def grid(*shape, offset=0.0):
    """Distinct multiples of 0.1 (plus offset), shuffled: grid() and grid(offset=0.05) never come within 0.05 of each
    other, so max/min reductions over both switch no winner within a finite-difference step."""
    n = int(np.prod(shape))
    return ((R.permutation(n) - n // 2) * 0.1 + offset).reshape(shape)


def unique_along(axis, shape, size):
    """Indices of `shape` into an axis of `size`, distinct along `axis` (a scatter without duplicates)."""
    moved = list(shape)
    moved.append(moved.pop(axis))
    rows = [R.permutation(size)[:moved[-1]] for _ in range(int(np.prod(moved[:-1])))]
    return np.moveaxis(np.array(rows, np.int64).reshape(moved), -1, axis)


def case(nodes, inputs, inits=None, opset=17, sym=None, out="y"):
    def build(dtype):
        model = make_model(nodes, inputs, inits or {}, out=out, opset=opset, dtype=dtype, sym=sym)
        feeds = {k: (v.astype(dtype) if v.dtype == np.float64 else v) for k, v in inputs.items()}
        return model, feeds, out
    return build


def unary(op, x=None, opset=17, **attrs):
    return case([node(op, ["x"], "y", **attrs)], {"x": away(2, 3, 4) if x is None else x}, opset=opset)


def binary(op, a, b, opset=17):
    return case([node(op, ["a", "b"], "y")], {"a": a, "b": b}, opset=opset)


GS = np.random.default_rng(7)   # GridSample's and AffineGrid's cases draw from their own generator, leaving R's draws


def sample_points(n, ho, wo, h, w, corners, reach=2):
    """A GridSample grid (n, ho, wo, 2) whose unnormalised coordinates (x over w, y over h) are an integer in
    -reach * size .. (reach + 1) * size (so beyond [-1, 1] on both sides, mirrored several times) plus a fraction in
    [0.1, 0.4] or [0.6, 0.9]: no finite-difference step crosses a pixel (integers), a border clip (0, size - 1), a
    mirror (integers with align_corners, half-integers without) or a rounding tie of nearest (half-integers)."""
    axes = []
    for size in (w, h):
        u = (GS.integers(-reach * size, (reach + 1) * size, (n, ho, wo)) + GS.uniform(0.1, 0.4, (n, ho, wo))
             + 0.5 * GS.integers(0, 2, (n, ho, wo)))
        axes.append(2 * u / (size - 1) - 1 if corners else (2 * u + 1) / size - 1)
    return np.stack(axes, -1)


def mod(a_shape, b_shape, opset=17, **attrs):
    """Mod of a and b (one of them full size, the other broadcast) whose quotients a / b are signed n + f, n in 0..3,
    f in 0.2 .. 0.8: no jump of y within a finite-difference step."""
    shape = np.broadcast_shapes(a_shape, b_shape)
    q = R.choice([-1.0, 1.0], size=shape) * (R.integers(0, 4, shape) + R.uniform(0.2, 0.8, shape))
    if shape == tuple(a_shape):
        b = away(*b_shape)
        a = q * b
    else:
        a = away(*a_shape)
        b = a / q
    return case([node("Mod", ["a", "b"], "y", **attrs)], {"a": a, "b": b}, opset=opset)


def grid_sample(mode, pad, corners, opset=20):
    attrs = dict(mode=mode, padding_mode=pad, align_corners=corners)
    return case([node("GridSample", ["x", "g"], "y", **attrs)],
                {"x": GS.standard_normal((2, 3, 4, 5)), "g": sample_points(2, 3, 4, 4, 5, corners)}, opset=opset)


def theta(*shape, zoom=1.4):
    """Affine maps near a zoom-out (identity * zoom plus noise): their grids reach past [-1, 1]."""
    k = shape[-2]
    return np.eye(k, k + 1) * zoom + GS.uniform(-0.3, 0.3, shape)


W = lambda *s: R.standard_normal(s) * 0.5  # noqa: E731


def tf2onnx_block():
    """A tf2onnx-style NHWC block: transposes around a SAME-padded conv, Clip as ReLU6, mean over H, W. Its values come
    from a generator of its own: a Conv output within a finite-difference step of the Clip's kink fails the check, and
    R's draws shift whenever a case is added before this one (these keep every Conv output >= 0.028 from 0 and 6)."""
    r = np.random.default_rng(0)
    x = r.choice([-1.0, 1.0], size=(2, 5, 5, 3)) * r.uniform(0.2, 1.0, size=(2, 5, 5, 3))
    w = lambda *s: r.standard_normal(s) * 0.5  # noqa: E731
    return case([node("Transpose", ["x"], "t", perm=[0, 3, 1, 2]),
                 node("Conv", ["t", "w", "b"], "c", auto_pad="SAME_UPPER", strides=[2, 2]),
                 node("Transpose", ["c"], "ct", perm=[0, 2, 3, 1]),
                 node("Clip", ["ct", "lo", "hi"], "r"),
                 node("ReduceMean", ["r"], "m", axes=[1, 2], keepdims=0),
                 node("MatMul", ["m", "fc"], "mm"), node("Add", ["mm", "fb"], "y")],
                {"x": x}, {"w": w(4, 3, 3, 3), "b": w(4), "lo": np.array(0.0), "hi": np.array(6.0), "fc": w(4, 2),
                           "fb": w(2)}, opset=13, sym={"x": ["N", 5, 5, 3]})

CASES = {
    # elementwise arithmetic and broadcasting
    "Add-same": binary("Add", away(2, 3), away(2, 3)),
    "Add-broadcast": binary("Add", away(2, 3, 4), away(3, 1)),
    "Add-symbolic-batch": case([node("Add", ["a", "b"], "y")], {"a": away(2, 3), "b": away(3)},
                               sym={"a": ["N", 3]}),
    "Sub-broadcast": binary("Sub", away(3, 1), away(2, 1, 4)),
    "Mul-broadcast": binary("Mul", away(2, 3, 4), away(4)),
    "Div-broadcast": binary("Div", away(2, 3, 4), pos(3, 1)),
    # Mod: fmod=1 truncates the quotient; fmod=0 floors it, for floats from opset 28 on (before, integers only)
    "Mod-fmod-broadcast-divisor": mod((2, 3, 4), (3, 1), fmod=1),
    "Mod-fmod-broadcast-dividend": mod((4,), (2, 3, 4), fmod=1),
    "Mod-floor-opset28": mod((2, 3, 4), (4,), opset=28),
    "Sum-variadic": case([node("Sum", ["a", "b", "c"], "y")], {"a": away(2, 3), "b": away(3), "c": away(1, 3)}),
    "Max-broadcast": binary("Max", distinct(2, 3), distinct(3) * 0.7),
    "Min-variadic": case([node("Min", ["a", "b", "c"], "y")], {"a": distinct(2, 3), "b": distinct(3) * 0.7,
                                                             "c": distinct(1, 3) * 1.3}),
    "Mean-variadic": case([node("Mean", ["a", "b"], "y")], {"a": away(2, 3), "b": away(3)}),
    "Neg": unary("Neg"),
    "Reciprocal": unary("Reciprocal", pos(2, 3)),
    "Pow-square-const": case([node("Pow", ["x", "p"], "y")], {"x": away(2, 3)}, {"p": np.array(2.0)}),
    "Pow-both-inputs": binary("Pow", pos(2, 3), away(3)),
    "Pow-int-exponent": case([node("Pow", ["x", "p"], "y")], {"x": away(2, 3)}, {"p": np.array(3, np.int64)}),
    "Sqrt": unary("Sqrt", pos(2, 3)),
    "Exp": unary("Exp"),
    "Log": unary("Log", pos(2, 3)),
    "Abs": unary("Abs"),
    "Sigmoid": unary("Sigmoid"),
    "Tanh": unary("Tanh"),
    "Erf": unary("Erf"),
    "Softplus": unary("Softplus"),
    "Sin": unary("Sin", away(2, 3, 4) * 4),
    "Cos": unary("Cos", away(2, 3, 4) * 4),
    # onnxruntime runs these in float32 only; inputs inside each domain, away from its edges and poles
    "Tan": unary("Tan", away(2, 3, 4) * 1.2),
    "Sinh": unary("Sinh", away(2, 3, 4) * 2),
    "Cosh": unary("Cosh", away(2, 3, 4) * 2),
    "Asin": unary("Asin", away(2, 3, 4, lo=0.05, hi=0.85)),
    "Acos": unary("Acos", away(2, 3, 4, lo=0.05, hi=0.85)),
    "Atan": unary("Atan", away(2, 3, 4) * 3),
    "Asinh": unary("Asinh", away(2, 3, 4) * 3),
    "Acosh": unary("Acosh", pos(2, 3, 4, lo=1.2, hi=3.0)),
    "Atanh": unary("Atanh", away(2, 3, 4, lo=0.05, hi=0.8)),
    # Hardmax is piecewise constant: x * Hardmax(x) has the gradient Hardmax(x) (no ties within a step)
    "Hardmax-no-gradient": case([node("Hardmax", ["x"], "h", axis=1), node("Mul", ["x", "h"], "y")],
                                {"x": distinct(2, 3, 4)}),
    "Where": case([node("Where", ["c", "a", "b"], "y")],
                  {"c": R.random((2, 3)) > 0.5, "a": away(2, 3), "b": away(3)}),
    "Identity": unary("Identity"),
    "Dropout": case([node("Dropout", ["x"], ["y", "mask"])], {"x": away(2, 3)}),
    "Cast-same-type": case([node("Cast", ["x"], "t", to=11), node("Mul", ["t", "t"], "y")], {"x": away(2, 3)}),
    "CastLike": case([node("CastLike", ["x", "like"], "t"), node("Mul", ["t", "t"], "y")], {"x": away(2, 3)},
                     {"like": np.array(0.0)}),
    # activations
    "Relu": unary("Relu"),
    "LeakyRelu": unary("LeakyRelu", alpha=0.1),
    "PRelu-channel-slope": binary("PRelu", away(2, 3, 4, 4), away(3, 1, 1)),
    "Clip-inputs": case([node("Clip", ["x", "lo", "hi"], "y")], {"x": away(2, 3, 4, lo=0.05) * 2},
                        {"lo": np.array(-0.5), "hi": np.array(1.0)}),
    "Clip-min-only": case([node("Clip", ["x", "lo"], "y")], {"x": away(2, 3, 4)}, {"lo": np.array(0.0)}),
    "Clip-relu6": case([node("Clip", ["x", "lo", "hi"], "y")], {"x": away(2, 3, 4, lo=0.1, hi=8)},
                       {"lo": np.array(0.0), "hi": np.array(6.0)}),
    "HardSigmoid": unary("HardSigmoid", away(3, 4, lo=0.1, hi=5), alpha=0.3, beta=0.4),
    "HardSwish": unary("HardSwish", np.concatenate([away(12, lo=0.1, hi=2.9), away(12, lo=3.1, hi=6)])),
    "Elu": unary("Elu", alpha=0.7),
    "Selu": unary("Selu"),
    "Selu-attrs": unary("Selu", alpha=1.2, gamma=0.9),
    "Celu": unary("Celu", alpha=1.5),
    "ThresholdedRelu": unary("ThresholdedRelu", away(2, 3, 4) + 0.5, alpha=0.5),
    "Mish": unary("Mish", opset=18),
    "Swish": unary("Swish", opset=24),
    "Swish-alpha": unary("Swish", away(2, 3, 4) * 3, opset=24, alpha=0.7),
    "Softsign": unary("Softsign"),
    "Gelu-erf": unary("Gelu", opset=20),
    "Gelu-tanh": unary("Gelu", opset=20, approximate="tanh"),
    "Softmax-last": unary("Softmax", axis=-1),
    "Softmax-axis1": unary("Softmax", axis=1),
    "LogSoftmax": unary("LogSoftmax", axis=-1),
    # linear algebra
    "Gemm": case([node("Gemm", ["a", "b", "c"], "y")], {"a": away(2, 3), "b": away(3, 4), "c": away(4)}),
    "Gemm-transA-transB-alpha-beta": case([node("Gemm", ["a", "b", "c"], "y", transA=1, transB=1,
                                                alpha=0.7, beta=1.3)],
                                          {"a": away(3, 2), "b": away(4, 3), "c": away(2, 1)}),
    "Gemm-transB-weights": case([node("Gemm", ["a", "w", "bias"], "y", transB=1)], {"a": away(2, 5)},
                                {"w": W(3, 5), "bias": W(3)}),
    "Gemm-transA": case([node("Gemm", ["a", "b"], "y", transA=1)], {"a": away(3, 2), "b": away(3, 4)}),
    "MatMul-2d": binary("MatMul", away(2, 3), away(3, 4)),
    "MatMul-batched": binary("MatMul", away(2, 3, 4), away(2, 4, 5)),
    "MatMul-broadcast": binary("MatMul", away(2, 1, 3, 4), away(5, 4, 2)),
    "MatMul-weight": case([node("MatMul", ["a", "w"], "y")], {"a": away(2, 3, 4)}, {"w": W(4, 5)},
                          sym={"a": ["N", 3, 4]}),
    "MatMul-vector-matrix": binary("MatMul", away(4), away(2, 4, 3)),
    "MatMul-matrix-vector": binary("MatMul", away(2, 3, 4), away(4)),
    "Einsum-batched-matmul": case([node("Einsum", ["a", "b"], "y", equation="bij,bjk->bik")],
                                  {"a": away(2, 3, 4), "b": away(2, 4, 2)}),
    "Einsum-implicit": case([node("Einsum", ["a", "b"], "y", equation="ij,jk")], {"a": away(2, 3), "b": away(3, 4)}),
    "Einsum-channel-weights": case([node("Einsum", ["a", "b"], "y", equation="nchw,c->nhw")],
                                   {"a": away(2, 3, 2, 2), "b": away(3)}),
    "Einsum-summed-operand": case([node("Einsum", ["a", "b"], "y", equation="ij,k->i")],
                                  {"a": away(2, 3), "b": away(4)}),
    "Einsum-ellipsis": case([node("Einsum", ["a", "b"], "y", equation="...ij,jk->...ik")],
                            {"a": away(2, 3, 4), "b": away(4, 2)}),
    # convolution
    "Conv-3x3-pad1": case([node("Conv", ["x", "w", "b"], "y", pads=[1, 1, 1, 1])], {"x": away(2, 3, 5, 5)},
                          {"w": W(4, 3, 3, 3), "b": W(4)}),
    "Conv-stride2-odd": case([node("Conv", ["x", "w"], "y", strides=[2, 2], pads=[1, 1, 1, 1])],
                             {"x": away(1, 2, 7, 6)}, {"w": W(3, 2, 3, 3)}),
    "Conv-stride3-nodivide": case([node("Conv", ["x", "w"], "y", strides=[3, 2])], {"x": away(1, 2, 8, 7)},
                                  {"w": W(2, 2, 2, 3)}),
    "Conv-dilation2": case([node("Conv", ["x", "w"], "y", dilations=[2, 2], pads=[2, 2, 2, 2])],
                           {"x": away(1, 2, 6, 6)}, {"w": W(2, 2, 3, 3)}),
    "Conv-group2": case([node("Conv", ["x", "w"], "y", group=2, pads=[1, 0, 1, 0])], {"x": away(1, 4, 5, 5)},
                        {"w": W(6, 2, 3, 3)}),
    "Conv-depthwise-stride2": case([node("Conv", ["x", "w"], "y", group=3, strides=[2, 2], pads=[1, 1, 1, 1])],
                                   {"x": away(2, 3, 6, 6)}, {"w": W(3, 1, 3, 3)}),
    "Conv-depthwise-dilated-stride1": case([node("Conv", ["x", "w"], "y", group=3, dilations=[2, 1],
                                                pads=[2, 1, 1, 0])], {"x": away(2, 3, 6, 5)}, {"w": W(6, 1, 3, 2)}),
    "Conv-pad-exceeds-kernel": case([node("Conv", ["x", "w"], "y", pads=[1, 0, 1, 2])], {"x": away(1, 2, 3, 3)},
                                    {"w": W(2, 2, 1, 2)}),
    "Conv-asymmetric-pads": case([node("Conv", ["x", "w"], "y", pads=[0, 1, 2, 0], strides=[2, 1])],
                                 {"x": away(1, 2, 5, 5)}, {"w": W(2, 2, 3, 2)}),
    "Conv-auto-same-upper": case([node("Conv", ["x", "w"], "y", auto_pad="SAME_UPPER", strides=[2, 2])],
                                 {"x": away(1, 2, 6, 7)}, {"w": W(2, 2, 4, 3)}),
    "Conv-auto-same-lower": case([node("Conv", ["x", "w"], "y", auto_pad="SAME_LOWER", strides=[2, 2])],
                                 {"x": away(1, 2, 6, 6)}, {"w": W(2, 2, 4, 4)}),
    "Conv-auto-valid": case([node("Conv", ["x", "w"], "y", auto_pad="VALID", strides=[2, 2])],
                            {"x": away(1, 2, 7, 7)}, {"w": W(2, 2, 3, 3)}),
    "Conv-1d": case([node("Conv", ["x", "w"], "y", strides=[2], pads=[1, 1])], {"x": away(2, 2, 9)},
                    {"w": W(3, 2, 3)}),
    "Conv-symbolic-spatial": case([node("Conv", ["x", "w"], "y", strides=[2, 2], pads=[1, 1, 1, 1])],
                                  {"x": away(1, 2, 7, 6)}, {"w": W(3, 2, 3, 3)}, sym={"x": ["N", 2, "H", "W"]}),
    "Conv-bias-input": case([node("Conv", ["x", "w", "b"], "y", pads=[1, 1, 1, 1])],
                            {"x": away(1, 2, 4, 4), "b": away(3)}, {"w": W(3, 2, 3, 3)}),
    "ConvTranspose-stride2": case([node("ConvTranspose", ["x", "w"], "y", strides=[2, 2], pads=[1, 1, 1, 1],
                                        output_padding=[1, 1])], {"x": away(1, 3, 4, 4)}, {"w": W(3, 2, 3, 3)}),
    "ConvTranspose-group": case([node("ConvTranspose", ["x", "w"], "y", group=2, strides=[2, 2])],
                                {"x": away(1, 4, 3, 3)}, {"w": W(4, 1, 2, 2)}),
    "ConvTranspose-output-shape": case([node("ConvTranspose", ["x", "w"], "y", strides=[2, 2],
                                             output_shape=[7, 8])], {"x": away(1, 2, 4, 4)}, {"w": W(2, 2, 3, 3)}),
    "ConvTranspose-same-upper": case([node("ConvTranspose", ["x", "w"], "y", strides=[2, 2], auto_pad="SAME_UPPER")],
                                     {"x": away(1, 2, 3, 3)}, {"w": W(2, 2, 4, 3)}),
    "ConvTranspose-same-lower": case([node("ConvTranspose", ["x", "w"], "y", strides=[2, 2], auto_pad="SAME_LOWER")],
                                     {"x": away(1, 2, 3, 3)}, {"w": W(2, 2, 4, 3)}),
    # pooling
    "MaxPool-2x2": unary("MaxPool", distinct(2, 2, 4, 4), kernel_shape=[2, 2], strides=[2, 2]),
    "MaxPool-3x3-s2-pad1": unary("MaxPool", distinct(1, 2, 7, 7), kernel_shape=[3, 3], strides=[2, 2],
                                 pads=[1, 1, 1, 1]),
    "MaxPool-overlap": unary("MaxPool", distinct(1, 2, 5, 5), kernel_shape=[3, 3]),
    "MaxPool-ceil": unary("MaxPool", distinct(1, 2, 6, 6), kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    "MaxPool-dilation": unary("MaxPool", distinct(1, 1, 7, 7), kernel_shape=[2, 2], dilations=[2, 2]),
    "MaxPool-1d": unary("MaxPool", distinct(2, 2, 9), kernel_shape=[3], strides=[2]),
    "MaxPool-symbolic-batch": case([node("MaxPool", ["x"], "y", kernel_shape=[2, 2], strides=[2, 2])],
                                   {"x": distinct(2, 2, 4, 4)}, sym={"x": ["N", 2, 4, 4]}),
    "AveragePool-2x2": unary("AveragePool", away(2, 2, 4, 4), kernel_shape=[2, 2], strides=[2, 2]),
    "AveragePool-pad-exclude": unary("AveragePool", away(1, 2, 5, 5), kernel_shape=[3, 3], strides=[2, 2],
                                     pads=[1, 1, 1, 1]),
    "AveragePool-pad-include": unary("AveragePool", away(1, 2, 5, 5), kernel_shape=[3, 3], strides=[2, 2],
                                     pads=[1, 1, 1, 1], count_include_pad=1),
    "AveragePool-ceil": unary("AveragePool", away(1, 2, 6, 6), kernel_shape=[3, 3], strides=[2, 2],
                              ceil_mode=1),
    "AveragePool-ceil-pad-include": unary("AveragePool", away(1, 2, 6, 7), kernel_shape=[3, 3], strides=[2, 2],
                                          pads=[1, 1, 1, 1], ceil_mode=1, count_include_pad=1),
    "AveragePool-same-upper": unary("AveragePool", away(1, 2, 5, 5), kernel_shape=[2, 2], strides=[2, 2],
                                    auto_pad="SAME_UPPER"),
    # LpPool: onnxruntime runs it in float32 only; ceil_mode and dilations are opset 18 attributes
    "LpPool-p2-3x3": unary("LpPool", away(2, 2, 5, 5), kernel_shape=[3, 3]),
    "LpPool-p1-s2-pads": unary("LpPool", away(1, 2, 6, 5), kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 1],
                               p=1),
    "LpPool-p3-ceil": unary("LpPool", away(1, 2, 6, 6), opset=18, kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1,
                            p=3),
    "LpPool-p4-dilations": unary("LpPool", away(1, 1, 7, 6), opset=18, kernel_shape=[2, 2], dilations=[2, 3], p=4),
    "LpPool-same-upper": unary("LpPool", away(1, 2, 5, 5), kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_UPPER"),
    "LpPool-1d": unary("LpPool", away(2, 2, 9), kernel_shape=[3], strides=[2]),
    "LpPool-symbolic-spatial": case([node("LpPool", ["x"], "y", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])],
                                    {"x": away(1, 2, 7, 6)}, sym={"x": ["N", 2, "H", "W"]}),
    # GlobalLpPool: float32 only in onnxruntime, as LpPool
    **{f"GlobalLpPool-p{p}-{k}d": unary("GlobalLpPool", away(2, 3, *[5, 4][:k]), **({"p": p} if p != 2 else {}))
       for p in (1, 2, 3) for k in (1, 2)},
    "GlobalAveragePool": unary("GlobalAveragePool", away(2, 3, 3, 4)),
    "GlobalAveragePool-symbolic": case([node("GlobalAveragePool", ["x"], "y")], {"x": away(2, 3, 3, 4)},
                                       sym={"x": ["N", 3, "H", "W"]}),
    "GlobalMaxPool": unary("GlobalMaxPool", distinct(2, 3, 3, 3)),
    # reductions
    "ReduceMean-axes-attr": unary("ReduceMean", away(2, 3, 2, 2), opset=13, axes=[2, 3]),
    "ReduceMean-axes-input-nokeep": case([node("ReduceMean", ["x", "ax"], "y", keepdims=0)],
                                         {"x": away(2, 3, 4)}, {"ax": i64(-1)}, opset=18),
    "ReduceSum-negative-axes": case([node("ReduceSum", ["x", "ax"], "y", keepdims=0)],
                                    {"x": away(2, 3, 4)}, {"ax": i64(-2, 0)}),
    "ReduceSum-all": unary("ReduceSum", keepdims=0),
    # noop_with_empty_axes: nothing reduced; L1, L2, SumSquare still map each element (|x|, |x|, x^2)
    "ReduceMax-noop-no-axes": unary("ReduceMax", distinct(2, 3), opset=18, noop_with_empty_axes=1),
    "ReduceL1-noop-no-axes": unary("ReduceL1", opset=18, noop_with_empty_axes=1),
    "ReduceSumSquare-noop-empty-axes": case([node("ReduceSumSquare", ["x", "ax"], "y", noop_with_empty_axes=1)],
                                            {"x": away(2, 3)}, {"ax": np.zeros(0, np.int64)}, opset=18),
    "ReduceMax-keepdims": case([node("ReduceMax", ["x", "ax"], "y")], {"x": distinct(2, 3, 4)}, {"ax": i64(1)},
                               opset=18),
    "ReduceMin-nokeep-attr": unary("ReduceMin", distinct(2, 3, 4), opset=13, axes=[-1], keepdims=0),
    "ReduceMax-all": unary("ReduceMax", distinct(2, 3), opset=13, keepdims=0),
    "ReduceL2-axes-input-nokeep": case([node("ReduceL2", ["x", "ax"], "y", keepdims=0)], {"x": away(2, 3, 4)},
                                       {"ax": i64(-1, 1)}, opset=18),
    "ReduceL2-all-attr": unary("ReduceL2", opset=13, keepdims=1),
    "ReduceL1": unary("ReduceL1", opset=13, axes=[1]),
    "ReduceSumSquare-nokeep": unary("ReduceSumSquare", opset=13, axes=[0, 2], keepdims=0),
    "ReduceLogSumExp": case([node("ReduceLogSumExp", ["x", "ax"], "y", keepdims=0)], {"x": away(2, 3, 4) * 3},
                            {"ax": i64(1)}, opset=18),
    "ReduceLogSum-axes-attr": unary("ReduceLogSum", pos(2, 3, 4), opset=13, axes=[1]),
    "ReduceLogSum-negative-axes-attr-nokeep": unary("ReduceLogSum", pos(2, 3, 4), opset=13, axes=[-1, 0], keepdims=0),
    "ReduceLogSum-axes-input-nokeep": case([node("ReduceLogSum", ["x", "ax"], "y", keepdims=0)], {"x": pos(2, 3, 4)},
                                           {"ax": i64(-2)}, opset=18),
    "ReduceLogSum-all-nokeep": unary("ReduceLogSum", pos(2, 3), opset=18, keepdims=0),
    "ReduceLogSum-empty-axes-all": case([node("ReduceLogSum", ["x", "ax"], "y")], {"x": pos(2, 3)},
                                        {"ax": np.zeros(0, np.int64)}, opset=18),
    # noop_with_empty_axes: nothing reduced, and each element still mapped, to log x
    "ReduceLogSum-noop-no-axes": unary("ReduceLogSum", pos(2, 3), opset=18, noop_with_empty_axes=1),
    "ReduceProd-axes-attr": unary("ReduceProd", away(2, 3, 4), opset=13, axes=[1]),
    "ReduceProd-axes-input-nokeep": case([node("ReduceProd", ["x", "ax"], "y", keepdims=0)], {"x": away(2, 3, 4)},
                                         {"ax": i64(-1, 0)}, opset=18),
    "ReduceProd-all-nokeep": unary("ReduceProd", away(2, 3), opset=13, keepdims=0),
    "ReduceProd-empty-axes-all": case([node("ReduceProd", ["x", "ax"], "y")], {"x": away(2, 3)},
                                      {"ax": np.zeros(0, np.int64)}, opset=18),
    "ReduceProd-noop-empty-axes": unary("ReduceProd", away(2, 3), opset=18, noop_with_empty_axes=1),
    # rows with no zero, one zero and two zeros (y is multilinear in x: central differences are exact at 0)
    "ReduceProd-zeros": unary("ReduceProd", np.array([[0.5, -1.2, 0.8], [0.0, 0.7, -0.9], [0.0, 0.6, 0.0]]), opset=13,
                              axes=[1]),
    "LpNormalization-p2-last": unary("LpNormalization", away(2, 3, 4)),
    "LpNormalization-p1-axis1": unary("LpNormalization", away(2, 3, 4), axis=1, p=1),
    # LRN (onnxruntime runs 4-D inputs and odd window sizes only), also with a window wider than the channels
    "LRN-size3": unary("LRN", away(2, 5, 3, 2), size=3, alpha=0.5, beta=0.75, bias=1.5),
    "LRN-size7-wide": unary("LRN", away(1, 6, 2, 3), size=7, alpha=2.0, beta=0.5, bias=1.0),
    "LRN-defaults": unary("LRN", away(2, 4, 3, 3) * 30, size=5),
    # normalisation
    "BatchNormalization": case([node("BatchNormalization", ["x", "s", "b", "m", "v"], "y", epsilon=1e-3)],
                               {"x": away(2, 3, 2, 2)}, {"s": W(3), "b": W(3), "m": W(3), "v": pos(3)}),
    "LayerNormalization-last": case([node("LayerNormalization", ["x", "s", "b"], "y")], {"x": away(2, 3, 5)},
                                    {"s": W(5), "b": W(5)}),
    "LayerNormalization-axis1-params": case([node("LayerNormalization", ["x", "s", "b"], "y", axis=1)],
                                            {"x": away(2, 3, 2), "s": away(3, 2), "b": away(3, 2)}),
    "LayerNormalization-saved-stats": case([node("LayerNormalization", ["x", "s"], ["y", "mu", "inv"])],
                                           {"x": away(2, 4)}, {"s": W(4)}),
    "InstanceNormalization": case([node("InstanceNormalization", ["x", "s", "b"], "y")], {"x": away(2, 3, 2, 3)},
                                  {"s": W(3), "b": W(3)}),
    "GroupNormalization-18": case([node("GroupNormalization", ["x", "s", "b"], "y", num_groups=2)],
                                  {"x": away(2, 4, 2, 2)}, {"s": W(2), "b": W(2)}, opset=18),
    "GroupNormalization-21": case([node("GroupNormalization", ["x", "s", "b"], "y", num_groups=2)],
                                  {"x": away(2, 4, 2, 2)}, {"s": W(4), "b": W(4)}, opset=21),
    # MeanVarianceNormalization: float32 only (onnxruntime's float64 function expansion does not type-check); its
    # default axes have a test of their own below
    "MeanVarianceNormalization-axes023": unary("MeanVarianceNormalization", away(2, 3, 2, 3), opset=13, axes=[0, 2, 3]),
    "MeanVarianceNormalization-axes23": unary("MeanVarianceNormalization", away(2, 3, 2, 3), opset=18, axes=[2, 3]),
    "MeanVarianceNormalization-negative-axis-3d": unary("MeanVarianceNormalization", away(2, 3, 4), opset=13,
                                                        axes=[-1]),
    "RMSNormalization-last": case([node("RMSNormalization", ["x", "s"], "y")], {"x": away(2, 3, 5), "s": away(5)},
                                  opset=23),
    "RMSNormalization-axis1": case([node("RMSNormalization", ["x", "s"], "y", axis=1, epsilon=0.1)],
                                   {"x": away(2, 3, 2)}, {"s": W(3, 2)}, opset=23),
    # attention (opset 23): Q [B, heads, S, size] or [B, S, heads * size]; the mask, causality and grouped K/V heads
    "Attention-4d": case([node("Attention", ["q", "k", "v"], "y")],
                         {"q": away(2, 2, 3, 4), "k": away(2, 2, 5, 4), "v": away(2, 2, 5, 3)}, opset=23),
    "Attention-causal-scale": case([node("Attention", ["q", "k", "v"], "y", is_causal=1, scale=0.7)],
                                   {"q": away(1, 2, 4, 3), "k": away(1, 2, 4, 3), "v": away(1, 2, 4, 3)}, opset=23),
    "Attention-mask-grouped": case([node("Attention", ["q", "k", "v", "m"], "y")],
                                   {"q": away(2, 4, 3, 2), "k": away(2, 2, 5, 2), "v": away(2, 2, 5, 3)},
                                   {"m": W(3, 5)}, opset=23),
    "Attention-3d-grouped": case([node("Attention", ["q", "k", "v"], "y", q_num_heads=4, kv_num_heads=2)],
                                 {"q": away(2, 3, 8), "k": away(2, 5, 4), "v": away(2, 5, 6)}, opset=23),
    # shape and data movement
    "Flatten": unary("Flatten", away(2, 3, 2), axis=1),
    "Reshape": case([node("Reshape", ["x", "s"], "y")], {"x": away(2, 3, 4)}, {"s": i64(0, -1)}),
    "Transpose-perm": unary("Transpose", away(2, 3, 4), perm=[2, 0, 1]),
    "Transpose-default": unary("Transpose", away(2, 3, 4)),
    "Squeeze": case([node("Squeeze", ["x", "a"], "y")], {"x": away(2, 1, 3)}, {"a": i64(1)}),
    "Unsqueeze": case([node("Unsqueeze", ["x", "a"], "y")], {"x": away(2, 3)}, {"a": i64(-1)}),
    "Concat-negative-axis": case([node("Concat", ["a", "b", "c"], "y", axis=-1)],
                                 {"a": away(2, 3, 1), "b": away(2, 3, 2), "c": away(2, 3, 3)}),
    "Concat-symbolic": case([node("Concat", ["a", "b"], "y", axis=1)], {"a": away(2, 3), "b": away(2, 1)},
                            sym={"a": ["N", "K"]}),
    "Split-both-used": case([node("Split", ["x", "s"], ["p", "q"], axis=1), node("Mul", ["p", "q"], "y")],
                            {"x": away(2, 4)}, {"s": i64(2, 2)}),
    "Split-one-unused": case([node("Split", ["x"], ["p", "q", "r"], axis=-1, num_outputs=3),
                              node("Add", ["p", "r"], "y")], {"x": away(2, 6)}, opset=18),
    "Slice-unit-steps": case([node("Slice", ["x", "st", "en", "ax"], "y")], {"x": away(2, 5, 6)},
                             {"st": i64(1, -4), "en": i64(4, 100), "ax": i64(1, -1)}),
    "Slice-negative-step": case([node("Slice", ["x", "st", "en", "ax", "sp"], "y")], {"x": away(2, 7)},
                                {"st": i64(-1), "en": i64(0), "ax": i64(1), "sp": i64(-2)}),
    "Slice-symbolic": case([node("Slice", ["x", "st", "en", "ax"], "y")], {"x": away(2, 5)},
                           {"st": i64(1), "en": i64(3), "ax": i64(1)}, sym={"x": ["N", "L"]}),
    "Gather-duplicates": case([node("Gather", ["x", "i"], "y", axis=1)], {"x": away(2, 4, 3)},
                              {"i": i64(0, 2, 2, -1)}),
    "Gather-scalar-index": case([node("Gather", ["x", "i"], "y", axis=1)], {"x": away(2, 4, 3)},
                                {"i": np.array(0, np.int64)}),
    "GatherND-slices-duplicates": case([node("GatherND", ["x", "i"], "y")], {"x": away(2, 3, 4)},
                                       {"i": i64([1, -1], [0, 2], [1, 2])}),
    # an opset-13 model: the walk lifts it to opset 16, where ScatterND has reduction="add"
    "GatherND-opset13-lifted": case([node("GatherND", ["x", "i"], "y")], {"x": away(2, 3)}, {"i": i64([1], [-1], [0])},
                                    opset=13),
    "GatherND-elements": case([node("GatherND", ["x", "i"], "y")], {"x": away(2, 3, 4)},
                              {"i": i64([[0, 1, 3], [1, 2, -1]], [[0, 1, 3], [1, 0, 0]])}),
    "GatherND-rows-symbolic": case([node("GatherND", ["x", "i"], "y")], {"x": away(3, 4)}, {"i": i64([2], [0], [2])},
                                   sym={"x": ["N", 4]}),
    "GatherND-batch_dims1": case([node("GatherND", ["x", "i"], "y", batch_dims=1)], {"x": away(2, 3, 4)},
                                 {"i": i64([[0], [2], [2]], [[-1], [1], [0]])}),
    "GatherND-batch_dims2-symbolic": case([node("GatherND", ["x", "i"], "y", batch_dims=2)], {"x": away(2, 3, 4)},
                                          {"i": R.integers(0, 4, (2, 3, 5, 1))}, sym={"x": ["N", 3, 4]}),
    "TopK-largest-sorted": case([node("TopK", ["x", "k"], ["y", "i"])], {"x": distinct(2, 3, 5)}, {"k": i64(2)}),
    "TopK-smallest-unsorted-axis1": case([node("TopK", ["x", "k"], ["y", "i"], axis=1, largest=0, sorted=0)],
                                         {"x": distinct(2, 4, 3)}, {"k": i64(3)}),
    "TopK-negative-axis-all": case([node("TopK", ["x", "k"], ["y", "i"], axis=-2)], {"x": distinct(2, 3, 2)},
                                   {"k": i64(3)}),
    "TopK-indices-used": case([node("TopK", ["x", "k"], ["v", "i"], axis=0), node("Cast", ["i"], "f", to=11),
                               node("Mul", ["v", "f"], "y")], {"x": distinct(4, 3)}, {"k": i64(2)}),
    # scatters: under reduction none the indices are distinct (duplicates are undefined there); under the others
    # duplicates combine. mul: the updates landing on one position hold no zero, one zero or two zeros (y is
    # multilinear in the updates, so central differences are exact there too)
    "ScatterND-none-slices": case([node("ScatterND", ["d", "i", "u"], "y")], {"d": away(2, 3, 4), "u": away(2, 4)},
                                  {"i": i64([0, 1], [1, -1])}),
    "ScatterND-none-elements": case([node("ScatterND", ["d", "i", "u"], "y")], {"d": away(3, 4), "u": away(3)},
                                    {"i": i64([0, 0], [2, 3], [1, -2])}),
    "ScatterND-none-constant-updates": case([node("ScatterND", ["d", "i", "u"], "y")], {"d": away(2, 3)},
                                            {"i": i64([1], [0]), "u": away(2, 3)}),
    "ScatterND-none-constant-data": case([node("ScatterND", ["d", "i", "u"], "y")], {"u": away(2, 3)},
                                         {"i": i64([2], [0]), "d": away(4, 3)}),
    "ScatterND-add-duplicates": case([node("ScatterND", ["d", "i", "u"], "y", reduction="add")],
                                     {"d": away(2, 3, 4), "u": away(3, 4)}, {"i": i64([0, 1], [1, 2], [0, 1])}),
    "ScatterND-mul-duplicates-zeros": case([node("ScatterND", ["d", "i", "u"], "y", reduction="mul")],
                                           {"d": away(3, 4), "u": np.array([0.7, 0.0, 0.0, -0.9, 0.0, 1.3, -0.6])},
                                           {"i": i64([0, 0], [0, 0], [1, 1], [1, 1], [1, 1], [2, -1], [2, 3])}),
    "ScatterND-mul-slices": case([node("ScatterND", ["d", "i", "u"], "y", reduction="mul")],
                                 {"d": away(2, 3, 4), "u": away(3, 4)}, {"i": i64([0, 1], [1, 2], [0, 1])}),
    "ScatterND-max-duplicates": case([node("ScatterND", ["d", "i", "u"], "y", reduction="max")],
                                     {"d": grid(3, 4), "u": grid(5, offset=0.05)},
                                     {"i": i64([0, 0], [0, 0], [1, 2], [2, -1], [1, 2])}, opset=18),
    "ScatterND-min-slices": case([node("ScatterND", ["d", "i", "u"], "y", reduction="min")],
                                 {"d": grid(2, 3, 4), "u": grid(3, 4, offset=0.05)}, {"i": i64([0, 1], [0, 1], [1, 0])},
                                 opset=18),
    "ScatterElements-none-axis1": case([node("ScatterElements", ["d", "i", "u"], "y", axis=1)],
                                       {"d": away(2, 4, 3), "u": away(2, 2, 3)}, {"i": unique_along(1, (2, 2, 3), 4)}),
    "ScatterElements-none-default-axis": case([node("ScatterElements", ["d", "i", "u"], "y")],
                                              {"d": away(3, 2), "u": away(2, 2)}, {"i": i64([2, -3], [0, 1])}),
    "ScatterElements-add-negative-axis": case([node("ScatterElements", ["d", "i", "u"], "y", axis=-1,
                                                    reduction="add")],
                                              {"d": away(2, 3), "u": away(2, 4)}, {"i": i64([0, 2, 0, -1], [1, 1, 1, 0])}),
    "ScatterElements-mul-zeros": case([node("ScatterElements", ["d", "i", "u"], "y", axis=0, reduction="mul")],
                                      {"d": away(2, 3), "u": np.array([[0.0, 0.8, 0.0], [0.6, 0.0, 0.0],
                                                                        [-1.1, 0.9, 0.5]])},
                                      {"i": i64([1, 0, 0], [1, 0, 0], [1, 0, 1])}),
    "ScatterElements-max": case([node("ScatterElements", ["d", "i", "u"], "y", axis=1, reduction="max")],
                                {"d": grid(2, 3), "u": grid(2, 4, offset=0.05)}, {"i": i64([0, 0, 2, 1], [2, 2, 2, 0])},
                                opset=18),
    "ScatterElements-min": case([node("ScatterElements", ["d", "i", "u"], "y", axis=0, reduction="min")],
                                {"d": grid(2, 3), "u": grid(3, 3, offset=0.05)}, {"i": i64([0, 1, 0], [0, 1, 1], [1, 1, 0])},
                                opset=18),
    "SpaceToDepth": unary("SpaceToDepth", away(2, 3, 4, 6), blocksize=2),
    "DepthToSpace-DCR": unary("DepthToSpace", away(2, 8, 2, 3), blocksize=2),
    "DepthToSpace-CRD": unary("DepthToSpace", away(1, 18, 2, 2), blocksize=3, mode="CRD"),
    "CumSum": case([node("CumSum", ["x", "a"], "y")], {"x": away(2, 3, 4)}, {"a": i64(1)}),
    "CumSum-exclusive": case([node("CumSum", ["x", "a"], "y", exclusive=1)], {"x": away(2, 5)}, {"a": i64(1)}),
    "CumSum-reverse-int32-axis": case([node("CumSum", ["x", "a"], "y", reverse=1)], {"x": away(3, 4)},
                                      {"a": np.array(0, np.int32)}),
    "CumSum-exclusive-reverse-negative-axis": case([node("CumSum", ["x", "a"], "y", exclusive=1, reverse=1)],
                                                   {"x": away(2, 3, 4)}, {"a": i64(-1)}),
    "CumSum-axis-graph-input": case([node("CumSum", ["x", "a"], "y", exclusive=1)],
                                    {"x": away(2, 3, 4), "a": np.array(-2, np.int64)}),
    # CumProd (opset 26). y is multilinear in x, so central differences are exact at zeros too: lines with a zero at
    # either end, in the middle, and two zeros
    "CumProd": case([node("CumProd", ["x", "a"], "y")], {"x": away(2, 3, 4)}, {"a": i64(1)}, opset=26),
    "CumProd-exclusive": case([node("CumProd", ["x", "a"], "y", exclusive=1)], {"x": away(2, 5)}, {"a": i64(1)},
                              opset=26),
    "CumProd-reverse-int32-axis": case([node("CumProd", ["x", "a"], "y", reverse=1)], {"x": away(3, 4)},
                                       {"a": np.array(0, np.int32)}, opset=26),
    "CumProd-exclusive-reverse-negative-axis": case([node("CumProd", ["x", "a"], "y", exclusive=1, reverse=1)],
                                                    {"x": away(2, 3, 4)}, {"a": i64(-1)}, opset=26),
    "CumProd-axis-graph-input": case([node("CumProd", ["x", "a"], "y", reverse=1)],
                                     {"x": away(2, 3, 4), "a": np.array(-2, np.int64)}, opset=26),
    **{f"CumProd-zeros-exclusive{e}-reverse{r}": case(
        [node("CumProd", ["x", "a"], "y", exclusive=e, reverse=r)],
        {"x": np.array([[0.5, -1.2, 0.8, 1.1], [0.7, 0.0, -0.9, 1.3], [0.0, 0.6, 0.0, -1.4], [1.2, 0.9, -0.7, 0.0]])},
        {"a": i64(1)}, opset=26) for e in (0, 1) for r in (0, 1)},
    # ReverseSequence: time-major (the default axes) and batch-major, the lengths a constant or a graph input
    "ReverseSequence-time-major": case([node("ReverseSequence", ["x", "l"], "y")], {"x": away(4, 3, 2)},
                                       {"l": i64(4, 1, 3)}),
    "ReverseSequence-batch-major-lens-input": case([node("ReverseSequence", ["x", "l"], "y", batch_axis=0,
                                                         time_axis=1)], {"x": away(3, 5, 2), "l": i64(2, 5, 3)}),
    "Trilu-upper-default": unary("Trilu", away(2, 3, 4)),
    "Trilu-lower-negative-k": case([node("Trilu", ["x", "k"], "y", upper=0)], {"x": away(2, 4, 3)}, {"k": i64(-1)}),
    "Trilu-upper-k-input": case([node("Trilu", ["x", "k"], "y")], {"x": away(3, 5), "k": np.array(2, np.int64)}),
    "Expand": case([node("Expand", ["x", "s"], "y")], {"x": away(3, 1)}, {"s": i64(2, 3, 4)}),
    "Tile": case([node("Tile", ["x", "r"], "y")], {"x": away(2, 3)}, {"r": i64(2, 3)}),
    "Pad-constant": case([node("Pad", ["x", "p"], "y")], {"x": away(2, 3)}, {"p": i64(1, 0, 2, 3)}),
    "Pad-negative": case([node("Pad", ["x", "p"], "y")], {"x": away(4, 5)}, {"p": i64(-1, 2, 1, -2)}),
    "Pad-reflect": case([node("Pad", ["x", "p"], "y", mode="reflect")], {"x": away(1, 4, 5)},
                        {"p": i64(0, 2, 1, 0, 1, 2)}),
    "Pad-edge-axes": case([node("Pad", ["x", "p", "", "a"], "y", mode="edge")], {"x": away(2, 3)},
                          {"p": i64(2, 1), "a": i64(-1)}, opset=18),
    # CenterCropPad (opset 18): crops and zero pads by odd and even differences, an axis left as it is, on all axes or
    # the listed ones (static sizes, or a symbolic one: x's size read at run time)
    "CenterCropPad-all-axes-odd-symbolic": case([node("CenterCropPad", ["x", "s"], "y")], {"x": away(2, 5, 4)},
                                                {"s": i64(3, 2, 7)}, opset=18, sym={"x": ["N", 5, 4]}),
    "CenterCropPad-axes-even": case([node("CenterCropPad", ["x", "s"], "y", axes=[1, 2, 3])], {"x": away(1, 6, 3, 4)},
                                    {"s": i64(4, 3, 6)}, opset=18),
    "CenterCropPad-negative-axes-symbolic": case([node("CenterCropPad", ["x", "s"], "y", axes=[-1, -2])],
                                                 {"x": away(2, 3, 7, 4)}, {"s": i64(5, 4)}, opset=18,
                                                 sym={"x": ["N", 3, "H", 4]}),
    "Resize-linear-x2": case([node("Resize", ["x", "", "sc"], "y", mode="linear")], {"x": away(1, 2, 3, 4)},
                             {"sc": np.array([1, 1, 2, 2], np.float32)}),
    "Resize-linear-sizes-down": case([node("Resize", ["x", "", "", "sz"], "y", mode="linear")],
                                     {"x": away(1, 1, 6, 5)}, {"sz": i64(1, 1, 4, 3)}),
    "Resize-align-corners": case([node("Resize", ["x", "", "", "sz"], "y", mode="linear",
                                       coordinate_transformation_mode="align_corners")],
                                 {"x": away(1, 1, 3, 3)}, {"sz": i64(1, 1, 5, 7)}),
    "Resize-nearest": case([node("Resize", ["x", "", "sc"], "y", mode="nearest")], {"x": away(1, 2, 3, 3)},
                           {"sc": np.array([1, 1, 2, 3], np.float32)}),
    "Resize-nhwc-axes": case([node("Resize", ["x", "", "sc"], "y", mode="linear", axes=[1, 2])],
                             {"x": away(1, 3, 3, 2)}, {"sc": np.array([2, 2], np.float32)}, opset=19),
    # GridSample: every supported mode x padding x align_corners; opset 20 (linear, nearest) in float64, opset 16's
    # spellings (bilinear, nearest) in float32 (onnxruntime has no float64 kernel for GridSample-16)
    **{f"GridSample{op}-{mode}-{pad}-ac{ac}": grid_sample(mode, pad, ac, opset=op)
       for op, modes in ((20, ("linear", "nearest")), (16, ("bilinear", "nearest"))) for mode in modes
       for pad in ("zeros", "border", "reflection") for ac in (0, 1)},
    "GridSample16-default-attributes": case([node("GridSample", ["x", "g"], "y")],
                                            {"x": GS.standard_normal((1, 2, 3, 4)),
                                             "g": sample_points(1, 4, 2, 3, 4, 0)}, opset=16),
    "GridSample-symbolic-sizes": case([node("GridSample", ["x", "g"], "y", padding_mode="reflection")],
                                      {"x": GS.standard_normal((2, 2, 5, 3)), "g": sample_points(2, 2, 6, 5, 3, 0)},
                                      opset=20, sym={"x": ["N", 2, "H", "W"], "g": ["N", "h", "w", 2]}),
    "GridSample-constant-image": case([node("GridSample", ["x", "g"], "y", padding_mode="border", align_corners=1)],
                                      {"g": sample_points(2, 3, 3, 4, 4, 1)}, {"x": GS.standard_normal((2, 3, 4, 4))},
                                      opset=20),
    "GridSample-constant-grid": case([node("GridSample", ["x", "g"], "y")], {"x": GS.standard_normal((2, 3, 4, 4))},
                                     {"g": sample_points(2, 5, 5, 4, 4, 0)}, opset=20),
    # AffineGrid (opset 20): 2-D and 3-D, with and without align_corners; then a spatial transformer whose size
    # comes from the image's shape (symbolic batch), as the legacy exporter writes F.affine_grid at opset 20
    **{f"AffineGrid-{k}d-ac{ac}": case([node("AffineGrid", ["t", "s"], "y", align_corners=ac)],
                                       {"t": theta(2, k, k + 1)}, {"s": i64(2, 3, *[4, 3, 5][3 - k:])}, opset=20)
       for k in (2, 3) for ac in (0, 1)},
    "AffineGrid-GridSample-size-from-shape": case(
        [node("Shape", ["x"], "s"), node("AffineGrid", ["t", "s"], "g"),
         node("GridSample", ["x", "g"], "y", padding_mode="reflection", align_corners=1)],
        {"x": GS.standard_normal((2, 2, 4, 5)), "t": theta(2, 2, 3)}, opset=20, sym={"x": ["N", 2, 4, 5]}),
    # an opset-11 model (Softmax with 2-D coercion) is converted to opset 16 before differentiation
    "opset11-model": case([node("Conv", ["x", "w"], "c", pads=[1, 1, 1, 1]), node("Flatten", ["c"], "f"),
                           node("Softmax", ["f"], "y", axis=1)], {"x": away(2, 2, 3, 3)}, {"w": W(2, 2, 3, 3)},
                          opset=11),
    "tf2onnx-NHWC-block": tf2onnx_block(),
}


FT = np.random.default_rng(11)   # the DFT, Compress and RotaryEmbedding cases draw from their own generator


def dft(x, opset=20, n=None, axis=None, **attrs):
    """A DFT node: dft_length and (opset 20) the axis as scalar inputs, the axis an attribute before."""
    ins, inits = ["x", "" if n is None else "n"], {} if n is None else {"n": np.array(n, np.int64)}
    if axis is not None and opset >= 20:
        ins.append("a")
        inits["a"] = np.array(axis, np.int64)
    elif axis is not None:
        attrs["axis"] = axis
    return case([node("DFT", ins, "y", **attrs)], {"x": x}, inits, opset=opset)


# rfft, fft, ifft and irfft, real and complex signals, on the default, a negative, the batch and a middle axis, with
# dft_length padding or cropping the signal, the axis an input (opset 20) or an attribute (17)
CASES.update({
    "DFT-rfft-default-axis": dft(FT.standard_normal((2, 3, 6, 1)), onesided=1),
    "DFT-rfft-pad-odd": dft(FT.standard_normal((2, 5, 3, 1)), n=7, axis=1, onesided=1),
    "DFT-rfft-crop-17": dft(FT.standard_normal((2, 6, 3, 1)), opset=17, n=4, axis=1, onesided=1),
    "DFT-fft-complex-17": dft(FT.standard_normal((2, 5, 3, 2)), opset=17, axis=1),
    "DFT-fft-real-negative-axis": dft(FT.standard_normal((2, 4, 5, 1)), axis=-3),
    "DFT-fft-pad": dft(FT.standard_normal((2, 4, 5, 2)), n=7, axis=2),
    "DFT-fft-batch-axis": dft(FT.standard_normal((4, 3, 2)), axis=0),
    "DFT-ifft-complex-crop": dft(FT.standard_normal((2, 6, 3, 2)), n=5, axis=1, inverse=1),
    "DFT-ifft-real-17": dft(FT.standard_normal((3, 4, 1)), opset=17, axis=1, inverse=1),
    "DFT-irfft-even": dft(FT.standard_normal((2, 5, 3, 2)), n=8, axis=1, inverse=1, onesided=1),
    "DFT-irfft-odd": dft(FT.standard_normal((2, 5, 3, 2)), n=9, axis=1, inverse=1, onesided=1),
    "DFT-irfft-default-length-17": dft(FT.standard_normal((2, 5, 2)), opset=17, axis=1, inverse=1, onesided=1),
})


# Compress along an axis (a condition shorter than it, a negative axis) and over the flattened input
CASES.update({
    "Compress-axis-short-condition": case([node("Compress", ["x", "k"], "y", axis=1)],
                                          {"x": FT.standard_normal((2, 5, 3))},
                                          {"k": np.array([True, False, True, True], bool)}),
    "Compress-negative-axis": case([node("Compress", ["x", "k"], "y", axis=-1)], {"x": FT.standard_normal((2, 3, 4))},
                                   {"k": np.array([False, True, False, True], bool)}),
    "Compress-flattened": case([node("Compress", ["x", "k"], "y")], {"x": FT.standard_normal((2, 3))},
                               {"k": np.array([True, True, False, False, True], bool)}),
})


def col2im(channels, image, block, strides=(1, 1), dilations=(1, 1), pads=(0, 0, 0, 0)):
    """Col2Im (F.fold) of [2, C*K, L] blocks into an image, L the number of windows that geometry fits."""
    nsp = len(image)
    count = [(n + pads[i] + pads[nsp + i] - dl * (k - 1) - 1) // st + 1
             for i, (n, k, st, dl) in enumerate(zip(image, block, strides, dilations))]
    cols = FT.standard_normal((2, channels * int(np.prod(block)), int(np.prod(count))))
    return case([node("Col2Im", ["x", "image", "block"], "y", strides=list(strides), dilations=list(dilations),
                      pads=list(pads))], {"x": cols},
                {"image": np.array(image, np.int64), "block": np.array(block, np.int64)}, opset=18)


def shrink(**attrs):
    """Shrink with |x| at least 0.2 away from lambd (no kink within a step)."""
    lambd = attrs.get("lambd", 0.5)
    mag = np.where(FT.random((2, 3, 4)) < 0.5, FT.uniform(0.0, lambd - 0.2, (2, 3, 4)),
                   FT.uniform(lambd + 0.2, lambd + 1.0, (2, 3, 4)))
    return case([node("Shrink", ["x"], "y", **attrs)], {"x": FT.choice([-1.0, 1.0], size=(2, 3, 4)) * mag})


# Col2Im with overlapping windows (padded), strided and dilated ones with asymmetric pads, one spatial axis;
# Shrink as torch's hardshrink (no bias) and softshrink (bias = lambd)
CASES.update({
    "Col2Im-overlapping-padded": col2im(2, (4, 5), (3, 3), pads=(1, 1, 1, 1)),
    "Col2Im-strided-dilated": col2im(3, (7, 6), (2, 2), strides=(2, 1), dilations=(2, 2), pads=(1, 0, 0, 1)),
    "Col2Im-1d": col2im(2, (9,), (3,), strides=(2,), dilations=(1,), pads=(1, 1)),
    "Shrink-hard": shrink(lambd=0.5),
    "Shrink-soft": shrink(lambd=0.3, bias=0.3),
})


def rotary(shape, positions=True, **attrs):
    """RotaryEmbedding (opset 23) of x [B, S, heads * D] (num_heads given) or [B, heads, S, D], angles drawn per
    cache row; with position ids (a [6, r / 2] cache gathered at them) or without (a [B, S, r / 2] cache)."""
    b, s, d = shape[0], shape[-2] if len(shape) == 4 else shape[1], shape[-1] // attrs.get("num_heads", 1)
    half = attrs.get("rotary_embedding_dim", d) // 2
    theta = FT.uniform(-3, 3, (6, half) if positions else (b, s, half))
    inits = {"cos": np.cos(theta), "sin": np.sin(theta)}
    if positions:
        inits["pos"] = FT.integers(0, 6, (b, s)).astype(np.int64)
    return case([node("RotaryEmbedding", ["x", "cos", "sin", "pos" if positions else ""], "y", **attrs)],
                {"x": FT.standard_normal(shape)}, inits, opset=23)


# 3-D (heads in the hidden size) and 4-D inputs, halves or interleaved pairs, a partial rotary dim, no position ids
CASES.update({
    "RotaryEmbedding-3d-heads": rotary((2, 4, 3 * 6), num_heads=3),
    "RotaryEmbedding-4d-interleaved": rotary((2, 2, 4, 6), interleaved=1),
    "RotaryEmbedding-partial": rotary((2, 2, 3, 8), rotary_embedding_dim=4),
    "RotaryEmbedding-partial-interleaved-3d": rotary((1, 5, 2 * 8), num_heads=2, rotary_embedding_dim=4,
                                                     interleaved=1),
    "RotaryEmbedding-no-position-ids": rotary((2, 4, 2 * 4), positions=False, num_heads=2),
})


# ORT's float64 GroupNormalization computes in float32 (forward off by ~1e-7): check it in float32.
FLOAT32_ONLY = {"GroupNormalization-18", "GroupNormalization-21", "Celu"}   # Celu: onnxruntime has float only
# Shrink: onnxruntime's float64 kernel rounds through float32 (y off by ~6e-8, too coarse for a 1e-6 step).
FLOAT32_ONLY |= {name for name in CASES if name.startswith(("MeanVarianceNormalization", "RotaryEmbedding", "Shrink"))}
# Conv outputs feeding a ReLU-like kink are not kept away from 0 by the input sampling: use a smaller step.
SMALL_STEP = {"tf2onnx-NHWC-block"}


@pytest.mark.parametrize("name", list(CASES))
def test_rule_matches_finite_differences(name):
    gradcheck(CASES[name], dtypes=(np.float32,) if name in FLOAT32_ONLY else (np.float64, np.float32),
              h32=1e-3 if name in SMALL_STEP else 1e-2)


GUIDED_CASES = ["Relu", "LeakyRelu", "Clip-relu6", "HardSwish", "Gelu-erf", "Elu", "Selu", "Mish", "ThresholdedRelu",
                "Swish-alpha"]


@pytest.mark.parametrize("name", GUIDED_CASES)
@pytest.mark.parametrize("variant", ["guided", "deconvnet"])
def test_rectifier_variants_follow_their_definition(name, variant):
    """guided: f'(x) * max(g, 0); deconvnet: max(g, 0) (see autodiff_rules' docstring)."""
    from adcheck import session
    from onnxplain.kernels.autodiff import augment

    model, feeds, out = CASES[name](np.float32)
    seed = np.random.default_rng(1).standard_normal(session(model).run([out], feeds)[0].shape).astype(np.float32)
    std = augment(model, scores=out)
    var = augment(model, scores=out, rule=variant)
    g_pos = np.maximum(seed, 0)
    got = session(var).run(["x__grad"], {**feeds, "seed": seed})[0]
    if variant == "guided":
        want = session(std).run(["x__grad"], {**feeds, "seed": g_pos})[0]  # elementwise: f'(x) * relu(g)
    else:
        want = g_pos
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["ReduceL2", "LpNormalization", "LpPool", "GlobalLpPool-p2", "GlobalLpPool-p3"])
def test_norms_give_a_zero_gradient_where_the_norm_is_zero(op):
    """An all-zero row has a zero gradient (as torch's norm backward gives), not NaN; the other row is unchanged."""
    from adcheck import session
    from onnxplain.kernels.autodiff import augment

    attrs = {"ReduceL2": {"axes": [1]}, "LpNormalization": {"axis": 1}, "LpPool": {"kernel_shape": [4]},
             "GlobalLpPool-p2": {}, "GlobalLpPool-p3": {"p": 3}}[op]
    op = op.split("-")[0]
    x = np.stack([np.zeros(4), away(4)]).astype(np.float32)
    x = x[:, None] if op.endswith("LpPool") else x   # (N, C, L)
    model, feeds, out = case([node(op, ["x"], "y", **attrs)], {"x": x}, opset=13)(np.float32)
    seed = np.ones(session(model).run([out], feeds)[0].shape, np.float32)
    grad = session(augment(model, scores=out)).run(["x__grad"], {**feeds, "seed": seed})[0]
    assert np.isfinite(grad).all() and not grad[0].any() and grad[1].any()


def test_mean_variance_normalization_default_axes():
    """Without `axes` the statistics are over [0, 2, 3]. onnx's checker rejects such a node (the function body's
    Constant reads the absent attribute) though onnxruntime runs it, so this case is checked against finite differences
    here, without the checker that gradcheck runs."""
    from adcheck import finite_differences, rel, session
    from onnxplain.kernels.autodiff import augment

    model, feeds, out = case([node("MeanVarianceNormalization", ["x"], "y")], {"x": away(2, 3, 2, 3)},
                             opset=13)(np.float32)
    seed = np.random.default_rng(0).standard_normal((2, 3, 2, 3)).astype(np.float32)
    got = session(augment(model, scores=out)).run(["x__grad"], {**feeds, "seed": seed})[0]
    assert rel(got, finite_differences(session(model), feeds, out, seed, "x", 1e-2)) < 3e-3


@pytest.mark.parametrize("op", ["ScatterND", "ScatterElements"])
def test_scatter_max_shares_the_cotangent_among_ties(op):
    """Where data and updates tie for the max, each gets an equal share of g (torch's scatter_reduce amax does so)."""
    from adcheck import session
    from onnxplain.kernels.autodiff import augment

    idx = i64([1], [1], [2]) if op == "ScatterND" else i64(1, 1, 2)
    d, u = np.array([1.0, 2.0, 3.0]), np.array([2.0, 0.5, 3.0])   # position 1: d, u0 tie (u1 loses); 2: d, u2 tie
    model, feeds, out = case([node(op, ["d", "i", "u"], "y", reduction="max")], {"d": d, "u": u}, {"i": idx},
                             opset=18)(np.float64)
    seed = np.array([1.0, 2.0, 4.0])
    aug = augment(model, scores=out)
    got = dict(zip([o.name for o in aug.graph.output], session(aug).run(None, {**feeds, "seed": seed})))
    np.testing.assert_array_equal(got["d__grad"], [1.0, 1.0, 2.0])
    np.testing.assert_array_equal(got["u__grad"], [1.0, 0.0, 2.0])


@pytest.mark.parametrize("axes,keepdims", [([1], 1), ([0, 2], 0), (None, 0)])
def test_reduce_prod_gradient_where_x_has_zeros(axes, keepdims):
    """d prod / dx_i is the product of the other members of x_i's group: nonzero only at the zero of a group with exactly
    one zero, zero everywhere in a group with two or more, the plain product of the others elsewhere."""
    from adcheck import session
    from onnxplain.kernels.autodiff import augment

    x = away(3, 4, 2)
    x[0, 1, 0] = 0.0                                # groups with one zero ...
    x[2, 3, 1] = 0.0
    x[1, 0, :] = 0.0                                # ... and with two
    x[1, 2, 0] = 0.0
    attrs = {"keepdims": keepdims} | ({"axes": axes} if axes is not None else {})
    model, feeds, out = case([node("ReduceProd", ["x"], "y", **attrs)], {"x": x}, opset=13)(np.float64)
    seed = R.standard_normal(session(model).run([out], feeds)[0].shape)
    got = session(augment(model, scores=out)).run(["x__grad"], {**feeds, "seed": seed})[0]

    red = range(3) if axes is None else axes
    want = np.empty_like(x)
    for i in np.ndindex(x.shape):   # the group of x[i] with x[i] itself set to 1, multiplied out
        group = x[tuple(slice(None) if a in red else i[a] for a in range(3))].copy()
        group[tuple(i[a] for a in red)] = 1.0
        at = tuple(0 if a in red else i[a] for a in range(3)) if keepdims else tuple(i[a] for a in range(3) if a not in red)
        want[i] = seed[at] * np.prod(group)
    zero = x == 0   # the cases occur: a lone zero gets a gradient, a group with two zeros gets none
    assert ((zero & (want != 0)).any() or axes is None) and (zero & (want == 0)).any() and (~zero & (want == 0)).any()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


def _mirror(v, lo, hi):
    """The ONNX reference's reflection of one coordinate into [lo, hi] (GridSample._gs_reflect)."""
    span = hi - lo
    if lo <= v <= hi:
        return v
    d = lo - v if v < lo else v - hi
    n = int(d / span)
    r = d - n * span
    return (lo + r if n % 2 == 0 else hi - r) if v < lo else (hi - r if n % 2 == 0 else lo + r)


@pytest.mark.parametrize("pad", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("corners", [0, 1])
def test_grid_sample_nearest_sends_g_to_the_rounded_pixel(pad, corners):
    """Nearest GridSample's dX against numpy: each point's g is added at the pixel its unnormalised coordinates round
    to, half to even (onnxruntime's std::nearbyint: the grid holds exact ties), then clipped (border) or mirrored
    (reflection), nowhere when off the image (zeros); points that share a pixel add up. The forward reads those very
    pixels, and the grid gets a zero gradient."""
    from adcheck import session
    from onnxplain.kernels.autodiff import augment

    h, w = (5, 3) if corners else (4, 8)   # sizes whose unnormalisation is exact, so the ties stay ties
    u = GS.integers(-4 * np.array([w, h]), 6 * np.array([w, h]), (2, 6, 7, 2)) * 0.5   # multiples of 0.5
    sizes = np.array([w, h], np.float64)
    g = 2 * u / (sizes - 1) - 1 if corners else (2 * u + 1) / sizes - 1
    x = GS.standard_normal((2, 3, h, w))
    model, feeds, out = case([node("GridSample", ["x", "g"], "y", mode="nearest", padding_mode=pad,
                                   align_corners=corners)], {"x": x, "g": g}, opset=20)(np.float64)
    lo, hi = (np.zeros(2), sizes - 1) if corners else (np.full(2, -0.5), sizes - 0.5)
    idx = np.rint(u)
    assert ((u % 1 == 0.5) & (idx != np.floor(u + 0.5))).any()   # ties that half-away-from-zero would round up
    if pad == "border":
        idx = np.clip(idx, 0, sizes - 1)
    elif pad == "reflection":
        idx = np.array([[_mirror(v, lo[a], hi[a]) for a, v in enumerate(pt)]
                        for pt in idx.reshape(-1, 2)]).reshape(idx.shape)
    on = ((idx >= 0) & (idx <= sizes - 1)).all(-1)
    ix, iy = (np.clip(idx[..., a], 0, sizes[a] - 1).astype(int) for a in (0, 1))
    n = np.arange(2)[:, None, None, None]
    ch = np.arange(3)[None, :, None, None]
    seed = GS.standard_normal((2, 3, 6, 7))
    want = np.zeros_like(x)
    np.add.at(want, (n, ch, iy[:, None], ix[:, None]), seed * on[:, None])
    aug = augment(model, scores=out)
    y, dx, dg = session(aug).run([out, "x__grad", "g__grad"], {**feeds, "seed": seed})
    np.testing.assert_array_equal(y, x[n, ch, iy[:, None], ix[:, None]] * on[:, None])
    np.testing.assert_allclose(dx, want, rtol=0, atol=1e-12)
    assert not dg.any() and dg.shape == g.shape


@pytest.mark.parametrize("opset,mode", [(20, "cubic"), (16, "bicubic")])
def test_grid_sample_cubic_is_refused_by_name(opset, mode):
    from onnxplain.kernels.autodiff import AutodiffError, augment

    model, _, out = case([node("GridSample", ["x", "g"], "y", mode=mode)],
                         {"x": GS.standard_normal((1, 2, 4, 4)), "g": sample_points(1, 2, 2, 4, 4, 0)},
                         opset=opset)(np.float32)
    with pytest.raises(AutodiffError, match=f"GridSample node .*mode='{mode}' is not supported"):
        augment(model, scores=out)


def test_volumetric_grid_sample_is_refused_by_name():
    from onnxplain.kernels.autodiff import AutodiffError, augment

    model, _, out = case([node("GridSample", ["x", "g"], "y")], {"x": GS.standard_normal((1, 2, 3, 4, 4)),
                                                                 "g": GS.uniform(-1, 1, (1, 2, 2, 2, 3))},
                         opset=20)(np.float32)
    with pytest.raises(AutodiffError, match="GridSample node .*volumetric"):
        augment(model, scores=out)


@pytest.mark.parametrize("bins,n", [(6, 6), (3, 8)])
def test_irfft_of_a_half_spectrum_of_another_length_is_refused(bins, n):
    """numpy crops or zero-pads such a spectrum to n // 2 + 1 bins, onnxruntime mirrors other bins: no rule picks one."""
    from onnxplain.kernels.autodiff import AutodiffError, augment

    model, _, out = dft(np.ones((2, bins, 2)), n=n, axis=1, inverse=1, onesided=1)(np.float32)
    with pytest.raises(AutodiffError, match=f"DFT node .*needs {n // 2 + 1} bins, not {bins}"):
        augment(model, scores=out)
