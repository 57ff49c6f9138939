"""What users would run instead of odenets_fast: the same residual MLP stack as a plain PyTorch
loop under autograd ("eager backprop": every activation stored). Independent of the package's own
code (activations from torch.nn.functional), so the tests use it as their autograd oracle too."""

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
    """f(x; θ_n) = a_out V_n σ(a_in W_n x + b_n) + c_n."""
    q, m = W.shape[2], W.shape[1]
    a_in = 1.0 / math.sqrt(q) if scale_in is None else scale_in
    a_out = 1.0 / math.sqrt(m) if scale_out is None else scale_out
    z = a_in * x @ W[n].T + (0 if b is None else b[n])
    return a_out * TORCH_ACTIVATIONS[activation](z) @ V[n].T + (0 if c is None else c[n])


def step(x, W, V, b, c, n, *, method, activation, h, **scales):
    """One forward layer, DESIGN.md §3."""
    k1 = residual(x, W, V, b, c, n, activation, **scales)
    if method == "euler":
        return x + h * k1
    k2 = residual(x + h * k1, W, V, b, c, n + 1, activation, **scales)
    return x + h / 2 * (k1 + k2)


def depth_of(W, method):
    return W.shape[0] - (1 if method == "heun" else 0)


def eager_forward(x, W, V, b=None, c=None, *, method="euler", activation="gelu", T=1.0, **scales):
    """x_L by a plain loop; differentiating it is exact backprop through stored activations."""
    L = depth_of(W, method)
    for n in range(L):
        x = step(x, W, V, b, c, n, method=method, activation=activation, h=T / L, **scales)
    return x
