"""Layer tensors as maps: every CAM-style method reads a layer's activations (and gradients) as K maps over
the layer's grid, whatever the layer's layout — NCHW, NHWC (tf2onnx) or transformer tokens N x T x C whose
prefix tokens (CLS, distillation) are dropped and whose grid comes from layer discovery (kernels.graph)."""

from __future__ import annotations

import numpy as np


def as_maps(tensor: np.ndarray, layer) -> np.ndarray:
    """[N, ...] layer tensor -> [N, K, h, w] channel maps."""
    if layer.kind == "spatial":
        return tensor
    if layer.kind == "spatial_nhwc":
        return tensor.transpose(0, 3, 1, 2)
    if layer.kind == "tokens":
        h, w = layer.grid
        tokens = tensor[:, layer.prefix_tokens:layer.prefix_tokens + h * w]
        if tokens.shape[1] != h * w:
            raise ValueError(f"layer {layer.name} has {tensor.shape[1]} tokens; expected {layer.prefix_tokens} "
                             f"prefix + {h}x{w} grid tokens")
        return tokens.reshape(tensor.shape[0], h, w, tensor.shape[2]).transpose(0, 3, 1, 2)
    raise ValueError(f"layer {layer.name} of kind {layer.kind!r} has no spatial structure")


def from_maps(maps: np.ndarray, layer, like: np.ndarray) -> np.ndarray:
    """The inverse of as_maps into a tensor shaped like `like` (prefix tokens of token layers keep `like`'s
    values): used to feed modified activations (e.g. ablated channels) back into the model's head."""
    if layer.kind == "spatial":
        return maps.astype(like.dtype)
    if layer.kind == "spatial_nhwc":
        return maps.transpose(0, 2, 3, 1).astype(like.dtype)
    h, w = layer.grid
    out = np.broadcast_to(like, (maps.shape[0], *like.shape[1:])).copy()
    out[:, layer.prefix_tokens:layer.prefix_tokens + h * w] = maps.transpose(0, 2, 3, 1).reshape(maps.shape[0], h * w, -1)
    return out


def one_hot(targets: np.ndarray, num_classes: int) -> np.ndarray:
    """[T, classes] seed rows: one forward+backward per target, all targets in one batch."""
    seed = np.zeros((len(targets), num_classes), np.float32)
    seed[np.arange(len(targets)), targets] = 1.0
    return seed


def repeated(batch: np.ndarray, times: int) -> np.ndarray:
    """The batch stacked `times` times along axis 0 (row r * len(batch) + i is batch[i]), e.g. one copy per
    target; the batch itself, not a copy, when times == 1."""
    return batch if times == 1 else np.tile(batch, (times, *[1] * (batch.ndim - 1)))
