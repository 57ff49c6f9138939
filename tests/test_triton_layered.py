"""The layered path of the Triton backend (cuBLAS products, Triton elementwise kernels) against the
reference. Without a GPU the products run in torch on the CPU and the kernels under TRITON_INTERPRET=1
(conftest), float32 and float16, at odd sizes so that every tile mask is exercised."""

import pytest
import torch

import naive
from backend_runs import DEVICE, assert_match, run
from helpers import make_stack
from odenets_fast import available_backends, ode_mlp, planner, triton_layered
from odenets_fast.activations import ACTIVATIONS
from odenets_fast.spec import resolve_precision

if available_backends()["triton"] != "available":
    pytest.fail(f"the Triton backend must be testable here: {available_backends()['triton']}", pytrace=False)

ODD = dict(B=37, q=24, m=40)  # three row tiles, the last a partial one (BLOCK_R = 16); q, m below one column tile
MODES = [("backprop", None), ("adjoint", None), ("adjoint", 2)]


@pytest.fixture(autouse=True)
def _layered(monkeypatch):
    monkeypatch.setenv(planner.PATH_ENV, "layered")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("backward, anchor_every", MODES)
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_matches_reference_float32(method, backward, anchor_every, activation, bias):
    tensors = make_stack(L=3, method=method, bias=bias, dtype=torch.float32, **ODD)
    grad_out = torch.randn(ODD["B"], ODD["q"])
    kwargs = dict(method=method, backward=backward, anchor_every=anchor_every, activation=activation)
    assert_match(run("triton", tensors, grad_out, DEVICE, **kwargs), run("reference", tensors, grad_out, **kwargs))


@pytest.mark.parametrize("backward, anchor_every", MODES)
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_float16_error_no_worse_than_plain_float16_torch(method, backward, anchor_every):
    """Judged by the error of the same stack run naively in float16 PyTorch (flash-attention's pattern)."""
    tensors64 = make_stack(L=8, method=method, bias=True, v_scale=0.5, **ODD)
    grad_out = torch.randn(ODD["B"], ODD["q"], dtype=torch.float64)
    kwargs = dict(method=method, backward=backward, anchor_every=anchor_every)
    exact = run("reference", tensors64, grad_out, **kwargs)
    tensors16 = [t.half() for t in tensors64]
    ours = run("triton", tensors16, grad_out, DEVICE, **kwargs)
    leaves = [t.clone().requires_grad_(True) for t in tensors16]
    out = naive.eager_forward(*leaves, method=method)
    plain = [out] + list(torch.autograd.grad(out, leaves, grad_out.half()))
    for o, p, e in zip(ours, plain, exact):
        assert o.dtype == torch.float16
        o, p, e = o.detach().cpu().double(), p.detach().double(), e.detach()
        err, err_plain = float((o - e).norm() / e.norm()), float((p - e).norm() / e.norm())
        assert err <= 2 * err_plain + 1e-3, (err, err_plain)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_drift_matches_reference(method):
    tensors = make_stack(L=4, method=method, dtype=torch.float32, **ODD)
    drifts = {}
    for backend, device in (("triton", DEVICE), ("reference", "cpu")):
        x, W, V = [t.clone().to(device).requires_grad_(True) for t in tensors[:3]]
        drifts[backend] = torch.zeros((), device=device)
        ode_mlp(x, W, V, method=method, backend=backend, drift_out=drifts[backend]).sum().backward()
    assert float(drifts["reference"]) > 1e-4
    assert float(drifts["triton"]) == pytest.approx(float(drifts["reference"]), rel=1e-4)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_wider_states_than_the_fused_kernels_take(method, monkeypatch):
    """q > 256 runs on the layered path by the automatic choice, and matches the reference; forcing
    the fused path there is a clear error."""
    monkeypatch.delenv(planner.PATH_ENV)
    tensors = make_stack(B=5, q=300, m=7, L=2, method=method, bias=True, dtype=torch.float32)
    grad_out = torch.randn(5, 300)
    assert_match(run("triton", tensors, grad_out, DEVICE, method=method),
                 run("reference", tensors, grad_out, method=method))  # fmt: skip
    monkeypatch.setenv(planner.PATH_ENV, "fused")
    with pytest.raises(ValueError, match="on-chip up to q = 256; got q = 300 with ODENETS_FAST_TRITON_PATH=fused"):
        run("triton", tensors, grad_out, DEVICE, method=method)


@pytest.mark.parametrize("backward, anchor_every", MODES)
def test_empty_batch(backward, anchor_every):
    tensors = make_stack(B=0, L=3, method="heun", bias=True, dtype=torch.float32)
    got = run("triton", tensors, torch.zeros(0, 5), DEVICE, method="heun", backward=backward,
              anchor_every=anchor_every)  # fmt: skip
    assert got[0].shape == (0, 5)
    assert all(not g.any() for g in got[1:])


def test_noncontiguous_and_batched_inputs():
    x, W, V, b, c = make_stack(B=3, q=3, m=5, L=2, bias=True, dtype=torch.float32)
    wide = torch.randn(2, 3, 6)[..., ::2]  # (2, 3, 3) with last-dim stride 2
    grad_out = torch.randn(2, 3, 3)
    assert_match(run("triton", [wide, W, V, b, c], grad_out, DEVICE), run("reference", [wide, W, V, b, c], grad_out))


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_bitwise_reproducible(method):
    """Full-batch GEMMs and fixed-order column sums: two runs give the same bits (deterministic=False
    too: the layered path has no atomics)."""
    tensors = make_stack(L=3, method=method, bias=True, dtype=torch.float32, **ODD)
    grad_out = torch.randn(ODD["B"], ODD["q"])
    first = run("triton", tensors, grad_out, DEVICE, method=method)
    second = run("triton", tensors, grad_out, DEVICE, method=method, deterministic=False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_path_override_must_name_a_path(monkeypatch):
    monkeypatch.setenv(planner.PATH_ENV, "tiled")
    tensors = make_stack(dtype=torch.float32)
    with pytest.raises(ValueError, match="ODENETS_FAST_TRITON_PATH must be one of \\['layered', 'fused'\\]"):
        run("triton", tensors, torch.randn(7, 5), DEVICE)


def test_layered_path_runs_when_chosen(monkeypatch):
    calls = []
    forward = triton_layered.forward
    monkeypatch.setattr(triton_layered, "forward", lambda *args: calls.append(1) or forward(*args))
    run("triton", make_stack(dtype=torch.float32), torch.randn(7, 5), DEVICE)
    assert calls == [1]


@pytest.mark.parametrize("setting, want", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_precision_follows_pytorch_on_cuda(setting, want):
    """input_precision=None: TF32 exactly when eager PyTorch uses it for CUDA float32 products; on CPU
    tensors never (CPU GEMMs do not use TF32); an explicit value wins."""
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(setting)
        assert resolve_precision(None, torch.device("cuda")) == want
        assert resolve_precision(None, torch.device("cpu")) == "ieee"
        assert resolve_precision("tf32x3", torch.device("cuda")) == "tf32x3"
    finally:
        torch.set_float32_matmul_precision(saved)


@pytest.mark.parametrize("precision, want", [("tf32", "tf32"), ("ieee", "ieee"), ("tf32x3", "ieee")])
def test_explicit_precision_is_what_cublas_runs(precision, want):
    """The layered path sets PyTorch's cuBLAS precision for its products and restores it after;
    cuBLAS has no three-pass TF32, so "tf32x3" runs in full float32 (at least as accurate)."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with triton_layered.tf32_context(precision, torch.device("cuda")):
        assert matmul.fp32_precision == want
    assert matmul.fp32_precision == before


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("precision", ["tf32", "ieee"])
def test_a_user_of_the_legacy_tf32_flag_gets_it_back(legacy, precision):
    """A user who set `allow_tf32` (the legacy API) reads it back after a layered call: PyTorch's legacy
    getters raise while the legacy and new settings disagree, so the restore must make them agree."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    try:
        matmul.allow_tf32 = legacy
        with triton_layered.tf32_context(precision, torch.device("cuda")):
            assert matmul.fp32_precision == precision
        assert matmul.allow_tf32 is legacy
        assert torch.get_float32_matmul_precision() == ("high" if legacy else "highest")
    finally:
        matmul.allow_tf32 = saved
