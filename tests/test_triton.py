"""Triton kernels against the reference. Without a GPU they run under TRITON_INTERPRET=1 (set in
conftest) on CPU tensors — float32 and float16 only, small odd sizes so every mask is exercised."""

import pytest
import torch

import naive
from helpers import make_stack
from odenets_fast import available_backends, ode_mlp, reference
from odenets_fast.activations import ACTIVATIONS
from odenets_fast.spec import check_stack

if available_backends()["triton"] != "available":  # e.g. triton not installed: say so, loudly
    pytest.fail(f"the Triton backend must be testable here: {available_backends()['triton']}", pytrace=False)

from odenets_fast import triton_backend  # noqa: E402
from odenets_fast.triton_kernels import mlp_step  # noqa: E402
from odenets_fast.triton_kernels.activations import ACTIVATION_CODES  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ODD = dict(B=37, q=24, m=40)  # B over 2 row blocks with a tail, q padded to 32, m over 2 chunks with a tail


def _run(backend, tensors, grad_out, **kwargs):
    leaves = [None if t is None else t.detach().clone().to(DEVICE).requires_grad_(True) for t in tensors]
    out = ode_mlp(*leaves, backend=backend, **kwargs)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out.to(DEVICE, out.dtype))
    return [out] + list(grads)


def _assert_match(got, want, rtol=2e-5, atol=2e-6):
    for a, b in zip(got, want):
        a, b = a.detach(), b.detach()
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=rtol, atol=atol * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("backward", ["backprop", "adjoint"])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_stack_matches_reference_float32(method, backward, activation, bias):
    tensors = make_stack(L=3, method=method, bias=bias, dtype=torch.float32, **ODD)
    grad_out = torch.randn(ODD["B"], ODD["q"])
    kwargs = dict(method=method, backward=backward, activation=activation)
    _assert_match(_run("triton", tensors, grad_out, **kwargs), _run("reference", tensors, grad_out, **kwargs))


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("anchor_every", [1, 2])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_anchors_and_atomic_reduction(method, anchor_every, deterministic):
    tensors = make_stack(L=5, method=method, bias=True, dtype=torch.float32, **ODD)
    grad_out = torch.randn(ODD["B"], ODD["q"])
    kwargs = dict(method=method, anchor_every=anchor_every, activation="silu")
    got = _run("triton", tensors, grad_out, deterministic=deterministic, **kwargs)
    _assert_match(got, _run("reference", tensors, grad_out, **kwargs))


@pytest.mark.parametrize("backward", ["backprop", "adjoint"])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_float16_error_no_worse_than_plain_float16_torch(method, backward):
    """The kernels' float16 error against float64 is judged by that of the same stack run naively
    in float16 PyTorch (the flash-attention test pattern)."""
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
        out = ode_mlp(x, W, V, method=method, backend=backend, on_drift=lambda d, k=backend: drifts.__setitem__(k, d))
        out.sum().backward()
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


@pytest.mark.parametrize("save", [False, True])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_forward_step_kernel_one_layer(method, save):
    x, W, V, b, c = make_stack(L=1, method=method, bias=True, dtype=torch.float32, **ODD)
    spec = _spec(x, W, method)
    layers = [mlp_step.Layer(W[n], V[n], b[n], c[n]) for n in range(W.shape[0])]
    state, saved_state, saved_stage = x.clone(), torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    mlp_step.forward_step(
        state, layers[0], layers[1] if method == "heun" else None, act=ACTIVATION_CODES["tanh"], step=spec.step,
        scale_in=spec.scale_in, scale_out=spec.scale_out, precision="ieee",
        config=mlp_step.step_config(ODD["q"], ODD["m"], triton_backend.INTERPRETED),
        saved_state=saved_state if save else None, saved_stage=saved_stage if save and method == "heun" else None,
    )  # fmt: skip
    stack = reference._Stack(W, V, b, c, spec, torch.float32)
    want, y = reference._forward_step(stack, x, 0)
    torch.testing.assert_close(state, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(saved_state, x) if save else saved_state.isnan().all()
    if method == "heun" and save:
        torch.testing.assert_close(saved_stage, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("atomic", [False, True])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_reverse_step_kernel_one_layer(method, atomic):
    """One reverse step: x̃_n, g_n and θ's gradient slots against the reference's step functions."""
    x, W, V, b, c = make_stack(L=1, method=method, bias=True, dtype=torch.float32, **ODD)
    spec = _spec(x, W, method)
    B, q, m, P = ODD["B"], ODD["q"], ODD["m"], W.shape[0]
    config = mlp_step.step_config(q, m, triton_backend.INTERPRETED)
    layers = [mlp_step.Layer(W[n], V[n], b[n], c[n]) for n in range(P)]
    x_next, g = torch.randn(B, q), torch.randn(B, q)
    layout = mlp_step.GradLayout(P, q, m)
    grads = torch.zeros(layout.numel)
    programs = -(-B // config.block_b)
    partials = torch.full((programs, layout.numel), float("nan"))  # every entry must be overwritten
    state, grad = x_next.clone(), g.clone()
    mlp_step.reverse_step(
        state, grad, layers[0], layers[1] if method == "heun" else None, grads if atomic else partials,
        layout.starts(0) if atomic else layout.partial_starts(P),
        act=ACTIVATION_CODES["tanh"], step=spec.step, scale_in=spec.scale_in, scale_out=spec.scale_out,
        precision="ieee", config=config, reconstruct=True, atomic=atomic,
    )  # fmt: skip
    if not atomic:
        segments = mlp_step.partial_segments(layout, P, 1, True, True, "cpu")
        mlp_step.sum_partials(partials, grads, segments[0], longest=P * m * q)

    stack = reference._Stack(W, V, b, c, spec, torch.float32)
    x_rec = reference.reverse_step(stack, x_next, 0)
    acc = reference._Accumulators(torch.zeros_like(W), torch.zeros_like(V), torch.zeros_like(b), torch.zeros_like(c))
    g_want = reference._backward_step(stack, x_rec, None, g, 0, acc)
    torch.testing.assert_close(state, x_rec, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, g_want, rtol=1e-5, atol=1e-6)
    for got, want in zip(layout.split(grads), acc):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_wide_state_is_a_clear_error():
    x, W, V, b, c = make_stack(B=2, q=257, m=16, L=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="on-chip up to q = 256; got q = 257"):
        ode_mlp(x.to(DEVICE), W.to(DEVICE), V.to(DEVICE), backend="triton")


def test_float64_is_a_clear_error():
    x, W, V, b, c = make_stack()
    with pytest.raises(TypeError, match="float64"):
        ode_mlp(x.to(DEVICE), W.to(DEVICE), V.to(DEVICE), backend="triton")
