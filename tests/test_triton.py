"""Triton kernels against the reference. Without a GPU they run under TRITON_INTERPRET=1 (set in
conftest) on CPU tensors — float32 and float16 only, small odd sizes so every mask is exercised."""

import pytest
import torch
import triton

import naive
from backend_runs import DEVICE, run
from backend_runs import assert_match as _assert_match
from helpers import make_stack
from odenets_fast import available_backends, ode_mlp, planner, reference
from odenets_fast.activations import ACTIVATIONS
from odenets_fast.spec import check_stack

if available_backends()["triton"] != "available":  # e.g. triton not installed: say so, loudly
    pytest.fail(f"the Triton backend must be testable here: {available_backends()['triton']}", pytrace=False)

from odenets_fast import triton_backend  # noqa: E402
from odenets_fast.triton_kernels import mlp_step  # noqa: E402
from odenets_fast.triton_kernels.activations import ACTIVATION_CODES  # noqa: E402

ODD = dict(B=37, q=24, m=40)  # B over 2 row blocks with a tail, q padded to 32, m over 2 chunks with a tail


def _run(backend, tensors, grad_out, **kwargs):
    return run(backend, tensors, grad_out, DEVICE, **kwargs)  # the reference too, on the same device


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("backward", ["backprop", "adjoint"])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_stack_matches_reference_float32(method, backward, activation, bias):
    tensors = make_stack(L=3, method=method, bias=bias, dtype=torch.float32, **ODD)
    grad_out = torch.randn(ODD["B"], ODD["q"])
    kwargs = dict(method=method, backward=backward, activation=activation)
    _assert_match(_run("triton", tensors, grad_out, **kwargs), _run("reference", tensors, grad_out, **kwargs))


def _use_reduction(grads: str, monkeypatch) -> dict:
    """ode_mlp keyword arguments (and environment) that make the backward use `grads`."""
    if grads == "atomic":
        return dict(deterministic=False)
    monkeypatch.setenv(triton_backend.WEIGHT_GRADS_ENV, grads)
    return {}


@pytest.mark.parametrize("grads", mlp_step.GRAD_REDUCTIONS)
@pytest.mark.parametrize("anchor_every", [1, 2])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_anchors_and_weight_gradient_reductions(method, anchor_every, grads, monkeypatch):
    tensors = make_stack(L=5, method=method, bias=True, dtype=torch.float32, **ODD)
    grad_out = torch.randn(ODD["B"], ODD["q"])
    kwargs = dict(method=method, anchor_every=anchor_every, activation="silu")
    want = _run("reference", tensors, grad_out, **kwargs)
    _assert_match(_run("triton", tensors, grad_out, **_use_reduction(grads, monkeypatch), **kwargs), want)


@pytest.mark.parametrize("grads", ["partials", "workspace"])
@pytest.mark.parametrize("backward", ["backprop", "adjoint"])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_float16_error_no_worse_than_plain_float16_torch(method, backward, grads, monkeypatch):
    """The kernels' float16 error against float64 is judged by that of the same stack run naively
    in float16 PyTorch (the flash-attention test pattern), with both deterministic reductions."""
    monkeypatch.setenv(triton_backend.WEIGHT_GRADS_ENV, grads)
    tensors64 = make_stack(L=8, method=method, bias=True, v_scale=0.5, **ODD)
    grad_out = torch.randn(ODD["B"], ODD["q"], dtype=torch.float64)
    exact = _run("reference", tensors64, grad_out, method=method, backward=backward)
    tensors16 = [t.half() for t in tensors64]
    ours = _run("triton", tensors16, grad_out, method=method, backward=backward)
    leaves = [t.clone().requires_grad_(True) for t in tensors16]
    out = naive.eager_forward(*leaves, method=method)
    plain = [out] + list(torch.autograd.grad(out, leaves, grad_out.half()))
    for o, p, e in zip(ours, plain, exact):
        o, p, e = o.detach(), p.detach(), e.detach()
        assert o.dtype == torch.float16
        err = float((o.cpu().double() - e.cpu()).norm() / e.norm())
        err_plain = float((p.double() - e.cpu()).norm() / e.norm())
        assert err <= 2 * err_plain + 1e-3, (err, err_plain)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_drift_matches_reference(method):
    tensors = make_stack(L=4, method=method, dtype=torch.float32, **ODD)
    drifts = {}
    for backend in ("triton", "reference"):
        x, W, V = [t.clone().to(DEVICE).requires_grad_(True) for t in tensors[:3]]
        drifts[backend] = torch.zeros((), device=DEVICE)
        ode_mlp(x, W, V, method=method, backend=backend, drift_out=drifts[backend]).sum().backward()
    assert float(drifts["reference"]) > 1e-4
    assert float(drifts["triton"]) == pytest.approx(float(drifts["reference"]), rel=1e-4)


def test_tiny_and_noncontiguous_inputs():
    x, W, V, b, c = make_stack(B=3, q=3, m=5, L=2, bias=True, dtype=torch.float32)
    wide = torch.randn(2, 3, 6)[..., ::2]  # (2, 3, 3) with last-dim stride 2
    grad_out = torch.randn(6, 3)
    got = _run("triton", [wide, W, V, b, c], grad_out.reshape(2, 3, 3))
    want = _run("reference", [wide, W, V, b, c], grad_out.reshape(2, 3, 3))
    _assert_match(got, want)


@pytest.mark.parametrize("backward", ["backprop", "adjoint"])
def test_empty_batch(backward):
    tensors = make_stack(B=0, L=3, method="heun", bias=True, dtype=torch.float32)
    got = _run("triton", tensors, torch.zeros(0, 5), method="heun", backward=backward)
    assert got[0].shape == (0, 5)
    assert all(not g.any() for g in got[1:])


def _spec(x, W, method, **kwargs):
    return check_stack(x, W, torch.empty(W.shape[0], W.shape[2], W.shape[1]), None, None, method=method,
                       activation="tanh", T=1.0, backward="adjoint", anchor_every=None, scale_in=None,
                       scale_out=None, **kwargs)  # fmt: skip


def _kernel_args(spec):
    return dict(heun=spec.method == "heun", act=ACTIVATION_CODES["tanh"], step=spec.step, scale_in=spec.scale_in,
                scale_out=spec.scale_out, precision="ieee",
                config=triton_backend.kernel_configs(ODD["q"], ODD["m"], operand_bytes=4).forward)  # fmt: skip


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_forward_layers_kernel_range(method):
    """One launch over layers 1 … 3 of a 4-layer stack: the state, the anchors (every 2nd) and the
    Heun stages against the reference's step function."""
    x, W, V, b, c = make_stack(L=4, method=method, bias=True, dtype=torch.float32, **ODD)
    spec = _spec(x, W, method)
    stack = reference._Stack(W, V, b, c, spec, torch.float32)
    x1, _ = reference._forward_step(stack, x, 0)
    state = x1.clone()
    anchors = torch.full((2,) + tuple(x.shape), float("nan"))
    stages = torch.full((4,) + tuple(x.shape), float("nan"))
    mlp_step.forward_layers(state, mlp_step.Params(W, V, b, c), 1, 4, anchors=anchors, anchor_every=2,
                            stages=stages if method == "heun" else None, **_kernel_args(spec))  # fmt: skip
    want, ys = x1, []
    for n in range(1, 4):
        if n == 2:
            torch.testing.assert_close(anchors[1], want, rtol=1e-5, atol=1e-6)
        want, y = reference._forward_step(stack, want, n)
        ys.append(y)
    torch.testing.assert_close(state, want, rtol=1e-5, atol=1e-6)
    assert anchors[0].isnan().all()  # slot 0 (layer 0) belongs to a launch that did not run
    if method == "heun":
        torch.testing.assert_close(stages[1:], torch.stack(ys), rtol=1e-5, atol=1e-6)
        assert stages[0].isnan().all()


@pytest.mark.parametrize("grads", mlp_step.GRAD_REDUCTIONS)
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_reverse_layers_kernel_range(method, grads):
    """One backward launch over layers 1 … 2 of a 3-layer stack: x̃_1, g_1 and the weight
    gradients (θ_1, θ_2 and, for Heun, θ_3) against the reference's step functions, with each
    weight-gradient reduction."""
    x, W, V, b, c = make_stack(L=3, method=method, bias=True, dtype=torch.float32, **ODD)
    spec = _spec(x, W, method)
    B, q, m = ODD["B"], ODD["q"], ODD["m"]
    args = _kernel_args(spec)
    x_top, g_top = torch.randn(B, q), torch.randn(B, q)
    sections = mlp_step.GradSections(q, m)
    accumulators = [torch.zeros_like(t) for t in (W, V, b, c)]
    slots = 2 + (method == "heun")
    programs = -(-B // args["config"].block_b)
    partials = torch.full((programs, sections.row(slots)), float("nan"))  # what is read must be written
    partial_sections = [partials[:, start:] for start in sections.partial_starts(slots)]
    sets = 2 if method == "heun" else 1
    workspace = torch.full((sets, 2, B, 2 * m + 2 * q), float("nan")) if grads == "workspace" else None
    state, grad = x_top.clone(), g_top.clone()
    mlp_step.reverse_layers(
        state, grad, mlp_step.Params(W, V, b, c), 1, 3, partial_sections if grads == "partials" else accumulators,
        partials.stride(0) if grads == "partials" else 0, 0 if grads == "atomic" else 1, reconstruct=True,
        grads=grads, workspace=workspace, **args,
    )  # fmt: skip
    if grads == "partials":
        for acc, part, size in zip(accumulators, partial_sections, sections.sizes):
            mlp_step.sum_partials(part, acc.view(-1)[size:], slots * size)
    if grads == "workspace":
        assert not workspace.isnan().any()  # every row of every VJP written
        # three ranges of the batch (16, 16 and 5 rows), summed in order
        mlp_step.workspace_grads(workspace, accumulators, 1, W, scale_in=spec.scale_in, scale_out=spec.scale_out,
                                 precision="ieee", config=mlp_step.product_config(4, interpreted=True), splits=3)  # fmt: skip

    stack = reference._Stack(W, V, b, c, spec, torch.float32)
    acc = reference._Accumulators(torch.zeros_like(W), torch.zeros_like(V), torch.zeros_like(b), torch.zeros_like(c))
    want_x, want_g = x_top, g_top
    for n in (2, 1):
        want_x = reference.reverse_step(stack, want_x, n)
        want_g = reference._backward_step(stack, want_x, None, want_g, n, acc)
    torch.testing.assert_close(state, want_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_g, rtol=1e-5, atol=1e-6)
    for got, want in zip(accumulators, acc):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grads", mlp_step.GRAD_REDUCTIONS)
@pytest.mark.parametrize("layers", ["1", "2"])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_layers_per_launch(method, layers, grads, monkeypatch):
    """Per-layer launches and ranges that do not divide the depth give the whole-depth results."""
    tensors = make_stack(L=5, method=method, bias=True, dtype=torch.float32, **ODD)
    grad_out = torch.randn(ODD["B"], ODD["q"])
    kwargs = dict(method=method, anchor_every=3, activation="gelu_tanh", **_use_reduction(grads, monkeypatch))
    whole = _run("triton", tensors, grad_out, **kwargs)
    monkeypatch.setenv(triton_backend.LAYERS_PER_LAUNCH_ENV, layers)
    _assert_match(_run("triton", tensors, grad_out, **kwargs), whole)


@pytest.mark.parametrize("grads", ["partials", "workspace"])
def test_gradient_buffer_cap_splits_the_backward(grads, monkeypatch):
    tensors = make_stack(L=4, method="heun", bias=True, dtype=torch.float32, **ODD)
    grad_out = torch.randn(ODD["B"], ODD["q"])
    monkeypatch.setenv(triton_backend.WEIGHT_GRADS_ENV, grads)
    whole = _run("triton", tensors, grad_out, method="heun")
    monkeypatch.setenv(triton_backend.GRAD_BUFFER_ENV, "0")  # one layer per launch
    _assert_match(_run("triton", tensors, grad_out, method="heun"), whole)


def test_gradient_buffer_must_be_a_size(monkeypatch):
    monkeypatch.setenv(triton_backend.GRAD_BUFFER_ENV, "-1")
    with pytest.raises(ValueError, match="ODENETS_FAST_TRITON_GRAD_BUFFER_MIB must be a non-negative integer"):
        triton_backend.grad_buffer_bytes()


@pytest.mark.parametrize("B, q, m, block_b, want", [
    (4096, 256, 512, 16, "workspace"),  # wide: 11× fewer floats than 256 programs' partial rows
    (16384, 64, 128, 64, "partials"),  # narrow: 64-row blocks, the partial rows are 1.5× smaller
    (37, 24, 40, 16, "workspace"),  # the interpreter tests' odd shape
])  # fmt: skip
def test_weight_gradient_reduction_moves_fewer_bytes(B, q, m, block_b, want):
    assert triton_backend.weight_grad_reduction(True, B, q, m, block_b) == want
    assert triton_backend.weight_grad_reduction(False, B, q, m, block_b) == "atomic"


@pytest.mark.parametrize("tiles, B, processors, want", [
    (32, 4096, 132, 9),  # one wide layer: 32 output tiles of 64 × 64 → 9 ranges of the batch
    (320, 4096, 132, 1),  # ten layers: enough programs already
    (32, 300, 132, 1),  # too few rows to cut (each range ≥ 8 steps of 32)
])  # fmt: skip
def test_product_splits_fill_the_device(tiles, B, processors, want):
    assert mlp_step.product_splits(tiles, B, 32, processors) == want


def test_weight_gradient_override(monkeypatch):
    monkeypatch.setenv(triton_backend.WEIGHT_GRADS_ENV, "partials")
    assert triton_backend.weight_grad_reduction(True, 4096, 256, 512, 16) == "partials"
    assert triton_backend.weight_grad_reduction(False, 4096, 256, 512, 16) == "atomic"  # explicit option wins
    monkeypatch.setenv(triton_backend.WEIGHT_GRADS_ENV, "atomic")
    with pytest.raises(ValueError, match="ODENETS_FAST_TRITON_WEIGHT_GRADS must be 'partials' or 'workspace'"):
        triton_backend.weight_grad_reduction(True, 4096, 256, 512, 16)


def test_layers_per_launch_must_be_positive(monkeypatch):
    monkeypatch.setenv(triton_backend.LAYERS_PER_LAUNCH_ENV, "0")
    with pytest.raises(ValueError, match="ODENETS_FAST_TRITON_LAYERS_PER_LAUNCH must be a positive integer"):
        triton_backend.layers_per_launch(4)


@pytest.mark.parametrize("precision", ["tf32", "tf32x3"])
def test_tensor_core_precisions_reach_the_kernels(precision):
    """The interpreter multiplies in float32 whatever the precision, so this checks the plumbing
    (the accuracy of TF32 and TF32x3 is checked on a GPU, tests/gpu)."""
    tensors = make_stack(L=2, method="heun", bias=True, dtype=torch.float32, **ODD)
    grad_out = torch.randn(ODD["B"], ODD["q"])
    _assert_match(_run("triton", tensors, grad_out, method="heun", input_precision=precision),
                  _run("reference", tensors, grad_out, method="heun"))  # fmt: skip


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_tile_overrides_give_the_same_results(method, monkeypatch):
    """Other tiles (more row blocks, more hidden chunks, forward and reverse apart) through the
    tuning variables: the reference's results, to float32 rounding."""
    tensors = make_stack(L=3, method=method, bias=True, dtype=torch.float32, **ODD)
    grad_out = torch.randn(ODD["B"], ODD["q"])
    want = _run("reference", tensors, grad_out, method=method, anchor_every=2)
    monkeypatch.setenv(triton_backend.TILES_ENV.forward, "32,16,1,1")
    monkeypatch.setenv(triton_backend.TILES_ENV.reverse, "16, 64, 2, 1")
    assert triton_backend.kernel_configs(ODD["q"], ODD["m"], 4) == mlp_step.KernelConfigs(
        mlp_step.StepConfig(32, 16, 32, 1, 1), mlp_step.StepConfig(16, 64, 32, 2, 1))
    _assert_match(_run("triton", tensors, grad_out, method=method, anchor_every=2), want)


@pytest.mark.parametrize("value, message", [("32,16,1", "4 positive integers"), ("32,x,1,1", "4 positive"),
                                            ("24,16,1,1", "powers of two of at least 16"),
                                            ("32,8,1,1", "powers of two of at least 16"),
                                            ("32,16,3,1", "num_warps must be a power of two"),
                                            ("32,16,4,0", "num_stages positive")])  # fmt: skip
def test_tile_override_must_be_valid(value, message, monkeypatch):
    monkeypatch.setenv(triton_backend.TILES_ENV.reverse, value)
    with pytest.raises(ValueError, match=f"ODENETS_FAST_TRITON_REVERSE_TILES.*{message}"):
        triton_backend.kernel_configs(ODD["q"], ODD["m"], 4)


def test_product_tile_override(monkeypatch):
    """Other workspace-product tiles (output tiles smaller than q and m, a longer batch step):
    the reference's gradients; a malformed value is a clear error."""
    tensors = make_stack(L=3, method="heun", bias=True, dtype=torch.float32, **ODD)
    grad_out = torch.randn(ODD["B"], ODD["q"])
    want = _run("reference", tensors, grad_out, method="heun")
    monkeypatch.setenv(triton_backend.WEIGHT_GRADS_ENV, "workspace")
    monkeypatch.setenv(triton_backend.PRODUCT_TILES_ENV, "16,16,32,2,1")
    assert triton_backend.product_config(4) == mlp_step.ProductConfig(16, 16, 32, 2, 1)
    _assert_match(_run("triton", tensors, grad_out, method="heun"), want)
    monkeypatch.setenv(triton_backend.PRODUCT_TILES_ENV, "16,16,1,1")
    with pytest.raises(ValueError, match="ODENETS_FAST_TRITON_PRODUCT_TILES must be 'BLOCK_R,BLOCK_C,BLOCK_K,num_warps"):
        triton_backend.product_config(4)


@pytest.mark.parametrize("operand_bytes", [2, 4])
@pytest.mark.parametrize("q, m", [(1, 1), (24, 40), (64, 128), (100, 300), (256, 512), (256, 2000)])
def test_gpu_tile_table_covers_every_width(q, m, operand_bytes):
    """The GPU tiles (what tests/triton_aot.py compiles at the benchmark shapes) for any state width:
    powers of two for tl.dot, q whole in one tile, no hidden chunk wider than m needs."""
    configs = mlp_step.kernel_configs(q, m, operand_bytes, interpreted=False)
    for config in configs:
        assert config.block_q >= q and config.block_q == max(16, 2 ** (q - 1).bit_length())
        for size in (config.block_b, config.block_m):
            assert size >= 16 and size & (size - 1) == 0
        assert config.block_m <= max(16, 2 ** (m - 1).bit_length())
    assert configs.forward.num_stages == (2 if configs.forward.block_q >= 256 else 3)
    assert configs.reverse.num_stages == 2


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("grads", mlp_step.GRAD_REDUCTIONS)
def test_persistent_programs_walk_more_tiles_than_there_are(method, grads, monkeypatch):
    """The reverse kernel's programs each walk several batch tiles (7 tiles, 2 programs here), adding
    their later tiles' weight gradients to their partial rows; as accurate as one program a tile, and
    (deterministic reductions) bitwise the same from run to run."""
    kwargs = dict(method=method, anchor_every=2, **_use_reduction(grads, monkeypatch))
    tensors = make_stack(B=100, q=24, m=40, L=3, method=method, bias=True, dtype=torch.float32)
    grad_out = torch.randn(100, 24)
    monkeypatch.setattr(triton_backend, "_processors", lambda device: 2)
    grids = []
    kernel_type = type(mlp_step.reverse_layers_kernel)
    launch = kernel_type.__getitem__

    def spy(kernel, grid):
        if kernel is mlp_step.reverse_layers_kernel:
            grids.append(grid)
        return launch(kernel, grid)

    monkeypatch.setattr(kernel_type, "__getitem__", spy)
    persistent = [_run("triton", tensors, grad_out, **kwargs) for _ in range(2)]
    assert set(grids) == {(2,)} and triton.cdiv(100, triton_backend.kernel_configs(24, 40, 4).reverse.block_b) == 7
    monkeypatch.setattr(triton_backend, "_processors", lambda device: 100)  # a program per tile
    one_per_tile = _run("triton", tensors, grad_out, **kwargs)
    _assert_match(persistent[0], _run("reference", tensors, grad_out, **kwargs))
    _assert_match(persistent[0], one_per_tile)
    if grads != "atomic":
        for a, b in zip(*persistent):
            assert torch.equal(a, b)


def test_wide_state_is_a_clear_error_on_the_fused_path(monkeypatch):
    """(The automatic choice runs such states on the layered path: tests/test_triton_layered.py.)"""
    monkeypatch.setenv(planner.PATH_ENV, "fused")
    x, W, V, b, c = make_stack(B=2, q=257, m=16, L=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="on-chip up to q = 256; got q = 257"):
        ode_mlp(x.to(DEVICE), W.to(DEVICE), V.to(DEVICE), backend="triton")


@pytest.mark.parametrize("B, P, message", [(2**25, 1, "B·q = 2147483648"), (1, 2**25, "P·m·q = 2147483648")])
def test_32_bit_index_limits_are_a_clear_error(B, P, message):
    """One state (B·q) and the stacked weights (P·m·q) are indexed in 32 bits; the many stored states
    of a deep stack are not, so only these two bound the sizes (expanded views: no memory)."""
    x = torch.zeros(1, 64, device=DEVICE).expand(B, 64)
    W = torch.zeros(1, 1, 64, device=DEVICE).expand(P, 1, 64)
    V = torch.zeros(1, 64, 1, device=DEVICE).expand(P, 64, 1)
    with pytest.raises(ValueError, match=f"index the stacked weights and one state with int32: .*{message}"):
        triton_backend.check_path_limits(x, W, "fused")
    triton_backend.check_path_limits(x[: 2**25 - 1], W[: 2**25 - 1], "fused")  # just below: accepted
    triton_backend.check_path_limits(x[: 2**20], W[:64], "fused")  # (L + 1)·B·q = 65 · 2^26 stored floats: fine
    triton_backend.check_path_limits(x, W, "layered")  # int64 offsets and cuBLAS: no such limit


def test_float64_is_a_clear_error(monkeypatch):
    """Checked before the planner is asked: on CUDA its own dtype check named no backend to use instead."""
    monkeypatch.setattr(planner, "choose_path", lambda *args: pytest.fail("the planner was asked"))
    x, W, V, b, c = make_stack()
    message = "does not support torch.float64" if triton_backend.INTERPRETED else "use 'reference' or 'cpp' for float64"
    with pytest.raises(TypeError, match=message):
        ode_mlp(x.to(DEVICE), W.to(DEVICE), V.to(DEVICE), backend="triton")


@pytest.mark.parametrize("grads, sets, B, q, m, programs", [
    ("workspace", 1, 1, 16, 16, 1),  # a tiny batch: thousands of layers' factors fit in the buffer
    ("workspace", 2, 4096, 256, 512, 256),  # wide Heun: the factors dominate
    ("partials", 2, 16384, 64, 128, 256),  # narrow Heun, with its extra θ_stop slot
])  # fmt: skip
def test_backward_buffers_fit_the_gradient_buffer(grads, sets, B, q, m, programs):
    """One backward launch's buffers — partial rows, or workspace factors and their products' partial
    buffer — stay within ODENETS_FAST_TRITON_GRAD_BUFFER_MIB whatever the depth (memory flat in L)."""
    size = triton_backend.backward_layers_per_launch(grads, 100_000, sets, B, q, m, programs)
    sections = mlp_step.GradSections(q, m)
    if grads == "partials":
        floats = programs * sections.row(size + sets - 1)
    else:
        floats = sets * size * B * sections.workspace_row + size * (m * q + max(m, q))
    assert size >= 1 and 4 * floats <= triton_backend.grad_buffer_bytes()
