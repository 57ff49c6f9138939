"""One CPU training step of ODEMLP, C++ backend against eager PyTorch and the reference backend (the
speed goals of the C++ issue: both ratios ≤ 0.5 at B = 256, q = 32, m = 64, L = 128, 2 threads).

A step is: zero the gradients, forward, mean-squared loss, backward. Contenders, on the same
parameters and data in one process, interleaved (each repetition times every contender once):
    eager_backprop        the plain autograd loop of bench.baselines (every activation stored)
    reference_adjoint     ODEMLP(backend="reference", backward="adjoint")
    cpp_adjoint           ODEMLP(backend="cpp", backward="adjoint")
    cpp_backprop          ODEMLP(backend="cpp", backward="backprop")
Ratios of medians: cpp_adjoint_step_vs_eager_backprop and cpp_adjoint_step_vs_reference.

    python -m bench.cpu_training_step [--reps N] [--out DIR]

prints a Markdown table and writes DIR/cpu-<yyyymmdd>-training-step.json (default bench/results).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from bench.baselines import eager_forward
from bench.report import git_commit, git_dirty, load_average_1min
from odenets_fast import ODEMLP, available_backends

CONFIG = dict(B=256, q=32, m=64, L=128, method="euler", activation="gelu", dtype="float32", init="smooth", threads=2)
ROOT = Path(__file__).resolve().parents[1]


def make_contenders(config: dict) -> dict:
    """name → a callable running one training step; every contender holds the same parameters."""
    torch.manual_seed(0)
    dtype = getattr(torch, config["dtype"])
    kwargs = dict(method=config["method"], activation=config["activation"], init=config["init"], dtype=dtype)
    template = ODEMLP(config["q"], config["m"], config["L"], **kwargs)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(config["B"], config["q"], generator=gen, dtype=dtype)
    target = torch.randn(config["B"], config["q"], generator=gen, dtype=dtype)

    def module_step(backend: str, backward: str):
        model = ODEMLP(config["q"], config["m"], config["L"], backend=backend, backward=backward, **kwargs)
        model.load_state_dict(template.state_dict())

        def step():
            model.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x), target).backward()

        return step

    W, V = (p.detach().clone().requires_grad_(True) for p in (template.W, template.V))

    def eager_step():
        W.grad = V.grad = None
        out = eager_forward(x, W, V, method=config["method"], activation=config["activation"])
        torch.nn.functional.mse_loss(out, target).backward()

    return {
        "eager_backprop": eager_step,
        "reference_adjoint": module_step("reference", "adjoint"),
        "cpp_adjoint": module_step("cpp", "adjoint"),
        "cpp_backprop": module_step("cpp", "backprop"),
    }


def interleaved_medians_ms(contenders: dict, *, warmup: int, reps: int) -> dict:
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times = {name: [] for name in contenders}
    for _ in range(reps):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(samples) for name, samples in times.items()}


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_1min_before": load_average_1min(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def run(reps: int, warmup: int) -> dict:
    if available_backends()["cpp"] != "available":
        raise SystemExit(f"cannot benchmark: {available_backends()['cpp']}")
    torch.set_num_threads(CONFIG["threads"])
    machine = machine_info()
    medians = interleaved_medians_ms(make_contenders(CONFIG), warmup=warmup, reps=reps)
    return {
        "benchmark": "cpu_training_step",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "config": {**CONFIG, "reps": reps, "warmup": warmup},
        "machine": machine,
        "median_ms": medians,
        "ratios": {
            "cpp_adjoint_step_vs_eager_backprop": medians["cpp_adjoint"] / medians["eager_backprop"],
            "cpp_adjoint_step_vs_reference": medians["cpp_adjoint"] / medians["reference_adjoint"],
        },
    }


def markdown_table(result: dict) -> str:
    c, t = result["config"], result["median_ms"]
    lines = [
        f"ODEMLP training step, B={c['B']}, q={c['q']}, m={c['m']}, L={c['L']}, {c['method']}, {c['activation']}, "
        f"{c['dtype']}, {c['threads']} threads, median of {c['reps']} interleaved runs",
        "",
        "| contender | median ms |",
        "| --- | --- |",
        *(f"| {name} | {ms:.2f} |" for name, ms in t.items()),
        "",
        "| ratio | value |",
        "| --- | --- |",
        *(f"| {name} | {value:.2f} |" for name, value in result["ratios"].items()),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions of every contender")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions first")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder for the JSON")
    args = parser.parse_args()
    result = run(args.reps, args.warmup)
    print(markdown_table(result))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cpu-{datetime.date.today():%Y%m%d}-training-step.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {path}")
