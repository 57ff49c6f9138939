"""Error-controlled anchors (anchor_every="auto") against fixed spacings, plain adjoint and backprop, over
training: activation memory, time per step, the gradient's error against exact backprop, the drift,
and how the controller moves the anchors.

Models (same seed, data and optimizer for every mode):
    rough-mlp    ODEMLP, iid init with V ~ N(0, 1), ReLU: not smooth in depth, plain adjoint drifts
    smooth-mlp   ODEMLP, smooth init, GELU: reconstruction is accurate, the anchors should go away
    conv         an AdjointResidualStack of the pre-activation conv blocks of bench.conv_example
                 (BatchNorm in training mode) between a conv stem and a linear head
Modes: backprop, adjoint (plain), anchor_every=4, anchor_every=√L, auto, auto strict (drift_tol).
Per step: the gradient error ‖g − g_exact‖ / ‖g_exact‖ against a backprop twin holding the same
parameters, the drift (the largest segment's for auto), the number of anchors. Activation memory:
diagnostics.saved_tensor_bytes of a forward after training (the layout auto settled on); time: the
median step, the modes interleaved step by step. Writes bench/results/error-control-<device>-<date>.json
and .png (anchors and drift over training for the auto modes; gradient error against drift).

    python -m bench.error_control [--steps 40] [--depth 64] [--conv-depth 16] [--drift-tol 1e-3] [--out DIR]
"""

import argparse
import math
import statistics
import time

import torch
from torch import nn

from bench.conv_example import CHANNELS, preactivation_block
from bench.plotting import plt, save_figure
from bench.report import environment, markdown_table, output_stem, write_json
from odenets_fast import AdjointResidualStack, ODEMLP, diagnostics


def modes(depth: int, drift_tol: float) -> dict:
    root = max(1, round(math.sqrt(depth)))
    return {
        "backprop": dict(backward="backprop"),
        "adjoint": dict(backward="adjoint"),
        "anchor_every=4": dict(anchor_every=4),
        f"anchor_every={root}": dict(anchor_every=root),
        "auto": dict(anchor_every="auto", drift_tol=drift_tol),
        "auto strict": dict(anchor_every="auto", drift_tol=drift_tol, strict=True),
    }


def mlp(kind: str, depth: int, seed: int, **mode) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "rough-mlp":
        model = ODEMLP(16, 32, depth, init="iid", activation="relu", **mode)
        with torch.no_grad():
            model.V.normal_()
        return model
    return ODEMLP(16, 32, depth, init="smooth", activation="gelu", **mode)


def conv(depth: int, seed: int, **mode) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, CHANNELS, 3, padding=1, bias=False), nn.BatchNorm2d(CHANNELS), nn.ReLU(),
        AdjointResidualStack([preactivation_block() for _ in range(depth)], **mode),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(CHANNELS, 10),
    )  # fmt: skip


def _stack_of(model: nn.Module):
    return model if isinstance(model, ODEMLP) else model[3]


def _loss(model, batch) -> torch.Tensor:
    x, y = batch
    out = model(x)
    return nn.functional.cross_entropy(out, y) if y.dtype == torch.long else (out - y).square().mean()


def _grads(model, batch) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    _loss(model, batch).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def run_model(kind: str, depth: int, steps: int, drift_tol: float, batch, seed: int = 0) -> dict:
    build = (lambda **mode: conv(depth, seed, **mode)) if kind == "conv" else (lambda **mode: mlp(kind, depth, seed, **mode))
    contenders = {name: build(**mode) for name, mode in modes(depth, drift_tol).items()}
    exact = build(backward="backprop")
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-2) for name, m in contenders.items()}
    trace = {name: {"gradient_error": [], "drift": [], "anchors": [], "step_ms": []} for name in contenders}
    for _ in range(steps):
        for name, model in contenders.items():  # interleaved: load bursts fall on every mode
            exact.load_state_dict(model.state_dict(), strict=False)
            want = _grads(exact, batch)
            start = time.perf_counter()
            model.zero_grad(set_to_none=True)
            _loss(model, batch).backward()
            trace[name]["step_ms"].append(1e3 * (time.perf_counter() - start))
            got = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            trace[name]["gradient_error"].append(float((got - want).norm() / want.norm()))
            stack = _stack_of(model)
            segs = getattr(stack, "last_segment_drift", None)
            trace[name]["drift"].append(max(d for *_, d in segs) if segs else stack.last_drift)
            trace[name]["anchors"].append(len(segs) if segs else None)
            optimizers[name].step()
    results = {}
    for name, model in contenders.items():
        inputs = batch[0]
        saved = diagnostics.saved_tensor_bytes(lambda m=model: _loss(m, batch), exclude=tuple(model.parameters()))
        t = trace[name]
        results[name] = {
            "activation_bytes": saved - inputs.numel() * inputs.element_size(),
            "median_step_ms": statistics.median(t["step_ms"]),
            "median_gradient_error": statistics.median(t["gradient_error"]),
            "final_drift": t["drift"][-1],
            **t,
        }
    base = results["backprop"]["median_step_ms"]
    for r in results.values():
        r["step_vs_backprop"] = r["median_step_ms"] / base
    return results


def _relation(per_mode: dict) -> dict:
    """How the gradient error follows the drift: their ratio over every adjoint mode's steps."""
    ratios = [e / d for name, r in per_mode.items() if name != "backprop"
              for e, d in zip(r["gradient_error"], r["drift"]) if d and e > 1e-12]  # fmt: skip
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def _batch(kind: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    if kind == "conv":
        return torch.randn(16, 3, 16, 16, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    return torch.randn(64, 16, generator=gen), torch.randn(64, 16, generator=gen)


def _plot(path, results: dict, drift_tol: float) -> None:
    """Colour: the model; marker: the mode (the scatter has more series than a colour cycle)."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    markers = dict(zip(dict.fromkeys(name for per_mode in results.values() for name in per_mode), "os^vDPX*"))
    for index, (kind, per_mode) in enumerate(results.items()):
        color = f"C{index}"
        for name in ("auto", "auto strict"):
            r = per_mode[name]
            steps = range(1, len(r["anchors"]) + 1)
            style = dict(color=color, marker=markers[name], label=f"{kind}, {name}")
            axes[0].plot(steps, r["anchors"], **style)
            axes[1].semilogy(steps, r["drift"], **style)
        for name, r in per_mode.items():
            points = [(d, e) for d, e in zip(r["drift"], r["gradient_error"]) if d and e > 1e-12]  # exact: no point
            if points:
                axes[2].loglog(*zip(*points), linestyle="none", color=color, marker=markers[name], markersize=4,
                               label=f"{kind}, {name}")  # fmt: skip
    axes[1].axhline(drift_tol, color="k", linestyle="--", label="drift_tol")
    for ax, title, ylabel in ((axes[0], "segments the controller places", "segments"),
                              (axes[1], "largest segment drift", "drift"),
                              (axes[2], "gradient error against drift, every mode and step", "gradient error")):  # fmt: skip
        ax.set_title(title)
        xlabel = "drift (auto: the largest segment's; anchor_every: the first's)" if ax is axes[2] else "training step"
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    save_figure(fig, axes, path, dpi=110)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--depth", type=int, default=64)
    parser.add_argument("--conv-depth", type=int, default=16)
    parser.add_argument("--drift-tol", type=float, default=1e-3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    results = {}
    for kind in ("rough-mlp", "smooth-mlp", "conv"):
        depth = args.conv_depth if kind == "conv" else args.depth
        results[kind] = run_model(kind, depth, args.steps, args.drift_tol, _batch(kind, 0))
    relation = {kind: _relation(per_mode) for kind, per_mode in results.items()}
    rows = [[kind, name, f"{r['activation_bytes'] / 1024:.1f}", f"{r['step_vs_backprop']:.2f}",
             f"{r['median_gradient_error']:.1e}", f"{r['gradient_error'][-1]:.1e}",
             "-" if r["final_drift"] is None else f"{r['final_drift']:.1e}",
             "-" if r["anchors"][-1] is None else str(r["anchors"][-1])]
            for kind, per_mode in results.items() for name, r in per_mode.items()]  # fmt: skip
    print(markdown_table(["model", "mode", "activations KiB", "step × backprop", "gradient error (median)",
                          "gradient error (last step)", "drift (last step)", "segments (last step)"], rows))  # fmt: skip
    for kind, r in relation.items():
        print(f"{kind}: gradient error / drift over the adjoint modes' steps: median {r['median']:.2g}, "
              f"range {r['min']:.2g}–{r['max']:.2g}")  # fmt: skip
    stem = output_stem("error-control", device, args.out)
    write_json(stem.with_suffix(".json"), {**environment(device), "config": vars(args), "results": results,
                                          "relation": relation})  # fmt: skip
    _plot(stem.with_suffix(".png"), results, args.drift_tol)
    print(f"wrote {stem}.json and .png")
    return {"results": results, "relation": relation}


if __name__ == "__main__":
    main()
