"""Micro-benchmarks (pytest-benchmark): forward, backward and full training step of the residual MLP stack per
backend and backward mode, next to the plain eager loop, over depth L ∈ {16, 64, 256, 1024} and two widths.

    python -m pytest bench/test_micro.py --benchmark-only -rs
    python -m pytest bench/test_micro.py --benchmark-only -rs -k "step and L1024" --benchmark-json=out.json

Phases: forward (a training forward: autograd on, whatever backward needs is stored), backward (the backward
of one forward, repeated with retain_graph=True), step (both; the loss is (1/B) Σ ‖x_L − y‖², gradients w.r.t.
W and V). Implementations: "eager" (bench.contenders.eager_backprop) and "<backend>-<mode>" for every backend
and mode backprop, adjoint, anchored (adjoint with anchor_every = round(√L)).

CPU: B = 256, (q, m) ∈ {(16, 32), (64, 128)}. CUDA: B = 4096, (q, m) ∈ {(64, 128), (256, 512)}; each timed
call ends with a synchronize, and the same callable is also timed with bench.timing.median_ms (Triton's
do_bench, CUDA events), stored in the benchmark's extra_info["median_ms"]. A backend that cannot run here is a
skipped test whose reason `-rs` prints. Results are grouped by phase, depth and width, so each group of
pytest-benchmark's table compares the implementations side by side. `make test` does not collect this file:
it runs pytest on tests/ only.
"""

import pytest
import torch

from bench.contenders import Sizes, eager_backprop, problem_tensors, sqrt_depth, training_loss
from bench.timing import median_ms
from odenets_fast import available_backends, ode_mlp
from odenets_fast.backends import BACKEND_NAMES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH = {"cpu": 256, "cuda": 4096}[DEVICE.type]
WIDTHS = {"cpu": [(16, 32), (64, 128)], "cuda": [(64, 128), (256, 512)]}[DEVICE.type]
DEPTHS = [16, 64, 256, 1024]
MODES = ("backprop", "adjoint", "anchored")
IMPLEMENTATIONS = ["eager"] + [f"{backend}-{mode}" for backend in BACKEND_NAMES for mode in MODES]
PHASES = ("forward", "backward", "step")
BACKEND_STATUS = available_backends()


def _rounds(depth: int) -> int:
    """More rounds for short calls; at least 3 so that the median means something."""
    return max(3, min(20, 1024 // depth))


def _forward_or_skip(implementation: str):
    if implementation == "eager":
        return eager_backprop
    backend, mode = implementation.split("-")
    if BACKEND_STATUS[backend] != "available":
        pytest.skip(BACKEND_STATUS[backend])
    if backend == "triton" and DEVICE.type != "cuda":
        pytest.skip("the Triton kernels are timed on a CUDA device only (on the CPU they run in Triton's interpreter)")
    if backend == "cpp" and DEVICE.type != "cpu":
        pytest.skip("backend 'cpp' runs on CPU tensors only")
    backward = "backprop" if mode == "backprop" else "adjoint"

    def forward(x, W, V, _backend):
        anchor_every = sqrt_depth(W.shape[0]) if mode == "anchored" else None
        return ode_mlp(x, W, V, method="euler", activation="gelu", backward=backward, anchor_every=anchor_every,
                       backend=backend)  # fmt: skip

    return forward


def _synchronized(fn):
    if DEVICE.type != "cuda":
        return fn

    def call():
        fn()
        torch.cuda.synchronize(DEVICE)

    return call


@pytest.mark.parametrize("width", WIDTHS, ids=lambda w: f"q{w[0]}-m{w[1]}")
@pytest.mark.parametrize("depth", DEPTHS, ids=lambda L: f"L{L}")
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("phase", PHASES)
def test_micro(benchmark, phase, implementation, depth, width):
    forward = _forward_or_skip(implementation)
    x, y, W, V = problem_tensors(Sizes(BATCH, *width), depth, DEVICE)

    def run_forward():
        return training_loss(forward(x, W, V, None), y)

    loss = run_forward() if phase == "backward" else None  # one graph, differentiated again at every round
    call = {
        "forward": run_forward,
        "backward": lambda: torch.autograd.grad(loss, (W, V), retain_graph=True),
        "step": lambda: torch.autograd.grad(run_forward(), (W, V)),
    }[phase]
    fn = _synchronized(call)
    benchmark.group = f"{phase} L={depth} q={width[0]} m={width[1]} B={BATCH} {DEVICE.type}"
    if DEVICE.type == "cuda":
        benchmark.extra_info["median_ms"] = median_ms(fn, DEVICE)
    benchmark.pedantic(fn, rounds=_rounds(depth), warmup_rounds=1)
