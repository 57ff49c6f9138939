"""Shared test inputs: random stacks, depth-smooth stacks, and a stack that shows σ and σ' of given values."""

import math

import torch

def make_stack(B=7, q=5, m=6, L=4, *, method="euler", bias=False, dtype=torch.float64, seed=0, v_scale=1.0):
    """Random inputs and stacked parameters with O(1) residuals, so every term is exercised."""
    gen = torch.Generator().manual_seed(seed)
    P = L + 1 if method == "heun" else L

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)

    x = randn(B, q)
    W, V = randn(P, m, q), randn(P, q, m, scale=v_scale)
    b, c = (randn(P, m), randn(P, q)) if bias else (None, None)
    return x, W, V, b, c


def smooth_stack(L, *, method, B=8, q=6, m=10, dtype=torch.float64, seed=0):
    """Weights sampling fixed smooth functions θ(s) at s = k/L: the same ODE at every depth."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, q, generator=gen, dtype=torch.float64)
    wc = torch.randn(3, m, q, generator=gen, dtype=torch.float64)
    vc = torch.randn(3, q, m, generator=gen, dtype=torch.float64)
    P = L + 1 if method == "heun" else L
    s = torch.arange(P, dtype=torch.float64)[:, None, None] / L

    def field(cs):
        return cs[0] + cs[1] * torch.sin(torch.pi * s) + 0.5 * cs[2] * torch.cos(2 * torch.pi * s)

    return x.to(dtype), field(wc).to(dtype), field(vc).to(dtype), None, None


def special_values(dtype):
    """NaN, ±inf, ±0 and finite values of both signs up to the largest of `dtype`: where σ, σ' and
    the transcendental functions inside them reach their limits, overflow or give NaN."""
    finite = [1.0, 3.0, 10.0, 50.0, 100.0, 1e4, 1e30, torch.finfo(dtype).max]
    values = [math.nan, math.inf, 0.0] + finite
    return torch.tensor(values + [-v for v in values[1:]], dtype=dtype)


def activation_probe(z):
    """(x, W, V) of a one-layer stack whose row i has the pre-activation z[i], for ode_mlp with
    q = 2, m = 1, Euler, T = 1 and scale_in = scale_out = 1: x_i = (z_i, 0), W = (1 0), V = (0 1)ᵀ.
    Then out[:, 1] = σ(z) and, with grad_out rows (0, 1) and backward="backprop", the gradient of
    x[:, 0] is σ'(z): one row per value, whatever the others are."""
    x = torch.stack([z, torch.zeros_like(z)], dim=1)
    W = torch.tensor([[[1.0, 0.0]]], dtype=z.dtype, device=z.device)
    V = torch.tensor([[[0.0], [1.0]]], dtype=z.dtype, device=z.device)
    return x, W, V


def activation_through_stack(backend, activation, z):
    """(σ(z), σ'(z)) as `backend` computes them inside its stack (see activation_probe)."""
    from odenets_fast import ode_mlp

    leaves = [t.clone().requires_grad_(True) for t in activation_probe(z)]
    out = ode_mlp(*leaves, activation=activation, backend=backend, backward="backprop", scale_in=1.0, scale_out=1.0)
    grad_out = torch.zeros_like(out)
    grad_out[:, 1] = 1.0
    (grad_x,) = torch.autograd.grad(out, leaves[0], grad_out)
    return out[:, 1].detach(), grad_x[:, 0]
