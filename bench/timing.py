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


def wall_median_ms(fn, device: torch.device, *, warmup: int = 3, reps: int = 30) -> float:
    """Median wall time (ms) of `fn` run alone and waited for (synchronised on CUDA): the host's overhead
    counted whole, no cache flush. Recorded beside do_bench's time, whose L2 flush before each call runs
    on the GPU while the host prepares the call, so that up to the flush's length (about 0.1 ms on an
    H100) of a call's host time goes unseen — most of it for a call of a few launches, little of it for
    eager PyTorch's hundreds."""

    def wait():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    wait()
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        wait()
        seconds.append(time.perf_counter() - start)
    return 1e3 * statistics.median(seconds)


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
