"""The public op `ode_mlp`: argument checks, backend choice, and the autograd formula of the
library ops in `library.py` — recorded as those custom ops under torch.compile, run through a plain
autograd.Function in eager mode (same formula, without the custom-op dispatch cost)."""

from typing import Optional, Union

import torch
from torch import Tensor

from . import library, reference, segments
from .backends import resolve_backend
from .spec import StackSpec, check_not_torchscript, check_stack


def _setup_context(ctx, inputs, output):
    x, W, V, b, c = inputs[:5]
    scalars = inputs[5 : 5 + library.NUM_SCALARS]
    backend, drift_out, anchor_mask, segment_drift_out = inputs[5 + library.NUM_SCALARS :]
    out, final, anchors, stages, layers = output
    ctx.mark_non_differentiable(final, anchors, stages, layers)
    spec = StackSpec.from_op_args(W, *scalars)
    # x_L doubles as the reconstruction's start when it is already in the compute dtype. Backprop mode stores
    # every input state and reads only x_L's shape and dtype: a stand-in of no memory, so that an in-place op
    # on the output (an nn.ReLU(inplace=True) after the stack) is allowed, as after a plain loop.
    final = out if library.is_absent(final) else final
    if spec.backward == "backprop":
        final = final.new_zeros(()).expand(final.shape)
    # x itself only for a double backward, which backprop mode supports by re-running the stack
    ctx.save_for_backward(final, anchors, stages, layers, x if spec.backward == "backprop" else None, W, V, b, c)
    # written, not read: attributes, so that their versions are not checked
    ctx.drift_out, ctx.anchor_mask, ctx.segment_drift_out = drift_out, anchor_mask, segment_drift_out
    ctx.spec, ctx.backend = spec, backend


def _backward(ctx, grad_out, *_):
    """Gradients of x, W, V, b, c through the backward op (hand-written VJPs, DESIGN.md §4).

    With create_graph=True the backward pass must itself be differentiable: in backprop mode the
    stack is re-run under autograd from the saved inputs and differentiated exactly; in adjoint
    mode there is nothing exact to differentiate, so it is an error. The re-run is differentiated
    through torch.func.vjp, not torch.autograd.grad: torch.func.vjp's and jacrev's vjp functions run
    after their transform's level has ended, where the saved inputs are that level's dead wrappers —
    operations on them record nothing for autograd.grad, while a vjp of their own wraps them anew.
    A batched backward (`is_grads_batched=True`, `autograd.functional.jacobian(vectorize=True)`) runs
    under vmap, which the kernels have no batching rule for: it takes the same re-run.
    """
    no_grads = (None,) * (library.NUM_FORWARD_INPUTS - 5)  # for the scalars, backend and state tensors
    if grad_out is None:  # x_L did not reach the loss
        return (None,) * 5 + no_grads
    spec = ctx.spec
    final, anchors, stages, layers, x, W, V, b, c = segments.saved_tensors(ctx) if spec.adaptive else ctx.saved_tensors
    batched = torch._C._functorch.is_legacy_batchedtensor(grad_out) or torch._C._functorch.is_batchedtensor(grad_out)
    if torch.is_grad_enabled() or batched:
        if spec.backward == "adjoint" and batched:
            raise RuntimeError(
                "a batched backward (is_grads_batched=True, jacobian(vectorize=True)) through ode_mlp in adjoint mode "
                "is not supported: its backward runs the backends' kernels, which vmap cannot batch. Loop over the "
                "cotangents (jacobian(vectorize=False)), or use backward='backprop'."
            )
        if spec.backward == "adjoint":
            raise RuntimeError(
                "double backward (create_graph=True, or a torch.func transform: grad, jacrev, … differentiate that way) "
                "through ode_mlp in adjoint mode is not supported: its backward reconstructs states instead of "
                "recording them. Use backward='backprop' for higher-order gradients and torch.func."
            )
        # only what needs a gradient: data x or a frozen W, V, b, c is not differentiated
        needed = [t is not None and t.requires_grad for t in (x, W, V, b, c)]
        inputs = [t for t, need in zip((x, W, V, b, c), needed) if need]

        def rerun(*differentiated):
            given = iter(differentiated)
            tensors = [next(given) if need else t for t, need in zip((x, W, V, b, c), needed)]
            return reference.differentiable_forward(*tensors, spec)

        with library.autocast_off(grad_out):  # the forward's arithmetic, as the forward op runs it
            grads = iter(torch.func.vjp(rerun, *inputs)[1](grad_out))
        return tuple(next(grads) if need else None for need in needed) + no_grads
    backward_op = library.backward_impl if getattr(ctx, "eager", False) else library.ode_mlp_backward
    gx, gW, gV, gb, gc, drift, segment_drift, next_mask = backward_op(
        grad_out.contiguous(), final, anchors, stages, layers, W, V, b, c, *spec.op_args(), ctx.backend)
    if spec.backward == "adjoint":
        ctx.drift_out.copy_(drift)
    if spec.adaptive:
        ctx.segment_drift_out.copy_(segment_drift)
        ctx.anchor_mask.copy_(next_mask)
    return (gx, gW, gV, None if b is None else gb, None if c is None else gc) + no_grads


library.ode_mlp_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerOdeMlp(torch.autograd.Function):
    """The forward op's implementation and autograd formula without the custom-op dispatch."""

    @staticmethod
    def forward(*inputs):
        return library.forward_impl(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, outputs):  # separate from forward: what torch.func's transforms need
        # the stored states are outputs too: without this, autograd would allocate zero gradients
        # for them (L × B × q in backprop mode) before calling backward
        ctx.set_materialize_grads(False)
        _setup_context(ctx, inputs, outputs)
        ctx.eager = True

    backward = staticmethod(_backward)


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
    anchor_every: Union[int, str, None] = None,
    scale_in: Optional[float] = None,
    scale_out: Optional[float] = None,
    backend: Optional[str] = None,
    input_precision: Optional[str] = None,
    deterministic: bool = True,
    drift_out: Optional[Tensor] = None,
    drift_tol: Optional[float] = None,
    strict: bool = False,
    anchor_mask: Optional[Tensor] = None,
    segment_drift_out: Optional[Tensor] = None,
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
            from the stored state there (k = 1 gives exact gradients). "auto": anchors placed by
            an error controller from the drift each backward measures per segment
            (odenets_fast.segments), so that it stays under `drift_tol`.
        drift_tol: with anchor_every="auto", the tolerance of each segment's relative drift
            ‖x̃_a − x_a‖ / ‖x_a‖ (default 1e-3).
        strict: with anchor_every="auto", redo a segment whose drift exceeds `drift_tol` exactly
            within the same backward (its forward re-run from its anchor in backprop mode).
        anchor_mask: with anchor_every="auto", the (L,) bool layout of the anchors: read by the
            forward, replaced by the controller's choice for the next call in the backward (ODEMLP
            keeps one as a buffer); None starts from one segment (plain adjoint's memory).
        segment_drift_out: with anchor_every="auto", an (L,) float tensor into which the backward
            writes each segment's drift at its first layer (-1 elsewhere).
        scale_in, scale_out: a_in and a_out; default 1/sqrt(q) and 1/sqrt(m).
        backend: "reference", "triton" or "cpp"; None picks by device (or ODENETS_FAST_BACKEND).
        input_precision: float32 matrix products of the Triton backend: None (default) does what
            eager PyTorch does on the device — TF32 on CUDA exactly when
            `torch.set_float32_matmul_precision` / `torch.backends.cuda.matmul` enable it there,
            full float32 otherwise; "ieee" (full float32), "tf32" (tensor cores, 10-bit mantissa) or
            "tf32x3" (three TF32 products per product in the fused kernels: close to float32
            accuracy; full float32 in cuBLAS, which has no such mode) force one. The reference and
            C++ backends always use full float32/float64 products.
        deterministic: Triton backend — True (default) reduces weight gradients over the batch in
            a fixed order (bitwise reproducible); False lets the fused kernels use atomics (faster,
            last bits vary; the layered path is reproducible either way).
        drift_out: a 0-dim floating tensor on x's device; an adjoint backward writes
            ‖x̃_0 − x_0‖ / ‖x_0‖ into it (works under torch.compile; ODEMLP keeps one as a buffer).

    Inside torch.autocast, x is cast to the parameters' dtype and the stack computes in it (the
    states never drop to the autocast dtype); pass bfloat16/float16 parameters for a low-precision
    stack.

    Returns:
        x_L with the shape of x, in the dtype of x (of the parameters under autocast).
    """
    check_not_torchscript("ode_mlp")
    if (isinstance(x, Tensor) and isinstance(W, Tensor) and x.device.type in library.AUTOCAST_DEVICE_TYPES
            and torch.is_autocast_enabled(x.device.type)):  # fmt: skip
        # an autocast region hands the stack low-precision activations: like autocast's float32 ops,
        # run it in the parameters' dtype, so that the state keeps that precision (DESIGN.md §6)
        x = x.to(W.dtype)
    spec = check_stack(
        x, W, V, b, c,
        method=method, activation=activation, T=T, backward=backward,
        anchor_every=anchor_every, scale_in=scale_in, scale_out=scale_out,
        input_precision=input_precision, deterministic=deterministic, drift_tol=drift_tol, strict=strict,
    )  # fmt: skip
    if spec.adaptive and x.device.type == "meta":
        raise ValueError("anchor_every='auto' reads its layout from anchor_mask's values, which meta tensors do not "
                         "have: use a fixed anchor_every (or None) on the meta device — every mode's output has x's shape")
    backend_name = resolve_backend(backend, x.device)
    if drift_out is None:
        drift_out = x.new_zeros((), dtype=torch.float32)
    elif (not isinstance(drift_out, Tensor) or drift_out.dim() != 0 or drift_out.device != x.device
          or not drift_out.is_floating_point()):  # fmt: skip
        raise TypeError(f"drift_out must be a 0-dim floating-point tensor on {x.device} or None")
    anchor_mask, segment_drift_out = _error_control_state(spec, x, anchor_mask, segment_drift_out)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, W, V, b, c))):
        spec = spec.storing_least()  # no backward can follow: keep no states for it
        anchor_mask = segment_drift_out = x.new_empty(0)
    # Batch rows flattened to 2-D; a 2-D input goes through as it is, so that the result is not a view
    # (FSDP2 and other output hooks warn about, and in-place ops on it would bypass, a view).
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    op = library.ode_mlp_forward if torch.compiler.is_compiling() else _EagerOdeMlp.apply
    out = op(rows, W, V, b, c, *spec.op_args(), backend_name, drift_out, anchor_mask, segment_drift_out)[0]
    return out if x.dim() == 2 else out.reshape(x.shape)


def _error_control_state(spec: StackSpec, x: Tensor, anchor_mask, segment_drift_out) -> tuple:
    """The anchor mask and segment-drift tensors of anchor_every="auto" (fresh ones where not given),
    checked; absent (shape (0,)) without it, where passing them would do nothing."""
    if not spec.adaptive:
        for name, given in (("anchor_mask", anchor_mask), ("segment_drift_out", segment_drift_out)):
            if given is not None:
                raise ValueError(f"{name} is only meaningful with anchor_every='auto'")
        absent = x.new_empty(0)
        return absent, absent
    L = spec.depth
    if anchor_mask is None:
        anchor_mask = torch.zeros(L, dtype=torch.bool, device=x.device)
    elif (not isinstance(anchor_mask, Tensor) or anchor_mask.dtype != torch.bool or anchor_mask.shape != (L,)
          or anchor_mask.device != x.device):  # fmt: skip
        raise TypeError(f"anchor_mask must be a bool tensor of shape ({L},) (the depth) on {x.device} or None")
    if segment_drift_out is None:
        segment_drift_out = torch.full((L,), segments.NO_SEGMENT, device=x.device)
    elif (not isinstance(segment_drift_out, Tensor) or not segment_drift_out.is_floating_point()
          or segment_drift_out.shape != (L,) or segment_drift_out.device != x.device):  # fmt: skip
        raise TypeError(f"segment_drift_out must be a floating-point tensor of shape ({L},) on {x.device} or None")
    return anchor_mask, segment_drift_out
