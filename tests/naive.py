"""An independent, autograd-only implementation of the stack: the check on the reference itself.

Activations come from torch.nn.functional, not from odenets_fast.activations, so a wrong σ or σ'
in the package cannot hide behind the same formula here.
"""

import math

import torch
import torch.nn.functional as F

TORCH_ACTIVATIONS = {
    "identity": lambda z: z,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
}


def residual(x, W, V, b, c, n, activation, scale_in=None, scale_out=None):
    q, m = W.shape[2], W.shape[1]
    a_in = 1.0 / math.sqrt(q) if scale_in is None else scale_in
    a_out = 1.0 / math.sqrt(m) if scale_out is None else scale_out
    z = a_in * x @ W[n].T + (0 if b is None else b[n])
    return a_out * TORCH_ACTIVATIONS[activation](z) @ V[n].T + (0 if c is None else c[n])


def step(x, W, V, b, c, n, *, method, activation, h, **scales):
    k1 = residual(x, W, V, b, c, n, activation, **scales)
    if method == "euler":
        return x + h * k1
    k2 = residual(x + h * k1, W, V, b, c, n + 1, activation, **scales)
    return x + h / 2 * (k1 + k2)


def depth_of(W, method):
    return W.shape[0] - (1 if method == "heun" else 0)


def forward(x, W, V, b=None, c=None, *, method="euler", activation="gelu", T=1.0, **scales):
    """x_L by a plain loop under autograd (what `backprop` mode must differentiate exactly)."""
    L = depth_of(W, method)
    for n in range(L):
        x = step(x, W, V, b, c, n, method=method, activation=activation, h=T / L, **scales)
    return x


def reverse(x_next, W, V, b, c, n, *, method, activation, h, **scales):
    """DESIGN.md §4 reconstruction of x̃_n from x̃_{n+1}, written independently of the package."""
    if method == "euler":
        return x_next - h * residual(x_next, W, V, b, c, n, activation, **scales)
    k = residual(x_next, W, V, b, c, n + 1, activation, **scales)
    y = x_next - h * k
    return x_next - h / 2 * (k + residual(y, W, V, b, c, n, activation, **scales))


def adjoint_grads(x0, W, V, b, c, grad_out, *, method, activation, T=1.0, anchor_every=None):
    """The adjoint gradient by definition: reconstruct the states backwards (resetting to the true
    state at multiples of `anchor_every`), then take autograd's VJP of each forward step there."""
    L = depth_of(W, method)
    h = T / L
    with torch.no_grad():
        states = [x0]
        for n in range(L):
            states.append(step(states[-1], W, V, b, c, n, method=method, activation=activation, h=h))
    params = [p for p in (W, V, b, c) if p is not None]
    totals = [torch.zeros_like(p) for p in params]
    g, x_next = grad_out, states[-1]
    for n in reversed(range(L)):
        with torch.no_grad():
            x = reverse(x_next, W, V, b, c, n, method=method, activation=activation, h=h)
            if anchor_every is not None and n % anchor_every == 0:
                x = states[n]
        xn = x.detach().requires_grad_(True)
        out = step(xn, W, V, b, c, n, method=method, activation=activation, h=h)
        got = torch.autograd.grad(out, [xn] + params, g, allow_unused=True)
        g = got[0]
        for t, d in zip(totals, got[1:]):
            if d is not None:
                t += d
        x_next = x
    return [g] + totals
