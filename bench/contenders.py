"""The ways to run the same Euler residual MLP stack (GELU, no biases) that the benchmarks compare, and the
seeded problem they run on. Each contender is a forward `(x, W, V, backend) -> x_L` with W (L, m, q) and
V (L, q, m), differentiable in W and V.

    eager_backprop            the plain PyTorch loop under autograd (bench.baselines.eager_forward): every
                              activation stored
    checkpoint_sqrtL          the same loop in round(√L) segments under torch.utils.checkpoint (non-reentrant)
    torchdiffeq_adjoint       torchdiffeq.odeint_adjoint, fixed-grid Euler with step 1/L on the depth-indexed
                              vector field (DepthIndexedField): the ResNet's forward, its gradient to O(1/L)
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
    "torchdiffeq is not installed: skipping the torchdiffeq_adjoint contender (pip install -r requirements.txt)"
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
    depth = W.shape[0]
    segments = sqrt_depth(depth)
    bounds = [round(i * depth / segments) for i in range(segments + 1)]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        # stacked slices: the segment folds its scales into them with one op each, not one per layer
        x = checkpoint(_segment, x, W[start:stop], V[start:stop], depth, use_reentrant=False)
    return x


def _segment(x, Ws, Vs, depth: int):
    """Layers Ws, Vs of a depth-`depth` stack (step 1/depth)."""
    return eager_forward(x, Ws, Vs, T=len(Ws) / depth)


class DepthIndexedField(nn.Module):
    """f(t, x) = the residual of layer n for t_n < t < t_(n+1), on the grid t_n = n/L (`grid`, in the
    weights' dtype), so that torchdiffeq's fixed-grid Euler on that grid is the ResNet forward (exactly when
    L is a power of two, else up to the rounding of the steps t_(n+1) − t_n) and odeint_adjoint's backward
    steps through the same layers in reverse. Solve with `solver_options`.

    Why that indexing is right in both directions (torchdiffeq 0.2.5, _impl/): with perturb=True the
    forward Euler step from t_n evaluates f at nextafter(t_n, +∞) (fixed_grid.Euler, Perturb.NEXT in
    misc._PerturbFunc); odeint_adjoint's backward solves the augmented system from t = 1 to 0 in negated
    time τ = −t (misc._check_inputs, _ReverseFunc), whose Euler step from τ = −t_(n+1) evaluates at
    nextafter(−t_(n+1), +∞), i.e. at t = nextafter(t_(n+1), −∞). Both times lie strictly inside
    (t_n, t_(n+1)), so `searchsorted(grid, t, right=True) − 1` gives n in both: the backward step from
    t_(n+1) to t_n differentiates layer n, the layer the forward step from t_n used. Without perturb the
    backward step evaluates at t_(n+1) itself, which belongs to layer n + 1 (a field indexed by round(t·L)
    gave layer 0 no gradient and layer L − 1 twice its own).
    The grid is handed to the solver (grid_constructor) rather than derived from a step size: torchdiffeq
    would build the backward grid as −1 + j·(1/L), which rounds differently from −n/L, and floor(t·L) then
    picks a neighbouring layer at some steps for most L that are not powers of two. `grid_between` gives
    the solver the very same numbers in either direction (the backward grid is negated back exactly).

    What the adjoint then computes is not backprop: it reconstructs the states by stepping backwards,
    x̃_n = x̃_(n+1) − f_n(x̃_(n+1))/L, and evaluates the vector–Jacobian products of layer n at x̃_(n+1)
    instead of x_n, an O(1/L) approximation of the network's gradient (tests/test_bench_smoke.py).
    """

    def __init__(self, W, V):
        super().__init__()
        self.W, self.V = W, V
        depth = W.shape[0]
        self.grid = torch.arange(depth + 1, dtype=W.dtype, device=W.device) / depth
        self.solver_options = {"grid_constructor": self.grid_between, "perturb": True}

    def grid_between(self, func, y0, t):
        """The grid from t[0] to t[-1] (0 → 1 in the forward, 1 → 0 in the adjoint's backward)."""
        return self.grid if t[0] < t[-1] else self.grid.flip(0)

    def forward(self, t, x):
        layer = int(torch.searchsorted(self.grid, t.reshape(1), right=True)) - 1
        return residual(x, self.W, self.V, None, None, layer, "gelu")


def torchdiffeq_adjoint(x, W, V, backend):
    from torchdiffeq import odeint_adjoint

    field = DepthIndexedField(W, V)
    states = odeint_adjoint(field, x, field.grid[[0, -1]], method="euler", options=field.solver_options,
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
