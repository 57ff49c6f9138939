"""What the GPU tests share: gradients of a run, relative errors, peak memory of a step, CUDA graphs."""

import torch

from helpers import make_stack
from odenets_fast import ode_mlp

CUDA = torch.device("cuda")


def run_grads(fn, tensors, grad_out):
    """[fn(*leaves), then the gradients of all leaves], from fresh leaf copies of `tensors`."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    return [out.detach()] + [g.detach() for g in torch.autograd.grad(out, leaves, grad_out.to(out.dtype))]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


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
