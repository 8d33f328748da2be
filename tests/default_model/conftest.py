"""Shared pieces for the default-model tests: the shipped ONNX model run the way the server runs it."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

MODEL_DIR = Path(__file__).resolve().parents[2] / "onnxplain" / "default_model"

# Held-out seeds, disjoint from those train.py uses (999_980 .. 1_500_019 and 4242 .. 4245):
# see its docstring.
HELD_OUT_SEED = 31_337
OCCLUSION_SEED = 27_182
SALIENCY_SEED = 16_180


def preprocess(images: np.ndarray, spec: dict, size: int) -> np.ndarray:
    """uint8 NHWC RGB -> float32 NCHW with the declared preprocessing ('stretch': bilinear resize)."""
    assert spec["fit"] == "stretch" and spec["channel_order"] == "RGB"
    if images.shape[1:3] != (size, size):
        images = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
                           for im in images])
    x = images.astype(np.float32) * np.float32(spec["scale"])
    x = (x - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


class Classifier:
    def __init__(self, model_dir: Path):
        import onnxruntime as ort

        self.config = tomllib.loads((model_dir / "model.toml").read_text())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        self.session = ort.InferenceSession(str(model_dir / self.config["path"]), opts,
                                            providers=["CPUExecutionProvider"])
        self.size = self.session.get_inputs()[0].shape[2]

    def logits(self, images: np.ndarray, batch: int = 256) -> np.ndarray:
        x = preprocess(images, self.config["preprocessing"], self.size)
        return np.concatenate([self.session.run(["logits"], {"input": x[i:i + batch]})[0]
                               for i in range(0, len(x), batch)])


@pytest.fixture(scope="session")
def classifier() -> Classifier:
    return Classifier(MODEL_DIR)
