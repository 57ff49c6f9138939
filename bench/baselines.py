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
    """f(x; θ_n) = a_out V_n σ(a_in W_n x + b_n) + c_n; W … c stacked tensors or per-layer sequences."""
    m, q = W[n].shape
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
    return len(W) - (1 if method == "heun" else 0)


def _per_layer(t):
    return None if t is None else (t.unbind(0) if isinstance(t, torch.Tensor) else tuple(t))


def eager_forward(x, W, V, b=None, c=None, *, method="euler", activation="gelu", T=1.0, **scales):
    """x_L by a plain loop; differentiating it is exact backprop through stored activations.

    W … c are stacked (P, …) tensors or sequences of per-layer tensors. A stack is unbound once:
    indexing W[n] inside the loop would make autograd's backward build a zero tensor of the whole
    stack for every layer — O(L² m q) work a user holding one weight per layer does not pay.
    """
    W, V, b, c = (_per_layer(t) for t in (W, V, b, c))
    L = depth_of(W, method)
    for n in range(L):
        x = step(x, W, V, b, c, n, method=method, activation=activation, h=T / L, **scales)
    return x
