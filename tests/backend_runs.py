"""One forward + backward through `ode_mlp` on a backend, and the comparison of two such runs."""

import torch

from odenets_fast import ode_mlp

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton backend's device here


def run(backend, tensors, grad_out, device="cpu", **kwargs):
    """[x_L, then the gradients of the tensors that are not None], from fresh leaf copies on `device`."""
    leaves = [None if t is None else t.detach().clone().to(device).requires_grad_(True) for t in tensors]
    out = ode_mlp(*leaves, backend=backend, **kwargs)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out.to(device, out.dtype))
    return [out] + list(grads)


def assert_match(got, want, rtol=2e-5, atol=2e-6):
    """Same dtypes and shapes, close values (atol relative to the largest entry of each tensor)."""
    for a, b in zip(got, want):
        a, b = a.detach(), b.detach()
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=rtol, atol=atol * max(1.0, float(b.abs().max())))
