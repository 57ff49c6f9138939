"""The public op `ode_mlp` and its autograd Function; the backend is picked per call."""

from types import ModuleType
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .backends import select_backend
from .spec import StackSpec, check_stack


class _OdeMlpFunction(torch.autograd.Function):
    """x_0 → x_L through the backend; backward is the backend's backprop or adjoint pass.

    Only what `spec.backward` needs is saved: every state in backprop mode, x_0 and x_L (and the
    anchors) in adjoint mode — this is where the memory saving happens.
    """

    @staticmethod
    def forward(ctx, x, W, V, b, c, spec: StackSpec, backend: ModuleType, on_drift):
        out, saved = backend.forward(x, W, V, b, c, spec)
        ctx.num_saved = len(saved)
        ctx.save_for_backward(*saved, W, V, b, c)
        ctx.spec, ctx.backend, ctx.on_drift = spec, backend, on_drift
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        tensors = ctx.saved_tensors
        saved, (W, V, b, c) = tensors[: ctx.num_saved], tensors[ctx.num_saved :]
        grads = ctx.backend.backward(grad_out.contiguous(), saved, W, V, b, c, ctx.spec)
        if ctx.on_drift is not None and grads.drift is not None:
            ctx.on_drift(grads.drift)
        needs = ctx.needs_input_grad
        return tuple(g if need else None for g, need in zip(grads[:5], needs)) + (None, None, None)


def ode_mlp(
    x: Tensor,
    W: Tensor,
    V: Tensor,
    b: Optional[Tensor] = None,
    c: Optional[Tensor] = None,
    *,
    method: str = "euler",
    activation: str = "gelu",
    T: float = 1.0,
    backward: str = "adjoint",
    anchor_every: Optional[int] = None,
    scale_in: Optional[float] = None,
    scale_out: Optional[float] = None,
    backend: Optional[str] = None,
    input_precision: str = "ieee",
    deterministic: bool = True,
    on_drift: Optional[Callable[[Tensor], None]] = None,
) -> Tensor:
    """A depth-L residual MLP stack, x_{n+1} = x_n + (T/L) f(x_n; θ_n), as one differentiable op.

    Args:
        x: (..., q) input; leading dims are flattened into the batch.
        W: (P, m, q), V: (P, q, m), b: (P, m) or None, c: (P, q) or None — stacked parameters,
            P = L for ``method="euler"`` and L + 1 for ``"heun"`` (θ_0 … θ_L).
        method: "euler" (ResNet) or "heun" (HeunNet).
        activation: identity, relu, tanh, gelu, gelu_tanh or silu.
        T: horizon; the step is h = T / L.
        backward: "backprop" (store every state, exact gradients) or "adjoint" (store x_0 and
            x_L, reconstruct the states backwards; memory independent of L, approximate).
        anchor_every: adjoint mode only — also store every k-th state; reconstruction restarts
            from the stored state there (k = 1 gives exact gradients).
        scale_in, scale_out: a_in and a_out; default 1/sqrt(q) and 1/sqrt(m).
        backend: "reference", "triton" or "cpp"; None picks by device (or ODENETS_FAST_BACKEND).
        input_precision: "ieee" (default) or "tf32" for float32 matrix products (Triton backend;
            the reference and C++ backends always use full float32/float64 products).
        deterministic: Triton backend — True (default) reduces weight gradients over the batch in
            a fixed order (bitwise reproducible); False uses atomics (faster, last bits vary).
        on_drift: called after an adjoint backward with the 0-dim tensor ‖x̃_0 − x_0‖ / ‖x_0‖.

    Returns:
        x_L with the shape and dtype of x.
    """
    spec = check_stack(
        x, W, V, b, c,
        method=method, activation=activation, T=T, backward=backward,
        anchor_every=anchor_every, scale_in=scale_in, scale_out=scale_out,
        input_precision=input_precision, deterministic=deterministic,
    )  # fmt: skip
    impl = select_backend(backend, x.device)
    if on_drift is not None and not callable(on_drift):
        raise TypeError(f"on_drift must be callable or None; got {type(on_drift).__name__}")
    rows = x.reshape(-1, x.shape[-1])
    out = _OdeMlpFunction.apply(rows, W, V, b, c, spec, impl, on_drift)
    return out.reshape(x.shape)
