"""An independent, autograd-only implementation of the stack: the check on the reference itself.

The forward loop is the benchmarks' eager baseline (`bench.baselines`), whose activations come
from torch.nn.functional, not from odenets_fast.activations, so a wrong σ or σ' in the package
cannot hide behind the same formula here. The reverse reconstruction is written here afresh.
"""

import torch

from bench.baselines import depth_of, eager_forward, residual, step  # noqa: F401  (eager_forward: for the tests)


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
