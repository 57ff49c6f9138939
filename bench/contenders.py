"""The ways to run the same Euler residual MLP stack (GELU, no biases) that the benchmarks compare, and the
seeded problem they run on. Each contender is a forward `(x, W, V, backend) -> x_L` with W (L, m, q) and
V (L, q, m), differentiable in W and V.

    eager_backprop            the plain PyTorch loop under autograd (bench.baselines.eager_forward): every
                              activation stored
    checkpoint_sqrtL          the same loop in round(√L) segments under torch.utils.checkpoint (non-reentrant)
    torchdiffeq_adjoint       torchdiffeq.odeint_adjoint, fixed-grid Euler with step 1/L on the depth-indexed
                              vector field (an optional extra)
    odenets_backprop          ode_mlp(backward="backprop")
    odenets_adjoint           ode_mlp(backward="adjoint")
    odenets_adjoint_anchored  ode_mlp(backward="adjoint", anchor_every=round(√L))
"""

import importlib.util
import math
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from bench.baselines import eager_forward, residual
from odenets_fast import ode_mlp

TORCHDIFFEQ_MISSING = (
    "torchdiffeq is not installed: skipping the torchdiffeq_adjoint contender (pip install -r requirements-bench.txt)"
)


class Sizes(NamedTuple):
    batch: int
    dim: int
    hidden: int


def problem_tensors(sizes: Sizes, depth: int, device: torch.device, seed: int = 0):
    """Inputs x, targets y (B, q) and parameters W (L, m, q), V (L, q, m) requiring grad, drawn from one seed on
    the CPU so that every contender, on every device, sees the same numbers (and the same x, y at every depth)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sizes.batch, sizes.dim, generator=gen)
    y = torch.randn(sizes.batch, sizes.dim, generator=gen)
    W = torch.randn(depth, sizes.hidden, sizes.dim, generator=gen)
    V = torch.randn(depth, sizes.dim, sizes.hidden, generator=gen)
    return x.to(device), y.to(device), W.to(device).requires_grad_(True), V.to(device).requires_grad_(True)


def training_loss(out, y):
    """(1/B) Σ_i ‖x_L,i − y_i‖²."""
    return (out - y).square().sum(-1).mean()


def make_step(contender: str, sizes: Sizes, depth: int, device: torch.device, backend: Optional[str]):
    """(step, gradient bytes): `step()` runs one training step of `contender` on the seeded problem — the loss
    and its gradients w.r.t. W and V; gradient bytes is what those gradients occupy."""
    forward = CONTENDERS[contender]
    x, y, W, V = problem_tensors(sizes, depth, device)

    def step():
        torch.autograd.grad(training_loss(forward(x, W, V, backend), y), (W, V))

    return step, sum(p.numel() * p.element_size() for p in (W, V))


def torchdiffeq_installed() -> bool:
    return importlib.util.find_spec("torchdiffeq") is not None


def sqrt_depth(depth: int) -> int:
    return max(1, round(math.sqrt(depth)))


def eager_backprop(x, W, V, backend):
    return eager_forward(x, W, V)


def checkpointed(x, W, V, backend):
    """round(√L) checkpointed segments: only segment inputs are kept, the activations of a segment are
    recomputed during backward."""
    depth, Ws, Vs = W.shape[0], W.unbind(0), V.unbind(0)
    segments = sqrt_depth(depth)
    bounds = [round(i * depth / segments) for i in range(segments + 1)]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        x = checkpoint(_segment, x, Ws[start:stop], Vs[start:stop], depth, use_reentrant=False)
    return x


def _segment(x, Ws, Vs, depth: int):
    """Layers Ws, Vs of a depth-`depth` stack (step 1/depth)."""
    return eager_forward(x, Ws, Vs, T=len(Ws) / depth)


class DepthIndexedField(nn.Module):
    """f(t, x) = the residual of layer n = min(round(t·L), L − 1), so that fixed-grid Euler with step 1/L
    (grid t_k = k/L) is exactly the ResNet. Rounding rather than flooring keeps a grid time computed as
    slightly less than k/L on layer k."""

    def __init__(self, W, V):
        super().__init__()
        self.W, self.V = W, V

    def forward(self, t, x):
        depth = self.W.shape[0]
        return residual(x, self.W, self.V, None, None, min(int(torch.round(t * depth)), depth - 1), "gelu")


def torchdiffeq_adjoint(x, W, V, backend):
    from torchdiffeq import odeint_adjoint

    times = torch.tensor([0.0, 1.0], device=x.device)
    states = odeint_adjoint(DepthIndexedField(W, V), x, times, method="euler", options={"step_size": 1.0 / W.shape[0]},
                            adjoint_params=(W, V))  # fmt: skip
    return states[-1]


def _odenets(backward: str, anchored: bool = False) -> Callable:
    def forward(x, W, V, backend):
        anchor_every = sqrt_depth(W.shape[0]) if anchored else None
        return ode_mlp(x, W, V, method="euler", activation="gelu", backward=backward, anchor_every=anchor_every,
                       backend=backend)  # fmt: skip

    return forward


CONTENDERS: dict[str, Callable] = {
    "eager_backprop": eager_backprop,
    "checkpoint_sqrtL": checkpointed,
    "torchdiffeq_adjoint": torchdiffeq_adjoint,
    "odenets_backprop": _odenets("backprop"),
    "odenets_adjoint": _odenets("adjoint"),
    "odenets_adjoint_anchored": _odenets("adjoint", anchored=True),
}
