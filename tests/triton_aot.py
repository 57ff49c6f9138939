"""Compile the Triton kernels for an H100 (sm_90) ahead of time, without a GPU.

The interpreter runs kernels as numpy code and misses what only the real compiler checks (globals
that are not constexpr, type errors in branches, shared-memory overflow, register spills). Triton
ships ptxas and cuobjdump, so compiling to a cubin and reading its resource usage need no device.
Run as a script (TRITON_INTERPRET must be unset):

    python tests/triton_aot.py [--all]   → one line per specialisation, exit code 1 on any failure

Each line gives the shared memory, registers and stack (register spill) per thread of the
specialisation (the fused step kernels, the workspace products and the layered path's elementwise
kernels), and its products' instructions: "wgmma" (Hopper's warpgroup tensor-core products,
which need 64 rows per warpgroup), "mma" (the older per-warp tensor-core products) or "fma" (CUDA
cores: float32 at input_precision="ieee"), which must be what odenets_fast.planner's cost model of the
fused step kernels assumes; a failure is a compile error, shared memory beyond the H100's 227 KiB, a mismatch with the planner, or a stack
beyond MAX_STACK_BYTES (the tile table of mlp_step.kernel_configs keeps spills small; a larger
stack means a kernel change made it spill, which costs far more than the interpreter shows).
Without --all, a representative subset (every kernel and branch at the widest benchmark shape, in
float32 and bfloat16) that compiles in a minute or two on 2 cores; --all covers every benchmark
shape and precision, the crossover's and the GPU tests' shapes (about 180 specialisations).
"""

import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":  # noqa: E402 — checked before triton is imported
    sys.exit("tests/triton_aot.py compiles real kernels: run it without TRITON_INTERPRET=1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from odenets_fast.planner import fused_product_instruction  # noqa: E402
from odenets_fast.triton_kernels import layered, mlp_step  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
H100_SHARED_MEMORY = 232448  # bytes per block (227 KiB)
MAX_STACK_BYTES = 4096  # per thread; the table's tiles stay below 3 KiB (triton 3.6 and 3.9), the old 32 × 32 reached 11 KiB
# TF32x3 (opt-in) triples the products' operands: at q = 256 the reverse kernel spills up to 7 KiB
# under triton 3.6 (2.3 KiB under 3.9) with each of the tiles tried; the README says so.
MAX_STACK_BYTES_TF32X3_WIDE = 8192
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
FLOAT_ARGS = {"step", "scale_in", "scale_out", "scale", "grad_scale", "alpha", "k_scale"}
# pointers in the parameter dtype: the weights, and the layered path's operands and biases
WEIGHT_PTRS = {"W_ptr", "V_ptr", "b_ptr", "c_ptr", "W1_ptr", "V1_ptr", "b1_ptr", "c1_ptr", "operand_like_ptr",
               "bias_ptr", "out_ptr", "act_out_ptr", "dz_out_ptr", "out_op_ptr", "u1_ptr"}  # fmt: skip
FLOAT32_OUT_PTRS = {"combine_kernel": {"out_ptr"}}  # kernels whose `out_ptr` is a float32 state


def compile_kernel(kernel, weight_dtype: str, constexprs: dict, num_warps: int, num_stages: int):
    """Compile one specialisation; pointer arguments are float32 except the weights ('fp32', 'bf16'…)."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            float32_out = name in FLOAT32_OUT_PTRS.get(kernel.__name__, ())
            signature[name] = f"*{weight_dtype}" if name in WEIGHT_PTRS and not float32_out else "*fp32"
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
    indexed = {(kernel.arg_names.index(name),): value for name, value in constexprs.items()}
    source = ASTSource(fn=kernel, signature=signature, constexprs=indexed)
    return triton.compile(source, target=H100, options={"num_warps": num_warps, "num_stages": num_stages})


def resource_usage(compiled) -> tuple:
    """(registers, stack bytes) per thread of a compiled kernel, from cuobjdump's report on its cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        report = subprocess.run([CUOBJDUMP, "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", report)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's report: {report[-300:]}")
    return int(found.group(1)), int(found.group(2))


def product_instructions(compiled) -> str:
    """The tensor-core instructions in the kernel's PTX ("wgmma", "mma", both), or "fma" without any."""
    ptx = compiled.asm["ptx"]
    found = [name for name, pattern in (("wgmma", r"\bwgmma\.mma_async\."), ("mma", r"\bmma\.sync\."))
             if re.search(pattern, ptx)]  # fmt: skip
    return "+".join(found) or "fma"


# (q, m) → (weight dtype, input precision) pairs compiled by --all: the benchmark widths, the
# crossover's q = 128 (also the GPU tests' q = 100) and the GPU tests' small and odd shapes.
_BENCHMARK_PRECISIONS = [("fp32", "ieee"), ("bf16", "ieee"), ("fp32", "tf32"), ("fp32", "tf32x3")]
ALL_SHAPES = {
    (256, 512): _BENCHMARK_PRECISIONS,
    (64, 128): _BENCHMARK_PRECISIONS,
    (128, 256): _BENCHMARK_PRECISIONS + [("fp16", "ieee")],
    (24, 40): [("fp32", "ieee"), ("fp16", "ieee")],
    (1, 1): [("fp32", "ieee")],
}


def specialisations(everything: bool):
    """(label, kernel, weight dtype, constexprs, launch options) for the shapes of the GPU benchmarks
    and tests (--all), or the representative subset."""
    shapes = ALL_SHAPES if everything else {(256, 512): [("fp32", "ieee"), ("bf16", "ieee")]}
    for (q, m), (dtype, precision) in ((shape, p) for shape, precisions in shapes.items() for p in precisions):
        configs = mlp_step.kernel_configs(q, m, 4 if dtype == "fp32" else 2, interpreted=False)
        label = f"q={q} m={m} {dtype} {precision}"
        for heun in (False, True) if everything else (True,):
            yield (f"forward heun={heun} {label}", mlp_step.forward_layers_kernel, dtype,
                   dict(HEUN=heun, ACT=3, HAS_B=True, HAS_C=True, SAVE_ANCHORS=True, SAVE_STAGES=heun,
                        **_tiles(configs.forward, precision)),
                   (configs.forward.num_warps, configs.forward.num_stages))  # fmt: skip
            for adjoint, grads in ((True, "partials"), (True, "workspace"), (True, "atomic"), (False, "partials")):
                yield (f"reverse heun={heun} adjoint={adjoint} grads={grads} {label}",
                       mlp_step.reverse_layers_kernel, dtype,
                       dict(HEUN=heun, ACT=4, HAS_B=True, HAS_C=True, RECONSTRUCT=adjoint, USE_ANCHORS=True,
                            USE_STAGES=heun and not adjoint, DRIFT=adjoint, GRADS=grads,
                            **_tiles(configs.reverse, precision)),
                       (configs.reverse.num_warps, configs.reverse.num_stages))  # fmt: skip
        product = mlp_step.product_config(4 if dtype == "fp32" else 2, interpreted=False)
        yield (f"workspace_grads {label}", mlp_step.workspace_grads_kernel, dtype,
               dict(HAS_BIAS=True, BLOCK_R=product.block_r, BLOCK_C=product.block_c, BLOCK_K=product.block_k,
                    PRECISION=precision), (product.num_warps, product.num_stages))  # fmt: skip
    yield "sum_partials", mlp_step.sum_partials_kernel, "fp32", dict(BLOCK=1024), (4, 3)
    yield from _layered_specialisations(("fp32", "bf16") if everything else ("bf16",))


def _layered_specialisations(dtypes):
    """The layered path's elementwise kernels, every branch on, at its tiles (triton_layered)."""
    from odenets_fast.triton_layered import BLOCK_C, BLOCK_R, NUM_WARPS

    tiles = dict(BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C)
    for dtype in dtypes:
        for label, kernel, flags in (
            ("activation", layered.activation_kernel, dict(HAS_BIAS=True, ACT=3, WRITE_SLOPE=True)),
            ("hidden_grad recompute", layered.hidden_grad_kernel, dict(RECOMPUTE=True, HAS_BIAS=True, ACT=4)),
            ("hidden_grad slope", layered.hidden_grad_kernel, dict(RECOMPUTE=False, HAS_BIAS=True, ACT=1)),
            ("combine", layered.combine_kernel, dict(HAS_K=True, HAS_BIAS=True, HAS_EXTRA=True, WRITE_OPERAND=True,
                                                     WRITE_INCREMENT=True, SUMS=True)),
            ("heun_cotangent", layered.heun_cotangent_kernel, dict(SUMS=True)),
        ):  # fmt: skip
            yield f"layered {label} {dtype}", kernel, dtype, dict(**flags, **tiles), (NUM_WARPS, 1)


def _tiles(config, precision: str) -> dict:
    return dict(BLOCK_B=config.block_b, BLOCK_M=config.block_m, BLOCK_Q=config.block_q, PRECISION=precision)


def _modelled_instruction(constexprs: dict, dtype: str):
    """What odenets_fast.planner assumes the products of a fused step kernel compile to (None for the
    kernels it does not model that way): its cost model of the fused path rests on this."""
    if "BLOCK_B" not in constexprs:
        return None
    return fused_product_instruction(constexprs["BLOCK_B"], 4 if dtype == "fp32" else 2, constexprs["PRECISION"])


def main(argv: list) -> int:
    failures = 0
    for label, kernel, dtype, constexprs, (num_warps, num_stages) in specialisations("--all" in argv):
        wide_tf32x3 = constexprs.get("PRECISION") == "tf32x3" and constexprs.get("BLOCK_Q", 0) > 128
        max_stack = MAX_STACK_BYTES_TF32X3_WIDE if wide_tf32x3 else MAX_STACK_BYTES
        try:
            compiled = compile_kernel(kernel, dtype, constexprs, num_warps, num_stages)
            shared, (registers, stack) = compiled.metadata.shared, resource_usage(compiled)
            instructions = product_instructions(compiled)
            modelled = _modelled_instruction(constexprs, dtype)
            ok = shared <= H100_SHARED_MEMORY and stack <= max_stack and modelled in (None, instructions)
            mismatch = "" if modelled in (None, instructions) else f" (the planner models {modelled})"
            print(f"{'ok ' if ok else 'BIG'} {label}: {shared} bytes of shared memory, {registers} registers, "
                  f"{stack} bytes of stack per thread, products {instructions}{mismatch}", flush=True)  # fmt: skip
        except Exception as err:  # report every failing specialisation, not just the first
            ok = False
            print(f"ERR {label}: {type(err).__name__}: {str(err).splitlines()[-1] if str(err) else ''}", flush=True)
        failures += not ok
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
