"""numpy <-> `onnxplain.v1.Tensor`: dtype + shape + raw little-endian bytes. Shared by server and client."""

from __future__ import annotations

import numpy as np

from onnxplain.v1 import tensor_pb2

DTYPES = {
    tensor_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DTYPE_FLOAT64: np.dtype("<f8"),
    tensor_pb2.DTYPE_UINT8: np.dtype("u1"),
    tensor_pb2.DTYPE_INT32: np.dtype("<i4"),
    tensor_pb2.DTYPE_INT64: np.dtype("<i8"),
    tensor_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
}
_CODES = {dt.newbyteorder("<") if dt.itemsize > 1 else dt: code for code, dt in DTYPES.items()}

MAX_DIMS = 8
# A Tensor's bytes travel in one protobuf message (< 2 GiB), so no real tensor holds more elements than this. The
# cap also bounds shapes whose zero dimension makes the byte count 0 however large the others are: numpy cannot
# make an array whose non-zero dimensions multiply past its index range ([2^62, 2^62, 0]).
MAX_ELEMENTS = 2 ** 31 - 1


class TensorError(ValueError):
    """A Tensor message that does not describe an array."""


def to_proto(array: np.ndarray) -> tensor_pb2.Tensor:
    array = np.asarray(array)
    dtype = array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype
    if dtype not in _CODES:
        raise TensorError(f"dtype {array.dtype} cannot travel as a Tensor")
    return tensor_pb2.Tensor(dtype=_CODES[dtype], shape=list(array.shape),
                             data=np.ascontiguousarray(array, dtype=dtype).tobytes())


def from_proto(tensor: tensor_pb2.Tensor, field: str = "tensor") -> np.ndarray:
    """The array a Tensor describes; TensorError naming `field` when dtype, shape and bytes disagree."""
    if tensor.dtype not in DTYPES:
        raise TensorError(f"{field}.dtype must be one of {sorted(tensor_pb2.DType.Name(c) for c in DTYPES)}, "
                          f"got {tensor.dtype}")
    shape = list(tensor.shape)
    if len(shape) > MAX_DIMS:
        raise TensorError(f"{field}.shape has {len(shape)} dimensions; at most {MAX_DIMS} are allowed")
    if any(d < 0 for d in shape):
        raise TensorError(f"{field}.shape must have dimensions >= 0, got {shape}")
    nonzero = 1
    for d in shape:
        nonzero *= d or 1
    if nonzero > MAX_ELEMENTS:
        raise TensorError(f"{field}.shape {shape} is too large: its non-zero dimensions must multiply to at most "
                          f"{MAX_ELEMENTS} elements")
    dtype = DTYPES[tensor.dtype]
    count = 0 if 0 in shape else nonzero
    if count * dtype.itemsize != len(tensor.data):
        raise TensorError(f"{field}.data has {len(tensor.data)} bytes; shape {shape} of "
                          f"{tensor_pb2.DType.Name(tensor.dtype)} needs {count * dtype.itemsize}")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
