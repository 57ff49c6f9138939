"""Shared test inputs: random stacks and depth-smooth stacks."""

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
