"""What every backend implements (DESIGN.md §7): a module with

    forward(x, W, V, b, c, spec) -> (out, Saved)
        x: (B, q) · out: (B, q) in x.dtype · Saved: the states the backward mode stores
    backward(grad_out, saved, W, V, b, c, spec) -> Gradients

`spec` is the validated `StackSpec`; x, grad_out and the stored states are 2-D (B, q) (the op flattens
leading dimensions). Lower precisions compute in float32, float64 in float64 (`spec.compute_dtype(x.dtype)`):
stored states are in the compute dtype, outputs in x's dtype and gradients in grad_out's — the inputs'
dtype (a call's tensors share one), or the compute dtype where a caller passes grad_out in it
(segments.py, so that gradients cross segment boundaries unrounded).
"""

from typing import NamedTuple, Optional, Protocol

import torch
from torch import Tensor

from .spec import StackSpec


class Saved(NamedTuple):
    """What a forward keeps for its backward, in the compute dtype."""

    final: Tensor  # x_L: where reverse reconstruction starts
    anchors: Tensor  # (S, B, q): x_n for n in range(0, L, spec.anchor_interval)
    heun_stages: Optional[Tensor]  # (L, B, q): y_n, Heun in backprop mode only


class Gradients(NamedTuple):
    """Gradients of one backward pass, in grad_out's dtype (`in_grad_dtype`); b, c are None without biases.

    `drift` is the 0-dim tensor ‖x̃_0 − x_0‖ / ‖x_0‖ (adjoint mode), None in backprop mode.
    """

    x: Tensor
    W: Tensor
    V: Tensor
    b: Optional[Tensor]
    c: Optional[Tensor]
    drift: Optional[Tensor]


class Backend(Protocol):
    def forward(self, x: Tensor, W: Tensor, V: Tensor, b: Optional[Tensor], c: Optional[Tensor],
                spec: StackSpec) -> tuple[Tensor, Saved]: ...  # fmt: skip

    def backward(self, grad_out: Tensor, saved: Saved, W: Tensor, V: Tensor, b: Optional[Tensor],
                 c: Optional[Tensor], spec: StackSpec) -> Gradients: ...  # fmt: skip


def in_grad_dtype(grad_out: Tensor, x: Tensor, W: Tensor, V: Tensor, b: Optional[Tensor], c: Optional[Tensor],
                  drift: Optional[Tensor]) -> Gradients:  # fmt: skip
    """Gradients of x, W, V, b, c (computed in the compute dtype) in grad_out's dtype (module docstring)."""
    return Gradients(*(None if t is None else t.to(grad_out.dtype) for t in (x, W, V, b, c)), drift)


def relative_drift(reconstructed: Tensor, exact: Tensor) -> Tensor:
    """‖x̃ − x‖ / ‖x‖ as a 0-dim tensor (no host sync); 0 for an empty x and where x̃ = x = 0. An all-zero x
    has no scale to be relative to: there the error is divided by the smallest normal number.

    Both norms are taken of the states divided by max |x|: squared float32 entries underflow below
    about 1e-19 and overflow above 1e19, which would report a drift of 0 or NaN for states of that
    scale (the C++ backend sums the squares in double, to the same effect)."""
    if exact.numel() == 0:
        return exact.new_zeros(())
    scale = exact.abs().amax().clamp_min(torch.finfo(exact.dtype).tiny)
    # ‖x/scale‖ ≥ 1 unless x = 0, where the error is divided by scale = tiny, as the docstring says
    return torch.linalg.vector_norm((reconstructed - exact) / scale) / torch.linalg.vector_norm(exact / scale).clamp_min(1)
