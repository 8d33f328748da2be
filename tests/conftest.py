"""Shared fixtures: the shared real material (../shared), and real gRPC servers on loopback.

Servers are started once per test session (in this process, on a free loopback port) and shared by the tests
that only read from them; tests that need other limits start their own with `start_server`.
"""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from support import default_model_config, efficientnet_config, EFFICIENTNET, start_server  # noqa: E402


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
