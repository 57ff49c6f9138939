"""The "triton" backend: the depth loop around the per-layer fused kernels of
`odenets_fast.triton_kernels.mlp_step` (one launch per layer forward; one per layer backward plus
the deterministic weight-gradient sum).

States and gradients travel between layers in float32 buffers of shape (B, q) updated in place;
weight gradients accumulate in one float32 (P, slot) buffer (layout in `mlp_step`) and are cast
to the parameter dtype at the end. What is saved for backward follows the reference exactly
(`reference._Saved`): x_L, the anchors and, for Heun in backprop mode, the stages y_n — so the
activation memory of adjoint mode is O(B q) whatever the depth. The backward's workspaces (two
(B, q) buffers, the (P, slot) accumulator and the (programs, slots, slot) partial buffer) are
allocated once per call, not per layer.
"""

import torch
import triton
from torch import Tensor

from .reference import Gradients, _Saved, anchor_interval, relative_drift
from .spec import StackSpec
from .triton_kernels import mlp_step
from .triton_kernels.activations import ACTIVATION_CODES
from .triton_kernels.mlp_step import MAX_STATE_WIDTH, Layer

INTERPRETED = type(mlp_step.forward_step_kernel).__name__ == "InterpretedFunction"
_INT32_MAX = 2**31 - 1


def check_supported(x: Tensor, W: Tensor) -> None:
    """Raise a clear error for inputs the kernels cannot run; never compute a wrong answer."""
    if x.device.type != "cuda" and not (INTERPRETED and x.device.type == "cpu"):
        raise ValueError(
            f"backend 'triton' runs on CUDA tensors (or on CPU tensors when TRITON_INTERPRET=1 was set before "
            f"odenets_fast was imported); got tensors on {x.device}"
        )
    if INTERPRETED and x.dtype in (torch.bfloat16, torch.float64):
        raise TypeError(f"the Triton interpreter does not support {x.dtype}; use float32 or float16")
    if x.dtype == torch.float64:
        raise TypeError("backend 'triton' supports float32, float16 and bfloat16; use 'reference' or 'cpp' for float64")
    P, m, q = W.shape
    if q > MAX_STATE_WIDTH:
        raise ValueError(
            f"backend 'triton' keeps the state width on-chip up to q = {MAX_STATE_WIDTH}; got q = {q}. "
            f"Use backend='reference' (or 'cpp' on CPU) for wider states"
        )
    if x.shape[0] * q > _INT32_MAX or m * q > _INT32_MAX // 4:
        raise ValueError(f"backend 'triton' indexes with int32: B·q = {x.shape[0] * q} and m·q = {m * q} are too large")


def _layers(W, V, b, c) -> list[Layer]:
    W, V = W.contiguous(), V.contiguous()
    b = None if b is None else b.contiguous()
    c = None if c is None else c.contiguous()
    return [Layer(W[n], V[n], None if b is None else b[n], None if c is None else c[n]) for n in range(W.shape[0])]


def _kernel_args(spec: StackSpec, q: int, m: int) -> dict:
    return dict(
        act=ACTIVATION_CODES[spec.activation],
        step=spec.step,
        scale_in=spec.scale_in,
        scale_out=spec.scale_out,
        precision=spec.input_precision,
        config=mlp_step.step_config(q, m, INTERPRETED),
    )


def forward(x: Tensor, W, V, b, c, spec: StackSpec) -> tuple[Tensor, tuple]:
    check_supported(x, W)
    B, q = x.shape
    heun = spec.method == "heun"
    layers = _layers(W, V, b, c)
    args = _kernel_args(spec, q, W.shape[1])
    state = x.to(torch.float32, copy=True).contiguous()
    every = anchor_interval(spec)
    anchors = state.new_empty((len(range(0, spec.depth, every)), B, q))
    stages = state.new_empty((spec.depth, B, q)) if heun and spec.backward == "backprop" else None
    for n in range(spec.depth if B else 0):
        mlp_step.forward_step(
            state, layers[n], layers[n + 1] if heun else None,
            saved_state=anchors[n // every] if n % every == 0 else None,
            saved_stage=None if stages is None else stages[n], **args,
        )  # fmt: skip
    return state.to(x.dtype), tuple(_Saved(state, anchors, stages))


def backward(grad_out: Tensor, saved: tuple, W, V, b, c, spec: StackSpec) -> Gradients:
    """Layers L−1 … 0 with the same anchor and drift rules as `reference.backward`."""
    final, anchors, stages = _Saved(*saved)
    B, q = final.shape
    P, m, _ = W.shape
    heun = spec.method == "heun"
    layers = _layers(W, V, b, c)
    args = _kernel_args(spec, q, m)
    layout = mlp_step.GradLayout(P, q, m)
    slots = 2 if heun else 1  # layers whose gradients one reverse step touches
    grads = torch.zeros(layout.numel, dtype=torch.float32, device=final.device)
    atomic = not spec.deterministic
    programs = triton.cdiv(B, args["config"].block_b)
    row = slots * sum(layout.sizes)
    if layout.numel > _INT32_MAX or programs * row > _INT32_MAX:
        raise ValueError(
            f"backend 'triton' indexes gradients with int32: {layout.numel} accumulator and {programs * row} "
            f"partial floats; use a smaller batch or fewer/narrower layers"
        )
    if not atomic:
        # zeros, not empty: without biases the kernels never write the db/dc entries that the sum reads
        partials = torch.zeros((programs, row), dtype=torch.float32, device=final.device)
        segments = mlp_step.partial_segments(layout, slots, spec.depth, b is not None, c is not None, final.device)
    state = final.clone()
    g = grad_out.to(torch.float32, copy=True).contiguous()
    every = anchor_interval(spec)
    use_anchors = spec.backward == "backprop" or spec.anchor_every is not None
    drift = None
    for n in reversed(range(spec.depth)):
        anchored = use_anchors and n % every == 0
        if B:
            mlp_step.reverse_step(
                state, g, layers[n], layers[n + 1] if heun else None,
                grads if atomic else partials, layout.starts(n) if atomic else layout.partial_starts(slots),
                reconstruct=not anchored or (n == 0 and spec.backward == "adjoint"),
                stored_state=anchors[n // every] if anchored else None,
                stored_stage=None if stages is None else stages[n], atomic=atomic, **args,
            )  # fmt: skip
            if not atomic:
                mlp_step.sum_partials(partials, grads, segments[n], longest=slots * m * q)
        if n == 0 and spec.backward == "adjoint":
            drift = relative_drift(state, anchors[0])
    grad_W, grad_V, grad_b, grad_c = layout.split(grads)
    return Gradients(
        g.to(grad_out.dtype),
        grad_W.to(W.dtype),
        grad_V.to(V.dtype),
        None if b is None else grad_b.to(b.dtype),
        None if c is None else grad_c.to(c.dtype),
        drift,
    )
