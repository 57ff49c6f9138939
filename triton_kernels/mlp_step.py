"""Per-layer fused kernels of the ODE-MLP stack (DESIGN.md §3–4), Euler and Heun.

    forward_step_kernel   x_{n+1} from x_n in one pass (both products, σ and the residual update;
                          Heun's k1, y, k2 too), optionally saving x_n and y_n for backprop
    reverse_step_kernel   (x̃_{n+1}, g_{n+1}) → (x̃_n, g_n) and layer n's weight gradients in one
                          pass: reconstruction, local recompute and VJP
    sum_partials_kernel   adds the per-program weight-gradient partials into the accumulator

Each program owns BLOCK_B rows of the batch and keeps them on-chip in float32; the hidden width m
is walked in BLOCK_M chunks, so z = a_in W x + b never exists in full — only a (BLOCK_B, BLOCK_M)
tile of it — and m is unbounded. The state width q lives whole in one BLOCK_Q ≥ q tile (the
on-chip limit is checked by the launcher). Matrix-product operands take the parameter dtype
(float32 products run at `PRECISION`, "ieee" unless TF32 was asked for), accumulation is float32.

Weight gradients: program p writes its batch-block's contribution to its own float32 partial row,
and `sum_partials_kernel` adds the rows in a fixed order — bitwise reproducible (the Triton
layer-norm tutorial's scheme, with one row per program instead of locks). With ATOMIC=True the
kernel instead adds straight into the accumulator with atomics: no partial buffer and no extra
launch, but the summation order, hence the last bits, vary from run to run.

Gradient layout (`GradLayout`): the accumulator is one flat float32 buffer, section-major —
[dW of all P layers | dV of all layers | db … | dc …] — so each section is the contiguous
(P, …) gradient of one parameter and float32 gradients are returned without a copy. A partial
row holds the same four sections for the one or two layers (θ_n, and θ_{n+1} for Heun) that a
reverse step touches; `sum_partials_kernel` maps each section onto its place in the accumulator.
"""

from typing import NamedTuple, Optional

import triton
import triton.language as tl
import torch
from torch import Tensor

from .activations import activation, activation_grad


class GradLayout(NamedTuple):
    """Offsets (in floats) of the four gradient sections in the flat accumulator of P layers."""

    P: int
    q: int
    m: int

    @property
    def sizes(self) -> tuple:
        """Floats of one layer's dW, dV, db, dc."""
        return (self.m * self.q, self.q * self.m, self.m, self.q)

    @property
    def numel(self) -> int:
        return self.P * sum(self.sizes)

    def starts(self, layer: int) -> tuple:
        """Where layer `layer`'s dW, dV, db, dc begin in the accumulator."""
        starts, section = [], 0
        for size in self.sizes:
            starts.append(section + layer * size)
            section += self.P * size
        return tuple(starts)

    def partial_starts(self, slots: int) -> tuple:
        """Where the sections begin in a partial row covering `slots` consecutive layers."""
        return tuple(slots * sum(self.sizes[:i]) for i in range(4))

    def split(self, flat: Tensor) -> tuple:
        """The accumulator as contiguous (P, m, q), (P, q, m), (P, m), (P, q) views."""
        P, q, m = self
        dW, dV, db, dc = flat.split([P * s for s in self.sizes])
        return dW.view(P, m, q), dV.view(P, q, m), db.view(P, m), dc.view(P, q)


@triton.jit
def _hidden_chunk(
    x_op,  # (BLOCK_B, BLOCK_Q) states in the parameter dtype
    W_ptr, V_ptr, b_ptr,  # this layer's W (m, q), V (q, m), b (m,)
    m0, q, m, scale_in,
    offs_q, mask_q,
    HAS_B: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Hidden units m0 … m0 + BLOCK_M − 1: their W rows (BLOCK_M, BLOCK_Q), Vᵀ rows (BLOCK_M,
    BLOCK_Q) — [j, i] = V[i, m0 + j] — and z = a_in W x + b (BLOCK_B, BLOCK_M). Padded units and
    columns load as 0, so they contribute nothing downstream."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < m
    tile_mask = mask_m[:, None] & mask_q[None, :]
    w = tl.load(W_ptr + offs_m[:, None] * q + offs_q[None, :], mask=tile_mask, other=0.0)
    v_t = tl.load(V_ptr + offs_q[None, :] * m + offs_m[:, None], mask=tile_mask, other=0.0)
    z = tl.dot(x_op, tl.trans(w), input_precision=PRECISION) * scale_in
    if HAS_B:
        z += tl.load(b_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)[None, :]
    return offs_m, mask_m, tile_mask, w, v_t, z


@triton.jit
def _residual(
    x,  # (BLOCK_B, BLOCK_Q) float32 block of states; padded columns are 0
    W_ptr, V_ptr, b_ptr, c_ptr,  # this layer's W (m, q), V (q, m), b (m,), c (q,), contiguous
    q, m, scale_in, scale_out,
    offs_q, mask_q,  # (BLOCK_Q,) column indices of the state and their validity
    HAS_B: tl.constexpr, HAS_C: tl.constexpr, ACT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """f(x; θ) = a_out V σ(a_in W x + b) + c for a block of rows, walking m in BLOCK_M chunks."""
    acc = tl.zeros((BLOCK_B, BLOCK_Q), dtype=tl.float32)
    x_op = x.to(W_ptr.dtype.element_ty)
    for m0 in range(0, m, BLOCK_M):
        _, _, _, _, v_t, z = _hidden_chunk(x_op, W_ptr, V_ptr, b_ptr, m0, q, m, scale_in, offs_q, mask_q,
                                           HAS_B, BLOCK_M, PRECISION)  # fmt: skip
        acc = tl.dot(activation(z, ACT).to(v_t.dtype), v_t, acc, input_precision=PRECISION)
    f = acc * scale_out
    if HAS_C:
        f += tl.load(c_ptr + offs_q, mask=mask_q, other=0.0).to(tl.float32)[None, :]
    return f


@triton.jit
def _residual_vjp(
    x,  # (BLOCK_B, BLOCK_Q) float32 states at which f is differentiated; padded entries 0
    u,  # (BLOCK_B, BLOCK_Q) float32 cotangent of f; rows past the batch are 0
    W_ptr, V_ptr, b_ptr,  # this layer's parameters
    dW_ptr, dV_ptr, db_ptr, dc_ptr,  # float32 gradient destinations of this layer (partial row or accumulator)
    q, m, scale_in, scale_out,
    offs_q, mask_q,
    HAS_B: tl.constexpr, HAS_C: tl.constexpr, ACT: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Write (or atomically add) this block's dθ into dW_ptr … dc_ptr; return dx.

        a = σ(z);  dV = a_out Σ u aᵀ;  dc = Σ u;  da = a_out Vᵀ u
        dz = σ'(z) ⊙ da;  db = Σ dz;  dW = a_in Σ dz xᵀ;  dx = a_in Wᵀ dz      (Σ over the rows)
    """
    dx = tl.zeros((BLOCK_B, BLOCK_Q), dtype=tl.float32)
    x_op = x.to(W_ptr.dtype.element_ty)
    u_op = u.to(V_ptr.dtype.element_ty)
    for m0 in range(0, m, BLOCK_M):
        offs_m, mask_m, tile_mask, w, v_t, z = _hidden_chunk(x_op, W_ptr, V_ptr, b_ptr, m0, q, m, scale_in, offs_q,
                                                             mask_q, HAS_B, BLOCK_M, PRECISION)  # fmt: skip
        da = tl.dot(u_op, tl.trans(v_t), input_precision=PRECISION) * scale_out
        dz = activation_grad(z, ACT) * da
        dx = tl.dot(dz.to(w.dtype), w, dx, input_precision=PRECISION)
        a = activation(z, ACT)
        # dV chunk stored transposed as (BLOCK_M, BLOCK_Q): [j, i] = dV[i, m0 + j]
        dV_t = tl.dot(tl.trans(a.to(u_op.dtype)), u_op, input_precision=PRECISION) * scale_out
        dW = tl.dot(tl.trans(dz.to(x_op.dtype)), x_op, input_precision=PRECISION) * scale_in
        dW_offs = offs_m[:, None] * q + offs_q[None, :]
        dV_offs = offs_q[None, :] * m + offs_m[:, None]
        if ATOMIC:
            tl.atomic_add(dW_ptr + dW_offs, dW, mask=tile_mask)
            tl.atomic_add(dV_ptr + dV_offs, dV_t, mask=tile_mask)
        else:
            tl.store(dW_ptr + dW_offs, dW, mask=tile_mask)
            tl.store(dV_ptr + dV_offs, dV_t, mask=tile_mask)
        if HAS_B:
            if ATOMIC:
                tl.atomic_add(db_ptr + offs_m, tl.sum(dz, axis=0), mask=mask_m)
            else:
                tl.store(db_ptr + offs_m, tl.sum(dz, axis=0), mask=mask_m)
    if HAS_C:
        if ATOMIC:
            tl.atomic_add(dc_ptr + offs_q, tl.sum(u, axis=0), mask=mask_q)
        else:
            tl.store(dc_ptr + offs_q, tl.sum(u, axis=0), mask=mask_q)
    return dx * scale_in


@triton.jit
def forward_step_kernel(
    state_ptr,  # (B, q) float32: x_n on entry, x_{n+1} on exit (each program owns its rows)
    saved_state_ptr,  # (B, q) float32: receives x_n when SAVE_STATE (a backprop/anchor slot)
    saved_stage_ptr,  # (B, q) float32: receives Heun's y_n when SAVE_STAGE
    W_ptr, V_ptr, b_ptr, c_ptr,  # θ_n, contiguous (b, c ignored without HAS_B / HAS_C)
    W1_ptr, V1_ptr, b1_ptr, c1_ptr,  # θ_{n+1} (Heun only)
    B, q, m,
    step, scale_in, scale_out,  # h = T/L, a_in, a_out
    HEUN: tl.constexpr, ACT: tl.constexpr, HAS_B: tl.constexpr, HAS_C: tl.constexpr,
    SAVE_STATE: tl.constexpr, SAVE_STAGE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Euler: x_{n+1} = x_n + h f(x_n; θ_n).
    Heun:  k1 = f(x_n; θ_n), y_n = x_n + h k1, k2 = f(y_n; θ_{n+1}), x_{n+1} = x_n + h/2 (k1 + k2).
    """
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_q = tl.arange(0, BLOCK_Q)
    mask_q = offs_q < q
    mask = (offs_b < B)[:, None] & mask_q[None, :]
    rows = offs_b[:, None] * q + offs_q[None, :]
    x = tl.load(state_ptr + rows, mask=mask, other=0.0)
    if SAVE_STATE:
        tl.store(saved_state_ptr + rows, x, mask=mask)
    k1 = _residual(x, W_ptr, V_ptr, b_ptr, c_ptr, q, m, scale_in, scale_out, offs_q, mask_q,
                   HAS_B, HAS_C, ACT, BLOCK_B, BLOCK_M, BLOCK_Q, PRECISION)  # fmt: skip
    if HEUN:
        y = tl.where(mask, x + step * k1, 0.0)
        if SAVE_STAGE:
            tl.store(saved_stage_ptr + rows, y, mask=mask)
        k2 = _residual(y, W1_ptr, V1_ptr, b1_ptr, c1_ptr, q, m, scale_in, scale_out, offs_q, mask_q,
                       HAS_B, HAS_C, ACT, BLOCK_B, BLOCK_M, BLOCK_Q, PRECISION)  # fmt: skip
        x_next = x + (0.5 * step) * (k1 + k2)
    else:
        x_next = x + step * k1
    tl.store(state_ptr + rows, x_next, mask=mask)


@triton.jit
def reverse_step_kernel(
    state_ptr,  # (B, q) float32: x̃_{n+1} on entry; x̃_n on exit (the stored x_n without RECONSTRUCT)
    grad_ptr,  # (B, q) float32: g_{n+1} on entry, g_n on exit
    stored_state_ptr,  # (B, q) float32 stored x_n, used for the VJP when USE_STORED
    stored_stage_ptr,  # (B, q) float32 stored Heun stage y_n, used when USE_STAGE
    W_ptr, V_ptr, b_ptr, c_ptr,  # θ_n
    W1_ptr, V1_ptr, b1_ptr, c1_ptr,  # θ_{n+1} (Heun only)
    dtheta_ptr,  # float32 gradient buffer: the (programs, row) partials, or with ATOMIC the accumulator
    program_stride,  # floats between programs' partial rows; 0 with ATOMIC (all add into one place)
    dW_off, dV_off, db_off, dc_off,  # where θ_n's sections start in a row; θ_{n+1}'s follow each one
    B, q, m,
    step, scale_in, scale_out,
    HEUN: tl.constexpr, ACT: tl.constexpr, HAS_B: tl.constexpr, HAS_C: tl.constexpr,
    RECONSTRUCT: tl.constexpr, USE_STORED: tl.constexpr, USE_STAGE: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One layer of the backward pass (DESIGN.md §4).

    x_n is the stored state (USE_STORED) or the reconstruction (RECONSTRUCT; both flags together:
    reconstruct to measure the drift, differentiate at the stored state). Then the exact VJP of
    the forward step at x_n:
        Euler:  dθ_n = h ∂θ f(x_n; θ_n)ᵀ g;  g_n = g + h ∂x f(x_n; θ_n)ᵀ g
        Heun:   u2 = (h/2) g;  gy, dθ_{n+1} = VJP f(y_n; θ_{n+1})[u2]
                u1 = u2 + h gy;  gx, dθ_n = VJP f(x_n; θ_n)[u1];  g_n = g + gy + gx
    """
    pid = tl.program_id(0)
    offs_b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_q = tl.arange(0, BLOCK_Q)
    mask_q = offs_q < q
    mask = (offs_b < B)[:, None] & mask_q[None, :]
    rows = offs_b[:, None] * q + offs_q[None, :]
    row = dtheta_ptr + pid.to(tl.int64) * program_stride
    dW_ptr, dV_ptr, db_ptr, dc_ptr = row + dW_off, row + dV_off, row + db_off, row + dc_off
    g = tl.load(grad_ptr + rows, mask=mask, other=0.0)

    if RECONSTRUCT:
        x_next = tl.load(state_ptr + rows, mask=mask, other=0.0)
        if HEUN:
            k_next = _residual(x_next, W1_ptr, V1_ptr, b1_ptr, c1_ptr, q, m, scale_in, scale_out, offs_q, mask_q,
                               HAS_B, HAS_C, ACT, BLOCK_B, BLOCK_M, BLOCK_Q, PRECISION)  # fmt: skip
            y_rev = tl.where(mask, x_next - step * k_next, 0.0)
            k_rev = _residual(y_rev, W_ptr, V_ptr, b_ptr, c_ptr, q, m, scale_in, scale_out, offs_q, mask_q,
                              HAS_B, HAS_C, ACT, BLOCK_B, BLOCK_M, BLOCK_Q, PRECISION)  # fmt: skip
            x = x_next - (0.5 * step) * (k_next + k_rev)
        else:
            x = x_next - step * _residual(x_next, W_ptr, V_ptr, b_ptr, c_ptr, q, m, scale_in, scale_out, offs_q,
                                          mask_q, HAS_B, HAS_C, ACT, BLOCK_B, BLOCK_M, BLOCK_Q, PRECISION)  # fmt: skip
        x = tl.where(mask, x, 0.0)
        tl.store(state_ptr + rows, x, mask=mask)
    if USE_STORED:
        x = tl.load(stored_state_ptr + rows, mask=mask, other=0.0)
        if not RECONSTRUCT:  # the next (lower) layer reconstructs from this anchor
            tl.store(state_ptr + rows, x, mask=mask)

    if HEUN:
        if USE_STAGE:
            y = tl.load(stored_stage_ptr + rows, mask=mask, other=0.0)
        else:
            k1 = _residual(x, W_ptr, V_ptr, b_ptr, c_ptr, q, m, scale_in, scale_out, offs_q, mask_q,
                           HAS_B, HAS_C, ACT, BLOCK_B, BLOCK_M, BLOCK_Q, PRECISION)  # fmt: skip
            y = tl.where(mask, x + step * k1, 0.0)
        u2 = (0.5 * step) * g
        gy = _residual_vjp(y, u2, W1_ptr, V1_ptr, b1_ptr, dW_ptr + m * q, dV_ptr + q * m, db_ptr + m, dc_ptr + q,
                           q, m, scale_in, scale_out, offs_q, mask_q,
                           HAS_B, HAS_C, ACT, ATOMIC, BLOCK_B, BLOCK_M, BLOCK_Q, PRECISION)  # fmt: skip
        gx = _residual_vjp(x, u2 + step * gy, W_ptr, V_ptr, b_ptr, dW_ptr, dV_ptr, db_ptr, dc_ptr,
                           q, m, scale_in, scale_out, offs_q, mask_q,
                           HAS_B, HAS_C, ACT, ATOMIC, BLOCK_B, BLOCK_M, BLOCK_Q, PRECISION)  # fmt: skip
        g_new = g + gy + gx
    else:
        g_new = g + _residual_vjp(x, step * g, W_ptr, V_ptr, b_ptr, dW_ptr, dV_ptr, db_ptr, dc_ptr,
                                  q, m, scale_in, scale_out, offs_q, mask_q,
                                  HAS_B, HAS_C, ACT, ATOMIC, BLOCK_B, BLOCK_M, BLOCK_Q, PRECISION)  # fmt: skip
    tl.store(grad_ptr + rows, g_new, mask=mask)


@triton.jit
def sum_partials_kernel(
    partials_ptr,  # (num_partials, row) float32 per-program partial gradients
    row,  # floats per partial row
    num_partials,
    out_ptr,  # flat float32 accumulator; the sums are added to it
    segments_ptr,  # (4, 3) int64: per gradient section (program_id 1) its start in a row, its start
    #                in the accumulator and its length
    BLOCK: tl.constexpr,
):  # fmt: skip
    """out[dst + i] += Σ_p partials[p, src + i], summed in the order p = 0, 1, … (reproducible)."""
    segment = segments_ptr + tl.program_id(1) * 3
    src, dst, length = tl.load(segment), tl.load(segment + 1), tl.load(segment + 2)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < length
    acc = tl.load(out_ptr + dst + offs, mask=mask, other=0.0)
    for p in range(0, num_partials):
        acc += tl.load(partials_ptr + p * row + src + offs, mask=mask, other=0.0)
    tl.store(out_ptr + dst + offs, acc, mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers. Tensors are float32 states/gradients of shape (B, q) and one layer's parameter views
# (contiguous); the caller (odenets_fast.triton_backend) owns the depth loop and the buffers.

MAX_STATE_WIDTH = 256  # q: a (BLOCK_B, q) float32 block of x, g and two accumulators stay on-chip


class StepConfig(NamedTuple):
    block_b: int  # rows of the batch per program
    block_m: int  # hidden-width chunk per iteration
    block_q: int  # state width padded to a power of two (≥ 16 for tl.dot)
    num_warps: int
    num_stages: int  # software-pipelining depth of the m loop: each stage buffers a W and a Vᵀ tile


class Layer(NamedTuple):
    """One layer's parameters θ_n as contiguous views; b, c are None without biases."""

    W: Tensor
    V: Tensor
    b: Optional[Tensor]
    c: Optional[Tensor]


def step_config(q: int, m: int, interpreted: bool) -> StepConfig:
    """Tile sizes: fixed small tiles under the interpreter (fast to emulate); on the GPU, fewer rows
    per program as q grows so that the per-row float32 blocks still fit in registers, and two
    pipeline stages at q = 256, where three float32 stages of the Heun reverse step would need
    more than the H100's 227 KiB of shared memory (checked by tests/triton_aot.py)."""
    block_q = max(16, triton.next_power_of_2(q))
    if interpreted:
        return StepConfig(block_b=16, block_m=32, block_q=block_q, num_warps=1, num_stages=1)
    block_b = 64 if block_q <= 64 else 32
    block_m = 64 if block_q <= 128 else 32
    return StepConfig(block_b=block_b, block_m=min(block_m, max(16, triton.next_power_of_2(m))), block_q=block_q,
                      num_warps=4 if block_q <= 64 else 8, num_stages=2 if block_q >= 256 else 3)  # fmt: skip


def _pointers(layer: Layer, fallback: Tensor):
    # Triton needs a tensor for every pointer argument; absent biases are never read (HAS_B/HAS_C).
    return (layer.W, layer.V, fallback if layer.b is None else layer.b, fallback if layer.c is None else layer.c)


def forward_step(
    state: Tensor, layer: Layer, next_layer: Optional[Layer], *, act: int, step: float, scale_in: float,
    scale_out: float, precision: str, config: StepConfig, saved_state: Optional[Tensor] = None,
    saved_stage: Optional[Tensor] = None,
) -> None:  # fmt: skip
    """state ← x_{n+1} in place (Heun when `next_layer` is given); x_n / y_n copied out if asked."""
    B, q = state.shape
    m = layer.W.shape[0]
    heun = next_layer is not None
    grid = (triton.cdiv(B, config.block_b),)
    forward_step_kernel[grid](
        state, state if saved_state is None else saved_state, state if saved_stage is None else saved_stage,
        *_pointers(layer, state), *_pointers(next_layer or layer, state),
        B, q, m, step, scale_in, scale_out,
        HEUN=heun, ACT=act, HAS_B=layer.b is not None, HAS_C=layer.c is not None,
        SAVE_STATE=saved_state is not None, SAVE_STAGE=saved_stage is not None,
        BLOCK_B=config.block_b, BLOCK_M=config.block_m, BLOCK_Q=config.block_q, PRECISION=precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip


def reverse_step(
    state: Tensor, grad: Tensor, layer: Layer, next_layer: Optional[Layer], dtheta: Tensor, offsets: tuple, *,
    act: int, step: float, scale_in: float, scale_out: float, precision: str, config: StepConfig,
    reconstruct: bool, stored_state: Optional[Tensor] = None, stored_stage: Optional[Tensor] = None,
    atomic: bool = False,
) -> None:  # fmt: skip
    """(state, grad) ← (x̃_n, g_n) in place; layer n's (and Heun's n + 1) weight gradients go to
    `dtheta` at `offsets` (dW, dV, db, dc starts): a row of the (programs, row) partial buffer,
    or with `atomic` the accumulator itself."""
    if not (reconstruct or stored_state is not None):
        raise ValueError("reverse_step needs x_n: reconstruct=True or a stored_state")
    B, q = state.shape
    m = layer.W.shape[0]
    heun = next_layer is not None
    grid = (triton.cdiv(B, config.block_b),)
    reverse_step_kernel[grid](
        state, grad, state if stored_state is None else stored_state, state if stored_stage is None else stored_stage,
        *_pointers(layer, state), *_pointers(next_layer or layer, state),
        dtheta, 0 if atomic else dtheta[0].numel(), *offsets,
        B, q, m, step, scale_in, scale_out,
        HEUN=heun, ACT=act, HAS_B=layer.b is not None, HAS_C=layer.c is not None,
        RECONSTRUCT=reconstruct, USE_STORED=stored_state is not None, USE_STAGE=stored_stage is not None,
        ATOMIC=atomic, BLOCK_B=config.block_b, BLOCK_M=config.block_m, BLOCK_Q=config.block_q, PRECISION=precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip


def partial_segments(layout: GradLayout, slots: int, depth: int, has_b: bool, has_c: bool, device) -> Tensor:
    """(depth, 4, 3) int64 table for `sum_partials`: per layer n and gradient section, its start in a
    partial row, its start in the accumulator (layers n … n + slots − 1) and its length (0 for an
    absent bias, whose entries stay zero)."""
    present = (True, True, has_b, has_c)
    rows = [
        [[src, dst, slots * size if keep else 0]
         for src, dst, size, keep in zip(layout.partial_starts(slots), layout.starts(n), layout.sizes, present)]
        for n in range(depth)
    ]  # fmt: skip
    return torch.tensor(rows, dtype=torch.int64, device=device)


def sum_partials(partials: Tensor, out: Tensor, segments: Tensor, longest: int, block: int = 1024) -> None:
    """out += partials.sum(0) section by section (`segments`: one layer's (4, 3) table, whose
    longest section has `longest` floats), in a fixed order."""
    sum_partials_kernel[(triton.cdiv(longest, block), 4)](partials, partials.shape[1], partials.shape[0], out,
                                                          segments, BLOCK=block)  # fmt: skip
