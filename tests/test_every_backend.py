"""What every backend must do alike, checked on each one that runs here (triton interpreted on CPU
tensors, float32/float16 only): empty batches in every dtype and backward mode, and the checks of
the scalar arguments, made once before dispatch so that each backend raises the same error."""

import pytest
import torch

from helpers import BACKENDS, backend, make_stack  # noqa: F401 (backend: a fixture)
from odenets_fast import ODEMLP, library, ode_mlp

MODES = [("backprop", None), ("adjoint", None), ("adjoint", 2)]
INTERPRETER_DTYPES = (torch.float16, torch.float32)  # what Triton's interpreter runs


def _dtypes(backend):
    if backend == "triton" and not torch.cuda.is_available():
        return INTERPRETER_DTYPES
    return (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _device(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backward, anchor_every", MODES)
@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_empty_batch_in_every_dtype(backend, method, backward, anchor_every):
    """B = 0: an empty output and zero gradients, in the input dtype. (A saved x_L with no rows
    used to be taken for "x_L is the output itself", handing a float16 x_L to a float32 backward.)"""
    for dtype in _dtypes(backend):
        tensors = make_stack(B=0, q=4, m=6, L=3, method=method, bias=True, dtype=dtype)
        leaves = [t.to(_device(backend)).requires_grad_(True) for t in tensors]
        out = ode_mlp(*leaves, method=method, backward=backward, anchor_every=anchor_every, backend=backend)
        assert out.shape == (0, 4) and out.dtype == dtype
        grads = torch.autograd.grad(out.sum(), leaves)
        for leaf, grad in zip(leaves, grads):
            assert grad.dtype == dtype and grad.shape == leaf.shape
            assert not grad.any(), (dtype, grad)


def test_empty_batch_through_a_low_precision_module():
    model = ODEMLP(4, 6, 3, anchor_every=2, bias=True, dtype=torch.bfloat16)
    model(torch.zeros(0, 4, dtype=torch.bfloat16)).sum().backward()
    assert not model.W.grad.any()


def _call(backend, dtype, **kwargs):
    tensors = [t.to(_device(backend)) for t in make_stack(B=3, q=4, m=5, L=2, dtype=dtype)[:3]]
    return ode_mlp(*tensors, backend=backend, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"T": 1e308}, r"T / L \(the step, L = 2\) must be at most 3\.403e\+38 in magnitude for a stack computed "
                       r"in torch\.float32; got 5e\+307"),
        ({"T": 5e-324}, r"T / L \(the step, L = 2\) must be at least 1\.175e-38 in magnitude .*; got 0\.0"),
        ({"T": 1e-38}, r"T / L \(the step, L = 2\) must be at least 1\.175e-38 in magnitude .*; got 5e-39"),
        ({"scale_out": 1e300}, r"scale_out must be at most 3\.403e\+38 in magnitude for a stack computed in "
                               r"torch\.float32; got 1e\+300"),
        ({"scale_in": -1e39}, r"scale_in must be at most 3\.403e\+38 in magnitude"),
        ({"scale_in": 1e-300}, r"scale_in must be 0 or at least 1\.175e-38 in magnitude"),
        # each factor representable, their product (which the kernels multiply by) not
        ({"T": 2e10, "scale_out": 1e30}, r"T / L × scale_out \(a factor of the step's update\) must be at most "
                                         r"3\.403e\+38 in magnitude .*; got 1e\+40"),
        ({"T": 2e-20, "scale_out": 1e-20}, r"T / L × scale_out .* must be 0 or at least 1\.175e-38 .*; got 1e-40"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_extreme_scalars_are_one_error_for_every_backend(backend, kwargs, message):
    """A scale or step that is inf or flushes to 0 in the compute dtype: the same ValueError naming
    the argument everywhere (the float32 C++ and Triton kernels used to overflow, round the step to
    0 or run with a different number than the float64 Python reference)."""
    for dtype in INTERPRETER_DTYPES:  # both compute in float32
        with pytest.raises(ValueError, match=message):
            _call(backend, dtype, **kwargs)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_float64_stacks_take_the_float64_range(backend):
    out = _call(backend, torch.float64, T=1e-300, scale_out=1e300)  # representable in float64: runs
    assert out.shape == (3, 4)
    with pytest.raises(ValueError, match=r"T / L \(the step, L = 2\) must be at least 2\.225e-308"):
        _call(backend, torch.float64, T=1e-310)


@pytest.mark.parametrize("anchor_every", [2**63 - 1, 2**63, 2**70])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_anchor_every_beyond_int64_is_anchor_every_L(backend, anchor_every):
    """Every k >= L stores x_0 alone: the backends get k = L, so no integer type overflows."""
    tensors = make_stack(B=3, q=4, m=5, L=3, dtype=torch.float32)[:3]
    grad_out = torch.randn(3, 4)

    def run(k):
        leaves = [t.to(_device(backend)).requires_grad_(True) for t in tensors]
        out = ode_mlp(*leaves, anchor_every=k, backend=backend)
        return [out] + list(torch.autograd.grad(out, leaves, grad_out.to(out.device)))

    for got, want in zip(run(anchor_every), run(3)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("scale", [1e-25, 1e20])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_drift_does_not_depend_on_the_scale_of_the_states(backend, scale):
    """A linear stack's relative drift is scale-free; squared float32 states underflow at 1e-25 and
    overflow at 1e20, which must not show as a drift of 0 or NaN."""
    x, W, V = make_stack(B=6, q=4, m=5, L=3, dtype=torch.float32)[:3]
    device = _device(backend)

    def drift(x):
        out_drift = torch.zeros((), device=device)
        out = ode_mlp(x.to(device).requires_grad_(True), W.to(device), V.to(device), activation="identity",
                      backend=backend, drift_out=out_drift)  # fmt: skip
        out.sum().backward()
        return out_drift.cpu()

    want = drift(x)
    assert 1e-3 < want < 1  # there is drift to measure
    torch.testing.assert_close(drift(x * scale), want, rtol=1e-4, atol=0)


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_an_in_place_op_on_a_backprop_mode_output_is_allowed(backend, method):
    """Backprop mode's backward reads the stored states, not x_L: a ReLU(inplace=True) after the stack works
    as after a plain loop (autograd reported x_L modified), with relu's gradients."""
    device = _device(backend)
    tensors = [t.to(device) for t in make_stack(B=5, q=4, m=6, L=3, method=method, dtype=torch.float32)[:3]]

    def grads(in_place):
        leaves = [t.clone().requires_grad_(True) for t in tensors]
        out = ode_mlp(*leaves, method=method, backward="backprop", backend=backend)
        out = out.relu_() if in_place else out.relu()
        return torch.autograd.grad(out.square().sum(), leaves)

    for got, want in zip(grads(True), grads(False)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backward, anchor_every", [("backprop", None), ("adjoint", 1), ("adjoint", "auto")])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_a_call_no_backward_can_follow_stores_no_states(backend, backward, anchor_every, monkeypatch):
    """Under no_grad, or with nothing requiring grad, backprop mode and anchors stored L states for nothing
    (400 MiB at L = 2000, B = 1000, q = 64): now only plain adjoint's x_0, and the same output."""
    device = _device(backend)
    tensors = [t.to(device) for t in make_stack(B=5, q=4, m=6, L=4, method="heun", dtype=torch.float32)[:3]]
    stored = []
    forward_impl = library.forward_impl

    def recording(*args):
        outputs = forward_impl(*args)
        stored.append(outputs[2].shape[0] + outputs[3].shape[0])  # anchors and Heun stages
        return outputs

    monkeypatch.setattr(library, "forward_impl", recording)

    def call(*leaves):
        every_layer = torch.ones(4, dtype=torch.bool, device=device) if anchor_every == "auto" else None
        return ode_mlp(*leaves, method="heun", backward=backward, anchor_every=anchor_every, backend=backend,
                       anchor_mask=every_layer)  # fmt: skip

    want = call(*[t.clone().requires_grad_(True) for t in tensors])
    with torch.no_grad():
        without_grad = call(*[t.clone().requires_grad_(True) for t in tensors])
    frozen = call(*tensors)
    assert stored[0] >= 4 and stored[1:] == [1, 1]
    assert torch.equal(without_grad, want.detach()) and torch.equal(frozen, want.detach())
