"""Both paths of the Triton backend on the GPU: accuracy against the float64 reference on the same GPU
(the first thing a short GPU run checks: `make gpu-quick`), and what the layered path promises —
reproducible, CUDA-graph capturable, memory flat in depth, PyTorch's precision policy."""

import pytest
import torch
import triton

from gpu_helpers import CUDA, assert_graph_replays_bitwise, assert_no_worse_than_eager, peak_step_bytes, rel, run_grads
from helpers import make_stack
from odenets_fast import ode_mlp, plan
from odenets_fast.planner import PATH_ENV, PATHS
from odenets_fast.triton_backend import kernel_configs, weight_grad_reduction
from odenets_fast.triton_kernels.mlp_step import reverse_programs
from odenets_fast.triton_layered import tf32_context

SHAPE = dict(B=1000, q=100, m=300, L=8)  # the other GPU tests' shape: their compiled kernels are reused
NARROW_GOAL = dict(B=16384, q=64, m=128)  # bench.triton_step's narrow goal configurations (at fewer layers)


def _stack(method, dtype=torch.float64, bias=True, **shape):
    """x, W, V (and b, c with `bias`) on the GPU."""
    shape = {**SHAPE, **shape}
    return [t.to(CUDA) for t in make_stack(method=method, bias=bias, v_scale=0.5, dtype=dtype, **shape) if t is not None]


@pytest.mark.parametrize("backward, anchor_every", [("backprop", None), ("adjoint", 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("path", PATHS)
def test_path_matches_float64_reference(path, method, dtype, backward, anchor_every, monkeypatch):
    """float32 (IEEE products) to 1e-5 of the float64 reference in the same backward mode; bfloat16 no
    worse than twice the error of the eager loop run in bfloat16 (flash-attention's yardstick)."""
    monkeypatch.setenv(PATH_ENV, path)
    tensors64 = _stack(method)
    grad_out = torch.randn(SHAPE["B"], SHAPE["q"], device=CUDA, dtype=torch.float64)
    kw = dict(method=method, backward=backward, anchor_every=anchor_every)
    if dtype != torch.float32:
        assert_no_worse_than_eager(tensors64, grad_out, dtype, **kw)
        return
    oracle = run_grads(lambda *t: ode_mlp(*t, backend="reference", **kw), tensors64, grad_out)
    ours = run_grads(lambda *t: ode_mlp(*t, backend="triton", input_precision="ieee", **kw), [t.float() for t in tensors64],
                     grad_out)  # fmt: skip
    for o, want in zip(ours, oracle):
        assert rel(o, want) < 1e-5


@pytest.mark.parametrize("dtype, precision", [(torch.bfloat16, "ieee"), (torch.float32, "tf32")], ids=["bf16", "tf32"])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_fused_path_at_the_narrow_goal_shape(method, dtype, precision, monkeypatch):
    """The kernels the narrow goals time, checked before they are timed: tensor-core products on 64-row
    tiles and persistent reverse programs that each take several batch tiles into their partial rows
    (at the shapes above every program has one tile); no worse than twice the error of the eager loop in
    the same precision."""
    monkeypatch.setenv(PATH_ENV, "fused")
    B, q, m = NARROW_GOAL["B"], NARROW_GOAL["q"], NARROW_GOAL["m"]
    block_b = kernel_configs(q, m, dtype.itemsize).reverse.block_b
    assert weight_grad_reduction(True, B, q, m, block_b) == "partials"  # the goals' reduction
    sms = torch.cuda.get_device_properties(CUDA).multi_processor_count
    assert triton.cdiv(B, block_b) > reverse_programs(B, block_b, sms)  # later tiles add into partial rows
    grad_out = torch.randn(B, q, device=CUDA, dtype=torch.float64)
    # as the goals run it (ode_mlp's defaults: no biases, gelu), at L = 16: depths divisible by 16, as 256 is,
    # get the same integer specialisation
    tensors64 = _stack(method, bias=False, L=16, **NARROW_GOAL)
    assert_no_worse_than_eager(tensors64, grad_out, dtype, precision, method=method, backward="adjoint")


def test_layered_follows_pytorch_tf32_setting(monkeypatch):
    """input_precision=None: TF32 products exactly when PyTorch's setting asks for them — visible as
    TF32's larger error against the float64 reference — and full float32 otherwise."""
    monkeypatch.setenv(PATH_ENV, "layered")
    tensors64 = _stack("euler")
    grad_out = torch.randn(SHAPE["B"], SHAPE["q"], device=CUDA, dtype=torch.float64)
    oracle = run_grads(lambda *t: ode_mlp(*t, backend="reference"), tensors64, grad_out)
    errors = {}
    for setting in ("ieee", "tf32"):
        with tf32_context(setting, CUDA):
            got = run_grads(lambda *t: ode_mlp(*t, backend="triton"), [t.float() for t in tensors64], grad_out)
        errors[setting] = max(rel(g, w) for g, w in zip(got, oracle))
    assert errors["ieee"] < 1e-5 < errors["tf32"], errors


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_layered_step_replays_from_a_cuda_graph_bitwise(method, monkeypatch):
    """No host synchronisation: a whole adjoint training step captures in a CUDA graph, and replayed on
    new inputs gives the launched step's gradients bit for bit (full-batch GEMMs, fixed-order sums)."""
    monkeypatch.setenv(PATH_ENV, "layered")
    x, W, V, b, c = _stack(method, dtype=torch.float32, B=300, q=48, m=96, L=5)
    params = [t.requires_grad_(True) for t in (W, V, b, c)]
    static_x, static_grad = torch.zeros_like(x), torch.zeros_like(x)

    def step():
        return torch.autograd.grad(ode_mlp(static_x, *params, method=method, backend="triton"), params, static_grad)

    assert_graph_replays_bitwise(step, (static_x, static_grad))


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_layered_adjoint_peak_memory_does_not_grow_with_depth(method, monkeypatch):
    monkeypatch.setenv(PATH_ENV, "layered")
    shallow, deep = peak_step_bytes(8, method, "adjoint"), peak_step_bytes(64, method, "adjoint")
    assert deep <= 1.05 * shallow + 2**20, (shallow, deep)
    grows = peak_step_bytes(64, method, "backprop") - peak_step_bytes(8, method, "backprop")
    assert grows >= 56 * 4096 * 256 * 4  # backprop's does grow by the stored states: the test can fail


def test_plan_of_the_live_device():
    """The planner models this GPU (by name, or approximately from its SM count) and names a path."""
    result = plan(4096, 256, 512, 64, device=CUDA)
    assert result.path in PATHS and result.estimates["layered"].step_ms > 0
    name = torch.cuda.get_device_name(CUDA)
    known = [model for model in ("H100", "H200") if model in name]
    assert result.device == known[0] if known else "approximate" in result.device
