"""Per-layer Triton kernels against eager PyTorch on the GPU (the speed goals of the Triton issue).

For each configuration, on the same data in one process:
    eager_forward          the plain loop, no autograd (the fastest eager forward)
    eager_backprop_step    the plain loop forward + backward (every activation stored)
    fused_forward          ode_mlp forward (adjoint mode: nothing stored)
    fused_adjoint_step     ode_mlp forward + adjoint backward
    fused_backprop_step    ode_mlp forward + backprop-mode backward
    per_layer_*            the forward and adjoint step again with one launch per layer
    (float32 only) the two fused steps again with TF32 products
The fused contenders use the default whole-depth launches (ratios also recorded as whole_depth_*);
per_layer_* give the crossover. On CUDA, forward_fraction_of_roofline = roofline floor / fused
forward time (see forward_roofline_ms).
Ratios: forward_vs_eager_forward = fused_forward / eager_forward and
adjoint_step_vs_eager_backprop = fused_adjoint_step / eager_backprop_step (goals: ≤ 0.5 and ≤ 1.0
on an H100 at B = 4096, q = 256, m = 512, L = 64, float32).

The crossover sweep (CROSSOVER_CONFIGS: q ∈ {64, 128, 256}, m = 2q, L ∈ {4, 16, 64}) times only the
whole-depth and per-layer contenders, for the backend's choice between them.

    python -m bench.triton_step [--dry-run] [--crossover]   (--dry-run: tiny sizes on the CPU interpreter)
"""

import argparse
import contextlib
import json
import os

import torch

from bench.baselines import eager_forward
from bench.timing import median_ms
from odenets_fast import ode_mlp
from odenets_fast.triton_backend import LAYERS_PER_LAUNCH_ENV
from odenets_fast.triton_kernels.mlp_step import step_config

CONFIGS = [
    dict(name="wide-float32", B=4096, q=256, m=512, L=64, dtype="float32"),
    dict(name="wide-bfloat16", B=4096, q=256, m=512, L=64, dtype="bfloat16"),
    dict(name="narrow-float32", B=16384, q=64, m=128, L=64, dtype="float32"),
    dict(name="narrow-float32-L256", B=16384, q=64, m=128, L=256, dtype="float32"),  # the whole-depth goals
]
DRY_RUN_CONFIGS = [dict(name="dry-run-float32", B=40, q=24, m=40, L=3, dtype="float32")]
CROSSOVER_CONFIGS = [dict(name=f"crossover-q{q}-L{L}", B=4096, q=q, m=2 * q, L=L, dtype="float32")
                     for q in (64, 128, 256) for L in (4, 16, 64)]  # fmt: skip
DRY_RUN_CROSSOVER_CONFIGS = [dict(name="dry-run-crossover", B=40, q=24, m=40, L=2, dtype="float32")]
CROSSOVER_CONTENDERS = ("fused_forward", "per_layer_forward", "fused_adjoint_step", "per_layer_adjoint_step")

# ratio name: (numerator, denominator) median times; recorded when both were timed
RATIOS = {
    "forward_vs_eager_forward": ("fused_forward", "eager_forward"),
    "adjoint_step_vs_eager_backprop": ("fused_adjoint_step", "eager_backprop_step"),
    "backprop_step_vs_eager_backprop": ("fused_backprop_step", "eager_backprop_step"),
    "whole_depth_forward_vs_eager_forward": ("fused_forward", "eager_forward"),
    "whole_depth_adjoint_step_vs_eager_backprop": ("fused_adjoint_step", "eager_backprop_step"),
    "per_layer_forward_vs_eager_forward": ("per_layer_forward", "eager_forward"),
    "per_layer_adjoint_step_vs_eager_backprop": ("per_layer_adjoint_step", "eager_backprop_step"),
    "adjoint_step_tf32_vs_eager_backprop": ("fused_adjoint_step_tf32", "eager_backprop_step"),
    "whole_depth_forward_vs_per_layer": ("fused_forward", "per_layer_forward"),
    "whole_depth_adjoint_step_vs_per_layer": ("fused_adjoint_step", "per_layer_adjoint_step"),
}


def run_config(config: dict, device: torch.device, only=None) -> dict:
    """Median times of the contenders (`only`: a subset of their names) and the ratios among them."""
    B, q, m, L = config["B"], config["q"], config["m"], config["L"]
    dtype = getattr(torch, config["dtype"])
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, q, generator=gen).to(device, dtype)
    W = torch.randn(L, m, q, generator=gen).to(device, dtype).requires_grad_(True)
    V = (0.5 * torch.randn(L, q, m, generator=gen)).to(device, dtype).requires_grad_(True)
    grad_out = torch.randn(B, q, generator=gen).to(device, dtype)

    def step(forward):
        def run():
            torch.autograd.grad(forward(), (W, V), grad_out)

        return run

    def fused(backward, precision="ieee", layers_per_launch=None):
        def run():
            with _layers_per_launch(layers_per_launch):
                return ode_mlp(x, W, V, backward=backward, backend="triton", input_precision=precision)

        return run

    contenders = {
        "eager_forward": lambda: _no_grad(lambda: eager_forward(x, W, V)),
        "eager_backprop_step": step(lambda: eager_forward(x, W, V)),
        "fused_forward": lambda: _no_grad(fused("adjoint")),
        "fused_adjoint_step": step(fused("adjoint")),
        "fused_backprop_step": step(fused("backprop")),
        "per_layer_forward": lambda: _no_grad(fused("adjoint", layers_per_launch=1)),
        "per_layer_adjoint_step": step(fused("adjoint", layers_per_launch=1)),
    }
    if dtype == torch.float32:
        contenders["fused_adjoint_step_tf32"] = step(fused("adjoint", "tf32"))
        contenders["fused_backprop_step_tf32"] = step(fused("backprop", "tf32"))
    if only is not None:
        contenders = {name: contenders[name] for name in only if name in contenders}
    times = {name: median_ms(fn, device) for name, fn in contenders.items()}
    ratios = {name: times[num] / times[den] for name, (num, den) in RATIOS.items() if num in times and den in times}
    if device.type == "cuda" and "fused_forward" in times:
        floor = forward_roofline_ms(config, device)
        ratios["forward_fraction_of_roofline"] = floor / times["fused_forward"]
        times["forward_roofline_floor"] = floor
    return {"name": config["name"], "config": config, "median_ms": times, "ratios": ratios}


@contextlib.contextmanager
def _layers_per_launch(value):
    """Run with ODENETS_FAST_TRITON_LAYERS_PER_LAUNCH set (None: the default whole-depth launches)."""
    saved = os.environ.pop(LAYERS_PER_LAUNCH_ENV, None)
    if value is not None:
        os.environ[LAYERS_PER_LAUNCH_ENV] = str(value)
    try:
        yield
    finally:
        os.environ.pop(LAYERS_PER_LAUNCH_ENV, None)
        if saved is not None:
            os.environ[LAYERS_PER_LAUNCH_ENV] = saved


def forward_roofline_ms(config: dict, device: torch.device) -> float:
    """max(FLOPs / peak rate, bytes / bandwidth) of the fused forward, rates measured here: an
    8192³ matrix product in the config's dtype (float32 without TF32) and a 1 GiB device copy.
    Bytes: the weights once per wave of programs (resident programs share them through L2), plus
    the input read and the output written."""
    B, q, m, L = config["B"], config["q"], config["m"], config["L"]
    dtype = getattr(torch, config["dtype"])
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        flops_per_ms = 2 * 8192**3 / median_ms(lambda: a @ a, device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    buffer = torch.empty(2**28, device=device)
    bytes_per_ms = 2 * buffer.numel() * 4 / median_ms(lambda: buffer.clone(), device)
    config_step = step_config(q, m, interpreted=False)
    programs = -(-B // config_step.block_b)
    waves = -(-programs // torch.cuda.get_device_properties(device).multi_processor_count)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    flops = L * 2 * (2 * B * q * m)
    moved = waves * L * 2 * m * q * itemsize + 2 * B * q * itemsize
    return max(flops / flops_per_ms, moved / bytes_per_ms)


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def run_all(dry_run: bool = False, crossover: bool = False, on_result=None) -> list:
    """Every configuration in turn; one that fails is recorded with its error and the others still run
    (a GPU session has little device time). `on_result(results_so_far)` after each configuration."""
    device = torch.device("cpu" if dry_run else "cuda")
    if crossover:
        configs, only = (DRY_RUN_CROSSOVER_CONFIGS if dry_run else CROSSOVER_CONFIGS), CROSSOVER_CONTENDERS
    else:
        configs, only = (DRY_RUN_CONFIGS if dry_run else CONFIGS), None
    results = []
    for config in configs:
        try:
            results.append(run_config(config, device, only))
        except Exception as err:  # noqa: BLE001 — recorded in the results file, not hidden
            results.append({"name": config["name"], "config": config, "error": f"{type(err).__name__}: {err}"})
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if on_result is not None:
            on_result(results)
    return results


def _describe(r: dict) -> str:
    c = r["config"]
    return f"{r['name']} (B={c['B']}, q={c['q']}, m={c['m']}, L={c['L']})"


def markdown_table(results: list) -> str:
    columns = [
        ("eager fwd ms", "eager_forward", None), ("fused fwd ms", "fused_forward", None),
        ("fwd ratio", None, "forward_vs_eager_forward"),
        ("per-layer fwd ratio", None, "per_layer_forward_vs_eager_forward"),
        ("fwd / roofline", None, "forward_fraction_of_roofline"),
        ("eager backprop step ms", "eager_backprop_step", None), ("fused adjoint step ms", "fused_adjoint_step", None),
        ("adjoint/eager", None, "adjoint_step_vs_eager_backprop"),
        ("per-layer adjoint/eager", None, "per_layer_adjoint_step_vs_eager_backprop"),
        ("fused backprop step ms", "fused_backprop_step", None),
        ("adjoint TF32/eager", None, "adjoint_step_tf32_vs_eager_backprop"),
    ]  # fmt: skip
    return _table(results, columns)


def crossover_table(results: list) -> str:
    columns = [
        ("whole-depth fwd ms", "fused_forward", None), ("per-layer fwd ms", "per_layer_forward", None),
        ("fwd whole/per-layer", None, "whole_depth_forward_vs_per_layer"),
        ("whole-depth adjoint step ms", "fused_adjoint_step", None),
        ("per-layer adjoint step ms", "per_layer_adjoint_step", None),
        ("adjoint whole/per-layer", None, "whole_depth_adjoint_step_vs_per_layer"),
    ]  # fmt: skip
    return _table(results, columns)


def _table(results: list, columns: list) -> str:
    """One row per configuration; a column shows a median time (ms) or a ratio."""
    lines = ["| config | " + " | ".join(title for title, _, _ in columns) + " |", "|" + " --- |" * (len(columns) + 1)]
    for r in results:
        if "error" in r:
            cells = [f"error: {r['error'][:200]}"] + [""] * (len(columns) - 1)
        else:
            t, k = r["median_ms"], r["ratios"]
            cells = [(f"{t[time]:.3f}" if time in t else "-") if time else (f"{k[ratio]:.2f}" if ratio in k else "-")
                     for _, time, ratio in columns]  # fmt: skip
        lines.append(f"| {_describe(r)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (TRITON_INTERPRET=1)")
    parser.add_argument("--crossover", action="store_true", help="the whole-depth vs per-layer sweep")
    args = parser.parse_args()
    results = run_all(args.dry_run, args.crossover)
    print(crossover_table(results) if args.crossover else markdown_table(results))
    print(json.dumps(results, indent=1))
