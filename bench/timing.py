"""Median wall time of a callable: Triton's do_bench (CUDA events, L2 flushed) on the GPU, a
perf_counter loop on the CPU. Always after warm-up; callers time contenders side by side in one
process on the same data and report ratios."""

import statistics
import time

import torch

# A Unix time after which the GPU tests and the micro-benchmarks skip instead of starting
# (bench/deadline_plugin.py); bench.gpu_suite sets it from a device call's time limit.
DEADLINE_ENV = "ODENETS_FAST_DEADLINE"
DEADLINE_SKIP_REASON = f"not started: the run's time budget is spent ({DEADLINE_ENV})"


def median_ms(fn, device: torch.device, *, warmup: int = 3, reps: int = 10) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)
