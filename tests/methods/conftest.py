"""Fixtures for method tests: the zoo of torch-defined nets exported to ONNX (see tests/zoo.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo_plugin import zoo_dir, zoo_model  # noqa: E402,F401  (session fixtures)
