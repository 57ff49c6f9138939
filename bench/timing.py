"""Median wall times: Triton's do_bench (CUDA events, L2 flushed) on the GPU, perf_counter rounds on
the CPU. Always after warm-up; callers time contenders side by side in one process on the same data
and report ratios."""

import statistics
import time

import torch


def median_ms(fn, device: torch.device, *, warmup: int = 3, reps: int = 10) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))
    return interleaved_medians_ms({"fn": fn}, warmup=warmup, reps=reps)["fn"]


def interleaved_medians_ms(fns: dict, *, warmup: int, reps: int) -> dict:
    """Median wall time (ms) of each callable of `fns` (name → callable) on the CPU. They take turns,
    one call each per round, so that bursts of load from other processes fall on all of them alike;
    `warmup` untimed rounds first."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    seconds = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(s) for name, s in seconds.items()}
