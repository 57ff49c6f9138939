import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: naive.py and the shared conftest helpers

if not torch.cuda.is_available():
    pytest.exit("tests/gpu needs a CUDA device (run them with `make gpu` on a GPU machine)", returncode=1)
