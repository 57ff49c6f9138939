"""The C++ CPU backend against the reference: float64 to ~1e-10, float32/16, bfloat16, gradcheck, every
method × backward mode × activation × bias × anchor_every, odd and empty batches, bad input, the op
schemas, and the fallback to the reference when the extension is not built."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import make_stack
from odenets_fast import available_backends, backends, ode_mlp
from odenets_fast.activations import ACTIVATIONS

ODD = dict(B=37, q=24, m=40, L=5)
# B q m = 2.3e6: 8 row blocks of 37 or 38 rows (csrc/mlp_stack.cpp, plan_row_chunks), dV and dW each
# in 2 row blocks (gradient_blocks). With q > m, MKL gives a row of the products with Vᵀ other last bits
# in blocks of other sizes (as it splits 301 rows by the number of threads, 150 + 151 or 100 + 100 + 101)
SPLIT = dict(B=301, q=160, m=48, L=4)
MODES = [("backprop", None), ("adjoint", None), ("adjoint", 1), ("adjoint", 3)]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cpp():
    status = available_backends()["cpp"]
    if status != "available":  # a broken build must not pass as skipped tests
        pytest.fail(f"the cpp backend must be testable here: {status}", pytrace=False)


requires_cpp = pytest.mark.usefixtures("cpp")


def _run(backend, tensors, grad_out, **kwargs):
    """(out, gradients of every tensor given, drift or None) through ode_mlp and autograd."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]
    drift = torch.full((), float("nan"), dtype=torch.float64)  # written by an adjoint backward only
    out = ode_mlp(*leaves, backend=backend, drift_out=drift, **kwargs)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out.to(out.dtype))
    return [out.detach(), *grads], (None if drift.isnan() else drift)


def _assert_match(got, want, *, rtol, atol):
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(1.0, float(b.abs().max())))


def _compare(tensors, *, rtol, atol, **kwargs):
    grad_out = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got, got_drift = _run("cpp", tensors, grad_out, **kwargs)
    want, want_drift = _run("reference", tensors, grad_out, **kwargs)
    _assert_match(got, want, rtol=rtol, atol=atol)
    assert (got_drift is None) == (want_drift is None)
    if want_drift is not None:
        assert got_drift.dtype == want_drift.dtype and got_drift.dim() == 0
        torch.testing.assert_close(got_drift, want_drift, rtol=max(rtol, 1e-6), atol=0.0)
    return got_drift


@requires_cpp
@pytest.mark.parametrize("backward, anchor_every", MODES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_matches_reference_float64(method, activation, bias, backward, anchor_every):
    tensors = make_stack(method=method, bias=bias, **ODD)
    drift = _compare(
        tensors, rtol=1e-10, atol=1e-12,
        method=method, activation=activation, backward=backward, anchor_every=anchor_every,
    )  # fmt: skip
    if backward == "adjoint" and activation != "identity":
        assert drift > 0  # the drift is measured, not a placeholder


@requires_cpp
@pytest.mark.parametrize("backward, anchor_every", MODES)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_matches_reference_float32(method, activation, backward, anchor_every):
    tensors = make_stack(method=method, bias=True, dtype=torch.float32, **ODD)
    _compare(
        tensors, rtol=1e-4, atol=1e-5,
        method=method, activation=activation, backward=backward, anchor_every=anchor_every,
    )  # fmt: skip


@requires_cpp
@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float64, 1e-10, 1e-12), (torch.float32, 1e-4, 1e-5)],
                         ids=["float64", "float32"])  # fmt: skip
@pytest.mark.parametrize("backward, anchor_every", MODES)
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_row_and_gradient_blocks_match_reference(method, backward, anchor_every, dtype, rtol, atol):
    # ODD is one block; SPLIT cuts the batch and both weight gradients into blocks of unequal sizes
    tensors = make_stack(method=method, bias=True, dtype=dtype, v_scale=0.5, **SPLIT)
    _compare(tensors, rtol=rtol, atol=atol, method=method, activation="tanh", backward=backward,
             anchor_every=anchor_every)  # fmt: skip


@requires_cpp
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_bias_gradients_keep_float32_accuracy_over_a_large_batch(method):
    """db and dc sum 2^18 rows: a float32 running sum would be ~2e-6 off (a cotangent with nonzero mean)."""
    tensors = make_stack(B=2**18, q=4, m=8, L=1, method=method, bias=True)
    gen = torch.Generator().manual_seed(1)
    grad_out = 1.0 + 0.1 * torch.randn(tensors[0].shape, generator=gen, dtype=torch.float64)
    exact, _ = _run("reference", tensors, grad_out, method=method, activation="relu", backward="backprop")
    single = [t.float() for t in tensors]
    got, _ = _run("cpp", single, grad_out, method=method, activation="relu", backward="backprop")
    for name, g, e in zip("bc", got[4:], exact[4:]):
        error = float((g.double() - e).abs().max() / e.abs().max())
        assert error < 2e-7, f"d{name}: relative error {error:.1e}"


@requires_cpp
@pytest.mark.parametrize("anchor_every", [2**63 - 1, 2**63 - 2])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_anchor_interval_near_int64_max_means_one_anchor(method, anchor_every):
    # ceil(L / k) as (L + k - 1) / k overflowed here: an empty or negative anchors tensor, then a write past it
    tensors = make_stack(method=method, bias=True, **ODD)
    _compare(tensors, rtol=1e-10, atol=1e-12, method=method, backward="adjoint", anchor_every=anchor_every)


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_low_precision_computed_in_float32_like_the_reference(method, dtype):
    tensors = make_stack(method=method, bias=True, dtype=dtype, v_scale=0.5, **ODD)
    drift = _compare(tensors, rtol=2e-2, atol=2e-2, method=method, activation="gelu", backward="adjoint")
    assert 0 < drift < 1  # written by the backward, as by the reference


@requires_cpp
@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("activation", ["gelu", "tanh", "silu", "gelu_tanh"])
def test_gradcheck_backprop(method, activation):
    x, W, V, b, c = make_stack(B=3, q=4, m=5, L=3, method=method, bias=True)
    inputs = [t.clone().requires_grad_(True) for t in (x, W, V, b, c)]

    def stack(*args):
        return ode_mlp(*args, method=method, activation=activation, backward="backprop", backend="cpp")

    assert torch.autograd.gradcheck(stack, inputs)


@requires_cpp
def test_odd_shapes_leading_dims_and_non_contiguous_input():
    x, W, V, b, c = make_stack(B=24, q=5, m=7, L=3, bias=True)
    wide = torch.randn(2, 12, 2 * 5, dtype=torch.float64)
    x = wide[..., ::2]  # (2, 12, 5), not contiguous
    assert not x.is_contiguous()
    got = ode_mlp(x, W, V, b, c, backend="cpp", activation="silu")
    want = ode_mlp(x, W, V, b, c, backend="reference", activation="silu")
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@requires_cpp
@pytest.mark.parametrize("backward", ["backprop", "adjoint"])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_empty_batch(method, backward):
    x, W, V, b, c = make_stack(B=0, q=4, m=6, L=3, method=method, bias=True)
    got, drift = _run("cpp", (x, W, V, b, c), torch.zeros(0, 4), method=method, backward=backward)
    assert got[0].shape == (0, 4)
    for grad, like in zip(got[1:], (x, W, V, b, c)):
        assert grad.shape == like.shape and not grad.any()
    assert drift is None if backward == "backprop" else float(drift) == 0.0


@requires_cpp
@pytest.mark.parametrize("shape", [ODD, SPLIT, dict(B=128, q=32, m=64, L=16), dict(B=4096, q=4, m=8, L=2)],
                         ids=["one-block", "split", "two-blocks", "long-batch"])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["float32", "float64", "bfloat16", "float16"])  # fmt: skip
@pytest.mark.parametrize("backward, anchor_every", MODES)
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_thread_count_does_not_change_results(method, backward, anchor_every, dtype, shape):
    # Bitwise: the row blocks and gradient blocks are fixed by the problem, and each product runs on one
    # BLAS thread, so 1, 2 or 3 threads compute every product and sum alike. Blocks of one per thread
    # gave "split" other bits; MKL's own threads gave dW other last bits at B = 128, and split the sums
    # over the 4096 rows of the long batch, which ran on the caller's thread.
    tensors = make_stack(method=method, bias=True, dtype=dtype, **shape)
    grad_out = torch.randn(shape["B"], shape["q"], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kwargs = dict(method=method, backward=backward, anchor_every=anchor_every)
    threads = torch.get_num_threads()
    runs = {}
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            runs[count] = _run("cpp", tensors, grad_out, **kwargs)
    finally:
        torch.set_num_threads(threads)
    (single, single_drift) = runs[1]
    for count in (2, 3):
        results, drift = runs[count]
        for got, want in zip(results, single):
            assert torch.equal(got, want), f"{count} threads"
        assert (drift is None) == (single_drift is None)
        if drift is not None:
            assert torch.equal(drift, single_drift), f"{count} threads"


_BACKWARD_PEAK_RSS = """
import json
from pathlib import Path
import torch
from odenets_fast import ode_mlp

def status_bytes(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

torch.set_num_threads(2)  # row blocks on two threads, as on any multi-core machine
B, q, m = 64, 64, 256     # the parameters dominate the workspaces from a few layers on
extra = {}
for depth in (2, 8, 256):  # depth 2 only for the first-use allocations (thread pool, MKL buffers)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, q, generator=gen)
    W = (0.1 * torch.randn(depth, m, q, generator=gen)).requires_grad_(True)
    V = (0.1 * torch.randn(depth, q, m, generator=gen)).requires_grad_(True)
    out = ode_mlp(x, W, V, backend="cpp", backward="adjoint")
    grad_out = torch.ones_like(out)
    baseline = status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    grads = torch.autograd.grad(out, (W, V), grad_out)
    extra[depth] = status_bytes("VmHWM") - baseline - sum(g.numel() * g.element_size() for g in grads)
    del out, grads
print(json.dumps({"extra_L8": extra[8], "extra_L256": extra[256], "gradients_L256": 2 * 256 * m * q * 4}))
"""


@requires_cpp
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS is measured through Linux /proc")
def test_adjoint_backward_memory_does_not_grow_with_depth():
    # A fresh process whose glibc serves blocks of 64 KiB and more by mmap, so that freed memory leaves
    # the RSS at once (as in bench/peak_memory.py). A backward that kept a copy of the weight gradients
    # per extra thread would peak 32 MiB (the L = 256 gradients) higher at L = 256 than at L = 8.
    env = {k: v for k, v in os.environ.items() if k != backends.ENV_VAR}
    env.update(MALLOC_MMAP_THRESHOLD_=str(64 * 1024), OMP_NUM_THREADS="2")
    run = subprocess.run(
        [sys.executable, "-c", _BACKWARD_PEAK_RSS], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )
    assert run.returncode == 0, run.stderr
    peaks = json.loads(run.stdout.strip().splitlines()[-1])
    growth = peaks["extra_L256"] - peaks["extra_L8"]
    assert growth < peaks["gradients_L256"] / 16, peaks  # 2 MiB: workspaces, allocator noise


@requires_cpp
def test_automatic_choice_on_cpu_is_cpp():
    from odenets_fast import cpp_backend

    assert backends.select_backend(None, torch.device("cpu")) is cpp_backend


@requires_cpp
def test_ops_registered_with_schemas():
    forward = str(torch.ops.odenets_fast.mlp_stack_forward.default._schema)
    backward = str(torch.ops.odenets_fast.mlp_stack_backward.default._schema)
    options = "str method, str activation, float step, float scale_in, float scale_out, str backward, int? anchor_every"
    assert forward == (
        f"odenets_fast::mlp_stack_forward(Tensor x, Tensor W, Tensor V, Tensor? b, Tensor? c, {options}) "
        "-> (Tensor final_state, Tensor anchors, Tensor? stages)"
    )
    assert backward == (
        "odenets_fast::mlp_stack_backward(Tensor grad_out, Tensor final_state, Tensor anchors, Tensor? stages, "
        f"Tensor W, Tensor V, Tensor? b, Tensor? c, {options}) "
        "-> (Tensor grad_x, Tensor grad_W, Tensor grad_V, Tensor? grad_b, Tensor? grad_c, Tensor? drift)"
    )


def _forward_args(**overrides):
    x, W, V, b, c = make_stack(B=6, q=3, m=4, L=2, bias=True)
    args = dict(
        x=x, W=W, V=V, b=b, c=c, method="euler", activation="gelu", step=0.5,
        scale_in=1.0, scale_out=1.0, backward="adjoint", anchor_every=None,
    )  # fmt: skip
    args.update(overrides)
    return args


@requires_cpp
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(V=torch.zeros(2, 3, 5, dtype=torch.float64)), r"V must have shape \[2, 3, 4\]"),
        (dict(x=torch.zeros(6, 4, dtype=torch.float64)), r"x must have shape \[6, 3\]"),
        (dict(b=torch.zeros(2, 3, dtype=torch.float64)), r"b must have shape \[2, 4\]"),
        (dict(c=torch.zeros(2, 3, dtype=torch.float32)), "c has dtype Float"),
        (dict(x=torch.zeros(6, 3, dtype=torch.float16)), "must be float32 or float64"),
        (dict(method="rk4"), "method must be 'euler' or 'heun'"),
        (dict(activation="swish"), "activation must be one of"),
        (dict(backward="backprop", anchor_every=2), "anchor_every is only meaningful"),
        (dict(anchor_every=0), "anchor_every must be >= 1"),
        (dict(step=float("nan")), "step must be finite"),
    ],
)
def test_direct_op_call_checks_its_arguments(overrides, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.odenets_fast.mlp_stack_forward(**_forward_args(**overrides))


@requires_cpp
def test_direct_backward_call_checks_saved_tensors():
    args = _forward_args(method="heun", backward="backprop", W=torch.zeros(3, 4, 3, dtype=torch.float64))
    args.update(V=torch.zeros(3, 3, 4, dtype=torch.float64), b=None, c=None)
    final, anchors, stages = torch.ops.odenets_fast.mlp_stack_forward(**args)
    assert stages.shape == (2, 6, 3)
    common = {k: args[k] for k in ("W", "V", "b", "c", "method", "activation", "step", "scale_in", "scale_out")}
    common.update(backward="backprop", anchor_every=None)
    grad_out = torch.zeros(6, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"stages \(L, B, q\) are required"):
        torch.ops.odenets_fast.mlp_stack_backward(grad_out, final, anchors, None, **common)
    with pytest.raises(RuntimeError, match=r"anchors must have shape \[2, 6, 3\]"):
        torch.ops.odenets_fast.mlp_stack_backward(grad_out, final, anchors[:1], stages, **common)


@requires_cpp
@pytest.mark.parametrize(
    "bad",
    [
        dict(x=torch.zeros(4, 7)),
        dict(V=torch.zeros(1, 3, 6)),
        dict(b=torch.zeros(1, 4)),
        dict(x=torch.zeros(4, 3, dtype=torch.float64)),
        dict(activation="swish"),
        dict(method="heun"),
        dict(backward="backprop", anchor_every=2),
        dict(anchor_every=0),
        dict(T=-1.0),
    ],
)
def test_bad_input_same_error_as_reference(bad):
    x, W, V, b, c = make_stack(B=4, q=3, m=5, L=1, bias=True, dtype=torch.float32)
    tensors = dict(x=x, W=W, V=V, b=b, c=c)
    tensors.update({k: v for k, v in bad.items() if k in tensors})
    options = {k: v for k, v in bad.items() if k not in tensors}

    def error_with(backend):
        try:
            ode_mlp(*tensors.values(), backend=backend, **options)
        except (TypeError, ValueError) as err:
            return type(err), str(err)
        pytest.fail(f"backend {backend!r} accepted {bad}")

    assert error_with("cpp") == error_with("reference")


def test_cpp_refuses_non_cpu_tensors():
    x, W, V, b, c = make_stack(B=4, q=3, m=5, L=2)
    with pytest.raises(ValueError, match="backend 'cpp' runs on CPU tensors only; got tensors on meta"):
        ode_mlp(x.to("meta"), W.to("meta"), V.to("meta"), backend="cpp")
    with pytest.raises(ValueError, match="got tensors on cuda:0"):
        backends.select_backend("cpp", torch.device("cuda", 0))


_WITHOUT_EXTENSION = """
import sys, warnings
sys.modules["odenets_fast._C"] = None  # what a missing or unloadable extension looks like to Python
import torch
import odenets_fast
from odenets_fast import backends, reference

x, W, V = torch.randn(5, 3), torch.randn(2, 4, 3), torch.randn(2, 3, 4)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = [odenets_fast.ode_mlp(x, W, V) for _ in range(2)]
assert backends.select_backend(None, torch.device("cpu")) is reference
assert torch.equal(out[0], odenets_fast.ode_mlp(x, W, V, backend="reference"))
print(len(caught))
print(caught[0].message)
print(odenets_fast.available_backends()["cpp"])
"""


def test_falls_back_to_reference_with_one_warning_without_the_extension():
    env = {k: v for k, v in os.environ.items() if k != backends.ENV_VAR}
    run = subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXTENSION], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )
    assert run.returncode == 0, run.stderr
    count, message, status = run.stdout.strip().splitlines()
    assert count == "1"
    assert "backend 'cpp' is not available" in message and "pip install --no-build-isolation -e ." in message
    assert "Falling back to the slower 'reference' backend" in message
    assert status.startswith("backend 'cpp' is not available: the C++ extension odenets_fast._C could not be imported")


def test_setup_skips_the_extension_when_asked():
    env = {**os.environ, "ODENETS_FAST_SKIP_EXT": "1"}
    run = subprocess.run(
        [sys.executable, "setup.py", "--name"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert "ODENETS_FAST_SKIP_EXT is set: skipping the C++ extension" in run.stderr
    assert run.stdout.strip() == "odenets_fast"
