"""Honest measurements of what the memory-free backward costs in accuracy, and of depth smoothness.

    reconstruction_error  ‖x̃_n − x_n‖ / ‖x_n‖ for every layer (DESIGN.md §4)
    gradient_error        adjoint vs exact (backprop) gradients, overall and per layer
    depth_smoothness      max_k ‖W_{k+1} − W_k‖_F — small for weights that sample a smooth θ(s)
    saved_tensor_bytes    bytes autograd keeps for backward: the activation memory of a mode
"""

from typing import Callable, Optional

import torch
from torch import Tensor

from . import reference
from .library import autocast_off
from .ops import ode_mlp
from .spec import check_fixed_layout, check_stack, type_name


def _widened(t: Tensor) -> Tensor:
    """t in float64 (float32 on MPS, which has no float64), for norms: a float16 tensor's norm overflows
    past 65504 though every entry is finite, and bfloat16's rounds to 3 digits."""
    return t.detach().to(torch.float32 if t.device.type == "mps" else torch.float64)


def _relative(approx: Tensor, exact: Tensor, dims=None) -> Tensor:
    approx, exact = _widened(approx), _widened(exact)
    err = torch.linalg.vector_norm(approx - exact, dim=dims)
    return err / torch.linalg.vector_norm(exact, dim=dims).clamp_min(torch.finfo(exact.dtype).tiny)


@torch.no_grad()
def reconstruction_error(
    x: Tensor,
    W: Tensor,
    V: Tensor,
    b: Optional[Tensor] = None,
    c: Optional[Tensor] = None,
    *,
    method: str = "euler",
    activation: str = "gelu",
    T: float = 1.0,
    anchor_every: Optional[int] = None,
    scale_in: Optional[float] = None,
    scale_out: Optional[float] = None,
) -> Tensor:
    """Relative error ‖x̃_n − x_n‖ / ‖x_n‖ (norms over the whole batch) for n = 0 … L.

    x_n are the forward states, x̃_n those the adjoint backward reconstructs from x̃_L = x_L (reset
    to x_n at every multiple of `anchor_every`). Entry L is 0 by construction. The states are
    computed by the reference in the compute dtype of x (float64 stays float64), the norms in float64.
    """
    check_fixed_layout(anchor_every, "reconstruction_error")
    spec = check_stack(
        x, W, V, b, c, method=method, activation=activation, T=T, backward="adjoint",
        anchor_every=anchor_every, scale_in=scale_in, scale_out=scale_out,
    )  # fmt: skip
    rows = x.reshape(-1, x.shape[-1])
    with autocast_off(rows):  # the stack's own arithmetic, as ode_mlp computes it inside autocast too
        exact = reference.trajectory(rows, W, V, b, c, spec)
        approx = reference.reconstruct(exact[-1], W, V, b, c, spec, anchors=exact)
    return _relative(approx, exact, dims=(1, 2))


def gradient_error(
    x: Tensor,
    W: Tensor,
    V: Tensor,
    b: Optional[Tensor] = None,
    c: Optional[Tensor] = None,
    grad_out: Optional[Tensor] = None,
    *,
    method: str = "euler",
    activation: str = "gelu",
    T: float = 1.0,
    anchor_every: Optional[int] = None,
    scale_in: Optional[float] = None,
    scale_out: Optional[float] = None,
    backend: Optional[str] = None,
) -> dict:
    """Relative error of adjoint-mode gradients against exact backprop gradients.

    Both come from the same backend, for the cotangent `grad_out` on x_L (default: a standard
    Gaussian drawn from a fixed seed, so repeated calls agree). Returns a dict with a float per
    input ("x", "W", "V", and "b", "c" when given) — ‖ĝ − g‖ / ‖g‖, the norms taken in float64 — and
    "W_per_layer", a (P,) float64 tensor of the same error for each W_k. The two backward passes run
    with gradients enabled, also inside torch.no_grad() or inference_mode.
    """
    check_fixed_layout(anchor_every, "gradient_error")  # "auto" would start from a fresh layout: plain adjoint's
    check_stack(
        x, W, V, b, c, method=method, activation=activation, T=T, backward="adjoint",
        anchor_every=anchor_every, scale_in=scale_in, scale_out=scale_out,
    )  # fmt: skip
    tensors = {"x": x, "W": W, "V": V, "b": b, "c": c}
    given = {k: t for k, t in tensors.items() if t is not None}
    if grad_out is None:
        gen = torch.Generator().manual_seed(0)
        grad_out = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.device, x.dtype)
    elif not isinstance(grad_out, Tensor) or grad_out.shape != x.shape:
        raise ValueError(f"grad_out must be a tensor of the shape of x {tuple(x.shape)}")

    def leaf(t: Tensor) -> Tensor:
        # a tensor made under torch.inference_mode cannot enter an autograd graph; a copy of it can
        return (t.clone() if t.is_inference() else t).detach().requires_grad_(True)

    def grads(mode: str, anchors: Optional[int]):
        # the measurement is two backward passes: they run inside torch.no_grad() and inference_mode too
        with torch.inference_mode(False), torch.enable_grad():
            leaves = {k: leaf(t) for k, t in given.items()}
            full = {k: leaves.get(k) for k in tensors}
            out = ode_mlp(
                full["x"], full["W"], full["V"], full["b"], full["c"], method=method, activation=activation,
                T=T, backward=mode, anchor_every=anchors, scale_in=scale_in, scale_out=scale_out, backend=backend,
            )  # fmt: skip
            return dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), grad_out)))

    exact, approx = grads("backprop", None), grads("adjoint", anchor_every)
    result = {k: float(_relative(approx[k], exact[k])) for k in given}
    result["W_per_layer"] = _relative(approx["W"], exact["W"], dims=(1, 2))
    return result


def depth_smoothness(W: Tensor) -> float:
    """max_k ‖W_{k+1} − W_k‖_F over the depth axis (dim 0) of stacked weights, in float64; 0 for one layer."""
    if not isinstance(W, Tensor) or W.dim() < 1 or not W.is_floating_point():
        raise TypeError("W must be a floating-point tensor with depth as dim 0")
    if W.shape[0] < 2:
        return 0.0
    wide = _widened(W)
    diffs = (wide[1:] - wide[:-1]).reshape(W.shape[0] - 1, -1)
    return float(torch.linalg.vector_norm(diffs, dim=1).max())


def saved_tensor_bytes(fn: Callable[[], Tensor], exclude: tuple = ()) -> int:
    """Bytes of the distinct tensors autograd saves for backward while running `fn()`.

    Storages shared with `exclude` (typically the parameters, which exist anyway) are not
    counted, nor is any storage counted twice. This is the activation memory of a backward mode. `fn`
    runs with gradients enabled, as in a training step, also inside torch.no_grad() or inference_mode.
    `exclude`: tensors, in any iterable (`model.parameters()`), or one tensor.
    """
    if not callable(fn):
        raise TypeError(f"fn must be a callable taking no arguments; got {type_name(fn)}")
    exclude = (exclude,) if isinstance(exclude, Tensor) else tuple(exclude)
    if not all(isinstance(t, Tensor) for t in exclude):
        raise TypeError("exclude must be an iterable of tensors (typically the parameters) or one tensor")
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    # what a training step would save: inside torch.no_grad() or inference_mode autograd would save nothing
    with torch.inference_mode(False), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
