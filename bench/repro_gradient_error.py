"""Reproduces Fig. 3c of "Do Residual Neural Networks discretize Neural ODEs?" (Sander, Ablin, Peyré, NeurIPS
2022): the relative error of the adjoint (memory-free) gradient against the exact backprop gradient as a
function of depth, for the Euler ResNet and the HeunNet, on depth-smooth weights.

The weights sample fixed smooth functions of s ∈ [0, 1] at s = k/L (k = 0 … L − 1 for Euler, 0 … L for
Heun), the same functions at every depth, so every L discretizes the same neural ODE:

    θ(s) = C₀ + C₁ sin(πs) + ½ C₂ cos(2πs),   C_j with standard-Gaussian entries (fixed seed)

for θ = W and θ = V. Errors come from odenets_fast.diagnostics.gradient_error (float64, one backend for both
gradients). Expected: slopes ≈ −1 (Euler) and ≈ −2 (Heun) on log-log, Heun below Euler at every depth.
Writes bench/results/gradient-error-<device>-<yyyymmdd>.json and .png.

    python -m bench.repro_gradient_error [--min-depth 8] [--max-depth 1024] [--batch 64 --dim 8 --hidden 16]
                                         [--activation gelu] [--backend NAME] [--seed 0] [--out DIR]
"""

import argparse

import torch

from bench.plotting import save_loglog_panels
from bench.report import backend_label, environment, loglog_slope, markdown_table, output_stem, powers_of_two, write_json
from odenets_fast import diagnostics

METHODS = ("euler", "heun")
GRADIENTS = ("W", "V", "x")


def smooth_problem(depth: int, method: str, batch: int, dim: int, hidden: int, seed: int):
    """Inputs x (B, q) and weights W (P, m, q), V (P, q, m) sampling the seeded smooth θ(s) at s = k/L."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    coeff_W = torch.randn(3, hidden, dim, generator=gen, dtype=torch.float64)
    coeff_V = torch.randn(3, dim, hidden, generator=gen, dtype=torch.float64)
    P = depth + 1 if method == "heun" else depth
    s = (torch.arange(P, dtype=torch.float64) / depth)[:, None, None]

    def theta(c):
        return c[0] + c[1] * torch.sin(torch.pi * s) + 0.5 * c[2] * torch.cos(2 * torch.pi * s)

    return x, theta(coeff_W), theta(coeff_V)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)  # fmt: skip
    parser.add_argument("--min-depth", type=int, default=8)
    parser.add_argument("--max-depth", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--activation", default="gelu")
    parser.add_argument("--backend", default=None, help="reference or cpp (default: automatic)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="output folder (default: bench/results)")
    args = parser.parse_args(argv)

    device = torch.device("cpu")  # float64: the Heun errors at large L sit below float32 resolution
    depths = powers_of_two(args.min_depth, args.max_depth)
    errors = {method: {g: [] for g in GRADIENTS} for method in METHODS}
    for depth in depths:
        for method in METHODS:
            x, W, V = smooth_problem(depth, method, args.batch, args.dim, args.hidden, args.seed)
            err = diagnostics.gradient_error(x, W, V, method=method, activation=args.activation, backend=args.backend)
            for g in GRADIENTS:
                errors[method][g].append(err[g])
        print(f"  L={depth:<5} " + "   ".join(f"{m} W {errors[m]['W'][-1]:.3e}" for m in METHODS), flush=True)

    slopes = {method: {g: loglog_slope(depths, errors[method][g]) for g in GRADIENTS} for method in METHODS}
    heun_below_euler = {g: all(h < e for h, e in zip(errors["heun"][g], errors["euler"][g])) for g in GRADIENTS}
    env = environment(device)
    backend = backend_label(args.backend, device)
    results = {
        "config": dict(depths=depths, batch=args.batch, dim=args.dim, hidden=args.hidden, activation=args.activation,
                       dtype="float64", seed=args.seed, backend=backend,
                       weights="theta(s) = C0 + C1 sin(pi s) + 0.5 C2 cos(2 pi s) at s = k/L"),
        "environment": env,
        "relative_error": errors,
        "loglog_slope": slopes,
        "heun_below_euler_at_every_depth": heun_below_euler,
    }  # fmt: skip
    stem = output_stem("gradient-error", device, args.out)
    write_json(stem.with_suffix(".json"), results)
    save_loglog_panels(stem.with_suffix(".png"), [
        dict(title=f"gradient w.r.t. {g}", xlabel="depth L", ylabel="relative error, adjoint vs exact",
             series={f"{m} (slope {slopes[m][g]:.2f})": (depths, errors[m][g]) for m in METHODS})
        for g in GRADIENTS
    ], f"Adjoint gradient error vs depth on depth-smooth weights ({args.activation}, float64, {backend})")  # fmt: skip

    headers = ["L"] + [f"{m} {g}" for m in METHODS for g in GRADIENTS]
    rows = [[L] + [f"{errors[m][g][i]:.3e}" for m in METHODS for g in GRADIENTS] for i, L in enumerate(depths)]
    rows.append(["slope"] + [f"{slopes[m][g]:.2f}" for m in METHODS for g in GRADIENTS])
    print(markdown_table(headers, rows))
    print("Heun below Euler at every depth: " + ", ".join(f"{g}: {heun_below_euler[g]}" for g in GRADIENTS))
    print(f"wrote {stem}.json and .png")
    return results


if __name__ == "__main__":
    main()
