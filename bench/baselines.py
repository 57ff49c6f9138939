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


def _scales(W_n, scale_in, scale_out) -> tuple[float, float]:
    m, q = W_n.shape
    return (1.0 / math.sqrt(q) if scale_in is None else scale_in, 1.0 / math.sqrt(m) if scale_out is None else scale_out)


def _scaled(weight, scale):
    """The scale on the (m, q) weight, not on the (B, ·) activations: no kernel where it is 1."""
    return weight if scale == 1.0 else weight * scale


def _at(t, n):
    return None if t is None else t[n]


def _hidden(x, W, b, n, activation, a_in):
    """σ(a_in W_n x + b_n): one GEMM (the bias in its epilogue), then σ."""
    return TORCH_ACTIVATIONS[activation](F.linear(x, _scaled(W[n], a_in), _at(b, n)))


def residual(x, W, V, b, c, n, activation, scale_in=None, scale_out=None):
    """f(x; θ_n) = a_out V_n σ(a_in W_n x + b_n) + c_n; W … c stacked tensors or per-layer sequences."""
    a_in, a_out = _scales(W[n], scale_in, scale_out)
    return F.linear(_hidden(x, W, b, n, activation, a_in), _scaled(V[n], a_out), _at(c, n))


def step(x, W, V, b, c, n, *, method, activation, h, scale_in=None, scale_out=None):
    """One forward layer, DESIGN.md §3 (eager_forward's Euler loop folds h into the weights instead)."""
    k1 = residual(x, W, V, b, c, n, activation, scale_in, scale_out)
    if method == "euler":
        return torch.add(x, k1, alpha=h)
    k2 = residual(torch.add(x, k1, alpha=h), W, V, b, c, n + 1, activation, scale_in, scale_out)
    return torch.add(x, k1 + k2, alpha=h / 2)


def depth_of(W, method):
    return len(W) - (1 if method == "heun" else 0)


def _per_layer(t, scale=1.0):
    """Per-layer tensors of a stacked (P, …) tensor or a sequence, times `scale` (one op for a stack)."""
    if t is None:
        return None
    return _scaled(t, scale).unbind(0) if isinstance(t, torch.Tensor) else tuple(_scaled(w, scale) for w in t)


def eager_forward(x, W, V, b=None, c=None, *, method="euler", activation="gelu", T=1.0, scale_in=None, scale_out=None):
    """x_L by a plain loop; differentiating it is exact backprop through stored activations.

    Written as a user after speed writes it, so that ratios against it are not flattered: the fixed
    scales a_in, a_out (Euler: and the step h) folded into the weights once per call, a bias only where
    there is one (in the GEMM's epilogue), Euler's update accumulated by the second GEMM with alpha = 1
    (another alpha costs its backward a multiply per gradient) — per Euler layer two GEMMs and σ.
    W … c are stacked (P, …) tensors or sequences of per-layer tensors. A stack is unbound once:
    indexing W[n] inside the loop would make autograd's backward build a zero tensor of the whole
    stack for every layer — O(L² m q) work a user holding one weight per layer does not pay.
    """
    a_in, a_out = _scales(W[0], scale_in, scale_out)
    L = depth_of(W, method)
    h = T / L
    state = x.reshape(-1, x.shape[-1])
    if method == "euler":  # h too: x + h c_n, then one GEMM accumulating into it with alpha = 1
        W, V, b, c = _per_layer(W, a_in), _per_layer(V, h * a_out), _per_layer(b), _per_layer(c, h)
        for n in range(L):
            start = state if c is None else state + c[n]
            state = torch.addmm(start, _hidden(state, W, b, n, activation, 1.0), V[n].T)
        return state.reshape(x.shape)
    W, V, b, c = _per_layer(W, a_in), _per_layer(V, a_out), _per_layer(b), _per_layer(c)
    for n in range(L):
        state = step(state, W, V, b, c, n, method=method, activation=activation, h=h, scale_in=1.0, scale_out=1.0)
    return state.reshape(x.shape)
