"""Session fixtures over tests/zoo.py: each zoo net exported once and reused (see zoo.py's docstring).

Exports live in pytest's cache (``.pytest_cache/d/onnxplain-zoo-<digest>``), keyed by a digest of zoo.py and the
torch version, so a second run reuses them; ``pytest --cache-clear`` or a change to zoo.py re-exports.
Use from a conftest.py in your test directory::

    import sys, pathlib
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from zoo_plugin import zoo_dir, zoo_model  # noqa: F401
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo  # noqa: E402


@pytest.fixture(scope="session")
def zoo_dir(request, tmp_path_factory) -> Path:
    override = os.environ.get("ONNXPLAIN_ZOO_DIR")
    if override:
        return Path(override)
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider: export once per run
    if cache is None:
        return tmp_path_factory.mktemp("onnxplain-zoo")
    return Path(cache.mkdir(f"onnxplain-zoo-{zoo.source_digest()}"))


@pytest.fixture(scope="session")
def zoo_model(zoo_dir):
    """zoo_model(name, exporter) -> path of the exported .onnx (exported on first use in this session)."""

    def get(name: str, exporter: str) -> str:
        return zoo.export(name, exporter, zoo_dir)

    return get
