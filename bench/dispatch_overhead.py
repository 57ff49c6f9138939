"""What the torch.library op costs per call, against a plain autograd.Function over the same backend.

`ode_mlp` goes through the custom ops of odenets_fast/library.py (what lets torch.compile and opcheck
see the stack). A plain `torch.autograd.Function` calling the backend directly is the cheapest
eager alternative. On a one-layer stack with a tiny batch the arithmetic is negligible, so the
difference of the two medians is the dispatch overhead per forward + backward.

    python -m bench.dispatch_overhead [--backend cpp] [--calls 2000]
"""

import argparse
import statistics
import time

import torch

from bench.report import environment, markdown_table
from odenets_fast import ode_mlp
from odenets_fast.backends import select_backend
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
        grads = ctx.backend.backward(grad_out, tuple(saved), W, V, None, None, ctx.spec)
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
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args(argv)
    x = torch.randn(8, 4, requires_grad=True)
    W, V = torch.randn(1, 8, 4, requires_grad=True), torch.randn(1, 4, 8, requires_grad=True)
    backend = select_backend(args.backend, x.device)
    spec = check_stack(x, W, V, None, None, method="euler", activation="gelu", T=1.0, backward="adjoint",
                       anchor_every=None, scale_in=None, scale_out=None)  # fmt: skip

    def library_op():
        torch.autograd.grad(ode_mlp(x, W, V, backend=args.backend), (x, W, V), x)

    def plain_function():
        torch.autograd.grad(PlainFunction.apply(x, W, V, spec, backend), (x, W, V), x)

    timings = {}
    for _ in range(2):  # interleaved: load bursts fall on both
        for name, fn in (("library_op", library_op), ("plain_function", plain_function)):
            timings.setdefault(name, []).append(_per_call_us(fn, args.calls))
    medians = {name: statistics.median(values) for name, values in timings.items()}
    overhead = medians["library_op"] - medians["plain_function"]
    name = backend.__name__.rsplit(".", 1)[-1]
    print(f"{environment(x.device)['device']}, torch {torch.__version__}, backend {name}, L = 1, B = 8\n")
    print(markdown_table(["path", "µs per forward + backward"],
                         [[k, f"{v:.1f}"] for k, v in medians.items()] + [["overhead", f"{overhead:.1f}"]]))  # fmt: skip
    return {"median_us": medians, "overhead_us": overhead}


if __name__ == "__main__":
    main()
