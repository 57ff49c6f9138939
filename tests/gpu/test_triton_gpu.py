"""GPU tests of the Triton backend's fused kernels (run by `make gpu`; `make test` covers the same
kernels under the interpreter; tests/gpu/test_paths_gpu.py the layered path and both paths' accuracy).
Low-precision results are judged against a same-dtype PyTorch run: the kernel's error against a
float64 oracle may be at most twice that of the plain eager loop in that dtype."""

import math

import pytest
import torch

from gpu_helpers import CUDA, assert_graph_replays_bitwise, assert_no_worse_than_eager, peak_step_bytes, rel, run_grads
from helpers import activation_through_stack, make_stack, special_values
from odenets_fast import ode_mlp
from odenets_fast.activations import ACTIVATIONS
from odenets_fast.planner import PATH_ENV
from odenets_fast.triton_backend import GRAD_BUFFER_ENV, WEIGHT_GRADS_ENV, backward_layers_per_launch, kernel_configs
from odenets_fast.triton_kernels.mlp_step import GradSections, reverse_programs

@pytest.fixture(autouse=True)
def _fused_path(monkeypatch):
    """These tests are about the fused kernels: not whatever path the planner picks for their shapes."""
    monkeypatch.setenv(PATH_ENV, "fused")


def _use_reduction(grads: str, monkeypatch) -> dict:
    """ode_mlp keyword arguments (and environment) that make the backward use `grads`."""
    if grads == "atomic":
        return dict(deterministic=False)
    monkeypatch.setenv(WEIGHT_GRADS_ENV, grads)
    return {}


def _stack(method, dtype=torch.float32, B=1000, q=100, m=300, L=8):
    return [t.to(CUDA) for t in make_stack(B=B, q=q, m=m, L=L, method=method, bias=True, v_scale=0.5, dtype=dtype)]


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("backward", ["backprop", "adjoint"])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_float32_ieee_matches_float64_reference(method, backward, activation):
    tensors = _stack(method)
    grad_out = torch.randn(1000, 100, device=CUDA)
    kw = dict(method=method, backward=backward, activation=activation)
    got = run_grads(lambda *t: ode_mlp(*t, backend="triton", **kw), tensors, grad_out)
    want = run_grads(lambda *t: ode_mlp(*t, backend="reference", **kw), [t.double() for t in tensors],
                     grad_out.double())  # fmt: skip
    for g, w in zip(got, want):
        assert rel(g, w) < 1e-5


@pytest.mark.parametrize("precision, dtype", [("tf32", torch.float32), ("tf32x3", torch.float32), ("ieee", torch.bfloat16),
                                              ("ieee", torch.float16)])  # fmt: skip
@pytest.mark.parametrize("grads", ["partials", "workspace"])
@pytest.mark.parametrize("backward", ["backprop", "adjoint"])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_reduced_precision_no_worse_than_eager_same_dtype(method, backward, precision, dtype, grads, monkeypatch):
    """Oracle: the float64 reference in the same backward mode. Yardstick: the eager loop run in
    `dtype` (with TF32 matmuls for "tf32"; in float32 for "tf32x3", which must come close to it)
    against the float64 eager loop — its rounding error. Both deterministic weight-gradient
    reductions (their products round their operands alike)."""
    monkeypatch.setenv(WEIGHT_GRADS_ENV, grads)
    tensors64 = _stack(method, torch.float64)
    grad_out = torch.randn(1000, 100, device=CUDA, dtype=torch.float64)
    assert_no_worse_than_eager(tensors64, grad_out, dtype, precision, method=method, backward=backward)


@pytest.mark.parametrize("grads", ["partials", "workspace"])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_deterministic_mode_is_bitwise_reproducible(method, grads, monkeypatch):
    monkeypatch.setenv(WEIGHT_GRADS_ENV, grads)
    tensors = _stack(method, B=4096, q=64, m=128, L=6)
    grad_out = torch.randn(4096, 64, device=CUDA)
    runs = [run_grads(lambda *t: ode_mlp(*t, method=method, backend="triton"), tensors, grad_out) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    atomic = run_grads(lambda *t: ode_mlp(*t, method=method, backend="triton", deterministic=False), tensors, grad_out)
    for a, b in zip(atomic, runs[0]):
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize("grads", ["partials", "workspace", "atomic"])
@pytest.mark.parametrize("shape", [dict(B=1, q=1, m=1), dict(B=37, q=24, m=40), dict(B=513, q=256, m=1000)])
def test_odd_and_limit_shapes(shape, grads, monkeypatch):
    tensors = _stack("heun", L=3, **shape)
    x_wide = torch.randn(shape["B"], 2 * shape["q"], device=CUDA)[:, ::2]  # non-contiguous x
    tensors[0] = x_wide
    grad_out = torch.randn(shape["B"], shape["q"], device=CUDA)
    kw = _use_reduction(grads, monkeypatch)
    got = run_grads(lambda *t: ode_mlp(*t, method="heun", backend="triton", **kw), tensors, grad_out)
    want = run_grads(lambda *t: ode_mlp(*t, method="heun", backend="reference"), [t.double() for t in tensors],
                  grad_out.double())  # fmt: skip
    for g, w in zip(got, want):
        assert rel(g, w) < 1e-5


@pytest.mark.parametrize("grads, shape", [
    ("partials", dict(B=16384, q=16, m=2**20, L=1)),  # one partials buffer of more than 2^31 floats (15–18 GB)
    ("workspace", dict(B=1, q=16, m=16, L=70000)),  # more than 65535 layers in one product launch
])  # fmt: skip
def test_past_32_bit_offsets_and_grid_axis_limits(grads, shape, monkeypatch):
    """Sizes where a 32-bit offset or a grid axis limited to 65535 programs would break; judged against
    the atomic reduction, which keeps no buffer (a reference run would not fit in memory here)."""
    B, q, m, L = shape["B"], shape["q"], shape["m"], shape["L"]
    sms = torch.cuda.get_device_properties(CUDA).multi_processor_count  # the persistent programs' bound
    programs = reverse_programs(B, kernel_configs(q, m, 4).reverse.block_b, sms)
    if grads == "partials":
        assert programs * GradSections(q, m).row(1) > 2**31  # the premise of the case
    else:  # a gradient buffer that holds every layer's factors: one product launch over all 70000 layers
        monkeypatch.setenv(GRAD_BUFFER_ENV, "256")
        assert backward_layers_per_launch("workspace", L, 1, B, q, m, programs) > 65535  # the premise
    tensors = _stack("euler", B=B, q=q, m=m, L=L)
    grad_out = torch.randn(B, q, device=CUDA)
    run = lambda **kw: run_grads(lambda *t: ode_mlp(*t, backend="triton", **kw), tensors, grad_out)  # noqa: E731
    want = run(**_use_reduction("atomic", monkeypatch))
    got = run(**_use_reduction(grads, monkeypatch))
    for g, w in zip(got, want):
        assert rel(g, w) < 1e-5


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_stored_states_past_2_31_floats(method):
    """Backprop mode stores L states (and Heun's L stages) of B·q floats: 70 · 2^21 · 16 = 2.3·10^9
    floats each, offsets past 2^31. Judged against the adjoint mode, which stores none: the two
    differ by at most 7e-4 here (the adjoint's reconstruction error, measured with the cpp backend
    at B = 4096), a wrapped offset by O(1)."""
    tensors = _stack(method, B=2**21, q=16, m=16, L=70)
    grad_out = torch.randn(2**21, 16, device=CUDA)
    got = run_grads(lambda *t: ode_mlp(*t, method=method, backward="backprop", backend="triton"), tensors, grad_out)
    want = run_grads(lambda *t: ode_mlp(*t, method=method, backward="adjoint", backend="triton"), tensors, grad_out)
    for g, w in zip(got, want):
        assert rel(g, w) < 1e-2


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_adjoint_peak_memory_does_not_grow_with_depth(method):
    shallow, deep = peak_step_bytes(8, method, "adjoint"), peak_step_bytes(64, method, "adjoint")
    assert deep <= 1.05 * shallow + 2**20, (shallow, deep)
    # and the comparison is meaningful: backprop's does grow by the stored states
    grows = peak_step_bytes(64, method, "backprop") - peak_step_bytes(8, method, "backprop")
    assert grows >= 56 * 4096 * 256 * 4


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_torch_compile_fullgraph_triton(method):
    from odenets_fast import ODEMLP
    from odenets_fast.nn import NOT_MEASURED

    torch.manual_seed(0)
    model = ODEMLP(64, 128, 8, method=method, init="smooth", bias=True, backend="triton", device=CUDA)
    x, y = torch.randn(256, 64, device=CUDA), torch.randn(256, 64, device=CUDA)

    def step(m):
        model.zero_grad(set_to_none=True)
        (m(x) - y).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()], model.last_drift

    want, want_drift = step(model)
    model.drift.fill_(NOT_MEASURED)
    got, drift = step(torch.compile(model, fullgraph=True))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert drift == pytest.approx(want_drift, rel=1e-5)


@pytest.mark.parametrize("grads", ["partials", "workspace"])
@pytest.mark.parametrize("layers_per_launch", ["1", ""])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_training_step_replays_from_a_cuda_graph(method, layers_per_launch, grads, monkeypatch):
    """The per-layer (and whole-depth) path has no host synchronisation, so a whole adjoint training
    step captures in a CUDA graph; replayed on new inputs it gives the launched step's gradients
    bit for bit (deterministic reductions, same kernels in the same order)."""
    from odenets_fast.triton_backend import LAYERS_PER_LAUNCH_ENV

    monkeypatch.setenv(LAYERS_PER_LAUNCH_ENV, layers_per_launch)
    monkeypatch.setenv(WEIGHT_GRADS_ENV, grads)
    x, W, V, b, c = _stack(method, B=300, q=48, m=96, L=5)
    params = [t.requires_grad_(True) for t in (W, V, b, c)]
    static_x, static_grad = torch.zeros_like(x), torch.zeros_like(x)

    def step():
        out = ode_mlp(static_x, *params, method=method, backend="triton")
        return torch.autograd.grad(out, params, static_grad)

    assert_graph_replays_bitwise(step, (static_x, static_grad))


def test_layer_ranges_reuse_one_compiled_kernel(monkeypatch):
    """Per-layer launches pass every kind of layer range (0, 1, multiples of 16, others); each kernel
    must compile once for them, not once per kind (Triton's default integer specialisation: five
    variants each here) — the reverse kernel twice, with and without the drift output of layer 0."""
    from odenets_fast.triton_backend import LAYERS_PER_LAUNCH_ENV
    from odenets_fast.triton_kernels import mlp_step

    monkeypatch.setenv(LAYERS_PER_LAUNCH_ENV, "1")
    x, W, V, _, _ = _stack("euler", B=37, q=24, m=40, L=20)
    kernels = (mlp_step.forward_layers_kernel, mlp_step.reverse_layers_kernel)
    compiled = [kernel.device_caches[torch.cuda.current_device()][0] for kernel in kernels]
    before = [len(cache) for cache in compiled]
    params = [t.requires_grad_(True) for t in (W, V)]
    torch.autograd.grad(ode_mlp(x, *params, activation="silu", backend="triton"), params, torch.randn_like(x))
    new_variants = [len(cache) - count for cache, count in zip(compiled, before)]
    assert new_variants[0] <= 1 and new_variants[1] <= 2, new_variants


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_activations_of_special_values_as_the_reference(activation):
    """NaN, ±inf and overflowing values through σ and σ' on the GPU (tests/test_nonfinite.py), whose
    NaN and inf semantics the interpreter's numpy does not have: max.f32 drops a NaN operand, tl.exp is
    ex2.approx and a quotient div.full."""
    z = special_values(torch.float32)
    want_value, want_slope = ACTIVATIONS[activation].fn(z), ACTIVATIONS[activation].grad(z)
    value, slope = activation_through_stack("triton", activation, z.to(CUDA))
    for got, want in ((value, want_value), (slope, want_slope)):
        torch.testing.assert_close(got.cpu(), want[:, None].expand(got.shape), rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("grads", ["partials", "workspace", "atomic"])
@pytest.mark.parametrize("where, value", [(1, math.nan), (0, math.inf), (2, -math.inf)],
                         ids=["W-nan", "x-inf", "V-inf"])  # fmt: skip
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_one_nonfinite_entry_gives_the_references_nonfinite_results(method, where, value, grads, monkeypatch):
    tensors = _stack(method, B=37, q=24, m=40, L=3)
    tensors[where][(1, 3, 5)[: tensors[where].dim()]] = value
    grad_out = torch.randn(37, 24, device=CUDA)
    kw = _use_reduction(grads, monkeypatch)
    got = run_grads(lambda *t: ode_mlp(*t, method=method, activation="relu", backend="triton", **kw), tensors, grad_out)
    want = run_grads(lambda *t: ode_mlp(*t, method=method, activation="relu", backend="reference"), tensors, grad_out)
    for g, w in zip(got, want):
        assert torch.equal(g.isnan(), w.isnan()) and torch.equal(g.isinf(), w.isinf())
