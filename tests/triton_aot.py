"""Compile the Triton kernels for an H100 (sm_90) ahead of time, without a GPU, as the JIT compiles them.

The interpreter runs kernels as numpy code and misses what only the real compiler checks (globals
that are not constexpr, type errors in branches, shared-memory overflow, register spills, which
instructions the products become). Triton ships ptxas and cuobjdump, so compiling to a cubin and
reading its resource usage need no device. The launches are not written out here: the backend runs
— the fused path of `triton_backend` and the layered path of `triton_layered`, forward and backward,
on CPU tensors of the benchmark and test shapes — with every kernel's launch intercepted, and each
distinct specialisation it makes is compiled the way Triton's JIT compiles it for those arguments:
through the JIT's own argument binder (argument types, the divisibility by 16 of aligned pointers and
integers) with the launch's constexprs and options. Run as a script (TRITON_INTERPRET must be unset):

    python tests/triton_aot.py [--all] [--shard=K/N]   → one line per specialisation, exit code 1 on any failure
    python tests/triton_aot.py --tune                  → the same for every tile candidate of bench.triton_step's tune mode

(--shard=K/N: every N-th case from the K-th, 0 ≤ K < N, to spread --all over processes; Triton's
cache then shares what two shards both compile.)

Each line gives the shared memory, registers and stack (register spill) per thread, and the products'
instructions: "wgmma" (Hopper's warpgroup tensor-core products, 64 rows per warpgroup), "mma" (the
older per-warp tensor-core products) or "fma" (CUDA cores: float32 at input_precision="ieee"). A
failure is a compile error, shared memory beyond the H100's 227 KiB, a stack beyond MAX_STACK_BYTES,
a fused step kernel whose products are not what odenets_fast.planner's cost model assumes
(`fused_product_instruction`), the narrow goal shape's TF32 or 16-bit products not on wgmma (or
spilling: none allowed for 16-bit operands, a little for TF32's and for Heun's anchored adjoint), or atomics that are not relaxed. Without --all, a representative subset (the goal configurations as
`make gpu-quick` launches them; the narrow goal shape in bfloat16 and TF32 and the wide shape in float32
and bfloat16 in the heaviest variants, both paths) that compiles in a few minutes
on 2 cores; --all also covers the crossover's and the GPU tests' shapes and every precision.
"""

import contextlib
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":  # noqa: E402 — checked before triton is imported
    sys.exit("tests/triton_aot.py compiles real kernels: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository: bench/
from bench import triton_step  # noqa: E402
from odenets_fast import planner, triton_backend, triton_layered  # noqa: E402
from odenets_fast.spec import check_stack  # noqa: E402
from odenets_fast.triton_kernels import layered, mlp_step  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
H100_SHARED_MEMORY = 232448  # bytes per block (227 KiB)
H100_SMS = 132
MAX_STACK_BYTES = 4096  # per thread; the table's tiles stay below 3 KiB, the old 32 × 32 reached 11 KiB
# TF32x3 (opt-in) triples the products' operands: at q = 256 the reverse kernel spills up to 7 KiB
# under triton 3.6 (2.3 KiB under 3.9) with each of the tiles tried; docs/triton.md says so.
MAX_STACK_BYTES_TF32X3_WIDE = 8192
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
NARROW_Q = 64  # the fused path's goal shape: tensor-core products there must be wgmma
MAX_STACK_BYTES_TF32_NARROW = 128
# Heun's anchored adjoint reverse (it reconstructs and loads anchors, the heaviest variant) spills at
# every 64-row tile at q = 64 under triton 3.9: 136–176 bytes a thread with 16-bit operands, 320–352
# with TF32's at the table's (64, 16, 8) (triton 3.6: 56–80 and 216–248); 112–480 with one stage or other 64-row tiles, 464–1072 with
# 4 or 16 warps. 32-row tiles spill 0–40 bytes but lose wgmma; the tune stage times both.
MAX_STACK_BYTES_NARROW_ANCHORED_HEUN = 384

# (name, B, q, m, L, dtype, input_precision, method, backward, anchor_every, path, weight-gradient reduction
#  [, activation, biases]: without them "gelu_tanh" with biases, the kernels' heaviest variant)
# The goal configurations as `make gpu-quick` launches them (bench.triton_step's goals mode: ode_mlp's
# defaults — gelu, no biases, Euler, adjoint, the deterministic reduction the backend picks — both paths).
GOALS = [
    (config["name"], config["B"], config["q"], config["m"], config["L"], getattr(torch, config["dtype"]),
     config.get("precision", "ieee"), "euler", "adjoint", None, path, None, "gelu", False)
    for config in triton_step.GOAL_CONFIGS for path in planner.PATHS
]  # fmt: skip
SUBSET = GOALS + [
    ("narrow", 16384, 64, 128, 256, torch.bfloat16, "ieee", "heun", "adjoint", None, "fused", "partials"),
    ("narrow", 16384, 64, 128, 256, torch.float32, "tf32", "heun", "adjoint", None, "fused", "partials"),
    ("narrow", 16384, 64, 128, 256, torch.bfloat16, "ieee", "euler", "adjoint", None, "fused", "atomic"),
    ("wide", 4096, 256, 512, 64, torch.float32, "ieee", "heun", "adjoint", None, "fused", "workspace"),
    ("wide", 4096, 256, 512, 64, torch.bfloat16, "ieee", "heun", "adjoint", None, "fused", "workspace"),
    ("wide", 4096, 256, 512, 64, torch.bfloat16, "ieee", "heun", "adjoint", None, "layered", None),
]
EVERYTHING = SUBSET + [
    (name, B, q, m, L, dtype, precision, method, backward, anchor, path, grads)
    for name, B, q, m, L in (("narrow", 16384, 64, 128, 16), ("wide", 4096, 256, 512, 16),
                             ("crossover", 4096, 128, 256, 4), ("gpu tests", 1000, 100, 300, 8),
                             ("odd", 37, 24, 40, 3))
    for dtype, precision in ((torch.float32, "ieee"), (torch.bfloat16, "ieee"), (torch.float32, "tf32"),
                             (torch.float32, "tf32x3"), (torch.float16, "ieee"))
    for method in ("euler", "heun")
    for backward, anchor, path, grads in (("backprop", None, "fused", "partials"), ("adjoint", 2, "fused", "partials"),
                                          ("adjoint", None, "fused", "workspace"), ("adjoint", None, "fused", "atomic"),
                                          ("adjoint", 2, "layered", None))
]  # fmt: skip


@contextlib.contextmanager
def _launches_recorded():
    """Every launch of the package's kernels, recorded instead of run: [(kernel, args, kwargs)]."""
    kernels = list({id(k): k for module in (mlp_step, layered) for k in vars(module).values()
                    if isinstance(k, JITFunction)}.values())  # fmt: skip  (the jit helpers they share once)
    launches = []

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            launches.append((kernel, args, kwargs))

        return run

    for kernel in kernels:
        kernel.run = recorder(kernel)
    try:
        yield launches
    finally:
        for kernel in kernels:
            del kernel.run  # the class's own run again


def launches_of(case) -> list:
    """The launches one forward and backward of `case` makes, on CPU tensors: the backend planning as
    on an H100 (132 SMs), the tensor contents irrelevant (nothing runs)."""
    name, B, q, m, L, dtype, precision, method, backward, anchor_every, path, grads, *call = case
    activation, bias = call or ("gelu_tanh", True)
    P = L + 1 if method == "heun" else L
    x = torch.zeros(B, q, dtype=dtype)
    W, V, b, c = (torch.zeros(shape, dtype=dtype) for shape in ((P, m, q), (P, q, m), (P, m), (P, q)))
    b, c = (b, c) if bias else (None, None)
    spec = check_stack(x, W, V, b, c, method=method, activation=activation, T=1.0, backward=backward,
                       anchor_every=anchor_every, scale_in=None, scale_out=None, input_precision=precision,
                       deterministic=grads != "atomic")  # fmt: skip
    env = {planner.PATH_ENV: path, triton_backend.WEIGHT_GRADS_ENV: grads if grads in ("partials", "workspace") else ""}
    saved_env = {key: os.environ.get(key) for key in env}
    saved = triton_backend.check_device_and_dtype, triton_backend._processors
    triton_backend.check_device_and_dtype = lambda *args: None  # CPU tensors stand in for CUDA ones
    triton_backend._processors = lambda device: H100_SMS
    os.environ.update(env)
    try:
        with _launches_recorded() as launches:
            out, stored = triton_backend.forward(x, W, V, b, c, spec)
            triton_backend.backward(torch.zeros_like(out), stored, W, V, b, c, spec)
    finally:
        triton_backend.check_device_and_dtype, triton_backend._processors = saved
        for key, value in saved_env.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    return launches


def compile_launch(kernel, args, kwargs):
    """The kernel compiled for these arguments as the JIT compiles it: its binder's specialisation."""
    backend = make_backend(H100)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=H100, options=options.__dict__)


def specialisation_key(kernel, args, kwargs) -> tuple:
    """What makes two launches one compiled kernel: the binder's specialisation and the options."""
    backend = make_backend(H100)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    _, specialization, _ = binder(*args, **kwargs)
    return kernel.__name__, repr(specialization), tuple(sorted((k, repr(v)) for k, v in kwargs.items()))


def _cuobjdump(compiled, flag: str) -> str:
    """cuobjdump's report (`-res-usage`, `-sass`) on the kernel's cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        return subprocess.run([CUOBJDUMP, flag, cubin.name], capture_output=True, text=True, check=True).stdout


def resource_usage(compiled) -> tuple:
    """(registers, stack bytes) per thread of a compiled kernel, from cuobjdump's report on its cubin."""
    report = _cuobjdump(compiled, "-res-usage")
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


def _operand_bytes(args, kernel) -> int:
    weights = args[kernel.arg_names.index("W_ptr")]
    return weights.element_size()


def expectations(kernel, args, kwargs, q: int) -> dict:
    """What a specialisation must satisfy beyond compiling: the planner's instruction for the fused step
    kernels; at the narrow goal shape, their tensor-core products on wgmma, spill-free with 16-bit
    operands (TF32's four-byte operands take twice the registers: the smallest spill of the candidate
    tiles, 24–112 bytes a thread, is allowed; Heun's anchored adjoint reverse spills at every 64-row tile,
    MAX_STACK_BYTES_NARROW_ANCHORED_HEUN); relaxed atomics for the atomic reduction."""
    if kernel.__name__ not in ("forward_layers_kernel", "reverse_layers_kernel"):
        return {}
    precision, block_b, block_m = kwargs["PRECISION"], kwargs["BLOCK_B"], kwargs["BLOCK_M"]
    operand_bytes = _operand_bytes(args, kernel)
    weight_products = kwargs.get("GRADS") in ("partials", "atomic")
    want = {"instruction": planner.fused_product_instruction(block_b, operand_bytes, precision, block_m,
                                                              weight_products)}  # fmt: skip
    if q == NARROW_Q and (operand_bytes == 2 or precision == "tf32"):
        anchored_heun = kwargs.get("HEUN") and kwargs.get("RECONSTRUCT") and kwargs.get("USE_ANCHORS")
        want["stack"] = (MAX_STACK_BYTES_NARROW_ANCHORED_HEUN if anchored_heun
                         else 0 if operand_bytes == 2 else MAX_STACK_BYTES_TF32_NARROW)  # fmt: skip
        if not want["instruction"].startswith("wgmma"):
            raise AssertionError(f"the tiles of the narrow shape must put the products on wgmma: {kwargs}")
    want["relaxed_atomics"] = kwargs.get("GRADS") == "atomic"
    return want


def atomics_relaxed(compiled) -> bool:
    """Whether the kernel has atomic reductions and none is fenced: the default acq_rel semantics bracket
    each with MEMBAR.ALL.GPU and a cache invalidation (CCTL.IVALL). Read in the machine code, not the PTX:
    triton 3.9 writes relaxed reductions as `red.global.gpu.relaxed`, 3.6 as `atom.global.gpu.relaxed`
    with the result unused, and ptxas makes both the same REDG."""
    sass = _cuobjdump(compiled, "-sass")
    return bool(re.search(r"\b(REDG|ATOMG|RED|ATOM)\.", sass)) and not re.search(r"\bMEMBAR\.\w+\.GPU\b|\bCCTL\.IVALL\b", sass)


@triton.jit
def _fenced_atomic_kernel(out_ptr):
    # acq_rel (the default): what atomics_relaxed must reject
    tl.atomic_add(out_ptr + tl.arange(0, 32), tl.full((32,), 1.0, tl.float32))


def check_the_atomics_check():
    """atomics_relaxed rejects the default semantics in this Triton release (its instruction names are
    release-dependent, and a check that cannot fail would pass every kernel)."""
    out = torch.zeros(32)
    compiled = compile_launch(_fenced_atomic_kernel, (out,), {})
    if atomics_relaxed(compiled):
        raise AssertionError("atomics_relaxed accepts an acq_rel atomic: its SASS patterns are out of date")


def describe(kernel, kwargs) -> str:
    shown = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
    tiles = ",".join(f"{k}={v}" for k, v in shown.items() if k.startswith("BLOCK"))
    flags = ",".join(f"{k}={v}" for k, v in shown.items() if not k.startswith("BLOCK"))
    return f"{kernel.__name__} [{tiles}; warps={kwargs.get('num_warps')}, stages={kwargs.get('num_stages')}] {flags}"


def check_launch(kernel, args, kwargs, title: str, label: str, want: dict, max_stack: int) -> bool:
    """Compile one launch and print its line: shared memory, registers, stack, products, and what breaks
    the bounds or `want` (expectations); True where something does (a compile error included)."""
    try:
        compiled = compile_launch(kernel, args, kwargs)
        shared, (registers, stack) = compiled.metadata.shared, resource_usage(compiled)
        instructions = product_instructions(compiled)
        problems = [f"shared memory {shared} > {H100_SHARED_MEMORY}"] if shared > H100_SHARED_MEMORY else []
        problems += [f"stack {stack} > {want.get('stack', max_stack)}"] if stack > want.get("stack", max_stack) else []
        if want.get("instruction", instructions) != instructions:
            problems.append(f"products {instructions}, expected {want['instruction']}")
        if want.get("relaxed_atomics") and not atomics_relaxed(compiled):
            problems.append("atomics not relaxed")
        print(f"{'ok ' if not problems else 'BAD'} {title} ({label}): {shared} bytes of shared memory, {registers} "
              f"registers, {stack} bytes of stack per thread, products {instructions}"
              + (f" — {'; '.join(problems)}" if problems else ""), flush=True)  # fmt: skip
        return bool(problems)
    except Exception as err:  # report every failing specialisation, not just the first
        print(f"ERR {title} ({label}): {type(err).__name__}: {str(err).splitlines()[-1] if str(err) else ''}", flush=True)
        return True


def tune_cases() -> list:
    """(case, tile variable, its value, kernel name) for every tile candidate that `python -m
    bench.triton_step --mode tune` times, at its configurations: each candidate's kernel in an Euler
    and a Heun adjoint step (the tune mode times Euler; the table serves both) with biases (the heavier
    variant), the forward and reverse tiles with the table's pipeline stages, as the tune mode sets them."""
    cases = []
    for config in triton_step.TUNE_CONFIGS:
        dtype = getattr(torch, config["dtype"])
        candidates = triton_step.tune_candidates(config, dry_run=False)
        table = triton_backend.kernel_configs(config["q"], config["m"], torch.empty(0, dtype=dtype).element_size())
        for method in ("euler", "heun"):
            for kind, env, kernel, grads in (("forward", triton_backend.TILES_ENV.forward, "forward_layers_kernel", None),
                                             ("reverse", triton_backend.TILES_ENV.reverse, "reverse_layers_kernel", None),
                                             ("product", triton_backend.PRODUCT_TILES_ENV, "workspace_grads_kernel",
                                              "workspace")):  # fmt: skip
                case = (config["name"], config["B"], config["q"], config["m"], config["L"], dtype,
                        config.get("precision", "ieee"), method, "adjoint", None, "fused", grads)  # fmt: skip
                stages = () if kind == "product" else (getattr(table, kind).num_stages,)
                cases += [(case, env, ",".join(map(str, (*tiles, *stages))), kernel) for tiles in candidates[kind]]
    return cases


def main_tune() -> int:
    """Compile every tune candidate (tune_cases); a failure is a compile error, shared memory beyond the
    H100's or a stack beyond MAX_STACK_BYTES — candidates that spill less are reported, for the table."""
    failures = 0
    for case, env, value, name in tune_cases():
        label = "{} {} {} {}".format(case[0], str(case[5]).removeprefix("torch."), case[6], case[7])
        previous = os.environ.get(env)
        os.environ[env] = value
        try:
            kernel, args, kwargs = next(launch for launch in launches_of(case) if launch[0].__name__ == name)
            title = f"{name} {env.removeprefix('ODENETS_FAST_TRITON_')}={value}"
            failures += check_launch(kernel, args, kwargs, title, label, want={}, max_stack=MAX_STACK_BYTES)
        except Exception as err:  # the planning itself failed
            failures += 1
            print(f"ERR {name} {env}={value} ({label}): {type(err).__name__}: {err}", flush=True)
        finally:
            os.environ.pop(env, None) if previous is None else os.environ.__setitem__(env, previous)
    return 1 if failures else 0


def main(argv: list) -> int:
    if "--tune" in argv:
        return main_tune()
    cases = EVERYTHING if "--all" in argv else SUBSET
    for arg in argv:
        if arg.startswith("--shard="):
            index, count = map(int, arg.removeprefix("--shard=").split("/"))
            if not 0 <= index < count:
                sys.exit(f"--shard=K/N needs 0 <= K < N; got {arg}")
            cases = cases[index::count]
    check_the_atomics_check()
    failures, seen = 0, set()
    for case in cases:
        label = "{} B={} q={} m={} L={} {} {} {} {} anchor={} {} {}".format(*case[:5], str(case[5]).removeprefix("torch."),
                                                                            *case[6:12]) + "".join(f" {v}" for v in case[12:])  # fmt: skip
        try:
            launches = launches_of(case)
        except Exception as err:  # the planning itself failed
            failures += 1
            print(f"ERR {label}: {type(err).__name__}: {err}", flush=True)
            continue
        for kernel, args, kwargs in launches:
            key = specialisation_key(kernel, args, kwargs)
            if key in seen:
                continue
            seen.add(key)
            wide_tf32x3 = kwargs.get("PRECISION") == "tf32x3" and kwargs.get("BLOCK_Q", 0) > 128
            max_stack = MAX_STACK_BYTES_TF32X3_WIDE if wide_tf32x3 else MAX_STACK_BYTES
            want = expectations(kernel, args, kwargs, case[2])
            failures += check_launch(kernel, args, kwargs, describe(kernel, kwargs), label, want, max_stack)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
