"""Memory-free training of generic residual blocks, side by side with its alternatives, on the tiny CIFAR
model of "Do Residual Neural Networks discretize Neural Ordinary Differential Equations?" (NeurIPS 2022);
then the gradient error of `AdjointResidualStack`'s two VJP points against depth.

Model: a 5×5 stride-3 convolution 3 → 16 channels (32×32 → 10×10), BatchNorm, ReLU; L residual blocks
x ← x + (1/L) f_n(x), f_n = conv3×3 → BN → ReLU → conv3×3 → BN (no biases, BatchNorm in training mode);
global average pooling, a linear classifier. Synthetic 32×32 images (bench.conv_example's), batch 32, CPU.

Contenders, one training step each (forward, loss, backward):

    backprop                     the plain loop under autograd: every activation stored
    checkpoint_sqrtL             the loop in round(√L) segments under torch.utils.checkpoint (non-reentrant)
    minimal_adjoint              the paper's algorithm and arithmetic written plainly (MinimalAdjoint below, a
                                 stand-in for the paper's code, which is not vendored): per layer a
                                 reconstruction, a recompute of f(x) / L under autograd and its backward, with
                                 no bookkeeping — no RNG replay, no autocast, no unlisted-input check, and its
                                 re-runs update BatchNorm's running statistics twice more per layer
    memcnn                       memcnn 1.5.2's InvertibleModuleWrapper around each step (x + h f(x), its inverse
                                 y − h f(y)): the same per-layer work by that library's machinery, which frees
                                 each step's input after the forward and rebuilds it in backward
    adjoint                      AdjointResidualStack (vjp_at="state")
    adjoint_vjp_reconstruction   AdjointResidualStack(vjp_at="reconstruction")
    adjoint_vjp_extrapolated     AdjointResidualStack(vjp_at="extrapolated")

Time: contenders interleaved (each round runs every contender once, in a rotating order), each
contender's time over backprop's in the same round, the median of those ratios over the rounds — for
the process's CPU time (time.process_time: with one torch thread, the work of the step, whatever else
the machine runs) and for wall time. Memory: the peak memory of one step above the memory in use before
it, parameter gradients excluded, in a fresh process per configuration (bench.peak_memory: peak RSS
with glibc serving blocks ≥ 64 KiB by mmap; --quick measures in this process). Gradient error:
‖g − g_backprop‖ / ‖g_backprop‖ over all parameters, same weights and batch, float32.

Gradient error against depth (float64): the conv model above (batch 8), the same with one block tied
across depth (f_n = f for every n, as in bench.mnist1d's conv model), and MLP blocks
f(x) = V gelu(W x / √q) / √m (q = 8, m = 16, batch 64) with weights smooth in depth
(bench.repro_gradient_error's θ(s)) and i.i.d. Gaussian, Euler and Heun; every VJP point (Heun: the
state and the reconstruction).

    python -m bench.generic_blocks [--depths 8 16 32 64] [--rounds 41] [--threads 1] [--quick]
"""

import argparse
import json
import math
import os
import statistics
import time

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from bench.baselines import residual
from bench.conv_example import synthetic_batch
from bench.peak_memory import in_fresh_process, peak_bytes
from bench.report import environment, loglog_slope, markdown_table, output_stem, powers_of_two, write_json
from bench.repro_gradient_error import smooth_problem
from odenets_fast import AdjointResidualStack
from odenets_fast.spec import VJP_POINTS

CHANNELS, CLASSES = 16, 10
# AdjointResidualStack's contenders, by VJP point
STACK_CONTENDERS = {"state": "adjoint", "reconstruction": "adjoint_vjp_reconstruction",
                    "extrapolated": "adjoint_vjp_extrapolated"}  # fmt: skip
CONTENDERS = ("backprop", "checkpoint_sqrtL", "minimal_adjoint", "memcnn", *STACK_CONTENDERS.values())
HEUN_VJP_POINTS = ("state", "reconstruction")  # "extrapolated" is Euler's


def residual_block() -> nn.Module:
    """conv → BN → ReLU → conv → BN: the tiny model's residual function."""
    return nn.Sequential(
        nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1, bias=False), nn.BatchNorm2d(CHANNELS), nn.ReLU(),
        nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1, bias=False), nn.BatchNorm2d(CHANNELS),
    )  # fmt: skip


class PlainLoop(nn.Module):
    """x ← x + h f_n(x) under autograd."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.h = 1.0 / len(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = torch.add(x, block(x), alpha=self.h)  # one pass, as the stack's own steps
        return x


class CheckpointedLoop(PlainLoop):
    """The same loop in round(√L) segments under torch.utils.checkpoint (non-reentrant)."""

    def forward(self, x):
        depth = len(self.blocks)
        segments = max(1, round(math.sqrt(depth)))
        bounds = [round(i * depth / segments) for i in range(segments + 1)]
        for start, stop in zip(bounds[:-1], bounds[1:]):
            x = checkpoint(self._segment, x, start, stop, use_reentrant=False)
        return x

    def _segment(self, x, start, stop):
        for block in self.blocks[start:stop]:
            x = torch.add(x, block(x), alpha=self.h)  # one pass, as the stack's own steps
        return x


class _MinimalAdjointFunction(torch.autograd.Function):
    """The paper's arithmetic (its resnet_memory.py): each step x + f(x) / L; in backward, per layer, the
    reconstruction x − f(x) / L, then f(x) / L alone recomputed and differentiated, the identity path's
    cotangent added by hand."""

    @staticmethod
    def forward(ctx, x, loop, *params):
        depth = len(loop.blocks)
        with torch.no_grad():
            for block in loop.blocks:
                x = x + block(x) / depth
        ctx.loop = loop
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        loop, grads = ctx.loop, []
        depth = len(loop.blocks)
        for block in reversed(loop.blocks):
            with torch.no_grad():
                x = x - block(x) / depth
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                params = list(block.parameters())
                gx, *block_grads = torch.autograd.grad(block(x_in) / depth, [x_in] + params, g)
            g = g + gx
            grads = block_grads + grads
        return (g, None, *grads)


class MinimalAdjoint(PlainLoop):
    """The paper's memory-free backward with nothing else (module docstring)."""

    def forward(self, x):
        return _MinimalAdjointFunction.apply(x, self, *self.parameters())


class InvertibleEulerStep(nn.Module):
    """x + h f(x) with the inverse memcnn asks for: y − h f(y), the reconstruction (exact as h → 0)."""

    def __init__(self, block: nn.Module, h: float):
        super().__init__()
        self.block, self.h = block, h

    def forward(self, x):
        return torch.add(x, self.block(x), alpha=self.h)

    def inverse(self, y):
        return torch.add(y, self.block(y), alpha=-self.h)


class MemcnnLoop(PlainLoop):
    """Every step in memcnn's InvertibleModuleWrapper (keep_input=False): its input's storage freed after the
    forward, rebuilt by the inverse in backward, then the step recomputed and differentiated. The loop's
    input is cloned once: memcnn would free the stem's output, which the stem's ReLU saved for its backward
    (not once per block, as a stack of wrappers needs no more)."""

    def __init__(self, blocks):
        super().__init__(blocks)
        import warnings

        with warnings.catch_warnings():  # memcnn 1.5.2 decorates with torch.cuda.amp's deprecated custom_fwd
            warnings.simplefilter("ignore", FutureWarning)
            from memcnn import InvertibleModuleWrapper
        warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning, r"memcnn\.")  # its storage().resize_
        self.steps = [InvertibleModuleWrapper(InvertibleEulerStep(b, self.h), keep_input=False) for b in self.blocks]

    def forward(self, x):
        x = x.clone()
        for step in self.steps:
            x = step(x)
        return x


def residual_part(contender: str, blocks: list) -> nn.Module:
    if contender == "backprop":
        return PlainLoop(blocks)
    if contender == "checkpoint_sqrtL":
        return CheckpointedLoop(blocks)
    if contender == "minimal_adjoint":
        return MinimalAdjoint(blocks)
    if contender == "memcnn":
        return MemcnnLoop(blocks)
    (vjp_at,) = (v for v, c in STACK_CONTENDERS.items() if c == contender)
    return AdjointResidualStack(blocks, vjp_at=vjp_at)


def make_net(contender: str, depth: int, seed: int = 0, dtype=torch.float32, tied: bool = False) -> nn.Module:
    """The tiny model with `contender`'s residual part; the same weights for every contender (`tied`: one
    block at every depth)."""
    torch.manual_seed(seed)
    stem = [nn.Conv2d(3, CHANNELS, 5, stride=3, bias=False), nn.BatchNorm2d(CHANNELS), nn.ReLU()]
    blocks = [residual_block()] * depth if tied else [residual_block() for _ in range(depth)]
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(CHANNELS, CLASSES)]
    return nn.Sequential(*stem, residual_part(contender, blocks), *head).to(dtype)


def training_step(net, images, labels) -> None:
    net.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(net(images), labels).backward()


def parameter_gradients(net, images, labels) -> torch.Tensor:
    """By .backward(): memcnn's wrapper refuses torch.autograd.grad."""
    training_step(net, images, labels)
    return torch.cat([p.grad.flatten() for p in net.parameters()])


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx - exact).norm() / exact.norm())


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def step_times(depth: int, batch: int, rounds: int, warmup: int = 2) -> dict:
    """{clock: {contender: its step time in each round (seconds)}}, rounds interleaved, order rotated."""
    images, labels = synthetic_batch(batch)
    nets = {c: make_net(c, depth) for c in CONTENDERS}
    for net in nets.values():
        for _ in range(warmup):
            training_step(net, images, labels)
    times = {clock: {c: [] for c in CONTENDERS} for clock in CLOCKS}
    for r in range(rounds):
        order = CONTENDERS[r % len(CONTENDERS) :] + CONTENDERS[: r % len(CONTENDERS)]
        for c in order:
            start = {clock: read() for clock, read in CLOCKS.items()}
            training_step(nets[c], images, labels)
            for clock, read in CLOCKS.items():
                times[clock][c].append(read() - start[clock])
    return times


def median_ratios(times: dict, baseline: str = "backprop") -> dict:
    """Per contender, the median over rounds of its time over the baseline's in the same round."""
    return {c: statistics.median(t / b for t, b in zip(ts, times[baseline])) for c, ts in times.items()}


def gradient_errors(depth: int, batch: int) -> dict:
    images, labels = synthetic_batch(batch)
    exact = parameter_gradients(make_net("backprop", depth), images, labels)
    return {c: relative_error(parameter_gradients(make_net(c, depth), images, labels), exact) for c in CONTENDERS}


def worker_peak(contender: str, depth: int, batch: int) -> dict:
    """One warm-up step, then the peak memory of a step above the memory before it, less its parameter
    gradients. The warm-up's gradients are held through the step: freed, their blocks (under the mmap
    threshold) would take the step's new gradients without raising RSS, and the subtraction would remove
    memory never counted — 1.2 MiB at L = 64, a peak falling with depth."""
    net = make_net(contender, depth)
    images, labels = synthetic_batch(batch)
    training_step(net, images, labels)
    warmup_gradients = [p.grad for p in net.parameters()]
    gradient_bytes = sum(g.numel() * g.element_size() for g in warmup_gradients)
    return {"peak_bytes": peak_bytes(lambda: training_step(net, images, labels), torch.device("cpu")) - gradient_bytes}


def measure_peak(contender: str, depth: int, batch: int, threads: int) -> int:
    args = ["bench.generic_blocks", "--worker", contender, str(depth), "--batch", str(batch), "--threads", str(threads)]
    return in_fresh_process(args, f"{contender} at L={depth}")["peak_bytes"]


class MLPBlock(nn.Module):
    """The ODE-MLP residual V gelu(W x / √q) / √m as a module (one layer's W, V)."""

    def __init__(self, W, V):
        super().__init__()
        self.W, self.V = nn.Parameter(W.clone()), nn.Parameter(V.clone())

    def forward(self, x):
        return residual(x, [self.W], [self.V], None, None, 0, "gelu")


def mlp_problem(weights: str, depth: int, method: str, seed: int = 0):
    """x (64, 8) and the blocks' W (P, 16, 8), V (P, 8, 16) in float64: smooth in depth or i.i.d."""
    if weights == "smooth":
        return smooth_problem(depth, method, 64, 8, 16, seed)
    gen = torch.Generator().manual_seed(seed)
    P = depth + (method == "heun")
    return (torch.randn(64, 8, generator=gen, dtype=torch.float64),
            torch.randn(P, 16, 8, generator=gen, dtype=torch.float64),
            torch.randn(P, 8, 16, generator=gen, dtype=torch.float64))  # fmt: skip


def _stack_gradients(stack, x, cotangent) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    out = stack(x)
    return torch.cat([g.flatten() for g in torch.autograd.grad(out, [x] + list(stack.parameters()), cotangent)])


def mlp_errors(weights: str, method: str, depth: int) -> dict:
    """Per VJP point (Heun: HEUN_VJP_POINTS), the relative gradient error (input and weights together)
    against backprop."""
    x, W, V = mlp_problem(weights, depth, method)
    cotangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    blocks = [MLPBlock(W[k], V[k]) for k in range(W.shape[0])]
    exact = _stack_gradients(AdjointResidualStack(blocks, method=method, backward="backprop"), x, cotangent)
    points = VJP_POINTS if method == "euler" else HEUN_VJP_POINTS
    return {v: relative_error(_stack_gradients(AdjointResidualStack(blocks, method=method, vjp_at=v), x, cotangent),
                              exact) for v in points}  # fmt: skip


def conv_errors(depth: int, batch: int, tied: bool = False) -> dict:
    """Per VJP point, the tiny conv model's relative gradient error against backprop, float64."""
    images, labels = (t.to(torch.float64) if t.is_floating_point() else t for t in synthetic_batch(batch))
    exact = parameter_gradients(make_net("backprop", depth, dtype=torch.float64, tied=tied), images, labels)
    return {v: relative_error(parameter_gradients(make_net(c, depth, dtype=torch.float64, tied=tied), images, labels),
                              exact) for v, c in STACK_CONTENDERS.items()}  # fmt: skip


def error_sweep(conv_depths: list, mlp_depths: list, conv_batch: int) -> dict:
    """{series: {"depths", per VJP point its errors, "ratio": {point: its error over the default's},
    "slope": {point: log-log slope}}} for the conv and MLP models."""
    series = {}

    def record(name, depths, measure):
        errors = [measure(depth) for depth in depths]
        points = list(errors[0])
        entry = {"depths": depths, **{v: [e[v] for e in errors] for v in points}}
        entry["ratio"] = {v: [r / s for s, r in zip(entry["state"], entry[v])] for v in points if v != "state"}
        entry["slope"] = {v: loglog_slope(depths, entry[v]) for v in points}
        series[name] = entry
        print(f"  {name}: over the default's error: " + "; ".join(
            f"{v} " + " ".join(f"{r:.2f}" for r in ratios) for v, ratios in entry["ratio"].items()), flush=True)  # fmt: skip

    record("conv, Euler", conv_depths, lambda depth: conv_errors(depth, conv_batch))
    record("conv tied, Euler", conv_depths, lambda depth: conv_errors(depth, conv_batch, tied=True))
    for weights in ("smooth", "iid"):
        for method in ("euler", "heun"):
            record(f"MLP {weights}, {method.capitalize()}", mlp_depths,
                   lambda depth: mlp_errors(weights, method, depth))  # fmt: skip
    return series


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)  # fmt: skip
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--rounds", type=int, default=41, help="interleaved timing rounds per depth")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--conv-error-depths", type=int, nargs="+", default=powers_of_two(8, 128))
    parser.add_argument("--mlp-error-depths", type=int, nargs="+", default=powers_of_two(8, 512))
    parser.add_argument("--quick", action="store_true", help="a smoke test: tiny depths, batch and rounds")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    parser.add_argument("--worker", nargs=2, metavar=("CONTENDER", "DEPTH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.depths, args.rounds, args.batch = [2, 4], 2, 4
        args.conv_error_depths, args.mlp_error_depths = [2, 4], [4, 8]
    return args


def main(argv=None) -> dict:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker_peak(args.worker[0], int(args.worker[1]), args.batch)))
        return {}
    device = torch.device("cpu")
    results = {"config": {k: v for k, v in vars(args).items() if k != "worker"}, "environment": environment(device),
               "memory_measured": "in this process (--quick)" if args.quick else "fresh process per configuration",
               "depths": {}, "load_average_1min_after_depth": {}}  # fmt: skip
    peak = (lambda c, depth: worker_peak(c, depth, args.batch)["peak_bytes"]) if args.quick else (
        lambda c, depth: measure_peak(c, depth, args.batch, args.threads))  # fmt: skip
    for depth in args.depths:
        times = step_times(depth, args.batch, args.rounds)
        results["depths"][str(depth)] = {
            "median_ms": {clock: {c: 1e3 * statistics.median(ts) for c, ts in t.items()} for clock, t in times.items()},
            "time_over_backprop": {clock: median_ratios(t) for clock, t in times.items()},
            # the goals' ratios, as medians of per-round ratios too
            **{f"time_over_{base}": {clock: median_ratios(t, base) for clock, t in times.items()}
               for base in ("minimal_adjoint", "checkpoint_sqrtL")},  # fmt: skip
            "peak_bytes": {c: peak(c, depth) for c in CONTENDERS},
            "gradient_error": gradient_errors(depth, args.batch),
        }
        results["load_average_1min_after_depth"][str(depth)] = os.getloadavg()[0]
        print(f"  L={depth} done (load {os.getloadavg()[0]:.1f})", flush=True)
    results["gradient_error_vs_depth"] = error_sweep(args.conv_error_depths, args.mlp_error_depths, conv_batch=8)
    results["goals"] = goals(results, args.depths)

    from bench.plotting import save_loglog_panels  # here: the memory workers need no matplotlib

    stem = output_stem("generic-blocks", device, args.out)
    write_json(stem.with_suffix(".json"), results)
    sweep = results["gradient_error_vs_depth"]
    save_loglog_panels(stem.with_suffix(".png"), [
        dict(title=name, xlabel="depth L", ylabel="relative gradient error vs backprop",
             series={f"vjp_at={v} (slope {slope:.2f})": (entry["depths"], entry[v]) for v, slope in entry["slope"].items()})
        for name, entry in sweep.items()
    ], "AdjointResidualStack: gradient error of the VJP points against depth (float64)")  # fmt: skip
    print(report(results, args))
    print(f"wrote {stem}.json and .png")
    return results


def goals(results: dict, depths: list) -> dict:
    """The issue's goals as measured ratios (CPU time), to hold against their targets: adjoint time ≤ the
    minimal loop's at every depth; vjp_at="reconstruction" (and "extrapolated") ≤ 1.5× backprop and ≤ √L
    checkpointing at L ≥ 16, its gradient error within 2× of the default's (here, and per series of the
    float64 sweep); memory flat in depth."""
    rows = {str(d): results["depths"][str(d)] for d in depths}
    deep = [d for d in rows if int(d) >= 16]
    errors = {d: r["gradient_error"] for d, r in rows.items()}
    peak = {c: [rows[d]["peak_bytes"][c] for d in rows] for c in STACK_CONTENDERS.values()}

    def time_over(base, contender, depths):
        return {d: rows[d][f"time_over_{base}"]["cpu"][contender] for d in depths}

    return {
        "adjoint_over_minimal_time": time_over("minimal_adjoint", "adjoint", rows),
        "reconstruction_over_backprop_time": time_over("backprop", "adjoint_vjp_reconstruction", deep),
        "reconstruction_over_checkpoint_time": time_over("checkpoint_sqrtL", "adjoint_vjp_reconstruction", deep),
        "extrapolated_over_backprop_time": time_over("backprop", "adjoint_vjp_extrapolated", deep),
        **{f"{v}_over_state_gradient_error": {d: e[STACK_CONTENDERS[v]] / e["adjoint"] for d, e in errors.items()}
           for v in ("reconstruction", "extrapolated")},  # fmt: skip
        "worst_over_state_gradient_error_vs_depth": {
            name: {v: max(r) for v, r in entry["ratio"].items()} for name, entry in results["gradient_error_vs_depth"].items()
        },  # fmt: skip
        "peak_deepest_over_shallowest": {c: p[-1] / p[0] for c, p in peak.items()},
    }


def report(results: dict, args) -> str:
    depths = [str(d) for d in args.depths]
    rows = results["depths"]
    ratios = {d: rows[d]["time_over_backprop"] for d in depths}
    time_rows = [[c] + [f"{ratios[d]['cpu'][c]:.2f} ({ratios[d]['wall'][c]:.2f})" for d in depths] for c in CONTENDERS]
    memory_rows = [[c] + [f"{rows[d]['peak_bytes'][c] / 2**20:.1f}" for d in depths] for c in CONTENDERS]
    error_rows = [[c] + [f"{rows[d]['gradient_error'][c]:.1e}" for d in depths] for c in CONTENDERS]
    head = ["contender"] + [f"L = {d}" for d in depths]
    sweep = results["gradient_error_vs_depth"]
    sweep_rows = [[name] + [f"{e['slope'][v]:.2f}" if v in e["slope"] else "–" for v in VJP_POINTS]
                  + [" / ".join(f"{r:.2f}" for r in e["ratio"][v]) if v in e["ratio"] else "–" for v in VJP_POINTS[1:]]
                  for name, e in sweep.items()]  # fmt: skip
    env = results["environment"]
    return "\n\n".join([
        f"{env['device']}, torch {env['torch']}, {args.threads} thread(s), batch {args.batch}, {args.rounds} rounds; "
        f"1-minute load after each depth: {results['load_average_1min_after_depth']}",
        "Time × backprop, CPU time (wall time), medians of per-round ratios:\n" + markdown_table(head, time_rows),
        f"Peak memory of a step, MiB ({results['memory_measured']}, parameter gradients excluded):\n"
        + markdown_table(head, memory_rows),
        "Gradient error against backprop (float32):\n" + markdown_table(head, error_rows),
        "Gradient error against depth (float64): log-log slopes, and each point's error over the default's per depth:\n"
        + markdown_table(["model"] + [f"slope, {v}" for v in VJP_POINTS] + [f"{v} / state" for v in VJP_POINTS[1:]],
                         sweep_rows),  # fmt: skip
        "Goals: " + json.dumps(results["goals"], indent=1),
    ])  # fmt: skip


if __name__ == "__main__":
    main()
