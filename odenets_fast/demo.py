"""`make demo`: train an ODEMLP in the synthetic setting of "Implicit regularization of deep
residual networks towards neural ODEs" (ICLR 2024) with the memory-free adjoint backward, then
report what it cost and how accurate it was.

Setting: n = 100 standard-Gaussian inputs and targets in R^16, hidden width 32, GELU, weight-tied
init, depth L = 256, full-batch gradient descent with lr = L × 1e-2 on (1/n) Σ ‖F(x_i) − y_i‖².

    python -m odenets_fast.demo [--steps 300] [--depth 256] [--device cpu|cuda] [--backend NAME]
"""

import argparse
import statistics
import time

import torch
from tqdm import tqdm

from . import ODEMLP, diagnostics, ode_mlp
from .backends import resolve_backend


def _loss(out, y):
    return (out - y).square().sum(-1).mean()


def _activation_bytes(model: ODEMLP, x, mode: str) -> int:
    """Bytes autograd keeps for backward in `mode`, parameters excluded."""
    params = (model.W, model.V, model.b, model.c)

    def run():
        return ode_mlp(x, *params, method=model.method, activation=model.activation, backward=mode,
                       backend=model.backend)  # fmt: skip

    return diagnostics.saved_tensor_bytes(run, exclude=[p for p in params if p is not None])


def _positive_int(text: str) -> int:
    """argparse type of --steps and --depth: no step leaves nothing to report, no layer no network."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text!r}")
    return value


def _ratio(value: float) -> str:
    """One decimal below 10 (1.5x is not 2x), none above."""
    return f"{value:.1f}x" if value < 10 else f"{value:.0f}x"


def _table(rows) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [f"{'quantity':<{width}}  value", f"{'-' * width}  {'-' * 24}"]
    return "\n".join(lines + [f"{k:<{width}}  {v}" for k, v in rows])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=_positive_int, default=300)
    parser.add_argument("--depth", type=_positive_int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None, help="reference, triton or cpp (default: automatic)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    q, m, n, L = 16, 32, 100, args.depth
    model = ODEMLP(q, m, L, activation="gelu", init="tied", backward="adjoint", backend=args.backend, device=device)
    x, y = torch.randn(n, q, device=device), torch.randn(n, q, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=L * 1e-2)
    backend = resolve_backend(args.backend, device)

    losses, step_times = [], []
    bar = tqdm(range(args.steps), desc=f"training ODEMLP (L={L}, adjoint, {backend})", unit="step", mininterval=0.5)
    for _ in bar:
        start = time.perf_counter()
        loss = _loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - start)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")

    final_loss = _loss(model(x), y).item()
    adjoint_bytes = _activation_bytes(model, x, "adjoint")
    backprop_bytes = _activation_bytes(model, x, "backprop")
    # the cotangent on x_L of the training loss at the final weights
    with torch.no_grad():
        grad_out = 2.0 * (model(x) - y) / n
    err = diagnostics.gradient_error(x, model.W.detach(), model.V.detach(), grad_out=grad_out,
                                     activation="gelu", backend=args.backend)  # fmt: skip
    median_ms = 1e3 * statistics.median(step_times[len(step_times) // 10 :])  # first 10%: warm-up
    results = {
        "loss_start": losses[0],
        "loss_end": final_loss,
        "ms_per_step_median": median_ms,
        "activation_bytes_adjoint": adjoint_bytes,
        "activation_bytes_backprop": backprop_bytes,
        "last_drift": model.last_drift,
        "gradient_error": {k: err[k] for k in ("x", "W", "V")},
        "depth_smoothness_W": diagnostics.depth_smoothness(model.W),
    }
    rows = [
        ("device / backend", f"{device.type} / {backend}"),
        ("depth L, width q, hidden m, n", f"{L}, {q}, {m}, {n}"),
        ("loss at start", f"{results['loss_start']:.4f}"),
        (f"loss after {args.steps} steps", f"{results['loss_end']:.4f}"),
        ("time per step (median)", f"{median_ms:.2f} ms"),
        ("activation memory, adjoint", f"{adjoint_bytes / 1024:.1f} KiB"),
        ("activation memory, backprop", f"{backprop_bytes / 1024:.1f} KiB"),
        ("backprop / adjoint memory", _ratio(backprop_bytes / max(adjoint_bytes, 1))),
        ("last_drift |x0~ - x0| / |x0|", f"{results['last_drift']:.2e}" if results["last_drift"] is not None else "-"),
        ("gradient error W (adjoint vs exact)", f"{err['W']:.2e}"),
        ("gradient error V (adjoint vs exact)", f"{err['V']:.2e}"),
        ("gradient error x (adjoint vs exact)", f"{err['x']:.2e}"),
        ("depth smoothness max_k |W_k+1 - W_k|", f"{results['depth_smoothness_W']:.3e}"),
    ]
    print(_table(rows))
    return results


if __name__ == "__main__":
    main()
