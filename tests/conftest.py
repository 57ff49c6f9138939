import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter. The variable is
# read when the kernels are decorated, so it must be set before odenets_fast.triton_kernels loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# torch.compile's on-disk caches key a compiled graph by the graph, not by the custom ops' fake implementations:
# a graph compiled against an older fake (other output strides) would be reused, and the tests would check it
# rather than this code.
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    # Tests choose backends explicitly; a developer's ODENETS_FAST_BACKEND must not leak in.
    monkeypatch.delenv("ODENETS_FAST_BACKEND", raising=False)
