import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo_plugin import zoo_dir, zoo_model  # noqa: E402,F401  (session fixtures)

torch.set_num_threads(1)
