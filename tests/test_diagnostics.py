"""diagnostics: shapes, edge values and the quantities they claim to measure."""

import pytest
import torch

from helpers import make_stack, smooth_stack
from odenets_fast import diagnostics, ode_mlp


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_reconstruction_error_shape_and_ends(method):
    x, W, V, b, c = make_stack(L=6, method=method, bias=True)
    err = diagnostics.reconstruction_error(x, W, V, b, c, method=method)
    assert err.shape == (7,)
    assert err[-1] == 0 and err[0] > 0
    anchored = diagnostics.reconstruction_error(x, W, V, b, c, method=method, anchor_every=2)
    assert anchored[0] == 0 and anchored[2] == 0 and anchored[4] == 0 and anchored[1] > 0


def test_reconstruction_error_grows_with_step():
    x, W, V, b, c = smooth_stack(16, method="euler")
    small = diagnostics.reconstruction_error(x, W, V, T=0.5)[0]
    large = diagnostics.reconstruction_error(x, W, V, T=1.0)[0]
    assert large > 1.5 * small


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_gradient_error_keys_and_consistency(method):
    x, W, V, b, c = make_stack(L=6, method=method, bias=True)
    err = diagnostics.gradient_error(x, W, V, b, c, method=method)
    assert set(err) == {"x", "W", "V", "b", "c", "W_per_layer"}
    assert err["W_per_layer"].shape == (W.shape[0],)
    assert all(err[k] > 0 for k in "xWVbc")
    # recompute the W error by hand from the two gradients
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = {}
    for mode in ("backprop", "adjoint"):
        Wl = W.clone().requires_grad_(True)
        out = ode_mlp(x, Wl, V, b, c, method=method, backward=mode)
        (grads[mode],) = torch.autograd.grad(out, Wl, grad_out)
    want = (grads["adjoint"] - grads["backprop"]).norm() / grads["backprop"].norm()
    assert err["W"] == pytest.approx(float(want), rel=1e-10)


def test_gradient_error_zero_with_every_state_anchored():
    x, W, V, b, c = make_stack(L=5)
    err = diagnostics.gradient_error(x, W, V, anchor_every=1)
    assert err["x"] < 1e-14 and err["W"] < 1e-14 and err["W_per_layer"].max() < 1e-14


def test_gradient_error_rejects_bad_grad_out():
    x, W, V, b, c = make_stack()
    with pytest.raises(ValueError, match="grad_out must be a tensor of the shape of x"):
        diagnostics.gradient_error(x, W, V, grad_out=torch.ones(3))


def test_gradient_error_checks_its_stack_first():
    x, W, V, b, c = make_stack()
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        diagnostics.gradient_error(x.tolist(), W, V)
    with pytest.raises(ValueError, match="anchor_every must be a positive int"):
        diagnostics.gradient_error(x, W, V, anchor_every=0)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_gradient_error_inside_no_grad_and_inference_mode(context):
    """Its two backward passes run with gradients enabled: before, autograd's "element 0 of tensors does
    not require grad". Under inference_mode the tensors may be inference tensors, made there."""
    x, W, V, b, c = make_stack(L=5, bias=True)
    want = diagnostics.gradient_error(x, W, V, b, c)
    with context():
        got = diagnostics.gradient_error(*(t.clone() for t in (x, W, V, b, c)))
    assert {k: got[k] for k in "xWVbc"} == {k: want[k] for k in "xWVbc"}
    assert torch.equal(got["W_per_layer"], want["W_per_layer"])


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_saved_tensor_bytes_inside_no_grad_and_inference_mode(context):
    """fn runs as in a training step: inside no_grad autograd saved nothing and the answer was 0."""
    x, W, V, b, c = make_stack(B=32, q=8, m=8, L=16, dtype=torch.float32)
    W.requires_grad_(True)

    def run():
        return ode_mlp(x, W, V, backward="adjoint")

    with context():
        assert diagnostics.saved_tensor_bytes(run, exclude=(W, V)) == 2 * 32 * 8 * 4  # x_0 and x_L


def test_the_diagnostics_need_a_fixed_layout():
    x, W, V, b, c = make_stack()
    with pytest.raises(ValueError, match="reconstruction_error: anchor_every='auto' places the stored states at run time"):
        diagnostics.reconstruction_error(x, W, V, anchor_every="auto")
    # each call would start the controller from one segment: plain adjoint's error, whatever auto trains with
    with pytest.raises(ValueError, match="gradient_error: anchor_every='auto' places the stored states at run time"):
        diagnostics.gradient_error(x, W, V, anchor_every="auto")


def test_gradient_error_of_float16_gradients_beyond_65504():
    """The gradients are finite float16 but the exact one's norm is not (66015 > 65504): a float16 norm
    gave inf / inf → a relative error of 0.0. In float64 it is the error of those two gradients."""
    torch.manual_seed(0)
    x, W, V, _, _ = smooth_stack(8, method="euler", B=256, q=16, m=32, dtype=torch.float16)
    grad_out = (1024 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).half()
    err = diagnostics.gradient_error(x, W, V, grad_out=grad_out)
    grads = {}
    for mode in ("backprop", "adjoint"):
        xi = x.clone().requires_grad_(True)
        (grads[mode],) = torch.autograd.grad(ode_mlp(xi, W, V, backward=mode), xi, grad_out)
    exact, approx = grads["backprop"].double(), grads["adjoint"].double()
    assert torch.isinf(torch.linalg.vector_norm(grads["backprop"])) and exact.norm() > 65504
    assert err["x"] == pytest.approx(float((approx - exact).norm() / exact.norm()), rel=1e-12)
    assert err["x"] > 0 and err["W_per_layer"].dtype == torch.float64


def test_depth_smoothness_of_16_bit_weights_in_float64():
    torch.manual_seed(0)
    W = torch.randn(3, 64, 64) * 100
    for dtype in (torch.float16, torch.bfloat16):
        low = W.to(dtype)
        assert diagnostics.depth_smoothness(low) == pytest.approx(diagnostics.depth_smoothness(low.double()), rel=1e-12)


def test_depth_smoothness():
    W = torch.zeros(4, 2, 2)
    W[2] = 3.0  # ‖W_2 − W_1‖_F = ‖W_3 − W_2‖_F = 6
    assert diagnostics.depth_smoothness(W) == pytest.approx(6.0)
    assert diagnostics.depth_smoothness(W[:1]) == 0.0
    assert diagnostics.depth_smoothness(torch.tensor([0.0, 2.0, 1.0])) == pytest.approx(2.0)  # a stack of scalars
    with pytest.raises(TypeError, match="W must be a floating-point tensor with depth as dim 0"):
        diagnostics.depth_smoothness(W.long())


def test_saved_tensor_bytes_adjoint_is_depth_independent():
    x, W, V, b, c = make_stack(B=32, q=8, m=8, L=64, dtype=torch.float32)
    W.requires_grad_(True)

    def saved(mode, depth):
        return diagnostics.saved_tensor_bytes(
            lambda: ode_mlp(x, W[:depth], V[:depth], backward=mode), exclude=(W, V)
        )

    state_bytes = 32 * 8 * 4
    assert saved("adjoint", 8) == saved("adjoint", 64) == 2 * state_bytes  # x_0 and x_L
    run = lambda: ode_mlp(x, W, V, backward="adjoint")  # noqa: E731
    assert diagnostics.saved_tensor_bytes(run, exclude=iter([W, V])) == 2 * state_bytes  # any iterable
    assert diagnostics.saved_tensor_bytes(run, exclude=W) == 2 * state_bytes + V.numel() * 4  # one tensor
    with pytest.raises(TypeError, match="fn must be a callable taking no arguments; got torch.Tensor"):
        diagnostics.saved_tensor_bytes(x)
    with pytest.raises(TypeError, match="exclude must be an iterable of tensors"):
        diagnostics.saved_tensor_bytes(run, exclude=[W, "V"])
    # x_0 … x_63, x (for a double backward) and a 4-byte stand-in for x_L, whose shape alone the backward reads
    assert saved("backprop", 64) == 65 * state_bytes + 4


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_reconstruction_error_inside_autocast_is_the_stack_s(method):
    """The diagnostic measures the stack as ode_mlp computes it — in its parameters' dtype, autocast or
    not — not a bfloat16 re-computation (20× larger before)."""
    x, W, V, b, c = make_stack(B=5, q=4, m=8, L=16, method=method, bias=True, dtype=torch.float32)
    want = diagnostics.reconstruction_error(x, W, V, b, c, method=method)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = diagnostics.reconstruction_error(x, W, V, b, c, method=method)
    torch.testing.assert_close(got, want)
