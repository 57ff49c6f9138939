"""Reproduces Fig. 1 of "Implicit regularization of deep residual networks towards neural ODEs" (Marion, Wu,
Sander, Biau, ICLR 2024) and the pattern of its Table 1: after training, the weights of a deep residual MLP
vary smoothly across depth — max_k ‖W_{k+1} − W_k‖_F falls like 1/L — when the activation is smooth and
the initialization is weight-tied; with i.i.d. initialization the smoothness is lost.

Setting (the paper's synthetic one, as in `make demo`): ODEMLP with q = 16, m = 32, n = 100 standard-Gaussian
inputs and targets, loss (1/n) Σ ‖F(x_i) − y_i‖², 500 full-batch gradient-descent steps with lr = L × 1e-2,
at L = 16, 32, … up to --max-depth, for three variants:

    gelu-tied   GELU, tied init (every W_k the same Gaussian matrix, V = 0)   expected slope ≈ −1
    relu-tied   ReLU, tied init
    gelu-iid    GELU, i.i.d. Gaussian W_k, V = 0                               expected slope ≈ 0

Exact backprop gradients by default, as in the paper (--backward adjoint trains memory-free instead).
Writes bench/results/smoothness-<device>-<yyyymmdd>.json and .png. Training time grows linearly with L: the
default range (L = 16 … 1024) takes about a minute on 2 idle CPU cores with the C++ backend; with the reference
backend (no C++ extension built) L = 1024 alone costs ~100 s per variant, so use --max-depth 256 there.

    python -m bench.repro_smoothness [--max-depth 1024] [--steps 500] [--variants gelu-tied relu-tied gelu-iid]
                                     [--backward backprop|adjoint] [--backend NAME] [--seed 0] [--out DIR]
"""

import argparse
import time

import torch

from bench.plotting import save_loglog_panels
from bench.report import backend_label, environment, loglog_slope, markdown_table, output_stem, powers_of_two, write_json
from odenets_fast import ODEMLP, diagnostics

VARIANTS = {"gelu-tied": ("gelu", "tied"), "relu-tied": ("relu", "tied"), "gelu-iid": ("gelu", "iid")}
DIM, HIDDEN, SAMPLES = 16, 32, 100


def mean_square_loss(out, y):
    return (out - y).square().sum(-1).mean()


def train(depth: int, activation: str, init: str, x, y, *, steps: int, backward: str, backend, seed: int) -> dict:
    """Full-batch gradient descent with lr = L × 1e-2; the trained weights' smoothness and the losses."""
    torch.manual_seed(seed)
    model = ODEMLP(DIM, HIDDEN, depth, activation=activation, init=init, backward=backward, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=depth * 1e-2)
    start, losses = time.perf_counter(), []
    for _ in range(steps):
        loss = mean_square_loss(model(x), y)
        losses.append(loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        final_loss = mean_square_loss(model(x), y).item()
    return {
        "depth": depth,
        "smoothness_W": diagnostics.depth_smoothness(model.W),
        "smoothness_V": diagnostics.depth_smoothness(model.V),
        "loss_start": losses[0],
        "loss_end": final_loss,
        "seconds": seconds,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)  # fmt: skip
    parser.add_argument("--min-depth", type=int, default=16)
    parser.add_argument("--max-depth", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--backward", choices=["backprop", "adjoint"], default="backprop")
    parser.add_argument("--backend", default=None, help="reference or cpp (default: automatic)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="output folder (default: bench/results)")
    args = parser.parse_args(argv)

    device = torch.device("cpu")
    depths = powers_of_two(args.min_depth, args.max_depth)
    gen = torch.Generator().manual_seed(args.seed)
    x, y = torch.randn(SAMPLES, DIM, generator=gen), torch.randn(SAMPLES, DIM, generator=gen)
    runs = {name: [] for name in args.variants}
    for name in args.variants:
        activation, init = VARIANTS[name]
        for depth in depths:
            run = train(depth, activation, init, x, y, steps=args.steps, backward=args.backward, backend=args.backend,
                        seed=args.seed)  # fmt: skip
            runs[name].append(run)
            print(f"  {name:<10} L={depth:<5} max_k |W_k+1 - W_k| = {run['smoothness_W']:.3e}   "
                  f"loss {run['loss_start']:.3f} -> {run['loss_end']:.3f}   {run['seconds']:.1f} s", flush=True)

    slopes = {name: {k: loglog_slope(depths, [r[k] for r in rs]) for k in ("smoothness_W", "smoothness_V")}
              for name, rs in runs.items()}  # fmt: skip
    env = environment(device)
    backend = backend_label(args.backend, device)
    results = {
        "config": dict(dim=DIM, hidden=HIDDEN, samples=SAMPLES, depths=depths, steps=args.steps, lr="L * 1e-2",
                       backward=args.backward, backend=backend, seed=args.seed, variants=args.variants),
        "environment": env,
        "runs": runs,
        "loglog_slope": slopes,
    }  # fmt: skip
    stem = output_stem("smoothness", device, args.out)
    write_json(stem.with_suffix(".json"), results)

    smoothness = {f"{name} (slope {slopes[name]['smoothness_W']:.2f})": (depths, [r["smoothness_W"] for r in rs])
                  for name, rs in runs.items()}  # fmt: skip
    final_loss = {name: (depths, [r["loss_end"] for r in rs]) for name, rs in runs.items()}
    save_loglog_panels(stem.with_suffix(".png"), [
        dict(title="max_k ‖W_{k+1} − W_k‖_F after training", xlabel="depth L", ylabel="Frobenius norm",
             series=smoothness),
        dict(title=f"training loss after {args.steps} steps", xlabel="depth L", ylabel="loss", series=final_loss),
    ], f"ODEMLP q={DIM}, m={HIDDEN}, n={SAMPLES}, lr = L × 1e-2, {args.backward}, {backend}")  # fmt: skip

    headers = ["variant"] + [f"L={L}" for L in depths] + ["slope W", "slope V"]
    rows = [[name] + [f"{r['smoothness_W']:.3e}" for r in rs]
            + [f"{slopes[name]['smoothness_W']:.2f}", f"{slopes[name]['smoothness_V']:.2f}"]
            for name, rs in runs.items()]  # fmt: skip
    print("max_k ‖W_{k+1} − W_k‖_F after training:")
    print(markdown_table(headers, rows))
    print(f"wrote {stem}.json and .png")
    return results


if __name__ == "__main__":
    main()
