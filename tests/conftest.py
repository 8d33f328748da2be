"""Shared fixtures: the shared real material (../shared), and real gRPC servers on loopback.

Servers are started once per test session (in this process, on a free loopback port) and shared by the tests
that only read from them; tests that need other limits start their own with `start_server`.
"""

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


@pytest.fixture(scope="session")
def server():
    """The shipped default model (`shapes`) and, when ../shared exists, `efficientnet`."""
    models = [default_model_config()] + ([efficientnet_config()] if EFFICIENTNET.exists() else [])
    srv = start_server(models, max_batch=32, max_concurrent_jobs=2, max_queued_jobs=8)
    yield srv
    srv.stop(0)


@pytest.fixture(scope="session")
def client(server):
    from onnxplain.client import Client

    with Client(server.address, timeout=120) as c:
        yield c
