"""Training on real data: MNIST-1D (4,000 training and 1,000 test signals of length 40, 10 classes) for
every backward mode, with test accuracy, activation memory, time per epoch, the drift over training and
the gradient's error against exact backprop.

The data are generated locally by the `mnist1d` package (`make_dataset` with the standard arguments:
the published split, regenerated from its seed; nothing is downloaded).

Models (each mode of a model starts from the same initial parameters, sees the same batches in the same
order and has the same optimizer and schedule):
    mlp        linear embedding 40 → q, ODEMLP(q, m, L) (tied init, GELU), linear head
    conv       1-D version of the NeurIPS 2022 paper's CIFAR ResNet: a 5-tap convolution with stride 2
               to C channels, BatchNorm, GELU, an AdjointResidualStack of L pre-activation blocks
               (BatchNorm, GELU, 3-tap convolution, twice; tied init: every block starts as the first),
               global average pooling, linear head
    rough-mlp  the failure case: the mlp with iid init, ReLU and step h = T/L = 1 (T = L, the step of a
               standard ResNet), trained with a larger learning rate
Modes: backprop; adjoint (Euler); heun (Heun's method, adjoint); anchors √L (Euler, anchor_every =
round(√L)); auto (Euler, anchor_every="auto" with drift_tol); the failure case adds auto strict, the
conv model extrapolated (Euler, AdjointResidualStack's vjp_at="extrapolated").

Per run: test accuracy after training (mean ± std over seeds in the tables), activation memory
(diagnostics.saved_tensor_bytes of one training forward on a batch, parameters and the input batch
excluded: what autograd keeps for backward; for auto, with the layout the controller settled on), the
median epoch's wall time (the modes of a depth and seed are trained side by side, interleaved epoch by
epoch, so that load bursts of the shared machine fall on all of them), the drift per epoch (median over
its steps of `last_drift` — for √L anchors the first segment's —, for auto of the largest of
`last_segment_drift`), whether the loss went non-finite, and the relative error ‖g − g_exact‖ / ‖g_exact‖
of the gradient of all parameters on a fixed batch of training signals against a backprop twin holding
the same parameters (Heun: a Heun backprop twin), before training, halfway and at the end. One thread
(torch.set_num_threads(1)): on the two shared cores, two threads measured the other jobs' load rather
than the code.

Two settings fit the 15 minutes a benchmark may take on the 2-core CPU machine, and neither alone fits
everything the question asks: the default covers the depths (every mode at every depth, few epochs),
--long the accuracy reached against the published baselines (the shallow depths, trained 5× longer).
The convolutional stack at L = 128 is in neither: one epoch of its five modes takes about 90 s, so
three seeds of three epochs would take the whole budget (--conv-depths 8 32 128 runs it).

Writes bench/results/mnist1d[-long]-<device>-<yyyymmdd>.json and .png (test accuracy against depth per
mode, with the published baselines; drift over training at the shallowest and the deepest depth) and
prints the tables of the README.

    python -m bench.mnist1d [--quick | --long] [--models mlp conv rough-mlp] [--seeds 3] [--epochs N] [--out DIR]
"""

import argparse
import copy
import math
import statistics
import time
from typing import Optional

import torch
from torch import nn

from bench.plotting import plt, save_figure
from bench.report import environment, markdown_table, output_stem, write_json
from odenets_fast import AdjointResidualStack, ODEMLP, diagnostics

CLASSES, SIGNAL_LENGTH = 10, 40
PUBLISHED_ACCURACY = {"mlp": 68.0, "conv": 94.0}  # the MNIST-1D paper's MLP and CNN baselines, %

# Each model's settings for the default run: sizes, optimizer (Adam with a one-cycle schedule), epochs,
# depths; 13 minutes on the 2-core machine at load 2 (769 s; 1,102 s at load 6). mlp: T = 2 learns faster than
# T = 1 (backprop, L = 8, seed 0: 66 % against 62 % test accuracy after 20 epochs) and keeps the step
# h = T/L ≤ 1/4; at lr 0.1 plain adjoint diverged at L = 8 where backprop did not, hence 3e-2.
SETTINGS = {
    "mlp": dict(depths=[8, 32, 128, 512], seeds=3, epochs=8, batch=128, lr=3e-2, width=32, hidden=64, T=2.0),
    "conv": dict(depths=[8, 32], seeds=3, epochs=3, batch=128, lr=2e-2, width=16),
    "rough-mlp": dict(depths=[8, 32], seeds=3, epochs=6, batch=128, lr=1e-1, width=32, hidden=64),
}
# The accuracy the shallow models reach with 5× the epochs (about 7 minutes): against the baselines.
LONG = {
    "mlp": dict(depths=[8, 32], epochs=40),
    "conv": dict(depths=[8], epochs=15),
}
QUICK = {
    "mlp": dict(depths=[2, 4], seeds=1, epochs=1),
    "conv": dict(depths=[2], seeds=1, epochs=1),
    "rough-mlp": dict(depths=[2], seeds=1, epochs=1),
}
GRADIENT_BATCH = 256  # training signals the gradient error is measured on


def load_data() -> dict:
    """The standard MNIST-1D split as float32/int64 tensors, generated from the package's default
    arguments (seed 42). `make_dataset` never reads the arguments' download URL; `get_dataset` would."""
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    return {
        "x": torch.tensor(data["x"], dtype=torch.float32), "y": torch.tensor(data["y"], dtype=torch.long),
        "x_test": torch.tensor(data["x_test"], dtype=torch.float32),
        "y_test": torch.tensor(data["y_test"], dtype=torch.long),
    }  # fmt: skip


def modes(kind: str, depth: int, drift_tol: float) -> dict:
    root = max(1, round(math.sqrt(depth)))
    table = {
        "backprop": dict(backward="backprop"),
        "adjoint": dict(backward="adjoint"),
        "heun": dict(method="heun", backward="adjoint"),
        "anchors √L": dict(anchor_every=root),
        "auto": dict(anchor_every="auto", drift_tol=drift_tol),
    }
    if kind == "rough-mlp":
        table["auto strict"] = dict(anchor_every="auto", drift_tol=drift_tol, strict=True)
    if kind == "conv":  # an AdjointResidualStack: the VJP points are its option
        table["extrapolated"] = dict(vjp_at="extrapolated")
    return table


def _pre_activation_block(channels: int) -> nn.Module:
    return nn.Sequential(
        nn.BatchNorm1d(channels), nn.GELU(), nn.Conv1d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm1d(channels), nn.GELU(), nn.Conv1d(channels, channels, 3, padding=1, bias=False),
    )  # fmt: skip


class Classifier(nn.Module):
    """embed → residual stack → head; the stack is `self.stack` for the drift and the anchors."""

    def __init__(self, embed: nn.Module, stack: nn.Module, head: nn.Module):
        super().__init__()
        self.embed, self.stack, self.head = embed, stack, head

    def forward(self, x):
        return self.head(self.stack(self.embed(x)))


def build(kind: str, depth: int, seed: int, settings: dict, **mode) -> Classifier:
    """The model of `kind` with the initial parameters of `seed`, whatever the mode: the embedding and the
    head are drawn first, and Heun's extra layer (θ_L) comes after the Euler layers."""
    torch.manual_seed(seed)
    width = settings["width"]
    if kind == "conv":
        embed = nn.Sequential(nn.Conv1d(1, width, 5, stride=2, padding=2, bias=False), nn.BatchNorm1d(width), nn.GELU())
        head = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(width, CLASSES))
        first = _pre_activation_block(width)  # tied init: copies, so the random stream does not depend on the depth
        blocks = [copy.deepcopy(first) for _ in range(depth + (mode.get("method") == "heun"))]
        return Classifier(embed, AdjointResidualStack(blocks, **mode), head)
    embed, head = nn.Linear(SIGNAL_LENGTH, width), nn.Linear(width, CLASSES)
    if kind == "rough-mlp":
        stack = ODEMLP(width, settings["hidden"], depth, init="iid", activation="relu", T=float(depth), **mode)
    else:
        stack = ODEMLP(width, settings["hidden"], depth, init="tied", activation="gelu", T=settings["T"], **mode)
    return Classifier(embed, stack, head)


def _inputs(kind: str, x: torch.Tensor) -> torch.Tensor:
    return x[:, None, :] if kind == "conv" else x  # the convolutions read one channel


def _drift(stack) -> Optional[float]:
    """The step's drift; None where reconstruction blew up (a diverged run)."""
    segments = stack.last_segment_drift
    drift = max(d for *_, d in segments) if segments else stack.last_drift
    return drift if drift is not None and math.isfinite(drift) else None


def _gradient(model: nn.Module, x, y) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def gradient_error(model: Classifier, twin: Classifier, x, y) -> Optional[float]:
    """‖g − g_exact‖ / ‖g_exact‖ over all parameters, g_exact from `twin` (backprop) holding the same
    parameters; None where either is not finite (a diverged run). The model's state (BatchNorm
    statistics, auto's layout) is left as it was."""
    state = copy.deepcopy(model.state_dict())
    twin.load_state_dict(state, strict=False)  # strict=False: auto's anchor_mask has no counterpart
    exact = _gradient(twin, x, y)
    got = _gradient(model, x, y)
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    error = float((got - exact).norm() / exact.norm())
    return error if math.isfinite(error) else None


def activation_bytes(model: Classifier, x, y) -> int:
    """What autograd keeps for backward in one training forward (parameters and input excluded)."""
    state = copy.deepcopy(model.state_dict())
    saved = diagnostics.saved_tensor_bytes(lambda: nn.functional.cross_entropy(model(x), y),
                                           exclude=(*model.parameters(), x))  # fmt: skip
    model.load_state_dict(state)
    return saved


@torch.no_grad()
def accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    correct = (model(x).argmax(1) == y).sum().item()
    model.train()
    return correct / len(y)


def train_depth(kind: str, depth: int, seed: int, settings: dict, data: dict, drift_tol: float) -> dict:
    """Every mode at one depth and seed, trained side by side (interleaved epoch by epoch)."""
    x, y = _inputs(kind, data["x"]), data["y"]
    x_test, y_test = _inputs(kind, data["x_test"]), data["y_test"]
    x_grad, y_grad = x[:GRADIENT_BATCH], y[:GRADIENT_BATCH]
    epochs, batch = settings["epochs"], settings["batch"]
    steps_per_epoch = math.ceil(len(y) / batch)
    checkpoints = sorted({0, epochs // 2, epochs})
    runs = {}
    for name, mode in modes(kind, depth, drift_tol).items():
        model = build(kind, depth, seed, settings, **mode)
        twin = build(kind, depth, seed, settings, backward="backprop", method=mode.get("method", "euler"))
        optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"])
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings["lr"], total_steps=epochs * steps_per_epoch)
        runs[name] = dict(model=model, twin=twin, optimizer=optimizer, schedule=schedule, epoch_s=[], drift=[],
                          segments=[], train_loss=[], gradient_error={}, nonfinite_steps=0)  # fmt: skip
    order = torch.Generator().manual_seed(seed)
    for epoch in range(epochs + 1):
        if epoch in checkpoints:
            for name, run in runs.items():
                error = 0.0 if name == "backprop" else gradient_error(run["model"], run["twin"], x_grad, y_grad)
                run["gradient_error"][epoch] = error
        if epoch == epochs:
            break
        permutation = torch.randperm(len(y), generator=order)
        for name, run in runs.items():
            model, optimizer, schedule = run["model"], run["optimizer"], run["schedule"]
            drifts, finite = [], []
            start = time.perf_counter()
            for first in range(0, len(y), batch):
                rows = permutation[first : first + batch]
                optimizer.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(x[rows]), y[rows])
                loss.backward()
                optimizer.step()
                schedule.step()
                if math.isfinite(loss.item()):
                    finite.append(loss.item())
                else:
                    run["nonfinite_steps"] += 1
                if name != "backprop" and _drift(model.stack) is not None:
                    drifts.append(_drift(model.stack))
            run["epoch_s"].append(time.perf_counter() - start)
            run["train_loss"].append(statistics.fmean(finite) if finite else None)
            run["drift"].append(statistics.median(drifts) if drifts else None)
            segments = model.stack.last_segment_drift
            run["segments"].append(len(segments) if segments else None)
    results = {}
    for name, run in runs.items():
        model = run["model"]
        results[name] = {
            "test_accuracy": accuracy(model, x_test, y_test),
            "train_accuracy": accuracy(model, x, y),
            "activation_bytes": activation_bytes(model, x[:batch], y[:batch]),
            "median_epoch_s": statistics.median(run["epoch_s"]),
            **{k: run[k] for k in ("epoch_s", "train_loss", "drift", "segments", "gradient_error", "nonfinite_steps")},
        }
    return results


def _mean_of_finite(values) -> Optional[float]:
    """The mean over the seeds that have a value (a diverged run has no drift or gradient error)."""
    finite = [v for v in values if v is not None]
    return statistics.fmean(finite) if finite else None


def summarize(per_seed: list) -> dict:
    """Mean and standard deviation over seeds of the numbers the tables show."""
    accuracies = [100 * r["test_accuracy"] for r in per_seed]
    return {
        "test_accuracy_mean": statistics.fmean(accuracies),
        "test_accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        "activation_bytes": statistics.fmean(r["activation_bytes"] for r in per_seed),
        "median_epoch_s": statistics.fmean(r["median_epoch_s"] for r in per_seed),
        "final_gradient_error": _mean_of_finite(r["gradient_error"][max(r["gradient_error"])] for r in per_seed),
        "final_drift": _mean_of_finite(r["drift"][-1] for r in per_seed),
        "diverged_seeds": sum(r["nonfinite_steps"] > 0 for r in per_seed),
    }


def _scientific(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1e}"


def tables(results: dict) -> str:
    """Per model: test accuracy (mean ± std, %) · activation memory · median epoch per mode and depth;
    then the gradient error and the drift at the end of training."""
    out = []
    for kind, per_depth in results.items():
        header = ["mode"] + [f"L = {d}" for d in per_depth]
        names = list(dict.fromkeys(name for r in per_depth.values() for name in r["summary"]))
        rows, errors = [], []
        for name in names:
            cells = [r["summary"].get(name) for r in per_depth.values()]
            rows.append([name] + ["-" if s is None else f"{s['test_accuracy_mean']:.1f} ± {s['test_accuracy_std']:.1f} · "
                                  f"{s['activation_bytes'] / 1024:.0f} KiB · {s['median_epoch_s']:.2f} s"
                                  for s in cells])  # fmt: skip
            if name != "backprop":
                errors.append([name] + ["-" if s is None else f"{_scientific(s['final_gradient_error'])} · "
                                        f"{_scientific(s['final_drift'])}" for s in cells])  # fmt: skip
            diverged = [f"L = {d}: {s['diverged_seeds']}" for d, s in zip(per_depth, cells) if s and s["diverged_seeds"]]
            if diverged:
                rows[-1][0] += f" (seeds diverged, {', '.join(diverged)})"
        out.append(f"{kind}: test accuracy % (mean ± std over seeds) · activation memory · median epoch\n\n"
                   + markdown_table(header, rows))  # fmt: skip
        out.append(f"{kind}: gradient error against backprop · drift, at the end of training (mean over seeds)\n\n"
                   + markdown_table(header, errors))  # fmt: skip
    return "\n\n".join(out)


# What each mode's drift is (`_drift`): one panel shows them all
DRIFT_OF = {"anchors √L": "first segment", "auto": "largest segment", "auto strict": "largest segment"}


def plot(path, results: dict) -> None:
    """Per model: test accuracy against depth per mode; drift over training at the shallowest and the
    deepest depth (seed 0)."""
    fig, axes = plt.subplots(len(results), 3, figsize=(18, 4.5 * len(results)), squeeze=False)
    for row, (kind, per_depth) in zip(axes, results.items()):
        depths = [int(d) for d in per_depth]
        for name in dict.fromkeys(name for r in per_depth.values() for name in r["summary"]):
            points = [(int(d), r["summary"][name]) for d, r in per_depth.items() if name in r["summary"]]
            row[0].errorbar([d for d, _ in points], [s["test_accuracy_mean"] for _, s in points],
                            yerr=[s["test_accuracy_std"] for _, s in points], marker="o", capsize=3, label=name)  # fmt: skip
        if kind in PUBLISHED_ACCURACY:
            row[0].axhline(PUBLISHED_ACCURACY[kind], color="k", linestyle="--", label="published baseline")
        row[0].set_xscale("log", base=2)
        row[0].set_title(f"{kind}: test accuracy")
        row[0].set_xlabel("depth L")
        row[0].set_ylabel("test accuracy (%)")
        if len(depths) == 1:
            row[2].set_axis_off()
        for ax, depth in zip(row[1:], sorted({min(depths), max(depths)})):
            for name, run in per_depth[str(depth)]["seeds"][0].items():
                points = [(e + 1, d) for e, d in enumerate(run["drift"]) if d is not None and d > 0]
                if points:
                    ax.semilogy(*zip(*points), marker=".", label=f"{name} ({DRIFT_OF.get(name, 'whole stack')})")
            ax.set_title(f"{kind}, L = {depth}: drift over training (seed 0)")
            ax.set_xlabel("epoch")
            ax.set_ylabel("median drift of the epoch's steps")
    save_figure(fig, axes.flat, path, dpi=100)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny depths, one seed, one epoch (the tests' run)")
    size.add_argument("--long", action="store_true", help="the shallow depths, 5× the epochs: accuracy against "
                      "the published baselines (writes mnist1d-long-…)")  # fmt: skip
    parser.add_argument("--models", nargs="+", choices=list(SETTINGS), default=None,
                        help="default: mlp conv rough-mlp (--long: mlp conv)")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default: SETTINGS)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs for every model (default: SETTINGS)")
    parser.add_argument("--mlp-depths", type=int, nargs="+", default=None)
    parser.add_argument("--conv-depths", type=int, nargs="+", default=None)
    parser.add_argument("--drift-tol", type=float, default=1e-3, help="auto mode's tolerance")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    for name in ("seeds", "epochs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    preset = QUICK if args.quick else LONG if args.long else {}
    device = torch.device("cpu")
    settings = {}
    for kind in args.models or (list(LONG) if args.long else list(SETTINGS)):
        chosen = {**SETTINGS[kind], **preset.get(kind, {})}
        for key, value in (("seeds", args.seeds), ("epochs", args.epochs),
                           ("depths", args.conv_depths if kind == "conv" else args.mlp_depths)):  # fmt: skip
            if value is not None:
                chosen[key] = value
        settings[kind] = chosen

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(args, settings, device)
    finally:  # the tests run this in their own process
        torch.set_num_threads(threads)


def _run(args, settings: dict, device: torch.device) -> dict:
    started = time.perf_counter()
    report = {**environment(device), "config": {**vars(args), "settings": settings}, "results": {}}
    load_before = report["load_average_1min"]
    data = load_data()
    report["data"] = {"train": len(data["y"]), "test": len(data["y_test"]), "length": data["x"].shape[1],
                      "classes": len(data["y"].unique())}  # fmt: skip
    for kind, chosen in settings.items():
        report["results"][kind] = {}
        for depth in chosen["depths"]:
            seeds = [train_depth(kind, depth, seed, chosen, data, args.drift_tol) for seed in range(chosen["seeds"])]
            summary = {name: summarize([s[name] for s in seeds]) for name in seeds[0]}
            report["results"][kind][str(depth)] = {"summary": summary, "seeds": seeds}
            print(f"{kind} L={depth}: " + ", ".join(f"{n} {s['test_accuracy_mean']:.1f}%" for n, s in summary.items()),
                  flush=True)  # fmt: skip
    report["wall_s"] = time.perf_counter() - started
    report["load_average_1min_end"] = environment(device)["load_average_1min"]
    text = tables(report["results"])
    print(f"\n{report['device']}, torch {torch.__version__}, 1 thread, load {load_before} → "
          f"{report['load_average_1min_end']}, {report['wall_s']:.0f} s\n\n{text}")  # fmt: skip
    stem = output_stem("mnist1d-long" if args.long else "mnist1d", device, args.out)
    write_json(stem.with_suffix(".json"), report)
    plot(stem.with_suffix(".png"), report["results"])
    print(f"wrote {stem}.json and .png")
    return report


if __name__ == "__main__":
    main()
