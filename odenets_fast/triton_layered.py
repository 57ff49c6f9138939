"""The layered path of the "triton" backend: one layer at a time, matrix products in cuBLAS, everything
between two products in one Triton elementwise kernel (`odenets_fast.triton_kernels.layered`).

Why: a float32 product in a fused Triton kernel runs on CUDA cores (FMA) at a fraction of the FP32
peak, while cuBLAS runs it at the efficiency eager PyTorch gets, on tensor cores where TF32 or a
16-bit dtype allows. For wide states the products dominate, so this path — the C++ backend's design
on the GPU — is what the planner (`odenets_fast.planner`) picks there; the fused whole-depth kernels
(`triton_backend`) win where states are narrow and launches and memory traffic dominate.

Per layer, the products go into preallocated float32 buffers (16-bit operands through cuBLAS's
float32-output GEMM, `out_dtype`): z = x·Wᵀ, σ(z)·Vᵀ, and in backward g·V, dz·W and the weight
gradients, which are full-batch GEMMs accumulating into the float32 (P, …) gradients — no partial
rows, no atomics, reproducible. The states x, g and the residuals are float32 buffers; each
epilogue also writes the next product's operand in the parameter dtype (for float32 parameters the
state itself is the operand). No host synchronisation anywhere, so a training step can be captured
in a CUDA graph. Memory: a handful of (B, m) and (B, q) buffers, whatever the depth, besides what the
backward mode stores (`interface.Saved`: x_L, anchors, Heun's stages in backprop mode).

On CPU tensors under TRITON_INTERPRET=1 (the tests) the products run in torch on the CPU, 16-bit
operands upcast to float32 (CPU GEMMs have no float32 output for them), and the elementwise kernels
in the interpreter.
"""

import contextlib
from typing import Optional

import torch
import triton
from torch import Tensor

from .interface import Gradients, Saved, in_grad_dtype, relative_drift
from .spec import StackSpec
from .triton_kernels import layered
from .triton_kernels.activations import ACTIVATION_CODES

# Elementwise tiles: 16 × 128 values over 8 warps, 8 a thread. ptxas gives the kernels 46–86 registers
# (sm_90, tests/triton_aot.py; 32-row tiles took up to 165), so several programs share an SM, as
# memory-bound kernels need; the column sums' partial rows (B/16 × width floats) stay 1/16 of the
# buffer they sum.
BLOCK_R, BLOCK_C, NUM_WARPS = 16, 128, 8


def _grid(R: int, C: int) -> tuple:
    return (triton.cdiv(R, BLOCK_R), triton.cdiv(C, BLOCK_C))


def tf32_context(precision: str, device: torch.device):
    """cuBLAS's float32 products in `precision` for the duration: "tf32" on tensor cores; "ieee" and
    "tf32x3" (cuBLAS has no three-pass TF32; full float32 is at least as accurate) in full float32.
    The setting is PyTorch's global one, restored on exit.

    On torch >= 2.9 the new API is set even where the user set the legacy one: the legacy getters
    (`allow_tf32`, `get_float32_matmul_precision`) raise while the two disagree, but cuBLAS reads only
    the new one (torch 2.11 cu130's libtorch_cuda calls the legacy getter only in TunableOp's
    signatures), and restoring the saved value makes them agree again. Setting the legacy flag instead
    would warn of its deprecation and break users of the new API the same way."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    matmul = torch.backends.cuda.matmul
    wanted = precision == "tf32"
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9: the new API (mixing the two is an error there)
        return _attribute(matmul, "fp32_precision", "tf32" if wanted else "ieee")
    return _attribute(matmul, "allow_tf32", wanted)


@contextlib.contextmanager
def _attribute(owner, name: str, value):
    saved = getattr(owner, name)
    if saved == value:
        yield
        return
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


class _Products:
    """The matrix products of one call: float32 results of operands in the parameter dtype."""

    def __init__(self, operand_dtype: torch.dtype, device: torch.device):
        self.widen = operand_dtype != torch.float32
        # cuBLAS's float32-output GEMM for 16-bit operands; the CPU has none: upcast the operands there
        self.upcast = self.widen and device.type != "cuda"

    def into(self, out: Tensor, left: Tensor, right: Tensor) -> Tensor:
        """out = left · right (float32)."""
        if self.upcast:
            return torch.mm(left.float(), right.float(), out=out)
        if self.widen:
            return torch.mm(left, right, out_dtype=torch.float32, out=out)
        return torch.mm(left, right, out=out)

    def accumulate(self, acc: Tensor, left: Tensor, right: Tensor, alpha: float, scratch: Tensor) -> None:
        """acc += alpha · left · right: a weight gradient, summed over the whole batch by one GEMM.
        16-bit operands go through `scratch` (acc's shape, float32), as a float32-output GEMM that
        also reads acc is not something every torch release gives."""
        if self.widen:
            acc.add_(self.into(scratch, left, right), alpha=alpha)
        else:
            acc.addmm_(left, right, alpha=alpha)


class _Layers:
    """The stacked parameters with the per-layer views the products take, and the epilogue launches."""

    def __init__(self, W: Tensor, V: Tensor, b: Optional[Tensor], c: Optional[Tensor], spec: StackSpec):
        self.W, self.V = W.contiguous(), V.contiguous()
        self.b = None if b is None else b.contiguous()
        self.c = None if c is None else c.contiguous()
        self.spec = spec
        self.act = ACTIVATION_CODES[spec.activation]
        self.operand_dtype = W.dtype
        self.products = _Products(W.dtype, W.device)

    def operand(self, buffer: Tensor) -> Tensor:
        """A buffer for the parameter-dtype copy of a float32 buffer, or the buffer itself."""
        return buffer if self.operand_dtype == torch.float32 else torch.empty_like(buffer, dtype=self.operand_dtype)

    # ---- epilogues ------------------------------------------------------------------------------

    def activation(self, pre: Tensor, n: int, out: Tensor, slope: Optional[Tensor] = None) -> None:
        """out = σ(a_in·pre + b_n) (operand dtype); slope = σ'(·) (float32) when given."""
        R, C = pre.shape
        layered.activation_kernel[_grid(R, C)](
            pre, pre if self.b is None else self.b[n], out, pre if slope is None else slope, R, C,
            self.spec.scale_in, HAS_BIAS=self.b is not None, ACT=self.act, WRITE_SLOPE=slope is not None,
            BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS,
        )  # fmt: skip

    def hidden_grad(self, n: int, da: Tensor, grad_scale: float, dz: Tensor, partials: Tensor, *,
                    pre: Optional[Tensor] = None, act_out: Optional[Tensor] = None,
                    slope: Optional[Tensor] = None) -> None:  # fmt: skip
        """dz = σ'(z) ⊙ (grad_scale·da) in the operand dtype, z = a_in·pre + b_n (writing σ(z) to
        act_out) or σ'(z) = slope; partial column sums of dz into `partials` when there are biases."""
        R, C = da.shape
        layered.hidden_grad_kernel[_grid(R, C)](
            da if pre is None else pre, da if self.b is None else self.b[n], da if slope is None else slope, da,
            dz if act_out is None else act_out, dz, partials, R, C, self.spec.scale_in, grad_scale,
            RECOMPUTE=pre is not None, HAS_BIAS=self.b is not None, ACT=self.act,
            BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS,
        )  # fmt: skip

    def combine(self, out: Tensor, base: Tensor, alpha: float, *, product: Optional[Tensor] = None,
                k_scale: float = 1.0, bias: Optional[Tensor] = None, extra: Optional[Tensor] = None,
                operand: Optional[Tensor] = None, increment: Optional[Tensor] = None,
                partials: Optional[Tensor] = None) -> None:  # fmt: skip
        """out = base + alpha·(k_scale·product + bias + extra), each term optional; also the operand-dtype
        copy (unless `operand` is `out`), the increment, and partial column sums of out."""
        R, C = out.shape
        write_operand = operand is not None and operand is not out
        layered.combine_kernel[_grid(R, C)](
            base, out if product is None else product, out if bias is None else bias, out if extra is None else extra,
            out, operand if write_operand else out, out if increment is None else increment,
            out if partials is None else partials, R, C, alpha, k_scale,
            HAS_K=product is not None, HAS_BIAS=bias is not None, HAS_EXTRA=extra is not None,
            WRITE_OPERAND=write_operand, WRITE_INCREMENT=increment is not None, SUMS=partials is not None,
            BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS,
        )  # fmt: skip

    def c_row(self, n: int) -> Optional[Tensor]:
        return None if self.c is None else self.c[n]

    # ---- one layer of the forward rule ----------------------------------------------------------

    def residual_product(self, x_op: Tensor, n: int, buffers: "_Buffers") -> Tensor:
        """P = σ(a_in x W_nᵀ + b_n) V_nᵀ (float32), so that f(x; θ_n) = a_out P + c_n."""
        self.products.into(buffers.hidden, x_op, self.W[n].t())
        self.activation(buffers.hidden, n, buffers.act)
        return self.products.into(buffers.residual, buffers.act, self.V[n].t())


class _Buffers:
    """Per-call workspaces: (B, m) hidden-width and (B, q) state-width buffers, reused at every layer."""

    def __init__(self, layers: _Layers, B: int, q: int, m: int, device: torch.device, backward: bool):
        wide = dict(dtype=torch.float32, device=device)
        op = dict(dtype=layers.operand_dtype, device=device)
        heun = layers.spec.method == "heun"
        self.hidden = torch.empty(B, m, **wide)
        self.act = torch.empty(B, m, **op)
        self.residual = torch.empty(B, q, **wide)
        self.stage = torch.empty(B, q, **wide) if heun else None  # y (Heun)
        self.stage_op = layers.operand(self.stage) if heun else None
        self.k1 = torch.empty(B, q, **wide) if heun else None  # f(x_n; θ_n), kept for reuse
        if not backward:
            return
        rows = triton.cdiv(B, BLOCK_R)
        self.grad_hidden = torch.empty(B, m, **wide)  # products g·V, u1·V
        self.dz = torch.empty(B, m, **op)
        self.partials = torch.empty(rows, max(m, q), **wide)  # column sums' partial rows, any width up to it
        self.act2 = torch.empty(B, m, **op) if heun else None  # σ(z2) while σ(z1) waits for dV_n
        self.slope = torch.empty(B, m, **wide) if heun else None  # σ'(z1)
        self.u1 = torch.empty(B, q, **op) if heun else None
        self.ones = torch.ones(rows, **wide)
        self.scratch_W = torch.empty(m, q, **wide) if layers.products.widen else None
        self.scratch_V = torch.empty(q, m, **wide) if layers.products.widen else None

    def sums(self, width: int) -> Tensor:
        """The partial rows of a column sum over `width` columns: a contiguous (programs, width) view."""
        rows = self.partials.shape[0]
        return self.partials.view(-1)[: rows * width].view(rows, width)


def _forward_layer(layers: _Layers, buf: _Buffers, x: Tensor, x_op: Tensor, n: int, stage: Optional[Tensor]) -> None:
    """x ← x_{n+1} from x = x_n in place (DESIGN.md §3), and its operand copy; Heun's y_n into `stage`."""
    h, a_out = layers.spec.step, layers.spec.scale_out
    product = layers.residual_product(x_op, n, buf)
    if layers.spec.method == "euler":
        layers.combine(x, x, h, product=product, k_scale=a_out, bias=layers.c_row(n), operand=x_op)
        return
    y = buf.stage if stage is None else stage
    y_op = buf.stage_op if layers.products.widen else y
    layers.combine(y, x, h, product=product, k_scale=a_out, bias=layers.c_row(n), operand=y_op, increment=buf.k1)
    product = layers.residual_product(y_op, n + 1, buf)
    layers.combine(x, x, 0.5 * h, product=product, k_scale=a_out, bias=layers.c_row(n + 1), extra=buf.k1,
                   operand=x_op)  # fmt: skip


def forward(x: Tensor, W: Tensor, V: Tensor, b, c, spec: StackSpec) -> tuple[Tensor, Saved]:
    """x_0 → x_L one layer at a time, storing what `spec.backward` needs (as `reference.forward`)."""
    B, q = x.shape
    layers = _Layers(W, V, b, c, spec)
    state = x.to(torch.float32, copy=True).contiguous()
    every = spec.anchor_interval
    anchors = state.new_empty((len(range(0, spec.depth, every)), B, q))
    stages = state.new_empty((spec.depth, B, q)) if spec.method == "heun" and spec.backward == "backprop" else None
    if B:
        buf = _Buffers(layers, B, q, W.shape[1], x.device, backward=False)
        state_op = layers.operand(state)
        if state_op is not state:
            state_op.copy_(state)
        with tf32_context(spec.input_precision, x.device):
            for n in range(spec.depth):
                if n % every == 0:
                    anchors[n // every].copy_(state)
                _forward_layer(layers, buf, state, state_op, n, None if stages is None else stages[n])
    return state.to(x.dtype), Saved(state, anchors, stages)


class _State:
    """A float32 state (B, q) and its operand copy (the state itself for float32 parameters)."""

    def __init__(self, value: Tensor, op: Tensor):
        self.value, self.op = value, op


class _Gradients:
    """float32 (P, …) accumulators of the weight gradients; each layer adds full-batch GEMMs and
    column sums, in a fixed order."""

    def __init__(self, layers: _Layers, buf: _Buffers):
        self.layers, self.buf = layers, buf
        zeros = dict(dtype=torch.float32, device=layers.W.device)
        self.W, self.V = torch.zeros(layers.W.shape, **zeros), torch.zeros(layers.V.shape, **zeros)
        self.b = None if layers.b is None else torch.zeros(layers.b.shape, **zeros)
        self.c = None if layers.c is None else torch.zeros(layers.c.shape, **zeros)

    def add_dW(self, n: int, dz: Tensor, x_op: Tensor, bias_sums: bool) -> None:
        """dW_n += a_in dzᵀ x;  db_n += Σ dz (the hidden_grad epilogue's partial rows)."""
        self.layers.products.accumulate(self.W[n], dz.t(), x_op, self.layers.spec.scale_in, self.buf.scratch_W)
        if bias_sums and self.b is not None:
            self.b[n].addmv_(self.buf.sums(self.b.shape[1]).t(), self.buf.ones)

    def add_dV(self, n: int, u_op: Tensor, act: Tensor, scale: float) -> None:
        """dV_n += scale · uᵀ σ(z) (scale: a_out, times h or h/2 where u is g)."""
        self.layers.products.accumulate(self.V[n], u_op.t(), act, scale, self.buf.scratch_V)

    def add_dc(self, n: int, column_sums: Tensor, scale: float) -> None:
        if self.c is not None:
            self.c[n].add_(column_sums, alpha=scale)

    def add_dc_from_partials(self, n: int) -> None:
        if self.c is not None:
            self.c[n].addmv_(self.buf.sums(self.c.shape[1]).t(), self.buf.ones)


def _reconstruct(layers: _Layers, buf: _Buffers, x_next: _State, out: _State, n: int, k_next_known: bool) -> None:
    """out = x̃_n from x_next = x̃_{n+1} (DESIGN.md §4). Heun: buf.k1 holds f(x̃_{n+1}; θ_{n+1}) when
    `k_next_known` (the VJP of layer n + 1 computed it at the same state), else it is computed here."""
    h, a_out = layers.spec.step, layers.spec.scale_out
    if layers.spec.method == "euler":
        product = layers.residual_product(x_next.op, n, buf)
        layers.combine(out.value, x_next.value, -h, product=product, k_scale=a_out, bias=layers.c_row(n),
                       operand=out.op)  # fmt: skip
        return
    if k_next_known:
        layers.combine(buf.stage, x_next.value, -h, extra=buf.k1, operand=buf.stage_op)
    else:
        product = layers.residual_product(x_next.op, n + 1, buf)
        layers.combine(buf.stage, x_next.value, -h, product=product, k_scale=a_out, bias=layers.c_row(n + 1),
                       operand=buf.stage_op, increment=buf.k1)  # fmt: skip
    product = layers.residual_product(buf.stage_op, n, buf)
    layers.combine(out.value, x_next.value, -0.5 * h, product=product, k_scale=a_out, bias=layers.c_row(n),
                   extra=buf.k1, operand=out.op)  # fmt: skip


def _finish_g(layers: _Layers, buf: _Buffers, g: _State, g_sums: Tensor, n: int) -> None:
    """g ← g + a_in dz W_n (dz in buf.dz): the last term of ∂ℓ/∂x_n; its operand copy, and its column
    sums for the next layer's dc."""
    product = layers.products.into(buf.residual, buf.dz, layers.W[n])
    sums = layers.c is not None
    layers.combine(g.value, g.value, layers.spec.scale_in, product=product, operand=g.op,
                   partials=buf.sums(g.value.shape[1]) if sums else None)  # fmt: skip
    if sums:
        torch.mv(buf.sums(g.value.shape[1]).t(), buf.ones, out=g_sums)


def _vjp_euler(layers: _Layers, buf: _Buffers, grads: _Gradients, x: _State, g: _State, g_sums: Tensor, n: int):
    """The exact VJP of x_{n+1} = x + h f(x; θ_n) at x, g = ∂ℓ/∂x_{n+1} → ∂ℓ/∂x_n (DESIGN.md §4):

        z = a_in W_n x + b_n,  dz = σ'(z) ⊙ (h a_out g V_n)
        dV_n += h a_out gᵀ σ(z);  dc_n += h Σ g;  dW_n += a_in dzᵀ x;  db_n += Σ dz
        g ← g + a_in dz W_n
    """
    h, a_out = layers.spec.step, layers.spec.scale_out
    layers.products.into(buf.hidden, x.op, layers.W[n].t())
    layers.products.into(buf.grad_hidden, g.op, layers.V[n])
    layers.hidden_grad(n, buf.grad_hidden, h * a_out, buf.dz, buf.sums(buf.dz.shape[1]), pre=buf.hidden,
                       act_out=buf.act)  # fmt: skip
    grads.add_dW(n, buf.dz, x.op, bias_sums=True)
    grads.add_dV(n, g.op, buf.act, h * a_out)
    grads.add_dc(n, g_sums, h)
    _finish_g(layers, buf, g, g_sums, n)


def _vjp_heun(layers: _Layers, buf: _Buffers, grads: _Gradients, x: _State, g: _State, g_sums: Tensor, n: int,
              stage: Optional[Tensor]):  # fmt: skip
    """The exact VJP of the Heun step k1 = f(x; θ_n), y = x + h k1, k2 = f(y; θ_{n+1}),
    x_{n+1} = x + (h/2)(k1 + k2) at x, with g = ∂ℓ/∂x_{n+1} (DESIGN.md §4):

        u2 = (h/2) g                    the cotangent of k2:  gy, dθ_{n+1} += VJP of f at (y; θ_{n+1})
        u1 = (h/2) g + h gy             the cotangent of k1:  gx, dθ_n += VJP of f at (x; θ_n)
        g ← g + gy + gx

    y is the stored stage in backprop mode, else recomputed — and k1 kept in buf.k1, which the
    reconstruction of the layer below reuses (its k_next, at the same state)."""
    h, a_in, a_out = layers.spec.step, layers.spec.scale_in, layers.spec.scale_out
    products = layers.products
    products.into(buf.hidden, x.op, layers.W[n].t())
    layers.activation(buf.hidden, n, buf.act, slope=buf.slope)  # σ(z1), σ'(z1)
    if stage is None:
        products.into(buf.residual, buf.act, layers.V[n].t())
        layers.combine(buf.stage, x.value, h, product=buf.residual, k_scale=a_out, bias=layers.c_row(n),
                       operand=buf.stage_op, increment=buf.k1)  # fmt: skip
        y_op = buf.stage_op
    elif products.widen:
        y_op = buf.stage_op.copy_(stage)
    else:
        y_op = stage
    # the VJP at (y; θ_{n+1}) with u2 = (h/2) g
    products.into(buf.hidden, y_op, layers.W[n + 1].t())
    products.into(buf.grad_hidden, g.op, layers.V[n + 1])
    layers.hidden_grad(n + 1, buf.grad_hidden, 0.5 * h * a_out, buf.dz, buf.sums(buf.dz.shape[1]), pre=buf.hidden,
                       act_out=buf.act2)  # fmt: skip
    grads.add_dW(n + 1, buf.dz, y_op, bias_sums=True)
    grads.add_dV(n + 1, g.op, buf.act2, 0.5 * h * a_out)
    grads.add_dc(n + 1, g_sums, 0.5 * h)
    gy_product = products.into(buf.residual, buf.dz, layers.W[n + 1])
    R, C = g.value.shape
    layered.heun_cotangent_kernel[_grid(R, C)](
        g.value, gy_product, buf.u1, g.value, buf.sums(C), R, C, h, a_in, SUMS=layers.c is not None,
        BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS,
    )  # fmt: skip
    grads.add_dc_from_partials(n)
    # the VJP at (x; θ_n) with u1, from the σ'(z1) kept above
    products.into(buf.grad_hidden, buf.u1, layers.V[n])
    layers.hidden_grad(n, buf.grad_hidden, a_out, buf.dz, buf.sums(buf.dz.shape[1]), slope=buf.slope)
    grads.add_dW(n, buf.dz, x.op, bias_sums=True)
    grads.add_dV(n, buf.u1, buf.act, a_out)
    _finish_g(layers, buf, g, g_sums, n)


def backward(grad_out: Tensor, saved: Saved, W: Tensor, V: Tensor, b, c, spec: StackSpec) -> Gradients:
    """Layers L−1 … 0 with the anchor and drift rules of `reference.backward`: x_n is a stored state
    where one is kept for layer n (backprop mode, anchors), the reconstruction from x̃_{n+1} otherwise;
    the drift is that of x̃_0 reconstructed from x̃_1."""
    final, anchors, stages = saved
    B, q = final.shape
    layers = _Layers(W, V, b, c, spec)
    adjoint = spec.backward == "adjoint"
    buf = _Buffers(layers, B, q, W.shape[1], final.device, backward=True)
    grads = _Gradients(layers, buf)
    g = _State(grad_out.to(torch.float32, copy=True).contiguous(), None)
    g.op = layers.operand(g.value)
    drift = None
    if B:
        slots = [_State(torch.empty_like(final), None) for _ in range(2)]
        for slot in slots:
            slot.op = layers.operand(slot.value)
        if g.op is not g.value:
            g.op.copy_(g.value)
        g_sums = g.value.sum(0)
        x_next = _State(final, final if slots[0].op is slots[0].value else slots[0].op.copy_(final))
        current = 0  # the slot whose operand buffer x_next uses
        every = spec.anchor_interval
        use_anchors = spec.backward == "backprop" or spec.anchor_every is not None
        k_next_known = False
        with tf32_context(spec.input_precision, final.device):
            for n in reversed(range(spec.depth)):
                free = slots[1 - current]
                if use_anchors and n % every == 0:
                    anchor = anchors[n // every]
                    if n == 0 and adjoint:
                        _reconstruct(layers, buf, x_next, free, 0, k_next_known)
                        drift = relative_drift(free.value, anchor)
                    x = _State(anchor, anchor if free.op is free.value else free.op.copy_(anchor))
                else:
                    _reconstruct(layers, buf, x_next, free, n, k_next_known)
                    x = free
                    if n == 0:
                        drift = relative_drift(x.value, anchors[0])
                if spec.method == "euler":
                    _vjp_euler(layers, buf, grads, x, g, g_sums, n)
                else:
                    _vjp_heun(layers, buf, grads, x, g, g_sums, n, None if stages is None else stages[n])
                k_next_known = spec.method == "heun" and stages is None
                x_next, current = x, 1 - current
    elif adjoint:
        drift = relative_drift(final, anchors[0])

    return in_grad_dtype(grad_out, g.value, grads.W, grads.V, grads.b, grads.c, drift)
