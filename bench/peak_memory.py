"""Peak memory of one training step of a contender (bench/contenders.py), measured in this process:

    CUDA  torch.cuda.max_memory_allocated() after a reset, minus memory_allocated() before the step;
    CPU   peak RSS (VmHWM, reset through /proc/self/clear_refs) minus the RSS before the step: run each
          configuration in a fresh process started with MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD, so that glibc
          serves every block ≥ 64 KiB by mmap and freed memory leaves RSS at once instead of hiding the next
          allocation (bench.memory does this).

Either way the parameter gradients are subtracted: they exist in any training, whatever the method.

    python -m bench.peak_memory CONTENDER DEPTH BATCH DIM HIDDEN [BACKEND]   (prints {"peak_bytes": N})
"""

import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from bench.contenders import Sizes, make_step
from bench.report import ROOT

MMAP_THRESHOLD = 64 * 1024  # bytes


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field}: peak RSS cannot be measured on this system")


def _start_peak(device: torch.device) -> int:
    """Reset the peak-memory counter; return the memory in use, which the peak is measured from."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    baseline = _proc_status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS
    return baseline


def _read_peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_bytes("VmHWM")


def peak_bytes(fn, device: torch.device) -> int:
    """Peak memory while `fn()` runs, above the memory in use before it (CPU: run in a fresh process
    started with MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD)."""
    baseline = _start_peak(device)
    fn()
    return _read_peak(device) - baseline


def fresh_process_json(module_args: list, what: str) -> dict:
    """The JSON object a CPU memory worker, `python -m <module_args>`, prints last — run in a fresh process
    started with MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD (module docstring); `what` names it in the error."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    proc = subprocess.run([sys.executable, "-m", *module_args], capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def step_peak_bytes(contender: str, sizes: Sizes, depth: int, device: torch.device, backend: Optional[str]) -> int:
    """Peak memory of one training step above the memory in use before it, parameter gradients excluded."""
    # A depth-2 step first: the libraries' first-use allocations (thread pools, kernels, cuBLAS
    # workspaces) belong to no depth.
    make_step(contender, sizes, min(depth, 2), device, backend)[0]()
    step, gradient_bytes = make_step(contender, sizes, depth, device, backend)
    return peak_bytes(step, device) - gradient_bytes


if __name__ == "__main__":
    contender, depth, batch, dim, hidden, *backend = sys.argv[1:]
    sizes = Sizes(int(batch), int(dim), int(hidden))
    peak = step_peak_bytes(contender, sizes, int(depth), torch.device("cpu"), backend[0] if backend else None)
    print(json.dumps({"peak_bytes": peak}))
