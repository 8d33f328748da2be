"""Gradient checks of augmented graphs against central finite differences on onnxruntime.

A case is built in float64; when onnxruntime's CPU provider lacks a float64 kernel for one of its ops the
same case runs in float32 (with a larger step and tolerance). Both the forward used for finite differences
and the augmented graph run on onnxruntime, the runtime the service uses.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from onnxplain.kernels.autodiff import augment



def node(op, ins, outs, **attrs):
    return helper.make_node(op, ins, outs if isinstance(outs, list) else [outs], **attrs)


def make_model(nodes, inputs: dict, inits: dict = (), out="y", opset=17, dtype=np.float64, sym=None):
    """inputs: name -> array (float ones are cast to dtype). sym: name -> dims with str entries."""
    tdt = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = dict(inits or {})

    def cast(a):
        a = np.asarray(a)
        return a.astype(dtype) if a.dtype == np.float64 else a  # float32 arrays (Resize scales) stay

    vis = []
    for name, arr in inputs.items():
        arr = cast(arr)
        shape = (sym or {}).get(name, list(arr.shape))
        vis.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype), shape))
    init_protos = [numpy_helper.from_array(cast(v), k) for k, v in inits.items()]
    outs = out if isinstance(out, list) else [out]
    graph = helper.make_graph(nodes, "case", vis, [helper.make_tensor_value_info(o, tdt, None) for o in outs],
                              init_protos)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    inferred = {o.name: o for o in onnx.shape_inference.infer_shapes(model).graph.output}
    for o in model.graph.output:
        o.CopyFrom(inferred[o.name])
        if not o.type.tensor_type.HasField("shape"):  # onnx infers no shape for a few ops (GroupNormalization)
            feeds = {k: cast(v) for k, v in inputs.items()}
            y = session(model).run([o.name], feeds)[0]
            o.CopyFrom(helper.make_tensor_value_info(o.name, tdt, list(y.shape)))
    return model


def session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def assert_standard(model, checker=True):
    if checker:
        onnx.checker.check_model(model, full_check=True)
    bad = {(n.domain, n.op_type) for n in model.graph.node if n.domain not in ("", "ai.onnx")}
    assert not bad, f"non-standard ops: {bad}"


def finite_differences(sess, feeds, out, seed, wrt, h):
    x0 = feeds[wrt]
    grad = np.zeros(x0.shape, np.float64)
    flat = grad.reshape(-1)
    for i in range(x0.size):
        vals = []
        for sgn in (1, -1):
            x = x0.copy()
            x.reshape(-1)[i] += sgn * h
            y = sess.run([out], {**feeds, wrt: x})[0]
            vals.append(np.sum(seed.astype(np.float64) * y.astype(np.float64)))
        flat[i] = (vals[0] - vals[1]) / (2 * h)
    return grad


def gradcheck(build, rule="standard", tol64=1e-6, tol32=3e-3, h32=1e-2, rng_seed=0,
              dtypes=(np.float64, np.float32)):
    """build(dtype) -> (model, feeds, out). Checks every float input's gradient; returns the dtype used."""
    for dtype in dtypes:
        model, feeds, out = build(dtype)
        try:
            fwd = session(model)
            aug = augment(model, scores=out, rule=rule)
            asess = session(aug)
        except Exception as e:  # noqa: BLE001 - only a missing float64 kernel sends us to float32
            if dtype == np.float64 and "NOT_IMPLEMENTED" in str(e):
                continue
            raise
        try:
            onnx.checker.check_model(model, full_check=True)
        except onnx.checker.ValidationError:  # e.g. GroupNormalization-18, deprecated yet run by ORT
            assert_standard(aug, checker=False)
        else:
            assert_standard(aug)
        y = fwd.run([out], feeds)[0]
        seed = np.random.default_rng(rng_seed).standard_normal(y.shape).astype(y.dtype)
        names = [o.name for o in aug.graph.output]
        res = dict(zip(names, asess.run(None, {**feeds, "seed": seed})))
        np.testing.assert_allclose(res[out], y, rtol=1e-6, atol=1e-6)
        for name, arr in feeds.items():
            if arr.dtype.kind != "f":
                continue
            h, tol = (1e-6, tol64) if dtype == np.float64 else (h32, tol32)
            fd = finite_differences(fwd, feeds, out, seed, name, h)
            got = res[f"{name}__grad"]
            assert got.shape == arr.shape, (got.shape, arr.shape)
            err = rel(got, fd)
            assert err < tol, f"{name}: relative error {err:.2e} ({np.dtype(dtype).name})"
        return dtype
    raise AssertionError("unreachable")
