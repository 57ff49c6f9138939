"""The ODE-MLP stack as torch.library ops, so that torch.compile (fullgraph) and opcheck see it.

    odenets_fast::ode_mlp_forward    x_0 → (x_L, what the backward mode stores)
    odenets_fast::ode_mlp_backward   (g_L, stored states) → (g_0, dW, dV, db, dc); writes the drift

Both dispatch to the backend named by their `backend` argument (resolved before the call, so a
compiled graph holds a fixed backend). The forward's autograd formula calls the backward op; fake
(meta) implementations give torch.compile the shapes without running anything.

Why custom ops: dynamo and AOTAutograd treat them as opaque nodes with known shapes, which works
for every backend (C++, Triton, reference) alike. Their Python dispatch costs about 220 µs per
forward + backward on this project's CPU machine (`python -m bench.dispatch_overhead`), so eager
calls run `forward_impl` / `backward_impl` through a plain autograd.Function instead (ops.py);
only a graph being compiled records the ops.

Absent optional tensors travel as empty tensors (custom ops return tensors, never None): no
stages outside Heun backprop mode, no separate x_L when it is the output itself (same dtype), no
bias gradients without biases.

The drift ‖x̃_0 − x_0‖ / ‖x_0‖ is an output of the backward op; the autograd formula copies it into
`drift_out`, a 0-dim tensor that the caller passes to the forward (ODEMLP passes a buffer) — a side
effect that torch.compile keeps. (Declaring the backward op as mutating `drift_out` instead would
bump the version of a tensor autograd saved, breaking a second backward with retain_graph=True.)
Error-controlled anchors work the same way: the forward reads the anchor layout from `anchor_mask`
and returns the anchored layers (a size known only when it runs: a dynamic size under torch.compile),
the backward returns the segments' drifts and the next layout, which the formula copies into
`segment_drift_out` and `anchor_mask`.
"""

import contextlib
import inspect
from typing import Optional

import torch
from torch import Tensor

from . import segments
from .backends import load_backend
from .interface import Saved
from .spec import OP_FIELDS, StackSpec, compute_dtype


AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")  # torch.autocast raises for other device types (meta, …)
NUM_SCALARS = len(OP_FIELDS)


def autocast_off(t: Tensor):
    """The op computes in its inputs' dtype whether or not it runs inside torch.autocast: the forward
    and the reconstruction in the backward (which runs outside the caller's autocast region) must
    use the same arithmetic. Mixed precision is had by passing bfloat16/float16 parameters."""
    if t.device.type not in AUTOCAST_DEVICE_TYPES:
        return contextlib.nullcontext()
    return torch.autocast(t.device.type, enabled=False)


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


def is_absent(t: Tensor) -> bool:
    """Whether `t` stands for an absent tensor: shape (0,), which no stored state has (those are
    (B, q) or (S, B, q), empty too when B = 0)."""
    return t.dim() == 1 and t.numel() == 0


def _or_none(t: Tensor) -> Optional[Tensor]:
    return None if is_absent(t) else t


def forward_impl(
    x: Tensor, W: Tensor, V: Tensor, b: Optional[Tensor], c: Optional[Tensor],
    method: str, activation: str, step: float, scale_in: float, scale_out: float,
    backward: str, anchor_every: int, input_precision: str, deterministic: bool, drift_tol: float, strict: bool,
    backend: str, drift_out: Tensor, anchor_mask: Tensor, segment_drift_out: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(x_L, x_L in the compute dtype or empty, anchors, Heun stages or empty, anchored layers or
    empty); x is (B, q). With error-controlled anchors (drift_tol > 0), `anchor_mask` (L,) says where
    (odenets_fast.segments). `drift_out` and `segment_drift_out` are not touched here: they are
    inputs so that the autograd formula can reach them."""
    spec = StackSpec.from_op_args(W, method, activation, step, scale_in, scale_out, backward, anchor_every,
                                  input_precision, deterministic, drift_tol, strict)  # fmt: skip
    backend_module = load_backend(backend)
    x = x.contiguous()  # the reference would keep a transposed x's layout, the fake below promises a dense one
    with autocast_off(x):
        if spec.adaptive:
            positions = segments.positions_of(anchor_mask)
            out, (final, anchors, stages) = segments.forward(backend_module, x, W, V, b, c, spec, positions)
        else:
            out, (final, anchors, stages) = backend_module.forward(x, W, V, b, c, spec)
    final = final.new_empty(0) if final.data_ptr() == out.data_ptr() and final.dtype == out.dtype else final
    layers = torch.tensor(positions, device=x.device) if spec.adaptive else x.new_empty(0, dtype=torch.int64)
    return out, final, anchors, _or_empty(stages, anchors), layers


ode_mlp_forward = torch.library.custom_op("odenets_fast::ode_mlp_forward", forward_impl, mutates_args=())
# x, W, V, b, c, the OP_FIELDS scalars, backend and the three state tensors: the forward op's inputs,
# for each of which the autograd formula returns a gradient (or None)
NUM_FORWARD_INPUTS = len(inspect.signature(forward_impl).parameters)


@ode_mlp_forward.register_fake
def _(x, W, V, b, c, *scalars_and_state):
    spec = StackSpec.from_op_args(W, *scalars_and_state[:NUM_SCALARS])
    dtype = compute_dtype(x.dtype)
    rows = tuple(x.shape)
    # with error-controlled anchors, how many depends on the mask's values: a size only known when run
    stored = torch.library.get_ctx().new_dynamic_size() if spec.adaptive else spec.num_anchors
    heun_stages = spec.method == "heun" and spec.backward == "backprop"
    return (
        x.new_empty(rows),
        x.new_empty(rows if dtype != x.dtype else (0,), dtype=dtype),
        x.new_empty((stored,) + rows, dtype=dtype),
        x.new_empty((spec.depth,) + rows if heun_stages else (0,), dtype=dtype),
        x.new_empty((stored,) if spec.adaptive else (0,), dtype=torch.int64),
    )


def backward_impl(
    grad_out: Tensor, final: Tensor, anchors: Tensor, stages: Tensor, layers: Tensor,
    W: Tensor, V: Tensor, b: Optional[Tensor], c: Optional[Tensor],
    method: str, activation: str, step: float, scale_in: float, scale_out: float,
    backward: str, anchor_every: int, input_precision: str, deterministic: bool, drift_tol: float, strict: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(g_0, dW, dV, db or empty, dc or empty, drift, segment drifts or empty, next anchor mask or
    empty); `final` is x_L in the compute dtype, and so is the 0-dim drift — 0 in backprop mode, where
    nothing is reconstructed (and not NaN, which compares unequal to itself and would fail opcheck's
    eager-vs-traced comparison). With error-controlled anchors, the (L,) drift of each segment at its
    first layer (segments.NO_SEGMENT elsewhere) and the (L,) mask of the anchors the controller picks for the next call."""
    spec = StackSpec.from_op_args(W, method, activation, step, scale_in, scale_out, backward, anchor_every,
                                  input_precision, deterministic, drift_tol, strict)  # fmt: skip
    backend_module = load_backend(backend)
    segment_drift, next_mask = W.new_empty(0, dtype=torch.float32), W.new_empty(0, dtype=torch.bool)
    with autocast_off(grad_out):
        if spec.adaptive:
            positions = layers.tolist()
            saved = Saved(final, anchors, None)
            grads, drifts, _ = segments.backward(backend_module, grad_out, saved, positions, W, V, b, c, spec)
            per_layer = W.new_empty(spec.depth)
            segment_drift = segments.segment_drifts(positions, drifts, per_layer)
            layout = segments.next_positions(positions, drifts, spec.depth, spec.drift_tol, grad_out.numel() > 0)
            next_mask = segments.mask_of(layout, per_layer)
        else:
            grads = backend_module.backward(grad_out, Saved(final, anchors, _or_none(stages)), W, V, b, c, spec)
    drift = grad_out.new_zeros((), dtype=final.dtype) if grads.drift is None else grads.drift
    dense = [None if t is None else t.contiguous() for t in (grads.x, grads.W, grads.V, grads.b, grads.c)]
    return (*dense[:3], _or_empty(dense[3], grads.W), _or_empty(dense[4], grads.W), drift, segment_drift,
            next_mask)  # fmt: skip


ode_mlp_backward = torch.library.custom_op("odenets_fast::ode_mlp_backward", backward_impl, mutates_args=())


@ode_mlp_backward.register_fake
def _(grad_out, final, anchors, stages, layers, W, V, b, c, *scalars_and_backend):
    spec = StackSpec.from_op_args(W, *scalars_and_backend[:NUM_SCALARS])
    per_layer = (spec.depth,) if spec.adaptive else (0,)
    # dense gradients, as the implementation returns them: empty_like would copy a transposed (tied) W's strides
    return (
        grad_out.new_empty(grad_out.shape),
        W.new_empty(W.shape),
        V.new_empty(V.shape),
        W.new_empty(0) if b is None else b.new_empty(b.shape),
        W.new_empty(0) if c is None else c.new_empty(c.shape),
        grad_out.new_empty((), dtype=final.dtype),
        W.new_empty(per_layer, dtype=torch.float32),
        W.new_empty(per_layer, dtype=torch.bool),
    )
