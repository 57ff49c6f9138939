"""The reference backend: DESIGN.md §2–5 in plain PyTorch, one Python loop over depth.

This is the oracle that every other backend is tested against, and the fallback backend named
"reference". Gradients are hand-written vector-Jacobian products (no autograd inside), so the
same code serves the exact `backprop` mode (VJPs at stored states) and the memory-free
`adjoint` mode (VJPs at states reconstructed by running the forward rule backwards).

Precision (DESIGN.md §6): float16/bfloat16 inputs are computed in float32 (states, gradients
and weight-gradient accumulators), float32 in float32, float64 in float64; outputs and gradients
are cast back to the input dtype at the end.

It implements the backend interface of `interface.py`, as every backend does.
"""

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .activations import ACTIVATIONS
from .interface import Gradients, Saved, in_grad_dtype, relative_drift
from .spec import StackSpec, compute_dtype


class _Stack:
    """The stacked parameters in the compute dtype, with the residual f(x; θ_n) and its VJP."""

    def __init__(self, W, V, b, c, spec: StackSpec, dtype: torch.dtype):
        self.W, self.V = W.to(dtype), V.to(dtype)
        self.b = None if b is None else b.to(dtype)
        self.c = None if c is None else c.to(dtype)
        self.spec = spec
        self.act = ACTIVATIONS[spec.activation]

    def preact(self, x: Tensor, n: int) -> Tensor:
        """z = a_in W_n x + b_n, batched over rows of x."""
        z = x @ self.W[n].T
        z = z * self.spec.scale_in
        return z if self.b is None else z + self.b[n]

    def readout(self, z: Tensor, n: int) -> Tensor:
        """f = a_out V_n σ(z) + c_n."""
        f = (self.act.fn(z) @ self.V[n].T) * self.spec.scale_out
        return f if self.c is None else f + self.c[n]

    def f(self, x: Tensor, n: int) -> Tensor:
        return self.readout(self.preact(x, n), n)

    def vjp(self, x: Tensor, z: Tensor, u: Tensor, n: int, grads: "_Accumulators") -> Tensor:
        """Add the parameter VJP of f(·; θ_n) at x with cotangent u into `grads`; return dx.

            a = σ(z);  dV += a_out Σ u aᵀ;  dc += Σ u;  da = a_out Vᵀ u
            dz = σ'(z) ⊙ da;  db += Σ dz;  dW += a_in Σ dz xᵀ;  dx = a_in Wᵀ dz
        """
        a_in, a_out = self.spec.scale_in, self.spec.scale_out
        grads.V[n].addmm_(u.T, self.act.fn(z), alpha=a_out)
        if grads.c is not None:
            grads.c[n] += u.sum(0)
        dz = self.act.grad(z) * ((u @ self.V[n]) * a_out)
        if grads.b is not None:
            grads.b[n] += dz.sum(0)
        grads.W[n].addmm_(dz.T, x, alpha=a_in)
        return (dz @ self.W[n]) * a_in


class _Accumulators(NamedTuple):
    W: Tensor
    V: Tensor
    b: Optional[Tensor]
    c: Optional[Tensor]


def _forward_step(stack: _Stack, x: Tensor, n: int) -> tuple[Tensor, Optional[Tensor]]:
    """One forward layer: (x_{n+1}, y_n) with y_n = None for Euler (DESIGN.md §3)."""
    h = stack.spec.step
    k1 = stack.f(x, n)
    if stack.spec.method == "euler":
        return x + h * k1, None
    y = x + h * k1
    k2 = stack.f(y, n + 1)
    return x + (0.5 * h) * (k1 + k2), y


def reverse_step(stack: _Stack, x_next: Tensor, n: int) -> Tensor:
    """Reconstruct x̃_n from x̃_{n+1} by running the forward rule backwards (DESIGN.md §4)."""
    h = stack.spec.step
    if stack.spec.method == "euler":
        return x_next - h * stack.f(x_next, n)
    k_next = stack.f(x_next, n + 1)
    y = x_next - h * k_next
    return x_next - (0.5 * h) * (k_next + stack.f(y, n))


def _backward_step(stack, x: Tensor, y: Optional[Tensor], g: Tensor, n: int, grads) -> Tensor:
    """Exact VJP of forward layer n at state x; accumulates dθ into `grads`, returns g_n.

    Euler:  g_n = g + h ∂x f(x; θ_n)ᵀ g,  dθ_n += h ∂θ f(x; θ_n)ᵀ g
    Heun:   u2 = (h/2) g;  gy, dθ_{n+1} += VJP_f(y; θ_{n+1})[u2]
            u1 = (h/2) g + h gy;  gx, dθ_n += VJP_f(x; θ_n)[u1];  g_n = g + gy + gx
    `y` (Heun's stage y_n) is recomputed as x + h f(x; θ_n) when not stored.
    """
    h = stack.spec.step
    z1 = stack.preact(x, n)
    if stack.spec.method == "euler":
        return g + stack.vjp(x, z1, h * g, n, grads)
    if y is None:
        y = x + h * stack.readout(z1, n)
    u2 = (0.5 * h) * g
    gy = stack.vjp(y, stack.preact(y, n + 1), u2, n + 1, grads)
    gx = stack.vjp(x, z1, u2 + h * gy, n, grads)
    return g + gy + gx


def forward(x: Tensor, W, V, b, c, spec: StackSpec) -> tuple[Tensor, Saved]:
    """Run x_0 → x_L, storing the states that `spec.backward` needs (DESIGN.md §5)."""
    dtype = compute_dtype(x.dtype)
    stack = _Stack(W, V, b, c, spec, dtype)
    every = spec.anchor_interval
    state = x.to(dtype)
    anchors = state.new_empty((len(range(0, spec.depth, every)),) + tuple(state.shape))
    store_stages = spec.backward == "backprop" and spec.method == "heun"
    stages = state.new_empty((spec.depth,) + tuple(state.shape)) if store_stages else None
    for n in range(spec.depth):
        if n % every == 0:
            anchors[n // every] = state
        state, y = _forward_step(stack, state, n)
        if store_stages:
            stages[n] = y
    return state.to(x.dtype), Saved(state, anchors, stages)


def backward(grad_out: Tensor, saved: Saved, W, V, b, c, spec: StackSpec) -> Gradients:
    """Walk layers L−1 … 0: obtain x_n (stored anchor or reconstruction), then its exact VJP.

    In plain adjoint mode x_0 is stored only to measure the drift: the gradient at layer 0 uses
    the reconstructed x̃_0 like every other layer. With `anchor_every=k` the stored x_0, x_k, …
    replace the reconstruction at their layers (so `anchor_every=1` is exact backprop), and the
    drift is that of x̃_0 reconstructed from x̃_1.
    """
    final, anchors, stages = saved
    dtype = final.dtype
    stack = _Stack(W, V, b, c, spec, dtype)
    grads = _Accumulators(
        W=torch.zeros(W.shape, dtype=dtype, device=W.device),
        V=torch.zeros(V.shape, dtype=dtype, device=V.device),
        b=None if b is None else torch.zeros(b.shape, dtype=dtype, device=b.device),
        c=None if c is None else torch.zeros(c.shape, dtype=dtype, device=c.device),
    )
    every = spec.anchor_interval
    use_anchors = spec.backward == "backprop" or spec.anchor_every is not None
    g = grad_out.to(dtype)
    x_next, drift = final, None
    for n in reversed(range(spec.depth)):
        if use_anchors and n % every == 0:
            x = anchors[n // every]
            if n == 0 and spec.backward == "adjoint":
                drift = relative_drift(reverse_step(stack, x_next, 0), x)
        else:
            x = reverse_step(stack, x_next, n)
            if n == 0:
                drift = relative_drift(x, anchors[0])
        g = _backward_step(stack, x, None if stages is None else stages[n], g, n, grads)
        x_next = x

    return in_grad_dtype(grad_out, g, grads.W, grads.V, grads.b, grads.c, drift)


def differentiable_forward(x: Tensor, W, V, b, c, spec: StackSpec) -> Tensor:
    """x_L by the forward rule under autograd (every intermediate recorded): what backprop mode
    differentiates, as a graph that can be differentiated again (double backward)."""
    stack = _Stack(W, V, b, c, spec, compute_dtype(x.dtype))
    state = x.to(stack.W.dtype)
    for n in range(spec.depth):
        state = _forward_step(stack, state, n)[0]
    return state.to(x.dtype)


def trajectory(x: Tensor, W, V, b, c, spec: StackSpec) -> Tensor:
    """All forward states x_0 … x_L stacked as (L + 1, B, q), in the compute dtype."""
    stack = _Stack(W, V, b, c, spec, compute_dtype(x.dtype))
    states = [x.to(stack.W.dtype)]
    for n in range(spec.depth):
        states.append(_forward_step(stack, states[-1], n)[0])
    return torch.stack(states)


def reconstruct(final: Tensor, W, V, b, c, spec: StackSpec, anchors: Optional[Tensor] = None) -> Tensor:
    """Reverse-reconstructed states x̃_0 … x̃_L from x̃_L = `final`, stacked as (L + 1, B, q).

    With `anchors` (the true states, (L + 1, B, q)) and `spec.anchor_every = k`, x̃_n is reset to
    the true x_n at every n divisible by k, exactly as the anchored backward pass does.
    """
    stack = _Stack(W, V, b, c, spec, compute_dtype(final.dtype))
    states = [final.to(stack.W.dtype)]
    for n in reversed(range(spec.depth)):
        x = reverse_step(stack, states[-1], n)
        if anchors is not None and spec.anchor_every is not None and n % spec.anchor_every == 0:
            x = anchors[n].to(x.dtype)
        states.append(x)
    return torch.stack(states[::-1])
