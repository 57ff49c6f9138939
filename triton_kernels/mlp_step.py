"""Fused kernels of the ODE-MLP stack (DESIGN.md §3–4), Euler and Heun.

    forward_layers_kernel   x_n → x_{n+1} for a range of layers (one layer, or the whole depth) in
                            one launch: both products, σ and the residual update (Heun's k1, y, k2
                            too) per layer, optionally saving x_n and y_n for the backward
    reverse_layers_kernel   (x̃_{n+1}, g_{n+1}) → (x̃_n, g_n) and the weight gradients for a range of
                            layers in one launch: reconstruction, local recompute and VJP per layer
    sum_partials_kernel     adds per-program (or per-batch-range) partial gradients into an
                            accumulator, in a fixed order
    workspace_grads_kernel  the weight gradients of a launch's layers from the factors the reverse
                            kernel left in a workspace: products over a range of the batch

Each program owns BLOCK_B rows of the batch and keeps them on-chip in float32; the hidden width m
is walked in BLOCK_M chunks, so z = a_in W x + b never exists in full — only a (BLOCK_B, BLOCK_M)
tile of it — and m is unbounded. The state width q lives whole in one BLOCK_Q ≥ q tile (the
on-chip limit is checked by the launcher). Matrix-product operands take the parameter dtype
(float32 products run at `PRECISION`, "ieee" unless TF32 was asked for), accumulation is float32.

Weight gradients, three reductions over the batch (GRADS):
    "partials"   program p writes its batch-block's contribution to its own float32 partial row,
                 and `sum_partials_kernel` adds the rows in a fixed order — bitwise reproducible
                 (the Triton layer-norm tutorial's scheme, with one row per program instead of
                 locks). Traffic per layer: programs × parameters.
    "workspace"  the reverse kernel writes what the weight gradients are made of — dz, σ(z), x and
                 u per row — to a float32 workspace, and `workspace_grads_kernel` forms
                 dW = a_in Σ dz xᵀ, dVᵀ = a_out Σ σ(z) uᵀ (and db, dc) as products over ranges of
                 the batch, summed in a fixed order: reproducible too. Traffic per layer:
                 B × (2m + 2q), independent of the row-block size — far less than the partial rows
                 when q·m / BLOCK_B > m + q (wide states, small row blocks). The C++ backend's scheme.
    "atomic"     the kernel adds straight into the accumulator with atomics: no buffer and no extra
                 launch, but the summation order, hence the last bits, vary from run to run.

Gradient layout: four float32 accumulators, the (P, …) gradients of W, V, b, c. A partial row
holds, section by section ([dW | dV | db | dc], `GradSections`), the layers one launch touches;
`sum_partials_kernel` adds one section of all rows into its place in an accumulator. A workspace
holds, per VJP of the launch, a (B, 2m + 2q) block of rows [dz | σ(z) | x | u];
Heun has two VJPs per layer, so two sets: set 0 for θ_n (at x_n), set 1 for θ_{n+1} (at y_n).
"""

from typing import NamedTuple, Optional

import triton
import triton.language as tl
from torch import Tensor

from .activations import activation, activation_grad


class GradSections(NamedTuple):
    """The four gradient sections (dW, dV, db, dc) of a layer, and their place in a partial row."""

    q: int
    m: int

    @property
    def sizes(self) -> tuple:
        """Floats of one layer's dW, dV, db, dc."""
        return (self.m * self.q, self.q * self.m, self.m, self.q)

    def row(self, slots: int) -> int:
        """Floats of a partial row holding `slots` consecutive layers."""
        return slots * sum(self.sizes)

    @property
    def workspace_row(self) -> int:
        """Floats of a workspace row of one VJP: [dz (m) | σ(z) (m) | x (q) | u (q)]."""
        return 2 * self.m + 2 * self.q

    def partial_starts(self, slots: int) -> tuple:
        """Where the sections begin in a partial row: [dW of the slots | dV … | db … | dc …]."""
        return tuple(slots * sum(self.sizes[:i]) for i in range(4))


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
    columns load as 0, and padded units get z = 0, so they contribute nothing downstream.

    Padding is 0, but 0 · inf is NaN: every product's padded outputs are set to 0 before they enter
    another product (here z; f, dz and dx in the callers), or one infinite state, weight or
    activation would turn results that the reference gives as ±inf into NaN."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < m
    tile_mask = mask_m[:, None] & mask_q[None, :]
    w = tl.load(W_ptr + offs_m[:, None] * q + offs_q[None, :], mask=tile_mask, other=0.0)
    v_t = tl.load(V_ptr + offs_q[None, :] * m + offs_m[:, None], mask=tile_mask, other=0.0)
    z = tl.dot(x_op, tl.trans(w), input_precision=PRECISION) * scale_in
    if HAS_B:
        z += tl.load(b_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)[None, :]
    return offs_m, mask_m, tile_mask, w, v_t, tl.where(mask_m[None, :], z, 0.0)


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
    return tl.where(mask_q[None, :], f, 0.0)


@triton.jit
def _deposit(ptr, value, mask, accumulate, ATOMIC: tl.constexpr):
    """Gradient contribution → memory: atomic add, read-add-write, or plain store."""
    if ATOMIC:
        tl.atomic_add(ptr, value, mask=mask, sem="relaxed")  # a sum: no ordering with other memory needed
    else:
        if accumulate:
            value += tl.load(ptr, mask=mask, other=0.0)
        tl.store(ptr, value, mask=mask)


@triton.jit
def _residual_vjp(
    x,  # (BLOCK_B, BLOCK_Q) float32 states at which f is differentiated; padded entries 0
    u,  # (BLOCK_B, BLOCK_Q) float32 cotangent of f; rows past the batch are 0
    W_ptr, V_ptr, b_ptr,  # this layer's parameters
    dW_ptr, dV_ptr, db_ptr, dc_ptr,  # float32 gradient destinations of this layer (partial row or accumulator)
    ws_ptr,  # float32 (B, 2m + 2q) workspace block of this VJP, rows [dz | σ(z) | x | u] (GRADS == "workspace")
    accumulate,  # partial rows: add to what is there (a second contribution) instead of overwriting
    q, m, scale_in, scale_out,
    offs_b, mask_b,  # (BLOCK_B,) batch rows of the block and their validity
    offs_q, mask_q,
    HAS_B: tl.constexpr, HAS_C: tl.constexpr, ACT: tl.constexpr, GRADS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Write, add or atomically add this block's dθ into dW_ptr … dc_ptr — or, with a workspace,
    write the factors dθ is made of; return dx.

        a = σ(z);  dV = a_out Σ u aᵀ;  dc = Σ u;  da = a_out Vᵀ u
        dz = σ'(z) ⊙ da;  db = Σ dz;  dW = a_in Σ dz xᵀ;  dx = a_in Wᵀ dz      (Σ over the rows)
    """
    dx = tl.zeros((BLOCK_B, BLOCK_Q), dtype=tl.float32)
    x_op = x.to(W_ptr.dtype.element_ty)
    u_op = u.to(V_ptr.dtype.element_ty)
    ws_rows = ws_ptr + offs_b.to(tl.int64)[:, None] * (2 * m + 2 * q)
    for m0 in range(0, m, BLOCK_M):
        offs_m, mask_m, tile_mask, w, v_t, z = _hidden_chunk(x_op, W_ptr, V_ptr, b_ptr, m0, q, m, scale_in, offs_q,
                                                             mask_q, HAS_B, BLOCK_M, PRECISION)  # fmt: skip
        # padded rows too: the products below sum over the rows (see _hidden_chunk on padding)
        hidden_mask = mask_b[:, None] & mask_m[None, :]
        da = tl.dot(u_op, tl.trans(v_t), input_precision=PRECISION) * scale_out
        dz = tl.where(hidden_mask, activation_grad(z, ACT) * da, 0.0)
        dx = tl.dot(dz.to(w.dtype), w, dx, input_precision=PRECISION)
        a = tl.where(hidden_mask, activation(z, ACT), 0.0)
        if GRADS == "workspace":
            # the products over the batch are left to workspace_grads_kernel: fewer live tiles here
            tl.store(ws_rows + offs_m[None, :], dz, mask=hidden_mask)
            tl.store(ws_rows + m + offs_m[None, :], a, mask=hidden_mask)
        else:
            # dV chunk stored transposed as (BLOCK_M, BLOCK_Q): [j, i] = dV[i, m0 + j]
            dV_t = tl.dot(tl.trans(a.to(u_op.dtype)), u_op, input_precision=PRECISION) * scale_out
            dW = tl.dot(tl.trans(dz.to(x_op.dtype)), x_op, input_precision=PRECISION) * scale_in
            dW_offs = offs_m[:, None] * q + offs_q[None, :]
            dV_offs = offs_q[None, :] * m + offs_m[:, None]
            _deposit(dW_ptr + dW_offs, dW, tile_mask, accumulate, GRADS == "atomic")
            _deposit(dV_ptr + dV_offs, dV_t, tile_mask, accumulate, GRADS == "atomic")
            if HAS_B:
                _deposit(db_ptr + offs_m, tl.sum(dz, axis=0), mask_m, accumulate, GRADS == "atomic")
    if GRADS == "workspace":
        state_mask = mask_b[:, None] & mask_q[None, :]
        tl.store(ws_rows + 2 * m + offs_q[None, :], x, mask=state_mask)
        tl.store(ws_rows + 2 * m + q + offs_q[None, :], u, mask=state_mask)
    elif HAS_C:
        _deposit(dc_ptr + offs_q, tl.sum(u, axis=0), mask_q, accumulate, GRADS == "atomic")
    return tl.where(mask_b[:, None] & mask_q[None, :], dx * scale_in, 0.0)


@triton.jit
def _layer_params(W_ptr, V_ptr, b_ptr, c_ptr, n, q, m):
    """Pointers to θ_n inside the stacked (P, …) parameter tensors."""
    return W_ptr + n * m * q, V_ptr + n * q * m, b_ptr + n * m, c_ptr + n * q


# Layer ranges are loop bounds and slot offsets, nothing an access pattern depends on: left to
# Triton's defaults (it keys an int argument on == 1 and on divisibility by 16), the per-layer path
# and a chunked backward would compile one variant per kind of range they meet — five at L = 20 —
# each costing seconds of compilation at first use and no faster code.
@triton.jit(do_not_specialize=["layer_start", "layer_stop"])
def forward_layers_kernel(
    state_ptr,  # (B, q) float32: x_start on entry, x_stop on exit (each program owns its rows)
    anchors_ptr,  # (S, B, q) float32: x_n is stored in slot n // anchor_every when SAVE_ANCHORS
    stages_ptr,  # (L, B, q) float32: Heun's y_n is stored in slot n when SAVE_STAGES
    W_ptr, V_ptr, b_ptr, c_ptr,  # stacked θ: (P, m, q), (P, q, m), (P, m), (P, q), contiguous
    layer_start, layer_stop,  # this launch runs layers layer_start … layer_stop − 1
    anchor_every,  # distance between stored states (SAVE_ANCHORS)
    B, q, m,
    step, scale_in, scale_out,  # h = T/L, a_in, a_out
    HEUN: tl.constexpr, ACT: tl.constexpr, HAS_B: tl.constexpr, HAS_C: tl.constexpr,
    SAVE_ANCHORS: tl.constexpr, SAVE_STAGES: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """x_{n+1} from x_n for a range of layers, the state staying on-chip between them.

    Euler: x_{n+1} = x_n + h f(x_n; θ_n).
    Heun:  k1 = f(x_n; θ_n), y_n = x_n + h k1, k2 = f(y_n; θ_{n+1}), x_{n+1} = x_n + h/2 (k1 + k2).
    """
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_q = tl.arange(0, BLOCK_Q)
    mask_q = offs_q < q
    mask = (offs_b < B)[:, None] & mask_q[None, :]
    rows = offs_b[:, None] * q + offs_q[None, :]
    state_size = tl.full((), B, tl.int64) * q  # one stored state: L of them may pass 2^31 floats
    x = tl.load(state_ptr + rows, mask=mask, other=0.0)
    for n in range(layer_start, layer_stop):
        if SAVE_ANCHORS:
            if n % anchor_every == 0:
                tl.store(anchors_ptr + (n // anchor_every) * state_size + rows, x, mask=mask)
        Wn, Vn, bn, cn = _layer_params(W_ptr, V_ptr, b_ptr, c_ptr, n, q, m)
        k1 = _residual(x, Wn, Vn, bn, cn, q, m, scale_in, scale_out, offs_q, mask_q,
                       HAS_B, HAS_C, ACT, BLOCK_B, BLOCK_M, BLOCK_Q, PRECISION)  # fmt: skip
        if HEUN:
            y = tl.where(mask, x + step * k1, 0.0)
            if SAVE_STAGES:
                tl.store(stages_ptr + n * state_size + rows, y, mask=mask)
            W1, V1, b1, c1 = _layer_params(W_ptr, V_ptr, b_ptr, c_ptr, n + 1, q, m)
            k2 = _residual(y, W1, V1, b1, c1, q, m, scale_in, scale_out, offs_q, mask_q,
                           HAS_B, HAS_C, ACT, BLOCK_B, BLOCK_M, BLOCK_Q, PRECISION)  # fmt: skip
            x = x + (0.5 * step) * (k1 + k2)
        else:
            x = x + step * k1
    tl.store(state_ptr + rows, x, mask=mask)


@triton.jit
def _reconstruct(x_next, n, W_ptr, V_ptr, b_ptr, c_ptr, q, m, step, scale_in, scale_out, offs_q, mask_q, mask,
                 HEUN: tl.constexpr, ACT: tl.constexpr, HAS_B: tl.constexpr, HAS_C: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, PRECISION: tl.constexpr):
    """x̃_n from x̃_{n+1} by the forward rule run backwards (DESIGN.md §4)."""  # fmt: skip
    Wn, Vn, bn, cn = _layer_params(W_ptr, V_ptr, b_ptr, c_ptr, n, q, m)
    if HEUN:
        W1, V1, b1, c1 = _layer_params(W_ptr, V_ptr, b_ptr, c_ptr, n + 1, q, m)
        k_next = _residual(x_next, W1, V1, b1, c1, q, m, scale_in, scale_out, offs_q, mask_q,
                           HAS_B, HAS_C, ACT, BLOCK_B, BLOCK_M, BLOCK_Q, PRECISION)  # fmt: skip
        y = tl.where(mask, x_next - step * k_next, 0.0)
        k = _residual(y, Wn, Vn, bn, cn, q, m, scale_in, scale_out, offs_q, mask_q,
                      HAS_B, HAS_C, ACT, BLOCK_B, BLOCK_M, BLOCK_Q, PRECISION)  # fmt: skip
        x = x_next - (0.5 * step) * (k_next + k)
    else:
        x = x_next - step * _residual(x_next, Wn, Vn, bn, cn, q, m, scale_in, scale_out, offs_q, mask_q,
                                      HAS_B, HAS_C, ACT, BLOCK_B, BLOCK_M, BLOCK_Q, PRECISION)  # fmt: skip
    return tl.where(mask, x, 0.0)


@triton.jit(do_not_specialize=["layer_start", "layer_stop", "slot_origin"])  # as forward_layers_kernel
def reverse_layers_kernel(
    state_ptr,  # (B, q) float32: x̃_stop on entry; on exit the x_start the VJP of layer_start used
    grad_ptr,  # (B, q) float32: g_stop on entry, g_start on exit
    anchors_ptr,  # (S, B, q) float32 stored states: x_n = slot n // anchor_every (USE_ANCHORS)
    stages_ptr,  # (L, B, q) float32 stored Heun stages y_n (USE_STAGES)
    drift_state_ptr,  # (B, q) float32: receives the reconstructed x̃_0 when layer 0 is in range (DRIFT)
    W_ptr, V_ptr, b_ptr, c_ptr,  # stacked θ, contiguous
    dW_ptr, dV_ptr, db_ptr, dc_ptr,  # float32 gradient sections: where layer `slot_origin`'s dW, dV, db, dc
    #                                  start in program 0's partial row, or ("atomic") in the accumulators
    ws_ptr,  # float32 workspace (sets, layer_stop − layer_start, B, 2m + 2q) (GRADS == "workspace")
    program_stride,  # floats between programs' partial rows; 0 for "atomic" (all add into one place)
    slot_origin,  # the layer in slot 0 of a gradient section or workspace set: layer_start, or 0 ("atomic")
    layer_start, layer_stop, anchor_every,
    B, q, m,
    num_tiles,  # cdiv(B, BLOCK_B) batch tiles, walked by the (fewer or as many) programs
    step, scale_in, scale_out,
    HEUN: tl.constexpr, ACT: tl.constexpr, HAS_B: tl.constexpr, HAS_C: tl.constexpr,
    RECONSTRUCT: tl.constexpr, USE_ANCHORS: tl.constexpr, USE_STAGES: tl.constexpr, DRIFT: tl.constexpr,
    GRADS: tl.constexpr,  # the weight-gradient reduction: "partials", "workspace" or "atomic" (module docstring)
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Layers layer_stop − 1 … layer_start of the backward pass (DESIGN.md §4), x and g on-chip.

    Per layer n: x_n is the stored anchor (USE_ANCHORS, n divisible by anchor_every) or the
    reconstruction from x̃_{n+1} (RECONSTRUCT; the reconstruction of x̃_0 also gives the drift).
    Then the exact VJP of the forward step at x_n:
        Euler:  dθ_n = h ∂θ f(x_n; θ_n)ᵀ g;  g_n = g + h ∂x f(x_n; θ_n)ᵀ g
        Heun:   u2 = (h/2) g;  gy, dθ_{n+1} = VJP f(y_n; θ_{n+1})[u2]
                u1 = u2 + h gy;  gx, dθ_n = VJP f(x_n; θ_n)[u1];  g_n = g + gy + gx
    Partial rows: layer n writes θ_n's slot first (store) and, for Heun, adds into θ_{n+1}'s slot,
    which layer n + 1 wrote before — except at the top of the range, where it is the first write; a
    program's later tiles add to all of them.
    Workspace: each VJP has its own block, θ_n's in set 0 and Heun's θ_{n+1} in set 1.
    """
    pid = tl.program_id(0)
    offs_q = tl.arange(0, BLOCK_Q)
    mask_q = offs_q < q
    state_size = tl.full((), B, tl.int64) * q  # one stored state: L of them may pass 2^31 floats
    row = pid.to(tl.int64) * program_stride
    # Persistent: program p walks batch tiles p, p + P, … (P programs), each through the launch's
    # layers, into its own partial row — so the rows scale with the programs (one per SM), not with
    # the tiles, and the order of every sum stays fixed. Its second and later tiles add to what
    # its first stored, read back by other threads than wrote it: a CTA barrier between tiles.
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        later_tile = tile != pid
        if GRADS == "partials":
            tl.debug_barrier()
        offs_b = tile * BLOCK_B + tl.arange(0, BLOCK_B)
        mask_b = offs_b < B
        mask = mask_b[:, None] & mask_q[None, :]
        rows = offs_b[:, None] * q + offs_q[None, :]
        g = tl.load(grad_ptr + rows, mask=mask, other=0.0)
        x_next = tl.load(state_ptr + rows, mask=mask, other=0.0)
        for i in range(0, layer_stop - layer_start):
            n = layer_stop - 1 - i
            x = x_next
            if RECONSTRUCT:
                # also at anchored layers, where the result is only needed at layer 0 (the drift): a
                # runtime branch around these products trips Triton's layout pass (3.9, float32 dots)
                x = _reconstruct(x_next, n, W_ptr, V_ptr, b_ptr, c_ptr, q, m, step, scale_in, scale_out, offs_q,
                                 mask_q, mask, HEUN, ACT, HAS_B, HAS_C, BLOCK_B, BLOCK_M, BLOCK_Q, PRECISION)  # fmt: skip
                if DRIFT:
                    if n == 0:
                        tl.store(drift_state_ptr + rows, x, mask=mask)
            if USE_ANCHORS:
                if n % anchor_every == 0:
                    x = tl.load(anchors_ptr + (n // anchor_every) * state_size + rows, mask=mask, other=0.0)

            Wn, Vn, bn, cn = _layer_params(W_ptr, V_ptr, b_ptr, c_ptr, n, q, m)
            slot = n - slot_origin
            dWn = dW_ptr + row + slot * m * q
            dVn = dV_ptr + row + slot * q * m
            dbn = db_ptr + row + slot * m
            dcn = dc_ptr + row + slot * q
            ws_block = tl.full((), B, tl.int64) * (2 * m + 2 * q)  # a VJP's workspace may pass 2^31 floats
            wsn = ws_ptr + slot * ws_block
            if HEUN:
                if USE_STAGES:
                    y = tl.load(stages_ptr + n * state_size + rows, mask=mask, other=0.0)
                else:
                    k1 = _residual(x, Wn, Vn, bn, cn, q, m, scale_in, scale_out, offs_q, mask_q,
                                   HAS_B, HAS_C, ACT, BLOCK_B, BLOCK_M, BLOCK_Q, PRECISION)  # fmt: skip
                    y = tl.where(mask, x + step * k1, 0.0)
                W1, V1, b1, c1 = _layer_params(W_ptr, V_ptr, b_ptr, c_ptr, n + 1, q, m)
                u2 = (0.5 * step) * g
                if GRADS == "partials":
                    # θ_{n+1}'s db/dc are read back (i > 0) from the partial row where the previous layer
                    # stored them, by other threads of this program than those that stored them (the loads'
                    # layout replicates what the stores' layout splits): order them with a CTA barrier
                    tl.debug_barrier()
                ws_stage = wsn + (layer_stop - layer_start) * ws_block
                gy = _residual_vjp(y, u2, W1, V1, b1, dWn + m * q, dVn + q * m, dbn + m, dcn + q, ws_stage,
                                   later_tile | (i > 0),
                                   q, m, scale_in, scale_out, offs_b, mask_b, offs_q, mask_q,
                                   HAS_B, HAS_C, ACT, GRADS, BLOCK_B, BLOCK_M, BLOCK_Q, PRECISION)  # fmt: skip
                gx = _residual_vjp(x, u2 + step * gy, Wn, Vn, bn, dWn, dVn, dbn, dcn, wsn, later_tile,
                                   q, m, scale_in, scale_out, offs_b, mask_b, offs_q, mask_q,
                                   HAS_B, HAS_C, ACT, GRADS, BLOCK_B, BLOCK_M, BLOCK_Q, PRECISION)  # fmt: skip
                g = g + gy + gx
            else:
                g = g + _residual_vjp(x, step * g, Wn, Vn, bn, dWn, dVn, dbn, dcn, wsn, later_tile,
                                      q, m, scale_in, scale_out, offs_b, mask_b, offs_q, mask_q,
                                      HAS_B, HAS_C, ACT, GRADS, BLOCK_B, BLOCK_M, BLOCK_Q, PRECISION)  # fmt: skip
            x_next = x
        tl.store(state_ptr + rows, x_next, mask=mask)
        tl.store(grad_ptr + rows, g, mask=mask)


@triton.jit
def sum_partials_kernel(
    partials_ptr,  # float32 partial rows, at the start of one gradient section of program 0's row
    row,  # floats per partial row
    num_partials,
    out_ptr,  # float32 accumulator, at the place of that section; the sum is added to it
    length,  # floats of the section
    BLOCK: tl.constexpr,
):  # fmt: skip
    """out[i] += Σ_p partials[p, i] for i < length, summed in the order p = 0, 1, … (reproducible).
    The partial rows are walked by advancing a pointer: p · row in 32 bits would pass 2^31 on a large
    buffer (16384 programs × 135184 floats at B = 2^20, q = 16, m = 4096)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < length
    acc = tl.load(out_ptr + offs, mask=mask, other=0.0)
    partial = partials_ptr + offs
    for _ in range(0, num_partials):
        acc += tl.load(partial, mask=mask, other=0.0)
        partial += row
    tl.store(out_ptr + offs, acc, mask=mask)


@triton.jit
def workspace_grads_kernel(
    ws_ptr,  # float32 (slots, B, 2m + 2q) workspace set of one launch: per VJP, rows [dz | σ(z) | x | u]
    out_ptr,  # float32 (splits, slots·R·C + slots·R) partial products: per split, [products | column sums]
    operand_like_ptr,  # any tensor of the parameter dtype: the products' operands are cast to it
    left_col, right_col,  # where the R columns of `left` and the C columns of `right` start in a row
    B, R, C, m, q,
    splits, rows_per_split,  # the batch is cut into `splits` ranges of rows_per_split rows (a BLOCK_K multiple)
    scale,  # a_in for dW, a_out for dV
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """For the VJP in slot s and the rows of split k, output tile (i, j) (one program axis, i fastest,
    then j, then s · splits + k: CUDA allows 2^31 − 1 programs on axis 0 but 65535 on the others, and
    slots · splits passes that for deep narrow stacks, e.g. L = 65536 layers of B = 1 in one launch):

        out[k, s] = scale Σ_b left[s, b]ᵀ right[s, b],   sums[k, s] = Σ_b left[s, b]

    in the order b = 0, 1, … of the split; `sum_partials_kernel` then adds the splits in order
    (reproducible — the split-K of a matrix product without atomics). Cutting the batch keeps the
    GPU busy when one launch has few output tiles (one layer: (m / BLOCK_R)·(q / BLOCK_C) of them).

        dW = a_in Σ dz xᵀ, db = Σ dz     (left = dz, right = x)
        dV = a_out Σ u σ(z)ᵀ, dc = Σ u   (left = u, right = σ(z))

    Operands are cast to the parameter dtype as in the reverse kernel's own products, so both
    reductions round alike; the sums are float32."""
    tiles_r = tl.cdiv(R, BLOCK_R)
    tiles = tiles_r * tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0)
    tile_c = (pid % tiles) // tiles_r
    offs_r = (pid % tiles_r) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tile_c * BLOCK_C + tl.arange(0, BLOCK_C)
    slot = pid // tiles // splits
    split = pid // tiles % splits
    slots = tl.num_programs(0) // tiles // splits
    mask_r = offs_r < R
    mask_c = offs_c < C
    row_width = 2 * m + 2 * q
    slot_rows = ws_ptr + slot.to(tl.int64) * B * row_width
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    bias = tl.zeros((BLOCK_R,), dtype=tl.float32)
    first = split * rows_per_split
    last = tl.minimum(first + rows_per_split, B)
    for k0 in range(first, last, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < last
        rows = slot_rows + offs_k.to(tl.int64)[:, None] * row_width
        left = tl.load(rows + left_col + offs_r[None, :], mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        right = tl.load(rows + right_col + offs_c[None, :], mask=mask_k[:, None] & mask_c[None, :], other=0.0)
        operand = operand_like_ptr.dtype.element_ty
        acc = tl.dot(tl.trans(left.to(operand)), right.to(operand), acc, input_precision=PRECISION)
        if HAS_BIAS:
            bias += tl.sum(left, axis=0)
    split_row = out_ptr + split.to(tl.int64) * slots * R * (C + 1)
    out = split_row + slot * R * C + offs_r[:, None] * C + offs_c[None, :]
    tl.store(out, acc * scale, mask=mask_r[:, None] & mask_c[None, :])
    if HAS_BIAS:
        if tile_c == 0:
            tl.store(split_row + slots * R * C + slot * R + offs_r, bias, mask=mask_r)


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


class KernelConfigs(NamedTuple):
    """Tiles of the two fused kernels, chosen apart: the reverse step holds about twice as many
    live tiles as the forward (x, g, u, dx and the dW, dVᵀ chunks), so it takes smaller ones."""

    forward: StepConfig
    reverse: StepConfig


# (BLOCK_B, BLOCK_M, num_warps) of the forward and the reverse kernel, by padded state width and
# the bytes of a matrix-product operand (4: float32, IEEE or TF32; 2: float16/bfloat16), read off
# ptxas's resource report for sm_90 (`python tests/triton_aot.py --all` prints it): the largest
# tiles whose register spill per thread stays small, preferring more rows per program where spills
# are close — in deterministic mode every program writes a partial row of each layer's weight
# gradients, so halving BLOCK_B doubles that traffic (34 MB per layer at q = 64, m = 128,
# B = 16384 with 32 rows). float32 IEEE products run on the CUDA cores, and Triton's FMA dot holds
# each thread's operand rows for the whole reduction in registers, so at q = 256 no reverse tile is
# spill-free (2–3 KiB at the choice below; the earlier 32 × 32 tiles spilled 11 KiB, and the 64 × 64
# tiles at q = 64 14 KiB, with ptxas falling back to 32 registers). Provisional until timed on a
# GPU: `python -m bench.triton_step --mode tune` (part of `make gpu`) times alternatives, and
# ODENETS_FAST_TRITON_{FORWARD,REVERSE}_TILES override the table (odenets_fast.triton_backend).
_TILES = {
    (64, 4): ((64, 32, 8), (64, 16, 8)),
    (64, 2): ((64, 64, 8), (64, 16, 8)),
    (128, 4): ((32, 16, 8), (16, 16, 8)),
    (128, 2): ((32, 32, 8), (32, 16, 8)),
    (256, 4): ((32, 16, 8), (16, 16, 8)),
    (256, 2): ((32, 16, 8), (16, 16, 8)),
}


def kernel_configs(q: int, m: int, operand_bytes: int, interpreted: bool) -> KernelConfigs:
    """Tile sizes of the forward and reverse kernels: fixed small tiles under the interpreter (fast to
    emulate); on the GPU the table above, with pipeline stages as tests/triton_aot.py (the JIT's
    specialisation) found them best: the forward three below q = 256, two at q = 256, where three
    float32 stages of the Heun step would need more than the H100's 227 KiB of shared memory; the
    reverse two at every width (its persistent tile loop spilled 24 bytes a thread with three stages
    at q = 64, bfloat16, and none with two)."""
    block_q = max(16, triton.next_power_of_2(q))
    if interpreted:
        config = StepConfig(block_b=16, block_m=32, block_q=block_q, num_warps=1, num_stages=1)
        return KernelConfigs(config, config)
    block_m_limit = max(16, triton.next_power_of_2(m))
    forward, reverse = (
        StepConfig(block_b, min(block_m, block_m_limit), block_q, num_warps, stages)
        for (block_b, block_m, num_warps), stages in zip(_TILES[max(64, block_q), 4 if operand_bytes >= 4 else 2],
                                                         (2 if block_q >= 256 else 3, 2))  # fmt: skip
    )
    return KernelConfigs(forward, reverse)


GRAD_REDUCTIONS = ("partials", "workspace", "atomic")


class ProductConfig(NamedTuple):
    """Tiles of workspace_grads_kernel: a (BLOCK_R, BLOCK_C) output tile per program, the batch
    walked BLOCK_K rows at a time."""

    block_r: int
    block_c: int
    block_k: int
    num_warps: int
    num_stages: int


def product_config(operand_bytes: int, interpreted: bool) -> ProductConfig:
    """Small fixed tiles under the interpreter; on the GPU 64 × 64 output tiles (matrix-product
    tutorial sizes; tl.dot needs ≥ 16), a longer batch step for 16-bit operands. Provisional until
    timed on a GPU (`bench.triton_step --mode tune`)."""
    if interpreted:
        return ProductConfig(block_r=16, block_c=32, block_k=16, num_warps=1, num_stages=1)
    return ProductConfig(block_r=64, block_c=64, block_k=32 if operand_bytes >= 4 else 64, num_warps=4, num_stages=3)


class Params(NamedTuple):
    """The stacked parameters, contiguous; b, c are None without biases."""

    W: Tensor
    V: Tensor
    b: Optional[Tensor]
    c: Optional[Tensor]

    def pointers(self, fallback: Tensor) -> tuple:
        # Triton needs a tensor for every pointer argument; absent biases are never read (HAS_B/HAS_C).
        return (self.W, self.V, fallback if self.b is None else self.b, fallback if self.c is None else self.c)


def _common(params: Params, heun: bool, act: int, precision: str, config: StepConfig) -> dict:
    return dict(
        HEUN=heun, ACT=act, HAS_B=params.b is not None, HAS_C=params.c is not None,
        BLOCK_B=config.block_b, BLOCK_M=config.block_m, BLOCK_Q=config.block_q, PRECISION=precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip


def forward_layers(
    state: Tensor, params: Params, start: int, stop: int, *, heun: bool, act: int, step: float, scale_in: float,
    scale_out: float, precision: str, config: StepConfig, anchors: Optional[Tensor] = None, anchor_every: int = 1,
    stages: Optional[Tensor] = None,
) -> None:  # fmt: skip
    """state ← x_stop from x_start in place, in one launch; x_n (n divisible by `anchor_every`) go
    to `anchors` and Heun's y_n to `stages` when given."""
    B, q = state.shape
    grid = (triton.cdiv(B, config.block_b),)
    forward_layers_kernel[grid](
        state, state if anchors is None else anchors, state if stages is None else stages, *params.pointers(state),
        start, stop, anchor_every, B, q, params.W.shape[1], step, scale_in, scale_out,
        SAVE_ANCHORS=anchors is not None, SAVE_STAGES=stages is not None,
        **_common(params, heun, act, precision, config),
    )  # fmt: skip


def reverse_layers(
    state: Tensor, grad: Tensor, params: Params, start: int, stop: int, targets: tuple, program_stride: int,
    slot_origin: int, *, heun: bool, act: int, step: float, scale_in: float, scale_out: float, precision: str,
    config: StepConfig, reconstruct: bool, anchors: Optional[Tensor] = None, anchor_every: int = 1,
    stages: Optional[Tensor] = None, drift_state: Optional[Tensor] = None, grads: str = "partials",
    workspace: Optional[Tensor] = None, programs: Optional[int] = None,
) -> None:  # fmt: skip
    """(state, grad) ← (x_start, g_start) from (x̃_stop, g_stop) in place, in one launch of `programs`
    persistent programs (`reverse_programs`; default one per batch tile). Weight gradients (`grads`,
    see the module docstring) go to `targets` (dW, dV, db, dc of layer `slot_origin`, None for an
    absent bias): views into program 0's row of the partial buffer (`program_stride` floats per
    program), or for "atomic" the accumulators themselves; for "workspace", the factors go to
    `workspace` (sets, stop − start, B, 2m + 2q) instead and `workspace_grads` forms the gradients.
    `drift_state` receives the reconstructed x̃_0 when layer 0 is in range."""
    if not (reconstruct or anchors is not None):
        raise ValueError("reverse_layers needs the states: reconstruct=True or stored anchors")
    if grads not in GRAD_REDUCTIONS or (workspace is None) != (grads != "workspace"):
        raise ValueError(f"reverse_layers: grads must be one of {GRAD_REDUCTIONS}, with a workspace exactly "
                         f"for 'workspace'; got {grads!r}")  # fmt: skip
    B, q = state.shape
    tiles = triton.cdiv(B, config.block_b)
    reverse_layers_kernel[(tiles if programs is None else min(programs, tiles),)](
        state, grad, state if anchors is None else anchors, state if stages is None else stages,
        state if drift_state is None else drift_state, *params.pointers(state),
        *(state if t is None else t for t in targets), state if workspace is None else workspace,
        program_stride, slot_origin, start, stop, anchor_every, B, q, params.W.shape[1], tiles, step, scale_in,
        scale_out,
        RECONSTRUCT=reconstruct, USE_ANCHORS=anchors is not None, USE_STAGES=stages is not None,
        DRIFT=drift_state is not None, GRADS=grads, **_common(params, heun, act, precision, config),
    )  # fmt: skip


# Persistent reverse programs per streaming multiprocessor: one. The reverse kernels take 219–255
# registers a thread over 8 warps as the JIT compiles them for sm_90 (tests/triton_aot.py): one program
# fills an SM's 64 K registers, so a second would only wait, and its partial rows would double.
PROGRAMS_PER_SM = 1


def reverse_programs(B: int, block_b: int, processors: int) -> int:
    """The reverse kernel's persistent programs: one per batch tile up to PROGRAMS_PER_SM per SM."""
    return max(1, min(triton.cdiv(B, block_b), PROGRAMS_PER_SM * processors))


def sum_partials(partials: Tensor, out: Tensor, length: int, block: int = 1024) -> None:
    """out[:length] += partials[:, :length].sum(0) in a fixed order; `partials` is a view starting at
    a gradient section of the (programs, row) buffer, `out` a flat view into an accumulator."""
    if length:
        sum_partials_kernel[(triton.cdiv(length, block),)](partials, partials.stride(0), partials.shape[0], out,
                                                           length, BLOCK=block)  # fmt: skip


def workspace_grads(
    workspace: Tensor, accumulators: list, start: int, operand_like: Tensor, *, scale_in: float, scale_out: float,
    precision: str, config: ProductConfig, splits: int = 1,
) -> None:  # fmt: skip
    """Add the weight gradients whose factors one reverse launch over layers start … start + k − 1
    left in `workspace` (sets, k, B, 2m + 2q) into the float32 (P, …) `accumulators` [dW, dV, db, dc]
    (db, dc None without biases): set 0 holds θ_n's VJPs, set 1 (Heun) θ_{n+1}'s, so set s of
    slot j lands on layer start + s + j. Per set, dW/db and dV/dc each take a product launch over
    `splits` ranges of the batch and a fixed-order sum of the splits into the accumulators."""
    sets, slots, B, _ = workspace.shape
    dW, dV, db, dc = accumulators
    _, m, q = dW.shape
    rows_per_split = triton.cdiv(triton.cdiv(B, splits), config.block_k) * config.block_k
    splits = triton.cdiv(B, rows_per_split)  # no empty split
    # one buffer for every product of the call: per split, the products then the column sums
    buffer = workspace.new_empty(splits * slots * (m * q + max(m, q)))
    for s in range(sets):
        layer = start + s
        # (out, bias, left column, right column, R, C, scale): dW = a_in Σ dz xᵀ, dV = a_out Σ u σ(z)ᵀ
        for out, bias, left_col, right_col, R, C, scale in ((dW, db, 0, 2 * m, m, q, scale_in),
                                                           (dV, dc, 2 * m + q, m, q, m, scale_out)):  # fmt: skip
            partial = buffer[: splits * slots * (R * C + R)].view(splits, -1)
            grid = (triton.cdiv(R, config.block_r) * triton.cdiv(C, config.block_c) * slots * splits,)
            workspace_grads_kernel[grid](
                workspace[s], partial, operand_like, left_col, right_col, B, R, C, m, q, splits, rows_per_split,
                scale, HAS_BIAS=bias is not None, BLOCK_R=config.block_r, BLOCK_C=config.block_c,
                BLOCK_K=config.block_k, PRECISION=precision, num_warps=config.num_warps, num_stages=config.num_stages,
            )  # fmt: skip
            sum_partials(partial, out.view(-1)[layer * R * C :], slots * R * C)
            if bias is not None:
                sum_partials(partial[:, slots * R * C :], bias.view(-1)[layer * R :], slots * R)


def product_splits(output_tiles: int, B: int, block_k: int, processors: int) -> int:
    """Batch ranges for the workspace products: enough programs for two per streaming processor,
    each range at least 8 BLOCK_K steps long (a fixed function of the shape and the device, so the
    summation order — and the result — is the same from run to run)."""
    wanted = triton.cdiv(2 * processors, max(output_tiles, 1))
    return max(1, min(wanted, B // (8 * block_k)))
