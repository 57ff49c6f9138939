"""The oracle checked against torch.autograd: forward, backprop, adjoint, anchors, rates, dtypes."""

import pytest
import torch

import naive
from helpers import make_stack, smooth_stack
from odenets_fast import diagnostics, ode_mlp
from odenets_fast.activations import ACTIVATIONS

METHODS = ["euler", "heun"]
ACTS = sorted(ACTIVATIONS)


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def _grads(out, leaves, grad_out):
    present = [t for t in leaves if t is not None]
    return torch.autograd.grad(out, present, grad_out)


def _assert_all_close(got, want, **tol):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("method", METHODS)
def test_forward_and_backprop_match_autograd(method, activation, bias):
    x, W, V, b, c = make_stack(method=method, bias=bias)
    ours, theirs = _leaves(x, W, V, b, c), _leaves(x, W, V, b, c)
    out = ode_mlp(*ours, method=method, activation=activation, backward="backprop", backend="reference")
    want = naive.eager_forward(*theirs, method=method, activation=activation)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(out)
    _assert_all_close(_grads(out, ours, grad_out), _grads(want, theirs, grad_out), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("method", METHODS)
def test_backprop_gradcheck_float64(method, activation, bias):
    # relu's kink is avoided by gradcheck's perturbation being far smaller than typical |z|
    x, W, V, b, c = make_stack(B=3, q=3, m=4, L=3, method=method, bias=bias, seed=1)
    inputs = tuple(_leaves(x, W, V, b, c))

    def fn(*args):
        return ode_mlp(*args, method=method, activation=activation, backward="backprop", backend="reference")

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("anchor_every", [None, 2, 3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_adjoint_is_autograd_vjp_at_reconstructed_states(method, bias, anchor_every):
    x, W, V, b, c = make_stack(L=6, method=method, bias=bias)
    ours = _leaves(x, W, V, b, c)
    out = ode_mlp(*ours, method=method, activation="tanh", anchor_every=anchor_every, backend="reference")
    grad_out = torch.randn_like(out)
    want = naive.adjoint_grads(
        x, *_leaves(W, V, b, c), grad_out, method=method, activation="tanh", anchor_every=anchor_every
    )
    _assert_all_close(_grads(out, ours, grad_out), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_adjoint_differs_from_backprop(method):
    # Guards the test above against a backward that silently ignores the mode.
    x, W, V, b, c = make_stack(L=4, method=method)
    grads = {}
    for mode in ("backprop", "adjoint"):
        leaves = _leaves(x, W, V)
        out = ode_mlp(*leaves, method=method, backward=mode, backend="reference")
        grads[mode] = _grads(out, leaves, torch.ones_like(out))
    assert (grads["backprop"][1] - grads["adjoint"][1]).abs().max() > 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_anchor_every_one_is_exact_backprop(method):
    x, W, V, b, c = make_stack(L=5, method=method, bias=True)
    grad_out = torch.randn(x.shape, dtype=x.dtype)
    results = []
    for kwargs in ({"backward": "backprop"}, {"backward": "adjoint", "anchor_every": 1}):
        leaves = _leaves(x, W, V, b, c)
        out = ode_mlp(*leaves, method=method, backend="reference", **kwargs)
        results.append(_grads(out, leaves, grad_out))
    _assert_all_close(results[1], results[0], rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("method", METHODS)
def test_reconstruction_rates_on_smooth_weights(method):
    """Euler's reconstruction error is O(1/L): at least ~halves per doubling of L; Heun's is
    O(Δθ/L + 1/L²) = O(1/L²) on depth-smooth weights: falls at least ~4× per doubling."""
    errors = []
    for L in (16, 32, 64):
        x, W, V, b, c = smooth_stack(L, method=method)
        errors.append(float(diagnostics.reconstruction_error(x, W, V, method=method, activation="gelu")[0]))
    factor = 1.8 if method == "euler" else 3.6
    assert errors[0] / errors[1] >= factor and errors[1] / errors[2] >= factor, errors


def test_heun_gradient_error_below_euler():
    for L in (16, 32, 64):
        err = {m: diagnostics.gradient_error(*smooth_stack(L, method=m)[:3], method=m) for m in METHODS}
        for key in ("x", "W", "V"):
            assert err["heun"][key] < err["euler"][key], (L, key, err)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", METHODS)
def test_low_precision_carries_float32_states(method, dtype):
    """States and gradients are carried in float32 (DESIGN.md §6): the error against float64 is no
    larger than that of the same stack run naively in the input dtype."""
    x64, W64, V64, b64, c64 = make_stack(B=16, q=8, m=12, L=32, method=method, bias=True, v_scale=0.5)
    low = [t.to(dtype) for t in (x64, W64, V64, b64, c64)]
    grad_out = torch.randn(x64.shape, dtype=torch.float64)

    def run(fn, tensors):
        leaves = _leaves(*tensors)
        out = fn(*leaves)
        return [out] + list(_grads(out, leaves, grad_out.to(out.dtype)))

    exact = run(lambda *t: naive.eager_forward(*t, method=method), [x64, W64, V64, b64, c64])
    ours = run(lambda *t: ode_mlp(*t, method=method, backward="backprop", backend="reference"), low)
    plain = run(lambda *t: naive.eager_forward(*t, method=method), low)
    for o, p, e in zip(ours, plain, exact):
        assert o.dtype == dtype
        err_ours = (o.double() - e).norm() / e.norm()
        err_plain = (p.double() - e).norm() / e.norm()
        assert err_ours <= err_plain * 1.05 + 2 * torch.finfo(dtype).eps, (err_ours, err_plain)


@pytest.mark.parametrize("backward", ["backprop", "adjoint"])
def test_leading_dims_and_noncontiguous_x(backward):
    x, W, V, b, c = make_stack(B=12, q=5, method="heun")
    wide = torch.randn(3, 4, 10, dtype=torch.float64)
    x_nc = wide[..., ::2]  # (3, 4, 5), last-dim stride 2
    assert not x_nc.is_contiguous()
    leaves = _leaves(x_nc, W, V)
    out = ode_mlp(*leaves, method="heun", backward=backward, backend="reference")
    assert out.shape == (3, 4, 5)
    flat = _leaves(x_nc.reshape(12, 5).contiguous(), W, V)
    want = ode_mlp(*flat, method="heun", backward=backward, backend="reference")
    torch.testing.assert_close(out.reshape(12, 5), want, rtol=0, atol=0)
    grad_out = torch.randn_like(want)
    got = _grads(out, leaves, grad_out.reshape(3, 4, 5))
    ref = _grads(want, flat, grad_out)
    torch.testing.assert_close(got[0].reshape(12, 5), ref[0])
    _assert_all_close(got[1:], ref[1:])


@pytest.mark.parametrize("backward", ["backprop", "adjoint"])
@pytest.mark.parametrize("method", METHODS)
def test_empty_batch(method, backward):
    x, W, V, b, c = make_stack(B=0, method=method, bias=True)
    leaves = _leaves(x, W, V, b, c)
    out = ode_mlp(*leaves, method=method, backward=backward, backend="reference")
    assert out.shape == (0, x.shape[1])
    grads = _grads(out, leaves, torch.ones_like(out))
    for g, t in zip(grads, leaves):
        assert g.shape == t.shape and not g.any()


def test_one_dim_input_is_a_single_sample():
    x, W, V, b, c = make_stack(B=1)
    out = ode_mlp(x[0], W, V, backend="reference")
    torch.testing.assert_close(out, ode_mlp(x, W, V, backend="reference")[0])


def test_only_requested_gradients_are_returned():
    x, W, V, b, c = make_stack()
    W = W.requires_grad_(True)
    out = ode_mlp(x, W, V, backend="reference")
    out.sum().backward()
    assert W.grad is not None and x.grad is None and V.grad is None
