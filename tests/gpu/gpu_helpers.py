"""What the GPU tests share: gradients of a run, relative errors, peak memory of a step, CUDA graphs."""

import torch

import naive
from helpers import make_stack
from odenets_fast import ode_mlp
from odenets_fast.triton_layered import tf32_context

CUDA = torch.device("cuda")


def run_grads(fn, tensors, grad_out):
    """[fn(*leaves), then the gradients of all leaves], from fresh leaf copies of `tensors`."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    return [out.detach()] + [g.detach() for g in torch.autograd.grad(out, leaves, grad_out.to(out.dtype))]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def assert_no_worse_than_eager(tensors64, grad_out, dtype, precision: str = "ieee", **kw) -> None:
    """flash-attention's yardstick. Oracle: the float64 reference in the same backward mode (`kw`:
    method, backward, …). The Triton backend run in `dtype` with `precision` products may be at most
    twice as far from it (plus 1e-4) as the eager loop run in `dtype` (with TF32 matmuls for "tf32",
    full float32 otherwise) is from the float64 eager loop — that loop's rounding error."""
    method = kw.get("method", "euler")
    oracle = run_grads(lambda *t: ode_mlp(*t, backend="reference", **kw), tensors64, grad_out)
    exact = run_grads(lambda *t: naive.eager_forward(*t, method=method), tensors64, grad_out)
    low = [t.to(dtype) for t in tensors64]
    ours = run_grads(lambda *t: ode_mlp(*t, backend="triton", input_precision=precision, **kw), low, grad_out)
    with tf32_context("tf32" if precision == "tf32" else "ieee", CUDA):
        eager = run_grads(lambda *t: naive.eager_forward(*t, method=method), low, grad_out)
    for o, want, e_low, e in zip(ours, oracle, eager, exact):
        assert o.dtype == dtype
        assert rel(o, want) <= 2 * rel(e_low, e) + 1e-4, (rel(o, want), rel(e_low, e))


def peak_step_bytes(L, method, backward, B=4096, q=256, m=512):
    """Peak CUDA memory of one training step of the Triton backend above what exists anyway: inputs,
    parameters and the parameter gradients it produces."""
    x, W, V, _, _ = make_stack(B=B, q=q, m=m, L=L, method=method, dtype=torch.float32, v_scale=0.5)
    x, W, V = x.to(CUDA), W.to(CUDA).requires_grad_(True), V.to(CUDA).requires_grad_(True)
    grad_out = torch.randn_like(x)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ode_mlp(x, W, V, method=method, backward=backward, backend="triton").backward(grad_out)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base - (W.numel() + V.numel()) * 4


def assert_graph_replays_bitwise(step, inputs) -> None:
    """Capture `step()` (a training step reading the static tensors `inputs`) in a CUDA graph after a
    warm-up that compiles its kernels; replayed on new inputs, it must give the launched step's
    results bit for bit."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(2):
        for t in inputs:
            t.copy_(torch.randn_like(t))
        graph.replay()
        for got, want in zip(captured, step()):
            assert torch.equal(got, want)
