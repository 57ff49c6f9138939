"""The "cpp" backend: the C++ CPU kernels of `csrc/` behind the backend interface (`interface.py`).

Importing this module imports the extension `odenets_fast._C`, whose import registers the ops
`torch.ops.odenets_fast.mlp_stack_forward` and `mlp_stack_backward`; without a built extension the
import raises ImportError. What it saves is `interface.Saved` (x_L, anchors, Heun stages),
and lower precisions are computed in float32 and cast back, as in the reference (DESIGN.md §6).
"""

from typing import Optional

import torch
from torch import Tensor

from . import _C  # noqa: F401  (registers torch.ops.odenets_fast.*)
from .interface import Gradients, Saved, in_grad_dtype
from .spec import StackSpec, compute_dtype


@torch.library.register_fake("odenets_fast::mlp_stack_forward")
def _(x, W, V, b, c, method, activation, step, scale_in, scale_out, backward, anchor_every):
    """Shapes of the forward op's outputs, for torch.compile and opcheck (see the schema in csrc/)."""
    depth = W.shape[0] - (1 if method == "heun" else 0)
    every = 1 if backward == "backprop" else (anchor_every or depth)
    stored = len(range(0, depth, every))
    stages = x.new_empty((depth,) + tuple(x.shape)) if method == "heun" and backward == "backprop" else None
    return x.new_empty(x.shape), x.new_empty((stored,) + tuple(x.shape)), stages


@torch.library.register_fake("odenets_fast::mlp_stack_backward")
def _(grad_out, final, anchors, stages, W, V, b, c, method, activation, step, scale_in, scale_out, backward,
      anchor_every):  # fmt: skip
    return (  # dense, as the kernels write them (empty_like would copy a transposed W's strides)
        grad_out.new_empty(grad_out.shape),
        W.new_empty(W.shape),
        V.new_empty(V.shape),
        None if b is None else b.new_empty(b.shape),
        None if c is None else c.new_empty(c.shape),
        grad_out.new_empty(()) if backward == "adjoint" else None,
    )


def _cpp_op_scalars(spec: StackSpec) -> tuple:
    """The scalars of the C++ ops' schema (csrc/registration.cpp): the step, not T; None for no anchors."""
    return (spec.method, spec.activation, spec.step, spec.scale_in, spec.scale_out, spec.backward, spec.anchor_every)


def _to(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def forward(x: Tensor, W, V, b, c, spec: StackSpec) -> tuple[Tensor, Saved]:
    """Run x_0 → x_L, storing the states that `spec.backward` needs (DESIGN.md §5)."""
    dtype = compute_dtype(x.dtype)
    final, anchors, stages = torch.ops.odenets_fast.mlp_stack_forward(
        x.contiguous().to(dtype), W.to(dtype), V.to(dtype), _to(b, dtype), _to(c, dtype), *_cpp_op_scalars(spec)
    )
    return final.to(x.dtype), Saved(final, anchors, stages)


def backward(grad_out: Tensor, saved: Saved, W, V, b, c, spec: StackSpec) -> Gradients:
    """Layers L−1 … 0: stored state or reconstruction, then the exact VJP (as `reference.backward`)."""
    final, anchors, stages = saved
    dtype = final.dtype
    grad_x, grad_W, grad_V, grad_b, grad_c, drift = torch.ops.odenets_fast.mlp_stack_backward(
        grad_out.to(dtype), final, anchors, stages, W.to(dtype), V.to(dtype), _to(b, dtype), _to(c, dtype),
        *_cpp_op_scalars(spec),
    )  # fmt: skip
    return in_grad_dtype(grad_out, grad_x, grad_W, grad_V, grad_b, grad_c, drift)
