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

    python -m bench.triton_step [--dry-run]   (--dry-run: tiny sizes on the CPU interpreter)
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


def run_config(config: dict, device: torch.device) -> dict:
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
    times = {name: median_ms(fn, device) for name, fn in contenders.items()}
    ratios = {
        "forward_vs_eager_forward": times["fused_forward"] / times["eager_forward"],
        "adjoint_step_vs_eager_backprop": times["fused_adjoint_step"] / times["eager_backprop_step"],
        "backprop_step_vs_eager_backprop": times["fused_backprop_step"] / times["eager_backprop_step"],
        "whole_depth_forward_vs_eager_forward": times["fused_forward"] / times["eager_forward"],
        "whole_depth_adjoint_step_vs_eager_backprop": times["fused_adjoint_step"] / times["eager_backprop_step"],
        "per_layer_forward_vs_eager_forward": times["per_layer_forward"] / times["eager_forward"],
        "per_layer_adjoint_step_vs_eager_backprop": times["per_layer_adjoint_step"] / times["eager_backprop_step"],
    }
    if dtype == torch.float32:
        ratios["adjoint_step_tf32_vs_eager_backprop"] = times["fused_adjoint_step_tf32"] / times["eager_backprop_step"]
    if device.type == "cuda":
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


def run_all(dry_run: bool = False) -> list:
    device = torch.device("cpu" if dry_run else "cuda")
    return [run_config(config, device) for config in (DRY_RUN_CONFIGS if dry_run else CONFIGS)]


def markdown_table(results: list) -> str:
    lines = [
        "| config | eager fwd ms | fused fwd ms | fwd ratio | per-layer fwd ratio | fwd / roofline | "
        "eager backprop step ms | fused adjoint step ms | adjoint/eager | per-layer adjoint/eager | "
        "fused backprop step ms | adjoint TF32/eager |",
        "|" + " --- |" * 12,
    ]
    for r in results:
        t, k, c = r["median_ms"], r["ratios"], r["config"]

        def ratio(name):
            return "-" if name not in k else f"{k[name]:.2f}"

        lines.append(
            f"| {r['name']} (B={c['B']}, q={c['q']}, m={c['m']}, L={c['L']}) | {t['eager_forward']:.3f} | "
            f"{t['fused_forward']:.3f} | {ratio('forward_vs_eager_forward')} | "
            f"{ratio('per_layer_forward_vs_eager_forward')} | {ratio('forward_fraction_of_roofline')} | "
            f"{t['eager_backprop_step']:.3f} | {t['fused_adjoint_step']:.3f} | {ratio('adjoint_step_vs_eager_backprop')} | "
            f"{ratio('per_layer_adjoint_step_vs_eager_backprop')} | {t['fused_backprop_step']:.3f} | "
            f"{ratio('adjoint_step_tf32_vs_eager_backprop')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (TRITON_INTERPRET=1)")
    results = run_all(parser.parse_args().dry_run)
    print(markdown_table(results))
    print(json.dumps(results, indent=1))
