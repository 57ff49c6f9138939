"""The Triton backend's two paths against eager PyTorch on the GPU (the speed goals of the GPU issues).

For each configuration, on the same data in one process, under the configuration's float32 matmul
precision (eager and ode_mlp's default alike):
    eager_forward          the plain loop (bench.baselines: written for speed), no autograd
    eager_backprop_step    the plain loop forward + backward (every activation stored)
    layered_*              the layered path (cuBLAS products, Triton epilogues): forward, adjoint and
                           backprop steps
    fused_forward          the fused whole-depth kernels: ode_mlp forward (adjoint mode: nothing stored)
    fused_adjoint_step     forward + adjoint backward
    fused_backprop_step    forward + backprop-mode backward
    per_layer_*            the fused forward and adjoint step again with one launch per layer
    *_graphed              (CUDA) adjoint steps captured once in a CUDA graph and replayed: no launch
                           overhead per layer
    fused_adjoint_step_{partials,workspace,atomic}
                           the adjoint step with each weight-gradient reduction (the backend picks
                           between the first two by bytes moved: triton_backend.weight_grad_reduction)
    (float32 IEEE only) the two fused steps again with TF32 products, the adjoint step with TF32x3
Ratios: X_vs_Y = median(X) / median(Y) (do_bench on a GPU; `wall_ratios` the same of synchronised wall
times, `wall_ms`, which count the host's overhead whole), e.g. layered_adjoint_step_vs_eager_backprop and
whole_depth_forward_vs_eager_forward (= fused_forward / eager_forward); on CUDA,
forward_fraction_of_roofline and layered_forward_fraction_of_roofline = roofline floor / forward time
(forward_roofline_ms). The goal ratios of bfloat16 and TF32 configurations are also recorded with the
suffix the issues give them (_bf16, _tf32). Each result carries `predicted`: odenets_fast.plan's
predicted times for the same configuration, beside the measured ones.

Modes: bench (every configuration and contender), goals (GOAL_CONFIGS, each with only the contenders
of its goal paths: the first thing a short GPU run measures; GOALS names each goal, its configuration
and its limit), crossover (whole-depth against per-layer launches over
q ∈ {64, 128, 256}, m = 2q, L ∈ {4, 16, 64}), tune (the tile candidates of TUNE_CANDIDATES for each
fused kernel at the benchmark shapes, for the tile table of mlp_step.kernel_configs).

    python -m bench.triton_step [--dry-run] [--mode bench|goals|crossover|tune]   (--dry-run: tiny, on the interpreter)
"""

import argparse
import contextlib
import functools
import json
import os
import time

import torch
import triton

from bench.baselines import eager_forward
from bench.timing import median_ms, wall_median_ms
from odenets_fast import ode_mlp, plan
from odenets_fast.planner import PATH_ENV
from odenets_fast.triton_layered import tf32_context
from odenets_fast.triton_backend import (
    LAYERS_PER_LAUNCH_ENV,
    PRODUCT_TILES_ENV,
    TILES_ENV,
    WEIGHT_GRADS_ENV,
    kernel_configs,
    product_config,
)

# "precision": PyTorch's float32 matmul setting for the whole configuration — eager and ode_mlp's default
# (input_precision=None) alike — "ieee" (torch's default) or "tf32". The goal configurations come first:
# a time-limited run measures them before the others.
# "goal_paths": the Triton paths whose goals a configuration carries (goals mode times only those).
GOAL_CONFIGS = [
    dict(name="wide-float32", B=4096, q=256, m=512, L=64, dtype="float32", goal_paths=["layered"]),  # part 1
    dict(name="wide-bfloat16", B=4096, q=256, m=512, L=64, dtype="bfloat16", goal_paths=["layered"]),  # part 1
    dict(name="narrow-bfloat16-L256", B=16384, q=64, m=128, L=256, dtype="bfloat16", goal_paths=["fused"]),  # 2
    dict(name="narrow-tf32-L256", B=16384, q=64, m=128, L=256, dtype="float32", precision="tf32",
         goal_paths=["fused"]),  # part 2
]
# The issues' goals: (ratio key, configuration, at most), None where a ratio is only to be reported.
GOALS = [
    ("layered_adjoint_step_vs_eager_backprop", "wide-float32", 1.3),
    ("layered_forward_fraction_of_roofline", "wide-float32", None),
    ("layered_adjoint_step_vs_eager_backprop_bf16", "wide-bfloat16", 1.0),
    ("layered_forward_fraction_of_roofline_bf16", "wide-bfloat16", None),
    ("whole_depth_forward_vs_eager_forward_bf16", "narrow-bfloat16-L256", 0.2),
    ("whole_depth_adjoint_step_vs_eager_backprop_bf16", "narrow-bfloat16-L256", 0.33),
    ("forward_fraction_of_roofline_bf16", "narrow-bfloat16-L256", None),
    ("whole_depth_forward_vs_eager_forward_tf32", "narrow-tf32-L256", 0.2),
    ("whole_depth_adjoint_step_vs_eager_backprop_tf32", "narrow-tf32-L256", 0.33),
    ("forward_fraction_of_roofline_tf32", "narrow-tf32-L256", None),
]
CONFIGS = GOAL_CONFIGS + [
    dict(name="narrow-float32", B=16384, q=64, m=128, L=64, dtype="float32"),
    dict(name="narrow-float32-L256", B=16384, q=64, m=128, L=256, dtype="float32"),
]
DRY_RUN_CONFIGS = [dict(name="dry-run-float32", B=40, q=24, m=40, L=3, dtype="float32", goal_paths=["layered", "fused"])]
CROSSOVER_CONFIGS = [dict(name=f"crossover-q{q}-L{L}", B=4096, q=q, m=2 * q, L=L, dtype="float32")
                     for q in (64, 128, 256) for L in (4, 16, 64)]  # fmt: skip
DRY_RUN_CROSSOVER_CONFIGS = [dict(name="dry-run-crossover", B=40, q=24, m=40, L=2, dtype="float32")]
CROSSOVER_CONTENDERS = ("fused_forward", "per_layer_forward", "fused_adjoint_step", "per_layer_adjoint_step",
                        "fused_adjoint_step_graphed", "per_layer_adjoint_step_graphed")

# Tile candidates "BLOCK_B,BLOCK_M,num_warps" per (padded q, operand bytes) and kernel for the tune
# mode: the table's choice first (mlp_step.kernel_configs), then the tiles used before the
# register-spill analysis, then neighbours with small spills in ptxas's report (`python
# tests/triton_aot.py --tune` compiles every candidate as this mode launches it; all within 0–560 bytes
# of stack a thread under triton 3.6 and 3.9, bench/results/triton-aot-tune-sm90-triton3.6-20261203.txt).
# For 16-bit operands at q = 256, (64, 16, 8) is the forward tile whose products compile to Hopper's
# wgmma: the table's 32- and 16-row tiles compile to the older mma, since wgmma needs 64 rows per
# warpgroup, but 64 rows leave only 64 programs at B = 4096 for 132 SMs. The same reverse tile is gone:
# it holds four (64, 256) float32 blocks and spills 0.9 KiB a thread (Euler) and 1.9 KiB (Heun) under
# both releases. At q = 64 (the narrow goal shape) the table's 64-row tiles put the products on wgmma;
# (32, 16, 8) is mma but spill-free in Heun's anchored reverse, which spills at every 64-row tile
# (tests/triton_aot.py). The (64, 64, 4) tiles of earlier tables are gone: as the JIT compiles them,
# 32 registers and 9–13 KB of stack a thread. Each is timed through
# ODENETS_FAST_TRITON_{FORWARD,REVERSE}_TILES, with the table's num_stages. "product": tiles
# "BLOCK_R,BLOCK_C,BLOCK_K,num_warps,num_stages" of the workspace products (mlp_step.product_config
# first), timed through ODENETS_FAST_TRITON_PRODUCT_TILES in an adjoint step that uses the workspace.
_PRODUCT_CANDIDATES = {4: [(64, 64, 32, 4, 3), (32, 32, 32, 4, 3), (64, 64, 16, 4, 3), (128, 64, 32, 8, 3)],
                       2: [(64, 64, 64, 4, 3), (32, 32, 64, 4, 3), (128, 64, 64, 8, 3), (64, 64, 32, 4, 4)]}  # fmt: skip
TUNE_CANDIDATES = {
    (64, 2): {"forward": [(64, 64, 8), (64, 32, 8), (128, 32, 8), (64, 64, 4)],
              "reverse": [(64, 16, 8), (64, 32, 8), (128, 16, 8), (32, 16, 8)],
              "product": _PRODUCT_CANDIDATES[2]},
    (64, 4): {"forward": [(64, 32, 8), (64, 64, 8), (32, 32, 8), (64, 16, 8), (128, 32, 8)],
              "reverse": [(64, 16, 8), (32, 16, 8), (16, 16, 8), (64, 32, 8)],
              "product": _PRODUCT_CANDIDATES[4]},
    (256, 4): {"forward": [(32, 16, 8), (32, 32, 8), (16, 16, 8), (16, 16, 16)],
               "reverse": [(16, 16, 8), (32, 32, 8), (32, 16, 8), (16, 16, 16)],
               "product": _PRODUCT_CANDIDATES[4]},
    (256, 2): {"forward": [(32, 16, 8), (32, 32, 8), (16, 16, 8), (64, 16, 8)],
               "reverse": [(16, 16, 8), (32, 32, 8), (32, 16, 8), (16, 32, 8)],
               "product": _PRODUCT_CANDIDATES[2]},
}  # fmt: skip
TUNE_CONFIGS = GOAL_CONFIGS  # the goal shapes: wide float32 and bfloat16, narrow bfloat16 and TF32
DRY_RUN_TUNE_CONFIGS = [dict(name="dry-run-tune", B=40, q=24, m=40, L=2, dtype="float32")]
DRY_RUN_TUNE_CANDIDATES = {"forward": [(16, 32, 1), (32, 16, 1)], "reverse": [(16, 32, 1), (16, 16, 1)],
                           "product": [(16, 32, 16, 1, 1), (32, 16, 32, 1, 1)]}  # fmt: skip

# ratio name: (numerator, denominator) median times; recorded when both were timed
RATIOS = {
    "forward_vs_eager_forward": ("fused_forward", "eager_forward"),
    "adjoint_step_vs_eager_backprop": ("fused_adjoint_step", "eager_backprop_step"),
    "backprop_step_vs_eager_backprop": ("fused_backprop_step", "eager_backprop_step"),
    "whole_depth_forward_vs_eager_forward": ("fused_forward", "eager_forward"),
    "whole_depth_adjoint_step_vs_eager_backprop": ("fused_adjoint_step", "eager_backprop_step"),
    "per_layer_forward_vs_eager_forward": ("per_layer_forward", "eager_forward"),
    "per_layer_adjoint_step_vs_eager_backprop": ("per_layer_adjoint_step", "eager_backprop_step"),
    # TF32 against eager in TF32; tf32x3 (about float32's accuracy) against eager in full float32
    "adjoint_step_tf32_vs_eager_backprop_tf32": ("fused_adjoint_step_tf32", "eager_backprop_step_tf32"),
    "adjoint_step_tf32x3_vs_eager_backprop": ("fused_adjoint_step_tf32x3", "eager_backprop_step"),
    "layered_forward_vs_eager_forward": ("layered_forward", "eager_forward"),
    "layered_adjoint_step_vs_eager_backprop": ("layered_adjoint_step", "eager_backprop_step"),
    "layered_backprop_step_vs_eager_backprop": ("layered_backprop_step", "eager_backprop_step"),
    "layered_graphed_vs_layered": ("layered_adjoint_step_graphed", "layered_adjoint_step"),
    "weight_grads_workspace_vs_partials": ("fused_adjoint_step_workspace", "fused_adjoint_step_partials"),
    "weight_grads_atomic_vs_partials": ("fused_adjoint_step_atomic", "fused_adjoint_step_partials"),
    "per_layer_graphed_vs_per_layer": ("per_layer_adjoint_step_graphed", "per_layer_adjoint_step"),
    "whole_depth_graphed_vs_per_layer_graphed": ("fused_adjoint_step_graphed", "per_layer_adjoint_step_graphed"),
    "whole_depth_forward_vs_per_layer": ("fused_forward", "per_layer_forward"),
    "whole_depth_adjoint_step_vs_per_layer": ("fused_adjoint_step", "per_layer_adjoint_step"),
}


def _problem(config: dict, device: torch.device) -> tuple:
    """Seeded x, W, V (requiring grad) and an output cotangent of the configuration."""
    B, q, m, L = config["B"], config["q"], config["m"], config["L"]
    dtype = getattr(torch, config["dtype"])
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, q, generator=gen).to(device, dtype)
    W = torch.randn(L, m, q, generator=gen).to(device, dtype).requires_grad_(True)
    V = (0.5 * torch.randn(L, q, m, generator=gen)).to(device, dtype).requires_grad_(True)
    grad_out = torch.randn(B, q, generator=gen).to(device, dtype)
    return x, W, V, grad_out


def goal_configs(dry_run: bool) -> list:
    return DRY_RUN_CONFIGS if dry_run else GOAL_CONFIGS


def goal_contenders(config: dict) -> tuple:
    """The contenders a configuration's goal ratios need (`make gpu-quick` times only these): eager, and
    the forward and adjoint step of each of its goal paths — no kernel compiles for a path without a goal."""
    paths = config.get("goal_paths", ("layered", "fused"))
    return ("eager_forward", "eager_backprop_step") + tuple(f"{p}_{kind}" for p in paths for kind in ("forward", "adjoint_step"))


def goal_outcomes(results: list) -> list:
    """Each goal of GOALS with the measured value from `results` (goals mode), its limit and whether it is met."""
    by_name = {r["name"]: r for r in results}
    outcomes = []
    for ratio, config, limit in GOALS:
        result = by_name.get(config, {})
        value = result.get("ratios", {}).get(ratio)
        met = None if value is None or limit is None else value <= limit
        outcomes.append({"ratio": ratio, "config": config, "value": value, "wall_value": result.get("wall_ratios", {}).get(ratio),
                         "at_most": limit, "met": met})  # fmt: skip
    return outcomes


GOAL_RATIOS = ("layered_forward_vs_eager_forward", "layered_adjoint_step_vs_eager_backprop",
               "whole_depth_forward_vs_eager_forward", "whole_depth_adjoint_step_vs_eager_backprop",
               "forward_fraction_of_roofline", "layered_forward_fraction_of_roofline")  # fmt: skip


def goal_suffix(config: dict) -> str:
    """The suffix of a configuration's goal ratios in the issues: "_bf16", "_tf32" or none (float32 IEEE)."""
    if config["dtype"] == "bfloat16":
        return "_bf16"
    return "_tf32" if config.get("precision") == "tf32" else ""


def predicted_ms(config: dict, device: torch.device) -> dict:
    """odenets_fast.plan's predictions for the contenders it models (H100 figures off a GPU)."""
    result = plan(config["B"], config["q"], config["m"], config["L"], dtype=getattr(torch, config["dtype"]),
                  input_precision=config.get("precision", "ieee"), device=device if device.type == "cuda" else "H100")  # fmt: skip
    names = {"layered": "layered", "fused": "fused", "eager": "eager"}
    times = {}
    for path, est in result.estimates.items():
        times[f"{names[path]}_forward"] = est.forward_ms
        times[f"{names[path]}_{'backprop' if path == 'eager' else 'adjoint'}_step"] = est.step_ms
    return {"device": result.device, "path": result.path, "median_ms": times}


def run_config(config: dict, device: torch.device, only=None) -> dict:
    """Median times of the contenders (`only`: a subset of their names) and the ratios among them, under
    the configuration's float32 matmul precision; with the planner's predictions beside them."""
    with tf32_context(config.get("precision", "ieee"), device):
        result = _run_config(config, device, only)
    try:  # the measured times stand whatever the model does
        result["predicted"] = predicted_ms(config, device)
    except Exception as err:  # noqa: BLE001 — recorded beside the measurements
        result["predicted"] = {"error": f"{type(err).__name__}: {err}"[:300]}
    suffix = goal_suffix(config)
    if suffix:  # the names the issues give these ratios for this precision
        for key in ("ratios", "wall_ratios"):
            result[key].update({name + suffix: result[key][name] for name in GOAL_RATIOS if name in result[key]})
    return result


def _run_config(config: dict, device: torch.device, only) -> dict:
    dtype = getattr(torch, config["dtype"])
    x, W, V, grad_out = _problem(config, device)

    def step(forward, **env):
        """forward + backward, with the backend's environment knobs `env` set for both."""

        def run():
            with _environment(env):
                torch.autograd.grad(forward(), (W, V), grad_out)

        return run

    def forward_only(forward, **env):
        def run():
            with _environment(env), torch.no_grad():
                forward()

        return run

    def triton(backward, precision=None, deterministic=True):
        return lambda: ode_mlp(x, W, V, backward=backward, backend="triton", input_precision=precision,
                               deterministic=deterministic)  # fmt: skip

    def under_tf32(run):
        def tf32_run():
            with tf32_context("tf32", device):
                run()

        return tf32_run

    fused = {PATH_ENV: "fused"}
    layered = {PATH_ENV: "layered"}
    per_layer = {**fused, LAYERS_PER_LAUNCH_ENV: 1}
    contenders = {
        "eager_forward": forward_only(lambda: eager_forward(x, W, V)),
        "eager_backprop_step": step(lambda: eager_forward(x, W, V)),
        "layered_forward": forward_only(triton("adjoint"), **layered),
        "layered_adjoint_step": step(triton("adjoint"), **layered),
        "layered_backprop_step": step(triton("backprop"), **layered),
        "fused_forward": forward_only(triton("adjoint"), **fused),
        "fused_adjoint_step": step(triton("adjoint"), **fused),
        "fused_backprop_step": step(triton("backprop"), **fused),
        "per_layer_forward": forward_only(triton("adjoint"), **per_layer),
        "per_layer_adjoint_step": step(triton("adjoint"), **per_layer),
        "fused_adjoint_step_partials": step(triton("adjoint"), **fused, **{WEIGHT_GRADS_ENV: "partials"}),
        "fused_adjoint_step_workspace": step(triton("adjoint"), **fused, **{WEIGHT_GRADS_ENV: "workspace"}),
        "fused_adjoint_step_atomic": step(triton("adjoint", deterministic=False), **fused),
    }
    if device.type == "cuda":
        contenders["fused_adjoint_step_graphed"] = _graphed(contenders["fused_adjoint_step"], device)
        contenders["per_layer_adjoint_step_graphed"] = _graphed(contenders["per_layer_adjoint_step"], device)
        contenders["layered_adjoint_step_graphed"] = _graphed(contenders["layered_adjoint_step"], device)
    if dtype == torch.float32 and config.get("precision", "ieee") == "ieee":
        contenders["fused_adjoint_step_tf32"] = step(triton("adjoint", "tf32"), **fused)
        contenders["eager_backprop_step_tf32"] = under_tf32(step(lambda: eager_forward(x, W, V)))
        contenders["fused_backprop_step_tf32"] = step(triton("backprop", "tf32"), **fused)
        contenders["fused_adjoint_step_tf32x3"] = step(triton("adjoint", "tf32x3"), **fused)
    if only is not None:
        contenders = {name: contenders[name] for name in only if name in contenders}
    measures = {name: functools.partial(median_ms, fn, device) for name, fn in contenders.items()}
    if device.type == "cuda" and {"fused_forward", "layered_forward"} & set(contenders):
        measures["forward_roofline_floor"] = functools.partial(forward_roofline_ms, config, device)
    # A contender that fails (a precision that does not compile, out of memory) is recorded with its
    # error; the others keep their times and ratios.
    times, walls, errors = {}, {}, {}
    for name, measure in measures.items():
        try:
            times[name] = measure()
            if name in contenders:  # (on the CPU's interpreter once: the plumbing, not a measurement)
                walls[name] = wall_median_ms(contenders[name], device, **({} if device.type == "cuda" else dict(warmup=0, reps=1)))
        except Exception as err:  # noqa: BLE001
            errors[name] = f"{type(err).__name__}: {err}"[:300]
    ratios = {name: times[num] / times[den] for name, (num, den) in RATIOS.items() if num in times and den in times}
    wall_ratios = {name: walls[num] / walls[den] for name, (num, den) in RATIOS.items() if num in walls and den in walls}
    for path, ratio in (("fused", "forward_fraction_of_roofline"), ("layered", "layered_forward_fraction_of_roofline")):
        if "forward_roofline_floor" in times and f"{path}_forward" in times:
            ratios[ratio] = times["forward_roofline_floor"] / times[f"{path}_forward"]
    return {"name": config["name"], "config": config, "median_ms": times, "ratios": ratios, "wall_ms": walls,
            "wall_ratios": wall_ratios, "errors": errors}


def tune_config(config: dict, device: torch.device, candidates: dict) -> dict:
    """Median ms of the fused whole-depth forward for each forward tile candidate, of the adjoint
    training step for each reverse candidate, and of the adjoint step with the workspace reduction for
    each product candidate (the other kernels at the table's tiles), in the configuration's precision."""
    with tf32_context(config.get("precision", "ieee"), device), environment_variable(PATH_ENV, "fused"):
        return _tune_config(config, device, candidates)


def _tune_config(config: dict, device: torch.device, candidates: dict) -> dict:
    x, W, V, grad_out = _problem(config, device)

    def forward():
        with torch.no_grad():
            ode_mlp(x, W, V, backward="adjoint", backend="triton")

    def adjoint_step():
        torch.autograd.grad(ode_mlp(x, W, V, backward="adjoint", backend="triton"), (W, V), grad_out)

    def workspace_step():
        with environment_variable(WEIGHT_GRADS_ENV, "workspace"):
            adjoint_step()

    itemsize = torch.empty(0, dtype=getattr(torch, config["dtype"])).element_size()
    default = kernel_configs(config["q"], config["m"], itemsize)
    tables = {kind: (c.block_b, c.block_m, c.num_warps, c.num_stages) for kind, c in zip(default._fields, default)}
    tables["product"] = tuple(product_config(itemsize))
    tiles_ms, best = {}, {}
    kernels = (("forward", forward, TILES_ENV.forward), ("reverse", adjoint_step, TILES_ENV.reverse),
               ("product", workspace_step, PRODUCT_TILES_ENV))  # fmt: skip
    for kind, fn, env in kernels:
        tiles_ms[kind] = {}
        for tiles in candidates[kind]:
            full = tiles if kind == "product" else (*tiles, tables[kind][-1])  # the table's num_stages
            value = ",".join(str(v) for v in full)
            with environment_variable(env, value):
                try:
                    tiles_ms[kind][value] = median_ms(fn, device)
                except Exception as err:  # noqa: BLE001 — e.g. out of shared memory: recorded, not fatal
                    tiles_ms[kind][value] = f"{type(err).__name__}: {err}"[:300]
        timed = {tiles: ms for tiles, ms in tiles_ms[kind].items() if isinstance(ms, float)}
        best[kind] = min(timed, key=timed.get) if timed else None
    return {"name": config["name"], "config": config, "tiles_ms": tiles_ms, "best": best,
            "table": {kind: ",".join(str(v) for v in table) for kind, table in tables.items()}}


def tune_candidates(config: dict, dry_run: bool) -> dict:
    """The tile candidates the tune mode times for `config` (TUNE_CANDIDATES by padded q and operand bytes)."""
    if dry_run:
        return DRY_RUN_TUNE_CANDIDATES
    itemsize = torch.empty(0, dtype=getattr(torch, config["dtype"])).element_size()
    return TUNE_CANDIDATES[max(64, triton.next_power_of_2(config["q"])), itemsize]


@contextlib.contextmanager
def environment_variable(name: str, value):
    """Run with the environment variable `name` set to `value` (None: unset)."""
    saved = os.environ.pop(name, None)
    if value is not None:
        os.environ[name] = str(value)
    try:
        yield
    finally:
        os.environ.pop(name, None)
        if saved is not None:
            os.environ[name] = saved


def _graphed(fn, device: torch.device):
    """`fn` captured in a CUDA graph on its first call (after warm-up on a side stream, as
    torch.cuda.graph asks), replayed on every call: the time of the kernels without the host's
    launch overhead. The backend makes no host synchronisation, so a training step captures whole."""
    graph = None

    def run():
        nonlocal graph
        if graph is None:
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
        graph.replay()

    return run


def _environment(settings: dict):
    """Run with each environment variable of `settings` set (ODENETS_FAST_TRITON_* knobs are read
    when the kernels launch, so a training step keeps them through its backward)."""
    stack = contextlib.ExitStack()
    for name, value in settings.items():
        stack.enter_context(environment_variable(name, value))
    return stack


def forward_roofline_ms(config: dict, device: torch.device) -> float:
    """max(FLOPs / peak rate, bytes / bandwidth) of the forward (the same floor for both paths), rates
    measured here: an 8192³ matrix product in the config's dtype and precision and a 1 GiB device copy.
    Bytes: the weights once per wave of programs (resident programs share them through L2), plus
    the input read and the output written."""
    B, q, m, L = config["B"], config["q"], config["m"], config["L"]
    dtype = getattr(torch, config["dtype"])
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    with tf32_context(config.get("precision", "ieee"), device):
        flops_per_ms = 2 * 8192**3 / median_ms(lambda: a @ a, device)
    buffer = torch.empty(2**28, device=device)
    bytes_per_ms = 2 * buffer.numel() * 4 / median_ms(lambda: buffer.clone(), device)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    programs = -(-B // kernel_configs(q, m, itemsize).forward.block_b)
    waves = -(-programs // torch.cuda.get_device_properties(device).multi_processor_count)
    flops = L * 2 * (2 * B * q * m)
    moved = waves * L * 2 * m * q * itemsize + 2 * B * q * itemsize
    return max(flops / flops_per_ms, moved / bytes_per_ms)


MODES = ("bench", "goals", "crossover", "tune")


def cuda_usable() -> bool:
    """Whether the CUDA context still works: an illegal memory access is sticky, every later CUDA
    call in the process fails with it, so later configurations could only record that error again."""
    try:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return True
    except RuntimeError:
        return False


def run_all(dry_run: bool = False, mode: str = "bench", on_result=None, deadline=None) -> list:
    """Every configuration of `mode` in turn; one that fails is recorded with its error and the others
    still run (a GPU session has little device time), unless the error left the CUDA context unusable.
    No configuration starts after `deadline` (a Unix time). `on_result(results_so_far)` after each one."""
    device = torch.device("cpu" if dry_run else "cuda")
    if mode == "tune":
        configs = DRY_RUN_TUNE_CONFIGS if dry_run else TUNE_CONFIGS
    elif mode == "crossover":
        configs = DRY_RUN_CROSSOVER_CONFIGS if dry_run else CROSSOVER_CONFIGS
    elif mode == "goals":
        configs = goal_configs(dry_run)
    else:
        configs = DRY_RUN_CONFIGS if dry_run else CONFIGS
    results, unusable = [], None
    for config in configs:
        if unusable is not None or (deadline is not None and time.time() >= deadline):
            reason = unusable or "the time budget (--budget-s) was spent"
            results.append({"name": config["name"], "config": config, "error": f"not started: {reason}"})
        else:
            try:
                if mode == "tune":
                    results.append(tune_config(config, device, tune_candidates(config, dry_run)))
                else:
                    only = {"crossover": CROSSOVER_CONTENDERS, "goals": goal_contenders(config)}.get(mode)
                    results.append(run_config(config, device, only))
            except Exception as err:  # noqa: BLE001 — recorded in the results file, not hidden
                results.append({"name": config["name"], "config": config, "error": f"{type(err).__name__}: {err}"})
            if device.type == "cuda" and not cuda_usable():
                unusable = f"the CUDA context is unusable after {config['name']}"
        if on_result is not None:
            on_result(results)
    return results


def tune_table(results: list) -> str:
    """One row per configuration and kernel: each candidate's median ms, the fastest, the table's.
    Tiles: BLOCK_B,BLOCK_M,warps,stages (forward, reverse); BLOCK_R,BLOCK_C,BLOCK_K,warps,stages (product)."""
    lines = ["| config | kernel | candidates (tiles: ms) | fastest | table |", "|" + " --- |" * 5]
    for r in results:
        if "error" in r:
            lines.append(f"| {_describe(r)} | | error: {r['error'][:200]} | | |")
            continue
        for kind, times in r["tiles_ms"].items():
            cells = ", ".join(f"{tiles}: {ms:.3f}" if isinstance(ms, float) else f"{tiles}: failed" for tiles, ms in times.items())
            lines.append(f"| {_describe(r)} | {kind} | {cells} | {r['best'][kind]} | {r['table'][kind]} |")
    return "\n".join(lines)


def _describe(r: dict) -> str:
    c = r["config"]
    return f"{r['name']} (B={c['B']}, q={c['q']}, m={c['m']}, L={c['L']})"


def markdown_table(results: list) -> str:
    columns = [
        ("eager fwd ms", "eager_forward", None), ("layered fwd ms", "layered_forward", None),
        ("fused fwd ms", "fused_forward", None),
        ("layered fwd/eager", None, "layered_forward_vs_eager_forward"),
        ("fused fwd/eager", None, "forward_vs_eager_forward"),
        ("layered fwd/roofline", None, "layered_forward_fraction_of_roofline"),
        ("fused fwd/roofline", None, "forward_fraction_of_roofline"),
        ("eager backprop step ms", "eager_backprop_step", None),
        ("layered adjoint step ms", "layered_adjoint_step", None), ("fused adjoint step ms", "fused_adjoint_step", None),
        ("layered adjoint/eager", None, "layered_adjoint_step_vs_eager_backprop"),
        ("fused adjoint/eager", None, "adjoint_step_vs_eager_backprop"),
        ("per-layer adjoint/eager", None, "per_layer_adjoint_step_vs_eager_backprop"),
        ("fused adjoint TF32/eager TF32", None, "adjoint_step_tf32_vs_eager_backprop_tf32"),
        ("dW workspace/partials", None, "weight_grads_workspace_vs_partials"),
        ("dW atomic/partials", None, "weight_grads_atomic_vs_partials"),
    ]  # fmt: skip
    return _table(results, columns)


def predicted_table(results: list) -> str:
    """The planner's predictions (ms) next to the measured medians, per configuration and contender."""
    lines = ["| config | contender | predicted ms | measured ms |", "|" + " --- |" * 4]
    for r in results:
        predicted = r.get("predicted", {})
        if "error" in predicted:
            lines.append(f"| {_describe(r)} | (the planner failed: {predicted['error'][:200]}) | | |")
        for name, ms in predicted.get("median_ms", {}).items():
            measured = r.get("median_ms", {}).get(name)
            cell = "-" if measured is None else f"{measured:.3f}"
            lines.append(f"| {_describe(r)} ({predicted['device']}) | {name} | {ms:.3f} | {cell} |")
    return "\n".join(lines)


def crossover_table(results: list) -> str:
    columns = [
        ("whole-depth fwd ms", "fused_forward", None), ("per-layer fwd ms", "per_layer_forward", None),
        ("fwd whole/per-layer", None, "whole_depth_forward_vs_per_layer"),
        ("whole-depth adjoint step ms", "fused_adjoint_step", None),
        ("per-layer adjoint step ms", "per_layer_adjoint_step", None),
        ("adjoint whole/per-layer", None, "whole_depth_adjoint_step_vs_per_layer"),
        ("per-layer graphed/launched", None, "per_layer_graphed_vs_per_layer"),
        ("graphed whole/per-layer", None, "whole_depth_graphed_vs_per_layer_graphed"),
    ]  # fmt: skip
    return _table(results, columns)


def _table(results: list, columns: list) -> str:
    """One row per configuration; a column shows a median time (ms) or a ratio."""
    lines = ["| config | " + " | ".join(title for title, _, _ in columns) + " |", "|" + " --- |" * (len(columns) + 1)]
    for r in results:
        if "error" in r:
            cells = [f"error: {r['error'][:200]}"] + [""] * (len(columns) - 1)
        else:
            t, k = r["median_ms"], r["ratios"]
            cells = [(f"{t[time]:.3f}" if time in t else "-") if time else (f"{k[ratio]:.2f}" if ratio in k else "-")
                     for _, time, ratio in columns]  # fmt: skip
        lines.append(f"| {_describe(r)} | " + " | ".join(cells) + " |")
    failed = [f"- {r['name']}, {name}: {error}" for r in results for name, error in r.get("errors", {}).items()]
    return "\n".join(lines + (["", "Contenders that failed (their cells show -):", *failed] if failed else []))


TABLES = {"bench": markdown_table, "goals": markdown_table, "crossover": crossover_table, "tune": tune_table}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (TRITON_INTERPRET=1)")
    parser.add_argument("--mode", choices=MODES, default="bench",
                        help="bench: the issues' ratios; goals: only the goal configurations and contenders; "
                             "crossover: whole-depth vs per-layer; tune: tile candidates")  # fmt: skip
    args = parser.parse_args()
    results = run_all(args.dry_run, args.mode)
    print(TABLES[args.mode](results))
    print(json.dumps(results, indent=1))
