"""What every backend implements (DESIGN.md §7): a module with

    forward(x, W, V, b, c, spec) -> (out, Saved)
        x: (B, q) · out: (B, q) in x.dtype · Saved: the states the backward mode stores
    backward(grad_out, saved, W, V, b, c, spec) -> Gradients

`spec` is the validated `StackSpec`; x, grad_out and the stored states are 2-D (B, q) (the op flattens
leading dimensions). Lower precisions compute in float32, float64 in float64 (`spec.compute_dtype(x.dtype)`):
stored states are in the compute dtype, outputs and gradients in the dtypes of their inputs.
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
    """Gradients of one backward pass, in the dtypes of the inputs; b, c are None without biases.

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


def relative_drift(reconstructed: Tensor, exact: Tensor) -> Tensor:
    """‖x̃ − x‖ / ‖x‖ as a 0-dim tensor (no host sync); 0 for an empty or all-zero x."""
    err = torch.linalg.vector_norm(reconstructed - exact)
    return err / torch.linalg.vector_norm(exact).clamp_min(torch.finfo(exact.dtype).tiny)
