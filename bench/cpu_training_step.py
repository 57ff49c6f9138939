"""One CPU training step of ODEMLP, C++ backend against eager PyTorch and the reference backend (the
speed goals of the C++ issue: both ratios ≤ 0.5 at B = 256, q = 32, m = 64, L = 128, 2 threads).

A step is: zero the gradients, forward, mean-squared loss, backward. Contenders, on the same
parameters and data in one process, interleaved (each repetition times every contender once):
    eager_backprop        the plain autograd loop of bench.baselines (every activation stored)
    reference_adjoint     ODEMLP(backend="reference", backward="adjoint")
    cpp_adjoint           ODEMLP(backend="cpp", backward="adjoint")
    cpp_backprop          ODEMLP(backend="cpp", backward="backprop")
Ratios of medians: cpp_adjoint_step_vs_eager_backprop and cpp_adjoint_step_vs_reference.

    python -m bench.cpu_training_step [--reps N] [--warmup N] [--out DIR]

prints Markdown tables and writes DIR/training-step-cpu-<yyyymmdd>.json (default bench/results).
"""

import argparse

import torch

from bench.baselines import eager_forward
from bench.report import environment, markdown_table, output_stem, write_json
from bench.timing import interleaved_medians_ms
from odenets_fast import ODEMLP, available_backends

CONFIG = dict(B=256, q=32, m=64, L=128, method="euler", activation="gelu", dtype="float32", init="smooth", threads=2)


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


def run(reps: int, warmup: int) -> dict:
    if available_backends()["cpp"] != "available":
        raise SystemExit(f"cannot benchmark: {available_backends()['cpp']}")
    torch.set_num_threads(CONFIG["threads"])
    env = environment(torch.device("cpu"))  # before the run: its load average is that of the others
    medians = interleaved_medians_ms(make_contenders(CONFIG), warmup=warmup, reps=reps)
    return {
        "config": {**CONFIG, "reps": reps, "warmup": warmup},
        "environment": env,
        "median_ms": medians,
        "ratios": {
            "cpp_adjoint_step_vs_eager_backprop": medians["cpp_adjoint"] / medians["eager_backprop"],
            "cpp_adjoint_step_vs_reference": medians["cpp_adjoint"] / medians["reference_adjoint"],
        },
    }


def tables(result: dict) -> str:
    c = result["config"]
    return "\n\n".join([
        f"ODEMLP training step, B={c['B']}, q={c['q']}, m={c['m']}, L={c['L']}, {c['method']}, {c['activation']}, "
        f"{c['dtype']}, {c['threads']} threads, median of {c['reps']} interleaved runs",
        markdown_table(["contender", "median ms"], [[name, f"{ms:.2f}"] for name, ms in result["median_ms"].items()]),
        markdown_table(["ratio", "value"], [[name, f"{value:.2f}"] for name, value in result["ratios"].items()]),
    ])  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions of every contender")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions first")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    result = run(args.reps, args.warmup)
    print(tables(result))
    stem = output_stem("training-step", torch.device("cpu"), args.out)
    write_json(stem.with_suffix(".json"), result)
    print(f"\nwrote {stem}.json")
    return result


if __name__ == "__main__":
    main()
