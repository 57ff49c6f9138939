"""What the torch.library op costs per call, against a plain autograd.Function over the same backend.

Three paths to the same backend forward + backward:
- `custom_op`: the torch.library ops of odenets_fast/library.py (what torch.compile and opcheck see;
  `ode_mlp` takes this path while compiling);
- `ode_mlp`: the public op in eager mode (argument checks, then an autograd.Function, no custom op);
- `plain_function`: a bare autograd.Function calling the backend, the cheapest eager path.
On a one-layer stack with a tiny batch the arithmetic is negligible, so the differences of the
medians are per-call overheads of one forward + backward. Writes
`bench/results/dispatch-overhead-<device>-<yyyymmdd>.json`.

    python -m bench.dispatch_overhead [--backend cpp] [--calls 2000] [--rounds 5]
"""

import argparse
import statistics
import time

import torch

from bench.report import environment, markdown_table, output_stem, write_json
from odenets_fast import library, ode_mlp
from odenets_fast.backends import load_backend, resolve_backend
from odenets_fast.interface import Saved
from odenets_fast.spec import check_stack


class PlainFunction(torch.autograd.Function):
    """The backend's forward and backward, with no custom op around them."""

    @staticmethod
    def forward(ctx, x, W, V, spec, backend):
        out, saved = backend.forward(x, W, V, None, None, spec)
        ctx.save_for_backward(*[t for t in saved if t is not None], W, V)
        ctx.spec, ctx.backend, ctx.has_stages = spec, backend, saved[2] is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        *saved, W, V = ctx.saved_tensors
        if not ctx.has_stages:
            saved.append(None)
        grads = ctx.backend.backward(grad_out, Saved(*saved), W, V, None, None, ctx.spec)
        return grads.x, grads.W, grads.V, None, None


def _per_call_us(fn, calls: int, rounds: int = 5) -> float:
    for _ in range(calls // 10):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default=None, help="reference or cpp (default: automatic)")
    parser.add_argument("--calls", type=int, default=2000, help="calls per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, each path once per round (median)")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    x = torch.randn(8, 4, requires_grad=True)
    W, V = torch.randn(1, 8, 4, requires_grad=True), torch.randn(1, 4, 8, requires_grad=True)
    backend_name = resolve_backend(args.backend, x.device)
    backend = load_backend(backend_name)
    spec = check_stack(x, W, V, None, None, method="euler", activation="gelu", T=1.0, backward="adjoint",
                       anchor_every=None, scale_in=None, scale_out=None)  # fmt: skip

    def custom_op():
        drift = torch.zeros(())
        absent = x.new_empty(0)  # no error-controlled anchors: no layout, no segment drifts
        out = library.ode_mlp_forward(x, W, V, None, None, *spec.op_args(), backend_name, drift, absent, absent)[0]
        torch.autograd.grad(out, (x, W, V), x)

    def public_op():
        torch.autograd.grad(ode_mlp(x, W, V, backend=args.backend), (x, W, V), x)

    def plain_function():
        torch.autograd.grad(PlainFunction.apply(x, W, V, spec, backend), (x, W, V), x)

    paths = (("custom_op", custom_op), ("ode_mlp", public_op), ("plain_function", plain_function))
    timings = {}
    for _ in range(args.rounds):  # interleaved: load bursts fall on all paths
        for name, fn in paths:
            timings.setdefault(name, []).append(_per_call_us(fn, args.calls))
    medians = {name: statistics.median(values) for name, values in timings.items()}
    overheads = {f"{name}_minus_plain_function": medians[name] - medians["plain_function"]
                 for name in ("custom_op", "ode_mlp")}  # fmt: skip
    env = environment(x.device)
    print(f"{env['device']}, torch {torch.__version__}, backend {backend_name}, L = 1, B = 8\n")
    print(markdown_table(["path", "µs per forward + backward"],
                         [[k, f"{v:.1f}"] for k, v in {**medians, **overheads}.items()]))  # fmt: skip
    results = {"config": {"backend": backend_name, "calls": args.calls, "rounds": args.rounds, "L": 1, "B": 8, "q": 4,
                          "m": 8},
               "environment": env, "median_us": medians, "overhead_us": overheads}  # fmt: skip
    write_json(output_stem("dispatch-overhead", x.device, args.out).with_suffix(".json"), results)
    return results

if __name__ == "__main__":
    main()
