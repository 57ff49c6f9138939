"""Elementwise kernels of the layered path (DESIGN.md §3–4): everything between two matrix products.

The layered path runs the stack one layer at a time with the matrix products in cuBLAS (torch.mm
into preallocated float32 buffers) — the C++ backend's design on the GPU. The products leave raw
float32 results P = left · right; these kernels apply the scales, biases, activations, residual
updates and column sums in one pass each, and write the next product's operand in the parameter
dtype (float32, bfloat16 or float16), so that no intermediate makes a separate round trip:

    activation_kernel   z = s·P + b → σ(z) as an operand (and σ'(z), kept for Heun's first VJP)
    hidden_grad_kernel  dz = σ'(z) ⊙ (s·Dp), from z = s·P + b (also writing σ(z)) or a kept σ'(z);
                        dz as an operand, and per-program column sums of dz (for db)
    combine_kernel      out = base + α·(K + c): residual updates, reconstructions, g updates; the
                        result as an operand, and per-program column sums of it (for dc)
    heun_cotangent_kernel   Heun's u1 = (h/2)·g + h·s·P and g + s·P (P = dz2 W_{n+1}), u1's column sums

Column sums are per-program float32 partial rows (programs × width), added by the caller in a
fixed order — the bias gradients are reproducible, as the weight gradients (full-batch GEMMs
accumulating with beta = 1) are.

Every kernel walks a 2-D (rows, cols) grid of BLOCK_R × BLOCK_C tiles; the buffers are contiguous
(rows, cols) arrays, operands of the parameter dtype and float32 for everything else.
"""

import triton
import triton.language as tl

from .activations import activation, activation_grad


@triton.jit
def _tile(R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's rows and columns, their validity, and the flat offsets of its tile."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_r < R)[:, None] & (offs_c < C)[None, :]
    return offs_c, mask, offs_r.to(tl.int64)[:, None] * C + offs_c[None, :]


@triton.jit
def _column_sums(values, partial_ptr, offs_c, C, mask):
    """Store this tile's column sums in its program's partial row (row program_id(0))."""
    sums = tl.sum(tl.where(mask, values, 0.0), axis=0)
    tl.store(partial_ptr + tl.program_id(0).to(tl.int64) * C + offs_c, sums, mask=offs_c < C)


@triton.jit
def activation_kernel(
    pre_ptr,  # (R, C) float32 product P = x·Wᵀ
    bias_ptr,  # (C,) b in the parameter dtype (HAS_BIAS)
    out_ptr,  # (R, C) σ(z) in the parameter dtype: the next product's operand
    slope_ptr,  # (R, C) float32 σ'(z) (WRITE_SLOPE)
    R, C,
    scale,  # a_in: z = scale·P + b
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, WRITE_SLOPE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    offs_c, mask, offs = _tile(R, C, BLOCK_R, BLOCK_C)
    z = tl.load(pre_ptr + offs, mask=mask, other=0.0) * scale
    if HAS_BIAS:
        z += tl.load(bias_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs, activation(z, ACT).to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_SLOPE:
        tl.store(slope_ptr + offs, activation_grad(z, ACT), mask=mask)


@triton.jit
def hidden_grad_kernel(
    pre_ptr,  # (R, C) float32 product P = x·Wᵀ (RECOMPUTE)
    bias_ptr,  # (C,) b in the parameter dtype (RECOMPUTE and HAS_BIAS)
    slope_ptr,  # (R, C) float32 σ'(z) kept by activation_kernel (not RECOMPUTE)
    da_ptr,  # (R, C) float32 product Dp = u·V
    act_out_ptr,  # (R, C) σ(z) in the parameter dtype (RECOMPUTE): the operand of dV's product
    dz_out_ptr,  # (R, C) dz in the parameter dtype: the operand of dW's and dx's products
    partial_ptr,  # (programs along R, C) float32 partial column sums of dz (HAS_BIAS)
    R, C,
    scale,  # a_in: z = scale·P + b
    grad_scale,  # dz = σ'(z) ⊙ (grad_scale·Dp): a_out, times the step where u = h·g is not formed
    RECOMPUTE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """dz = σ'(z) ⊙ da of the VJP of f (DESIGN.md §4), with σ(z) when z is recomputed here."""
    offs_c, mask, offs = _tile(R, C, BLOCK_R, BLOCK_C)
    if RECOMPUTE:
        z = tl.load(pre_ptr + offs, mask=mask, other=0.0) * scale
        if HAS_BIAS:
            z += tl.load(bias_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)[None, :]
        tl.store(act_out_ptr + offs, activation(z, ACT).to(act_out_ptr.dtype.element_ty), mask=mask)
        slope = activation_grad(z, ACT)
    else:
        slope = tl.load(slope_ptr + offs, mask=mask, other=0.0)
    dz = slope * (grad_scale * tl.load(da_ptr + offs, mask=mask, other=0.0))
    tl.store(dz_out_ptr + offs, dz.to(dz_out_ptr.dtype.element_ty), mask=mask)
    if HAS_BIAS:
        _column_sums(dz, partial_ptr, offs_c, C, mask)


@triton.jit
def combine_kernel(
    base_ptr,  # (R, C) float32
    k_ptr,  # (R, C) float32 product K (HAS_K)
    bias_ptr,  # (C,) c in the parameter dtype (HAS_BIAS)
    extra_ptr,  # (R, C) float32 residual E (HAS_EXTRA)
    out_ptr,  # (R, C) float32 result; may be base_ptr (in place)
    out_op_ptr,  # (R, C) the result in the parameter dtype (WRITE_OPERAND)
    increment_ptr,  # (R, C) float32 increment (WRITE_INCREMENT): a residual kept for later
    partial_ptr,  # (programs along R, C) float32 partial column sums of the result (SUMS)
    R, C,
    alpha, k_scale,  # out = base + alpha·increment, increment = k_scale·K + c + E
    HAS_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_EXTRA: tl.constexpr,
    WRITE_OPERAND: tl.constexpr, WRITE_INCREMENT: tl.constexpr, SUMS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """The state updates: x + h f with f = a_out P + c (Euler), and Heun's y = x + h k1,
    x + (h/2)(k1 + k2), their reversed forms, and g + a_in dz W."""
    offs_c, mask, offs = _tile(R, C, BLOCK_R, BLOCK_C)
    increment = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    if HAS_K:
        increment += k_scale * tl.load(k_ptr + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        increment += tl.load(bias_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)[None, :]
    if HAS_EXTRA:
        increment += tl.load(extra_ptr + offs, mask=mask, other=0.0)
    out = tl.load(base_ptr + offs, mask=mask, other=0.0) + alpha * increment
    tl.store(out_ptr + offs, out, mask=mask)
    if WRITE_OPERAND:
        tl.store(out_op_ptr + offs, out.to(out_op_ptr.dtype.element_ty), mask=mask)
    if WRITE_INCREMENT:
        tl.store(increment_ptr + offs, increment, mask=mask)
    if SUMS:
        _column_sums(out, partial_ptr, offs_c, C, mask)


@triton.jit
def heun_cotangent_kernel(
    g_ptr,  # (R, C) float32 g = ∂ℓ/∂x_{n+1}
    p_ptr,  # (R, C) float32 product P = dz2·W_{n+1}, so that gy = scale·P
    u1_ptr,  # (R, C) u1 = (h/2)·g + h·gy, the cotangent of k1, in the parameter dtype: the operand of
    #          da1's and dV_n's products
    g_out_ptr,  # (R, C) float32 g + gy (gx is added once the VJP at x_n has it)
    partial_ptr,  # (programs along R, C) float32 partial column sums of u1 (SUMS: dc_n)
    R, C,
    step, scale,  # h and a_in
    SUMS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    offs_c, mask, offs = _tile(R, C, BLOCK_R, BLOCK_C)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    gy = scale * tl.load(p_ptr + offs, mask=mask, other=0.0)
    u1 = (0.5 * step) * g + step * gy
    tl.store(u1_ptr + offs, u1.to(u1_ptr.dtype.element_ty), mask=mask)
    tl.store(g_out_ptr + offs, g + gy, mask=mask)
    if SUMS:
        _column_sums(u1, partial_ptr, offs_c, C, mask)
