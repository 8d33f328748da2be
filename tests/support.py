"""Helpers shared by the tests (imported as `support`; tests/ is on sys.path via tests/conftest.py)."""

from __future__ import annotations

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
EFFICIENTNET = SHARED / "models" / "efficientnet_lite0_imagenet.onnx"
IMAGENET_LABELS = SHARED / "models" / "imagenet_labels.txt"
SHARED_IMAGES = sorted((SHARED / "images").glob("*.jpg"))
EFFICIENTNET_PREPROCESSING = {"fit": "center_crop", "scale": 1.0, "mean": [127.5] * 3, "std": [128.0] * 3}

needs_shared = pytest.mark.skipif(not EFFICIENTNET.exists(), reason="../shared (real model and photos) is absent")


def efficientnet_config():
    from onnxplain.server.config import ModelConfig

    return ModelConfig("efficientnet", EFFICIENTNET, IMAGENET_LABELS, "EfficientNet-Lite0, ImageNet-1k",
                       dict(EFFICIENTNET_PREPROCESSING))


def default_model_config():
    from onnxplain.server import config

    return config.load(None).models[0]


def start_server(models, **limits):
    """A real server on a free loopback port; the caller stops it."""
    from onnxplain.server.config import Limits, ServerConfig
    from onnxplain.server.main import Server

    return Server(ServerConfig(host="127.0.0.1", port=0, limits=Limits(**limits), models=tuple(models))).start()
