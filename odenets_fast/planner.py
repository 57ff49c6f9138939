"""`plan`: what the Triton backend runs for a stack — the layered path or the fused whole-depth kernels —
with a cost model's predicted times for both and for eager PyTorch, and why (on the command line:
`python -m odenets_fast B q m L [--dtype bfloat16] [--device H200]`). The backend chooses its
path through the same function (`choose_path`); ODENETS_FAST_TRITON_PATH=layered|fused overrides it.

The model (times per call, seconds):
    a GPU kernel   max(FLOPs / (peak · efficiency), bytes / bandwidth) + KERNEL_TAIL_S
    a call         max(host time, GPU time): launches are asynchronous, so the slower side sets the pace;
                   host time = launches · their Python cost (torch op, Triton launch, eager autograd op)

Products are where the paths differ, and their efficiency is a property of what they compile to:
    cuBLAS (eager, layered)   CUBLAS_EFFICIENCY of the peak of the unit the dtype and precision use:
                              FP32 cores for float32 "ieee", tensor cores for TF32 and 16-bit
    fused Triton kernels      by instruction, as tests/triton_aot.py reads it off the sm_90 PTX
                              (`fused_product_instruction`, checked there against the compiler):
                              "fma" on FP32 cores, "mma" or "wgmma" (or a mix) on tensor cores, each
                              with TRITON_EFFICIENCY — "fma" low because the kernels' float32 tiles load
                              unswizzled from shared memory with bank conflicts (a load model of the
                              sm_90 SASS put the FMA kernels at 10–26 % of the FP32 peak)
The fused kernels also use only as many SMs as they have programs, read the weights from L2 once per
program and layer, and move their weight-gradient buffers (partial rows or workspace) through DRAM;
the byte counts come from the backend's own planning functions, so the model follows the code.

Devices: "H100" (SXM) and "H200", or a live CUDA device (matched by name; another GPU gets the H100's
per-SM rates scaled to its SM count, flagged in the plan). Every number is a prediction until a GPU
run measures it: bench.triton_step records the measured times beside these.
"""

import functools
import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional, Union

import torch


PATHS = ("layered", "fused")
PATH_ENV = "ODENETS_FAST_TRITON_PATH"
MAX_FUSED_WIDTH = 256  # q: the fused kernels keep a (BLOCK_B, q) float32 block on-chip (mlp_step.MAX_STATE_WIDTH)
# "tf32x3" splits every float32 operand of the fused kernels into three TF32 parts, and above q = 128 their
# reverse kernel does not fit in registers with any tile tried: 656–2,056 bytes of spill a thread under
# triton 3.9, and under 3.6 (the GPU machine's release) Euler's anchored adjoint reverse compiles to 32
# registers and 6.0–7.6 KB of stack with each of five tiles — the same with the ptxas of CUDA 12.8, 12.9 and 13.0
# (tests/triton_aot.py --all; bench/results/triton-aot-sm90-*). The model has no term for spills, so it
# cannot price that; above this width such stacks take the layered path (float32 cuBLAS products:
# at least as accurate as three TF32 passes).
MAX_FUSED_WIDTH_TF32X3 = 128
INT32_MAX = 2**31 - 1


def fused_unsupported(B: int, q: int, m: int, P: int) -> Optional[str]:
    """Why the fused kernels cannot run a stack of P parameter sets, or None: the backend raises it where
    the fused path is forced, and the planner takes the layered path (no such limit) instead."""
    if q > MAX_FUSED_WIDTH:
        return f"the fused kernels keep the state width on-chip up to q = {MAX_FUSED_WIDTH}; got q = {q}"
    # offsets within the stacked weights and within one state are int32 (those between stored states,
    # partial rows and workspace rows are int64)
    if P * m * q > INT32_MAX or B * q > INT32_MAX:
        return (f"the fused kernels index the stacked weights and one state with int32: P·m·q = {P * m * q} and "
                f"B·q = {B * q} must stay below 2^31")  # fmt: skip
    return None


@dataclass(frozen=True)
class DeviceModel:
    """Rates of one GPU at a sustained clock (NVIDIA's per-SM, per-clock figures for Hopper)."""

    name: str
    sms: int
    clock_ghz: float
    hbm_tbps: float
    l2_tbps: float = 7.0  # L2 read bandwidth (Hopper, about twice HBM3's)
    fp32_per_sm_clock: int = 256  # FLOPs: 128 FMA lanes
    tf32_per_sm_clock: int = 2048  # dense tensor-core FLOPs
    half_per_sm_clock: int = 4096  # bfloat16 / float16, dense
    approximate: bool = False  # a device not in the table, given the H100's per-SM rates

    def peak_tflops(self, unit: str) -> float:
        per_clock = {"fp32": self.fp32_per_sm_clock, "tf32": self.tf32_per_sm_clock, "half": self.half_per_sm_clock}
        return self.sms * self.clock_ghz * per_clock[unit] / 1e3


# 1.755 GHz: the clock Hopper sustains under matrix load (59 TFLOP/s FP32 on 132 SMs), not the boost clock.
DEVICES = {
    "H100": DeviceModel("H100", sms=132, clock_ghz=1.755, hbm_tbps=3.35),
    "H200": DeviceModel("H200", sms=132, clock_ghz=1.755, hbm_tbps=4.8),
}

CUBLAS_EFFICIENCY = 0.55  # of the unit's peak on large GEMMs (the review's 45–65 % for SGEMM)
TRITON_EFFICIENCY = {"fma": 0.16, "mma": 0.35, "wgmma": 0.55}
BANDWIDTH_EFFICIENCY = 0.85  # of HBM (or L2) bandwidth reached by streaming kernels
KERNEL_TAIL_S = 2e-6  # launch latency and the last wave's tail, per kernel on the device
HOST_S = {"torch_op": 5e-6, "triton_launch": 8e-6, "eager_autograd_op": 10e-6}


@dataclass(frozen=True)
class Cost:
    """FLOPs, DRAM bytes, launches and host/GPU seconds of some work; adds up."""

    flops: float = 0.0
    bytes: float = 0.0
    launches: int = 0
    host_s: float = 0.0
    gpu_s: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(*(a + b for a, b in zip(self.astuple(), other.astuple())))

    def __mul__(self, times: int) -> "Cost":
        return Cost(*(a * times for a in self.astuple()))

    def astuple(self) -> tuple:
        return (self.flops, self.bytes, self.launches, self.host_s, self.gpu_s)

    @property
    def seconds(self) -> float:
        return max(self.host_s, self.gpu_s)


@dataclass(frozen=True)
class Estimate:
    """One way of running the stack: what it launches and what the model predicts for it."""

    path: str  # "layered", "fused" or "eager"
    products: str  # what the matrix products run on
    forward: Cost
    step: Cost  # forward + backward in the plan's backward mode (eager: backprop)
    details: dict = field(default_factory=dict)

    @property
    def forward_ms(self) -> float:
        return 1e3 * self.forward.seconds

    @property
    def step_ms(self) -> float:
        return 1e3 * self.step.seconds


@dataclass(frozen=True)
class Plan:
    """What `ode_mlp` would run for a stack and why; predicted times for it, the other path and eager."""

    backend: str
    path: Optional[str]  # None off CUDA (no cost model there)
    reason: str
    device: str
    estimates: dict  # "layered", "fused" (when it can run), "eager" → Estimate

    def ratio(self, what: str = "step", against: str = "eager") -> float:
        """Predicted time of the chosen path over `against`'s (what: "forward" or "step")."""
        if self.path is None:
            raise ValueError(f"a plan on {self.device} has no predicted times: the cost model covers CUDA devices")
        ours, theirs = self.estimates[self.path], self.estimates[against]
        return getattr(ours, f"{what}_ms") / getattr(theirs, f"{what}_ms")

    def __str__(self) -> str:
        lines = [f"backend {self.backend!r}, path {self.path!r} on {self.device}: {self.reason}"]
        for name, est in self.estimates.items():
            lines.append(f"  {name:8s} forward {est.forward_ms:9.3f} ms, step {est.step_ms:9.3f} ms (predicted); "
                         f"{est.step.launches} launches, {est.step.flops / 1e9:.1f} GFLOP, "
                         f"{est.step.bytes / 1e9:.2f} GB; products: {est.products}")  # fmt: skip
        return "\n".join(lines)


def _is_cpu(device: Union[str, torch.device, None]) -> bool:
    if device is None or (isinstance(device, str) and device in DEVICES):
        return False
    try:
        return torch.device(device).type == "cpu"
    except (RuntimeError, TypeError):
        return False


def device_model(device: Union[str, torch.device, None]) -> DeviceModel:
    """The model of a named device ("H100", "H200") or of a live CUDA device."""
    if isinstance(device, str) and device in DEVICES:
        return DEVICES[device]
    original = device
    try:
        device = torch.device(device if device is not None else "cuda")
    except (RuntimeError, TypeError):
        device = None  # not a device name either
    if device is None or device.type != "cuda":
        raise ValueError(f"device must be 'H100', 'H200' or a CUDA device; got {original!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {original!r}: no CUDA device is available here; name a model ('H100' or 'H200')")
    props = torch.cuda.get_device_properties(device)
    for name, model in DEVICES.items():
        # the SXM parts the table describes: "NVIDIA H100 PCIe" (114 SMs, 2 TB/s) and "NVIDIA GH200" are others
        if re.search(rf"\b{name}\b", props.name) and "PCIe" not in props.name and props.multi_processor_count == model.sms:
            return model
    h100 = DEVICES["H100"]
    return DeviceModel(props.name, sms=props.multi_processor_count, clock_ghz=h100.clock_ghz,
                       hbm_tbps=h100.hbm_tbps * props.multi_processor_count / h100.sms, approximate=True)  # fmt: skip


def _product_unit(dtype: torch.dtype, precision: str) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "half"
    return "fp32" if precision in ("ieee", "tf32x3") else "tf32"


@dataclass(frozen=True)
class _Shape:
    B: int
    q: int
    m: int
    L: int
    heun: bool
    operand_bytes: int
    bias: bool


class _Model:
    """Kernel costs on one device."""

    def __init__(self, gpu: DeviceModel):
        self.gpu = gpu

    def kernel(self, flops: float, dram_bytes: float, rate_tflops: float, *, l2_bytes: float = 0.0,
               host: str = "torch_op", sms_used: Optional[int] = None) -> Cost:  # fmt: skip
        sms = self.gpu.sms if sms_used is None else max(1, min(sms_used, self.gpu.sms))
        compute = flops / (rate_tflops * 1e12 * sms / self.gpu.sms) if flops else 0.0
        memory = dram_bytes / (self.gpu.hbm_tbps * 1e12 * BANDWIDTH_EFFICIENCY)
        l2 = l2_bytes / (self.gpu.l2_tbps * 1e12 * BANDWIDTH_EFFICIENCY)
        return Cost(flops, dram_bytes, 1, HOST_S[host], max(compute, memory, l2) + KERNEL_TAIL_S)

    def gemm(self, M: int, N: int, K: int, operand_bytes: int, unit: str, *, out_bytes: int = 4,
             accumulate: bool = False, host: str = "torch_op") -> Cost:  # fmt: skip
        """cuBLAS: (M, K)·(K, N) into a float32 (M, N) result (read too when accumulating)."""
        moved = (M * K + K * N) * operand_bytes + M * N * out_bytes * (2 if accumulate else 1)
        rate = self.gpu.peak_tflops(unit) * CUBLAS_EFFICIENCY
        return self.kernel(2.0 * M * N * K, moved, rate, host=host)

    def elementwise(self, bytes_moved: float, host: str = "triton_launch") -> Cost:
        return self.kernel(0.0, bytes_moved, 1.0, host=host)


def _layered(model: _Model, s: _Shape, unit: str, backward: str, anchor_every: Optional[int]) -> Estimate:
    """One product per cuBLAS call and one elementwise pass between two products (triton_layered)."""
    B, q, m, ob = s.B, s.q, s.m, s.operand_bytes
    z = model.gemm(B, m, q, ob, unit)  # x·Wᵀ, and g·V, u1·V (same shape)
    f = model.gemm(B, q, m, ob, unit)  # σ(z)·Vᵀ, and dz·W
    grad = model.gemm(m, q, B, ob, unit, accumulate=True)  # a weight gradient over the whole batch
    if ob == 2:  # a float32-output GEMM into scratch, then added to the float32 gradient
        grad = model.gemm(m, q, B, ob, unit) + model.elementwise(3 * m * q * 4, host="torch_op")
    act = model.elementwise(B * m * (4 + ob))  # float32 product in; operand out
    hidden_grad = model.elementwise(B * m * (8 + 2 * ob))  # two products in; σ(z), dz out
    state = model.elementwise(B * q * (12 + ob))  # base and product in; result and operand out
    residual = z + act + f + state  # x ± h f(x), one evaluation of f
    reconstructions = _reconstructions(s.L, backward, anchor_every)
    evals = 2 if s.heun else 1
    vjp = z + hidden_grad + grad + grad + f + state  # g·V or u·V, dz; dV, dW; dz·W; the g update
    if s.heun:  # σ(z1) and σ'(z1) first; y recomputed unless stored; the VJP at y also forms z2
        vjp = z + act + vjp + z + vjp + (Cost() if backward == "backprop" else f + state)
    else:
        vjp = z + vjp
    forward = residual * (evals * s.L)
    reconstruct = residual * reconstructions
    if s.heun and reconstructions:
        # Heun's f(x̃_{n+1}; θ_{n+1}) comes from the VJP of the layer above (a combine, no product), except at
        # the first reconstruction when it is the top layer's
        fresh = 1 if anchor_every is None or (s.L - 1) % anchor_every or s.L == 1 else 0
        reconstruct = residual * (reconstructions + fresh) + state * (reconstructions - fresh)
    step = forward + vjp * s.L + reconstruct
    products = "cuBLAS on " + ("FP32 cores" if unit == "fp32" else f"tensor cores ({unit})")
    return Estimate("layered", products, forward, step)


def _efficiency(config, instruction: str) -> float:
    """TRITON_EFFICIENCY of a kernel's products by instruction — a "wgmma+mma" kernel (the weight-gradient
    products of a 64-row reverse tile run 16-row `mma`: their M is BLOCK_M) has 2 of its 5 products on
    `mma` — times the fraction of the warps that hold distinct work."""
    if instruction == "wgmma+mma":
        return (3 * TRITON_EFFICIENCY["wgmma"] + 2 * TRITON_EFFICIENCY["mma"] * _useful_warps(config, "mma")) / 5
    return TRITON_EFFICIENCY[instruction] * _useful_warps(config, instruction)


def _useful_warps(config, instruction: str) -> float:
    """The fraction of a fused kernel's warps that hold distinct work in its products. Per-warp `mma`
    tiles are 16 × 8: a (BLOCK_B, N) product has (BLOCK_B/16)·(N/8) of them, and warps beyond that
    repeat the same tile (the review of the sm_90 SASS: at q = 256, bfloat16, 16-row tiles, 6 of 8
    warps are redundant in z = x Wᵀ, N = BLOCK_M). Half of the products have N = BLOCK_M (z and
    dz-shaped), half N = BLOCK_Q. FMA and `wgmma` layouts spread the warps over the tile."""
    if instruction != "mma":
        return 1.0

    def fraction(n: int) -> float:
        return min(1.0, (config.block_b / 16) * max(1.0, n / 8) / config.num_warps)

    return 0.5 * (fraction(config.block_m) + fraction(config.block_q))


def fused_product_instruction(block_b: int, operand_bytes: int, precision: str, block_m: int = 64,
                              weight_products: bool = False) -> str:  # fmt: skip
    """What a fused kernel's tl.dot compiles to on sm_90, as the JIT specialises it (tests/triton_aot.py
    checks this against the compiler): FMA for float32 "ieee"; tensor cores otherwise — Hopper's
    warpgroup `wgmma` with 64-row tiles (a warpgroup's minimum), the per-warp `mma` below that. A reverse
    kernel that forms the weight gradients itself (`weight_products`: partial rows, atomics) has
    products with BLOCK_M rows too: `mma` beside `wgmma` when BLOCK_M < 64."""
    if operand_bytes == 4 and precision == "ieee":
        return "fma"
    if block_b < 64:
        return "mma"
    return "wgmma+mma" if weight_products and block_m < 64 else "wgmma"


def _fused(model: _Model, s: _Shape, unit: str, precision: str, backward: str, deterministic: bool) -> Estimate:
    """Whole-depth launches; products at the efficiency of their instruction on the programs' SMs."""
    from .triton_kernels import mlp_step  # triton is importable wherever this path can be planned
    from . import triton_backend

    B, q, m, L, ob = s.B, s.q, s.m, s.L, s.operand_bytes
    configs = mlp_step.kernel_configs(q, m, ob, interpreted=False)

    def layer_flops(config) -> float:
        """One product of f or its VJP over the batch, as a kernel computes it: whole tiles of rows,
        the state width padded to BLOCK_Q and the hidden width to whole BLOCK_M chunks."""
        rows = math.ceil(B / config.block_b) * config.block_b
        return 2.0 * rows * config.block_q * math.ceil(m / config.block_m) * config.block_m

    weights = 2 * m * q * ob  # W_n and V_n

    def launch(flops: float, dram: float, config, layers: int, weight_reads: int, programs: int,
               weight_products: bool = False) -> tuple:  # fmt: skip
        instruction = fused_product_instruction(config.block_b, ob, precision, config.block_m, weight_products)
        peak_unit = "fp32" if instruction == "fma" else ("half" if ob == 2 else "tf32")
        rate = model.gpu.peak_tflops(peak_unit) * _efficiency(config, instruction) / (3 if precision == "tf32x3" else 1)
        l2 = programs * layers * weights * weight_reads  # every program reads the layer's weights
        cost = model.kernel(flops, dram, rate, l2_bytes=l2, host="triton_launch", sms_used=programs)
        return cost, instruction

    evals = 2 if s.heun else 1  # evaluations of f per forward layer
    forward, instruction = launch(2 * evals * layer_flops(configs.forward) * L, 2 * B * q * 4 + L * weights,
                                  configs.forward, L, evals, math.ceil(B / configs.forward.block_b))  # fmt: skip
    # reverse: per layer a VJP per evaluation — the recompute of z, da, dx, and dV, dW unless the
    # workspace kernel forms those — Heun's recompute of k1 = f(x̃_n) for y (two products), and in adjoint
    # mode the reconstruction, which the kernel runs at every layer (at stored states too: the drift)
    grads = triton_backend.weight_grad_reduction(deterministic, B, q, m, configs.reverse.block_b)
    adjoint = backward == "adjoint"
    vjp_products = evals * (3 if grads == "workspace" else 5) + (2 if s.heun and adjoint else 0)
    reverse_flops = layer_flops(configs.reverse) * (vjp_products * L + (2 * evals * L if adjoint else 0))
    sections = mlp_step.GradSections(q, m)
    programs = mlp_step.reverse_programs(B, configs.reverse.block_b, model.gpu.sms)
    per_layer_buffer = {"partials": programs * sum(sections.sizes), "workspace": B * sections.workspace_row,
                        "atomic": 0}[grads] * 4 * evals  # fmt: skip
    size = triton_backend.backward_layers_per_launch(grads, L, evals, B, q, m, programs)
    launches = math.ceil(L / size)
    # every tile of a persistent program re-reads and re-writes the program's partial rows
    tiles = math.ceil(B / configs.reverse.block_b)
    buffer_traffic = L * per_layer_buffer * (2 * tiles / programs if grads == "partials" else 1)
    reverse, _ = launch(reverse_flops, 4 * B * q * 4 + L * weights + buffer_traffic, configs.reverse, L,
                        evals * (3 if adjoint else 2), programs, weight_products=grads != "workspace")  # fmt: skip
    reverse = reverse + Cost(launches=launches - 1, host_s=(launches - 1) * HOST_S["triton_launch"])
    finish = Cost()
    sections_present = 4 if s.bias else 2  # dW, dV (and db, dc)
    if grads == "partials":  # sum_partials, one launch per gradient section: the rows read once
        finish = model.elementwise(L * per_layer_buffer)
        extra = sections_present * launches - 1
        finish = finish + Cost(launches=extra, host_s=extra * HOST_S["triton_launch"])
    elif grads == "workspace":  # per set and launch the dW and dV products, then the sums of every section
        rate = model.gpu.peak_tflops(unit) * TRITON_EFFICIENCY[fused_product_instruction(64, ob, precision)]  # 64×64
        finish = model.kernel(2 * 2.0 * B * q * m * evals * L, L * per_layer_buffer, rate, host="triton_launch")
        extra = (2 + sections_present) * evals * launches - 1
        finish = finish + Cost(launches=extra, host_s=extra * HOST_S["triton_launch"])
    details = {"tiles": {"forward": configs.forward._asdict(), "reverse": configs.reverse._asdict()},
               "weight_grads": grads, "backward_launches": launches}  # fmt: skip
    return Estimate("fused", f"Triton {instruction}", forward, forward + reverse + finish, details)


def _eager(model: _Model, s: _Shape, unit: str) -> Estimate:
    """The plain PyTorch loop (bench.baselines.eager_forward: scales and Euler's step folded into the
    weights once) under autograd, backprop. Per Euler layer two products (the second accumulating into
    x) and σ; its backward four products, σ' and the accumulation of x's gradient. Per Heun layer twice
    the products and σ, three state-sized additions; its backward twice the products and σ', about six
    state-sized ops (counted in the profiler on the CPU)."""
    B, q, m, ob = s.B, s.q, s.m, s.operand_bytes
    z = model.gemm(B, m, q, ob, unit, out_bytes=ob, host="eager_autograd_op")
    f = model.gemm(B, q, m, ob, unit, out_bytes=ob, host="eager_autograd_op")
    sigma = model.elementwise(2 * B * m * ob, host="eager_autograd_op")
    sigma_grad = model.elementwise(3 * B * m * ob, host="eager_autograd_op")
    narrow_op = model.elementwise(3 * B * q * ob, host="eager_autograd_op")
    if s.heun:
        forward_layer = (z + f + sigma) * 2 + narrow_op * 3
        backward_layer = (z * 2 + f * 2 + sigma_grad) * 2 + narrow_op * 6
    else:
        forward_layer = z + f + sigma
        backward_layer = z * 2 + f * 2 + sigma_grad + narrow_op
    forward = forward_layer * s.L
    no_grad = Cost(forward.flops, forward.bytes, forward.launches, forward.launches * HOST_S["torch_op"], forward.gpu_s)
    return Estimate("eager", f"cuBLAS ({unit})", no_grad, forward + backward_layer * s.L)


def _reconstructions(L: int, backward: str, anchor_every: Optional[int]) -> int:
    """Layers whose input the backward reconstructs (the drift's x̃_0 included)."""
    if backward == "backprop":
        return 0
    if anchor_every is None:
        return L
    anchored = len(range(0, L, anchor_every))
    return L - anchored + 1


def path_override() -> Optional[str]:
    value = os.environ.get(PATH_ENV, "")
    if value and value not in PATHS:
        raise ValueError(f"{PATH_ENV} must be one of {list(PATHS)}; got {value!r}")
    return value or None


def plan(
    batch: int,
    dim: int,
    hidden: int,
    depth: int,
    *,
    method: str = "euler",
    dtype: torch.dtype = torch.float32,
    input_precision: Optional[str] = None,
    backward: str = "adjoint",
    anchor_every: Optional[int] = None,
    bias: bool = False,
    deterministic: bool = True,
    device: Union[str, torch.device, None] = "H100",
) -> Plan:
    """What the "triton" backend would run for a (batch, dim) input through a depth-`depth` stack of
    hidden width `hidden`, on `device` ("H100", "H200" or a CUDA device), with the cost model's
    predicted forward and training-step times of the layered path, the fused path and eager PyTorch.

    `input_precision=None` is PyTorch's float32 matmul setting of the moment (as in `ode_mlp`)."""
    from .spec import (BACKWARD_MODES, METHODS, check_anchor_every, check_bool, check_choice, check_fixed_layout,
                       check_positive_int, resolve_precision)

    B, q, m, L = (check_positive_int(name, value) for name, value in
                  (("batch", batch), ("dim", dim), ("hidden", hidden), ("depth", depth)))  # fmt: skip
    check_choice("method", method, METHODS)
    check_choice("backward", backward, BACKWARD_MODES)
    anchor_every = check_anchor_every(anchor_every, backward)
    check_fixed_layout(anchor_every, "plan")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dtype must be float32, float16 or bfloat16 for the Triton backend; got {dtype}")
    check_bool("bias", bias)
    check_bool("deterministic", deterministic)
    if _is_cpu(device):
        return Plan("cpp", None, "CPU tensors run on the C++ backend (or the reference); the cost model covers "
                    "CUDA devices", "cpu", {})  # fmt: skip
    gpu = device_model(device)
    precision = resolve_precision(input_precision, torch.device("cuda"))
    shape = _Shape(B, q, m, L, method == "heun", torch.empty((), dtype=dtype).element_size(), bias)
    model = _Model(gpu)
    unit = _product_unit(dtype, precision)
    estimates = {"layered": _layered(model, shape, unit, backward, anchor_every)}
    unsupported = fused_unsupported(B, q, m, L + (1 if method == "heun" else 0))
    if unsupported is None:
        estimates["fused"] = _fused(model, shape, unit, precision, backward, deterministic)
    estimates["eager"] = _eager(model, shape, _product_unit(dtype, precision))
    forced = path_override()
    if forced == "fused" and unsupported is not None:
        raise ValueError(f"{PATH_ENV}=fused, but {unsupported}; unset it: the layered path runs such stacks")
    if forced is not None:
        path, reason = forced, f"{PATH_ENV}={forced}"
    elif unsupported is not None:
        path, reason = "layered", unsupported
    elif precision == "tf32x3" and dtype == torch.float32 and q > MAX_FUSED_WIDTH_TF32X3:
        path = "layered"
        reason = (f"tf32x3 at q = {q} > {MAX_FUSED_WIDTH_TF32X3}: the fused reverse kernel spills KiBs of registers "
                  f"a thread as compiled for sm_90, which the model does not price")  # fmt: skip
    else:
        path = min(("layered", "fused"), key=lambda p: estimates[p].step_ms)
        other = "fused" if path == "layered" else "layered"
        ours, theirs = estimates[path], estimates[other]
        reason = (f"predicted {ours.step_ms:.3g} ms per training step against {theirs.step_ms:.3g} ms for the "
                  f"{other} path ({ours.products} against {theirs.products})")  # fmt: skip
    name = gpu.name + (" (approximate: H100 per-SM rates)" if gpu.approximate else "")
    return Plan("triton", path, reason, name, estimates)


def choose_path(B: int, q: int, m: int, spec, dtype: torch.dtype, device: torch.device) -> str:
    """The path `triton_backend` runs (see `plan`); under the interpreter, the override or "fused"
    (there is no device to model; the tests run both paths by the override), and "fused" for an empty
    batch, which `plan` rejects."""
    forced = path_override()
    if forced is not None:
        return forced
    if fused_unsupported(B, q, m, spec.num_params) is not None:
        return "layered"
    if device.type != "cuda" or B == 0:  # an empty batch runs no kernel: there is no time to model
        return "fused"
    from . import triton_backend  # loaded already: it is the caller

    # plan's fused estimate reads the backend's tuning knobs (tiles, layers per launch, gradient buffer, weight
    # gradient reduction): they are part of the cache key, so that a changed knob is planned afresh
    knobs = tuple(os.environ.get(name) for name in triton_backend.TUNING_ENVS)
    return _planned_path(B, q, m, spec.depth, spec.method, dtype, spec.input_precision, spec.backward,
                         spec.anchor_every, spec.deterministic, device, knobs)  # fmt: skip


@functools.lru_cache(maxsize=1024)
def _planned_path(B, q, m, L, method, dtype, precision, backward, anchor_every, deterministic, device, knobs) -> str:
    """plan(...).path, once per distinct call and `knobs` (the environment it reads): the model costs about
    0.2 ms of Python, which a forward and its backward would otherwise both pay (the override is read
    before, on every call)."""
    return plan(B, q, m, L, method=method, dtype=dtype, input_precision=precision, backward=backward,
                anchor_every=anchor_every, deterministic=deterministic, device=device).path  # fmt: skip



def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m odenets_fast",
                                     description="What the Triton backend runs for a stack, with predicted times.")
    for name in ("batch", "dim", "hidden", "depth"):
        parser.add_argument(name, type=int)
    parser.add_argument("--method", default="euler")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--input-precision", default=None, choices=["ieee", "tf32", "tf32x3"])
    parser.add_argument("--backward", default="adjoint")
    parser.add_argument("--anchor-every", type=int, default=None)
    parser.add_argument("--device", default="H100", help="H100, H200 or a CUDA device such as cuda:0")
    args = parser.parse_args(argv)
    print(plan(args.batch, args.dim, args.hidden, args.depth, method=args.method, dtype=getattr(torch, args.dtype),
               input_precision=args.input_precision, backward=args.backward, anchor_every=args.anchor_every,
               device=args.device))  # fmt: skip

