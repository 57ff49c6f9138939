"""Compile the Triton kernels for an H100 (sm_90) ahead of time, without a GPU.

The interpreter runs kernels as numpy code and misses what only the real compiler checks (globals
that are not constexpr, type errors in branches, shared-memory overflow). Triton ships ptxas, so
compiling to a cubin needs no device. Run as a script (TRITON_INTERPRET must be unset):

    python tests/triton_aot.py [--all]   → one line per specialisation, exit code 1 on any failure

Without --all, a representative subset (every kernel and branch at the widest benchmark shape, in
float32 and bfloat16) that compiles in a minute or two on 2 cores; --all covers every benchmark
shape and precision (about 30 specialisations).
"""

import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":  # noqa: E402 — checked before triton is imported
    sys.exit("tests/triton_aot.py compiles real kernels: run it without TRITON_INTERPRET=1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from odenets_fast.triton_kernels import mlp_step  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
H100_SHARED_MEMORY = 232448  # bytes per block (227 KiB)
FLOAT_ARGS = {"step", "scale_in", "scale_out"}
WEIGHT_PTRS = {"W_ptr", "V_ptr", "b_ptr", "c_ptr", "W1_ptr", "V1_ptr", "b1_ptr", "c1_ptr"}


def compile_kernel(kernel, weight_dtype: str, constexprs: dict, num_warps: int, num_stages: int):
    """Compile one specialisation; pointer arguments are float32 except the weights ('fp32', 'bf16'…)."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = f"*{weight_dtype}" if name in WEIGHT_PTRS else "*fp32"
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
    indexed = {(kernel.arg_names.index(name),): value for name, value in constexprs.items()}
    source = ASTSource(fn=kernel, signature=signature, constexprs=indexed)
    return triton.compile(source, target=H100, options={"num_warps": num_warps, "num_stages": num_stages})


def specialisations(everything: bool):
    """(label, kernel, weight dtype, constexprs, launch options) for the shapes of the GPU benchmarks."""
    shapes = [(256, 512), (64, 128)] if everything else [(256, 512)]
    precisions = [("fp32", "ieee"), ("bf16", "ieee")] + ([("fp32", "tf32")] if everything else [])
    for (q, m), (dtype, precision) in itertools.product(shapes, precisions):
        config = mlp_step.step_config(q, m, interpreted=False)
        tiles = dict(BLOCK_B=config.block_b, BLOCK_M=config.block_m, BLOCK_Q=config.block_q, PRECISION=precision)
        label = f"q={q} m={m} {dtype} {precision}"
        for heun in (False, True) if everything else (True,):
            yield (f"forward heun={heun} {label}", mlp_step.forward_layers_kernel, dtype,
                   dict(HEUN=heun, ACT=3, HAS_B=True, HAS_C=True, SAVE_ANCHORS=True, SAVE_STAGES=heun, **tiles),
                   (config.num_warps, config.num_stages))  # fmt: skip
            for adjoint, atomic in ((True, False), (True, True), (False, False)):
                yield (f"reverse heun={heun} adjoint={adjoint} atomic={atomic} {label}",
                       mlp_step.reverse_layers_kernel, dtype,
                       dict(HEUN=heun, ACT=4, HAS_B=True, HAS_C=True, RECONSTRUCT=adjoint, USE_ANCHORS=True,
                            USE_STAGES=heun and not adjoint, DRIFT=adjoint, ATOMIC=atomic, **tiles),
                       (config.num_warps, config.num_stages))  # fmt: skip
    yield "sum_partials", mlp_step.sum_partials_kernel, "fp32", dict(BLOCK=1024), (4, 3)


def main(argv: list) -> int:
    failures = 0
    for label, kernel, dtype, constexprs, (num_warps, num_stages) in specialisations("--all" in argv):
        try:
            shared = compile_kernel(kernel, dtype, constexprs, num_warps, num_stages).metadata.shared
            ok = shared <= H100_SHARED_MEMORY
            print(f"{'ok ' if ok else 'BIG'} {label}: {shared} bytes of shared memory")
        except Exception as err:  # report every failing specialisation, not just the first
            ok = False
            print(f"ERR {label}: {type(err).__name__}: {str(err).splitlines()[-1] if str(err) else ''}")
        failures += not ok
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
