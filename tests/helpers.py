"""Shared test inputs: random stacks, depth-smooth stacks, and a stack that shows σ and σ' of given values;
the `backend` fixture that runs a test on every backend and Triton path."""

import math

import pytest
import torch

from odenets_fast import planner

BACKENDS = ("reference", "cpp", "triton", "triton/layered")  # the Triton backend's two paths


@pytest.fixture
def backend(request, monkeypatch):
    """The backend name to pass (parametrize indirectly with BACKENDS); "triton/layered" is "triton"
    with the layered path forced."""
    name, _, path = request.param.partition("/")
    if path:
        monkeypatch.setenv(planner.PATH_ENV, path)
    return name


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


def activation_through_stack(backend, activation, z):
    """(σ(z), σ'(z)) as `backend` computes them inside its stack, for a 1-D z.

    A one-layer Euler stack (T = 1, a_in = a_out = 1, backward="backprop", B = q = 1) with W = 0 and
    b = z: z_j is the pre-activation of hidden unit j. With V = 1 and grad_out = 1, dV[0, j] = σ(z_j)
    and db[j] = σ'(z_j), each from its own unit whatever the others are. Every value is repeated over
    16 units, so that it also goes through full vectors of the C++ backend's loops, not only through
    their scalar remainder."""
    from odenets_fast import ode_mlp

    b = z.repeat_interleave(16)[None, :]
    m = b.shape[1]
    x = torch.ones(1, 1, dtype=z.dtype, device=z.device)
    W = torch.zeros(1, m, 1, dtype=z.dtype, device=z.device)
    V = torch.ones(1, 1, m, dtype=z.dtype, device=z.device, requires_grad=True)
    b.requires_grad_(True)
    out = ode_mlp(x, W, V, b, activation=activation, backend=backend, backward="backprop", scale_in=1.0,
                  scale_out=1.0)  # fmt: skip
    grad_V, grad_b = torch.autograd.grad(out, (V, b), torch.ones_like(out))
    return grad_V[0, 0].view(-1, 16), grad_b[0].view(-1, 16)
