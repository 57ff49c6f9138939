"""The small CIFAR-style ResNet of "Do Residual Neural Networks discretize Neural Ordinary
Differential Equations?" with a memory-free residual stack, on synthetic images.

Network: 5×5 convolution 3 → 16 channels with stride 2 (downsampling 32×32 → 16×16), BatchNorm, ReLU,
then `AdjointResidualStack` of L pre-activation blocks (bn → relu → conv3×3 → bn → relu → conv3×3),
global average pooling and a linear classifier. Data: 10 classes of 32×32 images, each a fixed random
template of its class plus Gaussian noise, generated locally from a seed (no download).

For each depth L and backward mode (backprop: the plain loop; adjoint: reconstruction): peak memory
of a training step (parameters and gradients excluded; CPU: a fresh process per configuration, as
bench.memory); median step time of a few SGD steps, both modes timed in one process on the same batch
(on the CPU taking turns step by step, so that load from other processes falls on both alike), and
the loss after them; plus the relative error of the adjoint gradient against backprop at the same
weights and batch.

    python -m bench.conv_example [--depths 4 16 64] [--steps 7] [--batch 64]
"""

import argparse
import functools
import json

import torch
from torch import nn

from bench.peak_memory import in_fresh_process, peak_bytes
from bench.report import environment, markdown_table, output_stem, write_json
from bench.timing import interleaved_medians_ms, median_ms
from odenets_fast import AdjointResidualStack

CHANNELS, CLASSES, SIZE = 16, 10, 32


def preactivation_block() -> nn.Module:
    return nn.Sequential(
        nn.BatchNorm2d(CHANNELS), nn.ReLU(), nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1, bias=False),
        nn.BatchNorm2d(CHANNELS), nn.ReLU(), nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1, bias=False),
    )  # fmt: skip


def make_net(depth: int, backward: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, CHANNELS, 5, stride=2, padding=2, bias=False), nn.BatchNorm2d(CHANNELS), nn.ReLU(),
        AdjointResidualStack([preactivation_block() for _ in range(depth)], backward=backward),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(CHANNELS, CLASSES),
    )  # fmt: skip


def synthetic_batch(batch: int, seed: int = 0):
    """Images = class template + noise; the templates are fixed by the seed, the noise by the batch."""
    gen = torch.Generator().manual_seed(seed)
    templates = torch.randn(CLASSES, 3, SIZE, SIZE, generator=gen)
    labels = torch.randint(0, CLASSES, (batch,), generator=gen)
    return templates[labels] + torch.randn(batch, 3, SIZE, SIZE, generator=gen), labels


def _train_step(net, images, labels, opt):
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(net(images), labels)
    loss.backward()
    opt.step()
    return loss.item()


def _training(depth: int, backward: str, batch: int, device: torch.device) -> tuple:
    net = make_net(depth, backward).to(device)
    images, labels = (t.to(device) for t in synthetic_batch(batch))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    return net, functools.partial(_train_step, net, images, labels, opt), (images, labels)


def peak_memory(depth: int, backward: str, batch: int, device: torch.device) -> dict:
    """Peak memory of one step (after one warm-up step) less its parameter gradients. The warm-up's
    gradients are held through the measured step: freed by its zero_grad, their blocks (under the mmap
    threshold) would take the step's new gradients without raising the RSS, and subtracting the
    gradient bytes would remove memory never counted."""
    net, step, _ = _training(depth, backward, batch, device)
    step()  # allocates the gradients and the optimizer state
    warmup_gradients = [p.grad for p in net.parameters()]
    gradient_bytes = sum(g.numel() * g.element_size() for g in warmup_gradients)
    return {"peak_bytes": peak_bytes(step, device) - gradient_bytes}


def step_times_and_losses(depth: int, steps: int, batch: int, device: torch.device) -> dict:
    """Per mode, the median time of `steps` training steps after one warm-up step, both modes in this
    process on the same batch and weights, and the loss after them."""
    runs = {backward: _training(depth, backward, batch, device) for backward in ("backprop", "adjoint")}
    steps_of = {backward: step for backward, (_, step, _) in runs.items()}
    if device.type == "cuda":
        times = {backward: median_ms(step, device, warmup=1, reps=steps) for backward, step in steps_of.items()}
    else:
        times = interleaved_medians_ms(steps_of, warmup=1, reps=steps)
    losses = {backward: nn.functional.cross_entropy(net(images), labels).item()
              for backward, (net, _, (images, labels)) in runs.items()}  # fmt: skip
    return {backward: {"median_ms": times[backward], "loss": losses[backward]} for backward in runs}


def gradient_error(depth: int, batch: int, device: torch.device) -> float:
    """‖g_adjoint − g_backprop‖ / ‖g_backprop‖ over all parameters, same weights and batch."""
    images, labels = (t.to(device) for t in synthetic_batch(batch))
    grads = {}
    for backward in ("backprop", "adjoint"):
        net = make_net(depth, backward).to(device)
        loss = nn.functional.cross_entropy(net(images), labels)
        grads[backward] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(net.parameters()))])
    return float((grads["adjoint"] - grads["backprop"]).norm() / grads["backprop"].norm())


def _peak_memory(depth: int, backward: str, batch: int, device: torch.device) -> dict:
    if device.type == "cuda":
        return peak_memory(depth, backward, batch, device)
    args = ["bench.conv_example", "--worker", backward, str(depth), "--batch", str(batch)]
    return in_fresh_process(args, f"{backward} at L={depth}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--steps", type=int, default=7, help="timed training steps per configuration")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    parser.add_argument("--worker", nargs=2, metavar=("BACKWARD", "DEPTH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.worker:
        print(json.dumps(peak_memory(int(args.worker[1]), args.worker[0], args.batch, device)))
        return {}

    rows, results = [], {"config": vars(args), "environment": environment(device), "depths": {}}
    for depth in args.depths:
        timed = step_times_and_losses(depth, args.steps, args.batch, device)
        measured = {mode: {**_peak_memory(depth, mode, args.batch, device), **timed[mode]} for mode in timed}
        error = gradient_error(depth, args.batch, device)
        results["depths"][str(depth)] = {**measured, "adjoint_gradient_error": error}
        b, a = measured["backprop"], measured["adjoint"]
        rows.append([depth, f"{b['peak_bytes'] / 2**20:.1f}", f"{a['peak_bytes'] / 2**20:.1f}",
                     f"{b['peak_bytes'] / max(a['peak_bytes'], 1):.1f}", f"{b['median_ms']:.0f}", f"{a['median_ms']:.0f}",
                     f"{a['median_ms'] / b['median_ms']:.2f}", f"{b['loss']:.3f}", f"{a['loss']:.3f}", f"{error:.1e}"])  # fmt: skip
    table = markdown_table(["L", "backprop MiB", "adjoint MiB", "memory ratio", "backprop ms", "adjoint ms",
                            "time ratio", "backprop loss", "adjoint loss", "adjoint grad. error"], rows)  # fmt: skip
    print(f"{results['environment']['device']}, torch {torch.__version__}, batch {args.batch}\n\n{table}")
    stem = output_stem("conv-example", device, args.out)
    write_json(stem.with_suffix(".json"), results)
    print(f"wrote {stem}.json")
    return results


if __name__ == "__main__":
    main()
