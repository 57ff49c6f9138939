"""Peak memory and time of one training step against depth: odenets_fast next to what users would
otherwise run (the contenders of bench/contenders.py: eager backprop, √L checkpointing, torchdiffeq's
odeint_adjoint, and ode_mlp in backprop, adjoint and anchored-adjoint modes), on the same seeded data and
parameters (Euler, GELU, no biases). Where torchdiffeq (requirements.txt) is not installed, as on a GPU
machine's own environment, its contender is skipped with a message.

A training step is the loss (1/B) Σ_i ‖x_L,i − y_i‖² and its gradients w.r.t. W and V. Its peak memory,
parameters and their gradients excluded, is measured by bench/peak_memory.py: on CUDA with
torch.cuda.max_memory_allocated() in this process, on the CPU as the peak RSS of a fresh process per
(contender, depth).
Time: the median over steps after a warm-up step, the contenders side by side in this process (do_bench on
CUDA; on the CPU the contenders take turns step by step, at least --reps rounds, more for short steps).
Writes bench/results/memory-<device>-<yyyymmdd>.json (after every depth, marked complete at the end, with the
load average then: the machine may be shared) and .png.

    python -m bench.memory [--depths 16 64 256 1024] [--batch B --dim q --hidden m] [--contenders NAME ...]
                           [--backend NAME] [--reps 3] [--out DIR]
"""

import argparse
import json
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from bench.contenders import (
    CONTENDERS,
    TORCHDIFFEQ_MISSING,
    Sizes,
    make_step,
    problem_tensors,
    torchdiffeq_installed,
    training_loss,
)
from bench.peak_memory import MMAP_THRESHOLD, in_fresh_process, step_peak_bytes
from bench.plotting import save_loglog_panels
from bench.report import (
    backend_label,
    environment,
    load_average_1min,
    markdown_table,
    output_stem,
    write_json,
)
from bench.timing import interleaved_medians_ms, median_ms

DEFAULT_DEPTHS = (16, 64, 256, 1024)
# CPU: eager backprop at L = 1024 keeps about 2.6 GiB of activations, and the whole run takes a few minutes on
# 2 cores (memory that a VM touches for the first time is slow, so a larger B mostly buys waiting).
# CUDA: the GPU configuration.
DEFAULT_SIZES = {"cpu": dict(batch=4096, dim=32, hidden=64), "cuda": dict(batch=4096, dim=256, hidden=512)}
CPU_TIMING_BUDGET_S, CPU_MAX_ROUNDS = 2.0, 25


def measure_peak_bytes(contender: str, sizes: Sizes, depth: int, device: torch.device, backend: Optional[str]) -> int:
    """`step_peak_bytes` in this process on CUDA; on the CPU in a fresh bench.peak_memory process, so that no
    earlier allocation is reused and the peak RSS is that of this configuration alone."""
    if device.type == "cuda":
        return step_peak_bytes(contender, sizes, depth, device, backend)
    args = ["bench.peak_memory", contender, str(depth), str(sizes.batch), str(sizes.dim), str(sizes.hidden)]
    return in_fresh_process(args + ([] if backend is None else [backend]), f"{contender} at L={depth}")["peak_bytes"]


def steps_ms(steps: dict, device: torch.device, min_rounds: int) -> dict:
    """Median time (ms) of each step in `steps` (name → step), after one warm-up step each.

    CUDA: bench.timing.median_ms (do_bench). CPU: bench.timing.interleaved_medians_ms, short steps
    getting more rounds (about CPU_TIMING_BUDGET_S of the slowest step, at most CPU_MAX_ROUNDS, at
    least `min_rounds`).
    """
    if device.type == "cuda":
        return {name: median_ms(step, device) for name, step in steps.items()}
    slowest_s = max(_seconds(step) for step in steps.values())  # each step's warm-up, timed
    rounds = max(min_rounds, min(CPU_MAX_ROUNDS, int(CPU_TIMING_BUDGET_S / slowest_s)))
    return interleaved_medians_ms(steps, warmup=0, reps=rounds)


def _seconds(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def torchdiffeq_check(sizes: Sizes, depth: int, device: torch.device, backend: Optional[str], rows=256) -> dict:
    """The torchdiffeq contender against the network it stands for, on the first `rows` inputs of the
    seeded problem: max |its x_L − ode_mlp(method="euler")'s|, and the relative errors ‖ĝ − g‖ / ‖g‖ of
    its gradients and of ode_mlp's adjoint gradients against exact backprop (eager_backprop), over the
    whole stack and for the worst layer."""
    x, y, W, V = problem_tensors(sizes, depth, device)
    x, y = x[:rows], y[:rows]

    def output_and_gradients(contender):
        out = CONTENDERS[contender](x, W, V, backend)
        return out.detach(), torch.autograd.grad(training_loss(out, y), (W, V))

    _, exact = output_and_gradients("eager_backprop")
    outputs, errors = {}, {}
    for name in ("torchdiffeq_adjoint", "odenets_adjoint"):
        outputs[name], approx = output_and_gradients(name)
        errors[name] = {}
        for param, a, e in zip("WV", approx, exact):
            per_layer = (a - e).flatten(1).norm(dim=1) / e.flatten(1).norm(dim=1)
            errors[name][param] = float((a - e).norm() / e.norm())
            errors[name][f"{param}_worst_layer"] = float(per_layer.max())
    diff = float((outputs["torchdiffeq_adjoint"] - outputs["odenets_adjoint"]).abs().max())
    return {"depth": depth, "rows": rows, "max_abs_diff_vs_ode_mlp": diff,
            "gradient_relative_error_vs_backprop": errors}


def goal_ratios(measured: dict, depths: list) -> dict:
    """The issue's goals and the time ratios, from measured[(contender, depth)] = {"peak_bytes", "median_ms"}."""

    def ratio(a, b, key):
        if a not in measured or b not in measured or measured[b][key] <= 0:
            return None
        return measured[a][key] / measured[b][key]

    low, high = min(depths), max(depths)
    adjoint = "odenets_adjoint"
    ratios = {
        f"adjoint_peak_L{high}_over_L{low}": ratio((adjoint, high), (adjoint, low), "peak_bytes"),
        f"eager_backprop_over_adjoint_peak_L{high}": ratio(("eager_backprop", high), (adjoint, high), "peak_bytes"),
        f"odenets_backprop_over_adjoint_peak_L{high}": ratio(("odenets_backprop", high), (adjoint, high), "peak_bytes"),
    }
    for other in ("eager_backprop", "checkpoint_sqrtL", "torchdiffeq_adjoint"):
        ratios[f"adjoint_time_over_{other}"] = {
            str(L): ratio((adjoint, L), (other, L), "median_ms") for L in depths if (other, L) in measured
        }
    return ratios


def _tables(measured: dict, contenders: list, depths: list) -> str:
    headers = ["contender"] + [f"L={L}" for L in depths]

    def rows(key, scale, fmt):
        return [[name] + [format(measured[(name, L)][key] / scale, fmt) for L in depths] for name in contenders]

    return "\n\n".join([
        "Peak memory of a training step (MiB, parameters and gradients excluded):",
        markdown_table(headers, rows("peak_bytes", 2**20, ".1f")),
        "Median time of a training step (ms):",
        markdown_table(headers, rows("median_ms", 1, ".1f")),
    ])  # fmt: skip


def _plot(path: Path, measured: dict, contenders: list, depths: list, title: str) -> None:
    def series(key, scale):
        return {name: (depths, [measured[(name, L)][key] / scale for L in depths]) for name in contenders}

    save_loglog_panels(path, [
        dict(title="peak memory of a step, parameters and gradients excluded (lower is better)", xlabel="depth L",
             ylabel="MiB above the step's start", series=series("peak_bytes", 2**20)),
        dict(title="time of a training step, median (lower is better)", xlabel="depth L", ylabel="ms",
             series=series("median_ms", 1)),
    ], title)  # fmt: skip


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)  # fmt: skip
    parser.add_argument("--depths", type=int, nargs="+", default=list(DEFAULT_DEPTHS))
    parser.add_argument("--batch", type=int, help="B (default: 4096)")
    parser.add_argument("--dim", type=int, help="state width q (default: 32 on the CPU, 256 on CUDA)")
    parser.add_argument("--hidden", type=int, help="hidden width m (default: 64 on the CPU, 512 on CUDA)")
    parser.add_argument("--contenders", nargs="+", choices=list(CONTENDERS), default=list(CONTENDERS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None, help="odenets_fast backend: reference, triton or cpp "
                        "(default: automatic)")  # fmt: skip
    parser.add_argument("--reps", type=int, default=3, help="least number of timed rounds on the CPU (median)")
    parser.add_argument("--out", default=None, help="output folder (default: bench/results)")
    return parser.parse_args(argv)


def main(argv=None, *, deadline=None) -> dict:
    """`deadline`: a Unix time after which no further depth starts (a GPU call's time limit; the
    depths measured keep their tables, plot and ratios)."""
    args = _parse(argv)
    device = torch.device(args.device)
    defaults = DEFAULT_SIZES[device.type]
    sizes = Sizes(*(getattr(args, k) or defaults[k] for k in ("batch", "dim", "hidden")))
    depths = sorted(args.depths)
    contenders, skipped = list(args.contenders), {}
    if "torchdiffeq_adjoint" in contenders and not torchdiffeq_installed():
        print(TORCHDIFFEQ_MISSING)
        contenders.remove("torchdiffeq_adjoint")
        skipped["torchdiffeq_adjoint"] = TORCHDIFFEQ_MISSING
    backend_name = backend_label(args.backend, device)
    env = environment(device)
    config = dict(sizes._asdict(), depths=depths, method="euler", activation="gelu", dtype="float32",
                  backend=backend_name, cpu_min_rounds=args.reps, mmap_threshold_bytes=MMAP_THRESHOLD)  # fmt: skip
    print(f"{env['device']} · torch {env['torch']} · odenets_fast backend {backend_name} · B={sizes.batch}, "
          f"q={sizes.dim}, m={sizes.hidden}, depths {depths}", flush=True)  # fmt: skip

    torchdiffeq_agreement = None
    if "torchdiffeq_adjoint" in contenders:
        torchdiffeq_agreement = torchdiffeq_check(sizes, depths[-1], device, args.backend)
        print(f"torchdiffeq Euler vs ode_mlp(method='euler') at L={depths[-1]}: max |x_L difference| = "
              f"{torchdiffeq_agreement['max_abs_diff_vs_ode_mlp']:.2e}; gradients against exact backprop:")  # fmt: skip
        for name, e in torchdiffeq_agreement["gradient_relative_error_vs_backprop"].items():
            print(f"  {name:<20} W {e['W']:.1e} (worst layer {e['W_worst_layer']:.1e}), "
                  f"V {e['V']:.1e} (worst layer {e['V_worst_layer']:.1e})")  # fmt: skip

    stem = output_stem("memory", device, args.out)
    results = {"config": config, "environment": env, "torchdiffeq": _torchdiffeq_version(),
               "torchdiffeq_check": torchdiffeq_agreement, "skipped": skipped, "complete": False, "ratios": {},
               "measurements": [], "load_average_1min_after_depth": {}}  # fmt: skip
    measured = {}
    for done, depth in enumerate(depths, 1):
        if deadline is not None and time.time() >= deadline:
            print(f"  L={depth}: not started, the time budget is spent", flush=True)
            depths = depths[: done - 1]
            break
        peaks = {name: measure_peak_bytes(name, sizes, depth, device, args.backend) for name in contenders}
        steps = {name: make_step(name, sizes, depth, device, args.backend)[0] for name in contenders}
        times = steps_ms(steps, device, args.reps)
        del steps
        for name in contenders:
            measured[(name, depth)] = {"peak_bytes": peaks[name], "median_ms": times[name]}
            peak_mib, ms = peaks[name] / 2**20, times[name]
            print(f"  L={depth:<5} {name:<25} peak {peak_mib:9.1f} MiB   step {ms:10.1f} ms", flush=True)
        # after every depth: a run cut off by a time limit (a GPU machine's) keeps the depths it measured
        ratios = goal_ratios(measured, depths[:done])
        results["load_average_1min_after_depth"][str(depth)] = load_average_1min()
        results.update(complete=done == len(depths), ratios=ratios,
                       measurements=[dict(contender=n, depth=L, **v) for (n, L), v in measured.items()])  # fmt: skip
        write_json(stem.with_suffix(".json"), results)
    if not depths:
        return results
    _plot(stem.with_suffix(".png"), measured, contenders, depths,
          f"{env['device']}, torch {env['torch']}, odenets_fast backend {backend_name}, B={sizes.batch}, "
          f"q={sizes.dim}, m={sizes.hidden}, torch threads: {torch.get_num_threads()}")  # fmt: skip
    print()
    print(_tables(measured, contenders, depths))
    print()
    print(json.dumps(ratios, indent=1))
    print(f"wrote {stem}.json and .png")
    return results


def _torchdiffeq_version() -> Optional[str]:
    if not torchdiffeq_installed():
        return None
    import torchdiffeq

    return torchdiffeq.__version__


if __name__ == "__main__":
    main()
