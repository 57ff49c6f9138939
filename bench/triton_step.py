"""Per-layer Triton kernels against eager PyTorch on the GPU (the speed goals of the Triton issue).

For each configuration, on the same data in one process:
    eager_forward          the plain loop, no autograd (the fastest eager forward)
    eager_backprop_step    the plain loop forward + backward (every activation stored)
    fused_forward          ode_mlp forward (adjoint mode: nothing stored)
    fused_adjoint_step     ode_mlp forward + adjoint backward
    fused_backprop_step    ode_mlp forward + backprop-mode backward
    (float32 only) the two fused steps again with TF32 products
Ratios: forward_vs_eager_forward = fused_forward / eager_forward and
adjoint_step_vs_eager_backprop = fused_adjoint_step / eager_backprop_step (goals: ≤ 0.5 and ≤ 1.0
on an H100 at B = 4096, q = 256, m = 512, L = 64, float32).

    python -m bench.triton_step [--dry-run]   (--dry-run: tiny sizes on the CPU interpreter)
"""

import argparse
import json

import torch

from bench.baselines import eager_forward
from bench.timing import median_ms
from odenets_fast import ode_mlp

CONFIGS = [
    dict(name="wide-float32", B=4096, q=256, m=512, L=64, dtype="float32"),
    dict(name="wide-bfloat16", B=4096, q=256, m=512, L=64, dtype="bfloat16"),
    dict(name="narrow-float32", B=16384, q=64, m=128, L=64, dtype="float32"),
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

    def fused(backward, precision="ieee"):
        return lambda: ode_mlp(x, W, V, backward=backward, backend="triton", input_precision=precision)

    contenders = {
        "eager_forward": lambda: _no_grad(lambda: eager_forward(x, W, V)),
        "eager_backprop_step": step(lambda: eager_forward(x, W, V)),
        "fused_forward": lambda: _no_grad(fused("adjoint")),
        "fused_adjoint_step": step(fused("adjoint")),
        "fused_backprop_step": step(fused("backprop")),
    }
    if dtype == torch.float32:
        contenders["fused_adjoint_step_tf32"] = step(fused("adjoint", "tf32"))
        contenders["fused_backprop_step_tf32"] = step(fused("backprop", "tf32"))
    times = {name: median_ms(fn, device) for name, fn in contenders.items()}
    ratios = {
        "forward_vs_eager_forward": times["fused_forward"] / times["eager_forward"],
        "adjoint_step_vs_eager_backprop": times["fused_adjoint_step"] / times["eager_backprop_step"],
        "backprop_step_vs_eager_backprop": times["fused_backprop_step"] / times["eager_backprop_step"],
    }
    if dtype == torch.float32:
        ratios["adjoint_step_tf32_vs_eager_backprop"] = times["fused_adjoint_step_tf32"] / times["eager_backprop_step"]
    return {"name": config["name"], "config": config, "median_ms": times, "ratios": ratios}


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def run_all(dry_run: bool = False) -> list:
    device = torch.device("cpu" if dry_run else "cuda")
    return [run_config(config, device) for config in (DRY_RUN_CONFIGS if dry_run else CONFIGS)]


def markdown_table(results: list) -> str:
    lines = [
        "| config | eager fwd ms | fused fwd ms | fwd ratio | eager backprop step ms | fused adjoint step ms | "
        "adjoint/eager | fused backprop step ms | adjoint TF32/eager |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        t, k = r["median_ms"], r["ratios"]
        tf32 = k.get("adjoint_step_tf32_vs_eager_backprop")
        c = r["config"]
        lines.append(
            f"| {r['name']} (B={c['B']}, q={c['q']}, m={c['m']}, L={c['L']}) | {t['eager_forward']:.3f} | "
            f"{t['fused_forward']:.3f} | {k['forward_vs_eager_forward']:.2f} | {t['eager_backprop_step']:.3f} | "
            f"{t['fused_adjoint_step']:.3f} | {k['adjoint_step_vs_eager_backprop']:.2f} | "
            f"{t['fused_backprop_step']:.3f} | {'-' if tf32 is None else f'{tf32:.2f}'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (TRITON_INTERPRET=1)")
    results = run_all(parser.parse_args().dry_run)
    print(markdown_table(results))
    print(json.dumps(results, indent=1))
