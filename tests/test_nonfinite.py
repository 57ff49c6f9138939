"""NaN and ±inf in every backend, against the reference: σ and σ' of every activation at NaN, ±inf and
finite values up to the largest float, and one non-finite entry in any input or parameter. The contract
is the reference's result (odenets_fast/activations.py in torch's IEEE arithmetic), NaN where it gives
NaN — e.g. gelu(−inf) = −inf · 0 — so a backend must neither hide a NaN (relu) nor make one (0 · inf
in padding). And σ, σ' near 0 and in their tails, to the relative accuracy of the reference's formulas."""

import math

import pytest
import torch

from helpers import activation_through_stack, make_stack, special_values
from odenets_fast import ODEMLP, available_backends, ode_mlp
from odenets_fast.activations import ACTIVATIONS
from odenets_fast.planner import PATH_ENV
from odenets_fast.triton_backend import WEIGHT_GRADS_ENV

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (backend, dtype, tolerance of σ and σ' against the reference's formulas in that dtype); the C++
# float32 functions are polynomial approximations of a few ulp
BACKENDS = [("cpp", torch.float64, 1e-12), ("cpp", torch.float32, 1e-5), ("triton", torch.float32, 1e-5),
            ("triton/layered", torch.float32, 1e-5)]  # fmt: skip
# (backend, dtype, Triton's path or its fused path's weight-gradient reduction): each reduction has its
# own products over the batch
VARIANTS = [("cpp", torch.float64, None), ("cpp", torch.float32, None), ("triton", torch.float32, "partials"),
            ("triton", torch.float32, "workspace"), ("triton", torch.float32, "atomic"),
            ("triton", torch.float32, "layered")]  # fmt: skip
MODES = [("backprop", None), ("adjoint", None)]
# the Triton interpreter's numpy warns of the overflows and NaNs that are the point here
pytestmark = pytest.mark.filterwarnings("ignore:.* encountered in:RuntimeWarning")


@pytest.fixture(autouse=True)
def _backends_testable():
    for name in ("cpp", "triton"):
        if available_backends()[name] != "available":  # a broken build must not pass as skipped tests
            pytest.fail(f"the {name} backend must be testable here: {available_backends()[name]}", pytrace=False)


def _device(backend):
    return DEVICE if backend == "triton" else "cpu"


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("backend, dtype, tol", BACKENDS, ids=lambda v: str(v).replace("torch.", ""))
def test_activation_and_slope_of_special_values(backend, dtype, tol, activation, monkeypatch):
    backend, _, path = backend.partition("/")
    monkeypatch.setenv(PATH_ENV, path or "fused")  # the Triton backend's path (cpp reads no such variable)
    z = special_values(dtype)
    want_value, want_slope = ACTIVATIONS[activation].fn(z), ACTIVATIONS[activation].grad(z)
    value, slope = activation_through_stack(backend, activation, z.to(_device(backend)))
    for got, want in ((value, want_value), (slope, want_slope)):
        # equal_nan: NaN exactly where the reference has NaN; inf must equal inf of the same sign
        torch.testing.assert_close(got.cpu(), want[:, None].expand(got.shape), rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("backend, dtype", [entry[:2] for entry in BACKENDS], ids=lambda v: str(v).replace("torch.", ""))
def test_activation_and_slope_keep_relative_accuracy(backend, dtype, activation, monkeypatch):
    """|z| from 1e-30 to 30: σ and σ' relatively no further from the float64 formulas than twice the
    reference's own formulas in `dtype` (plus 1e-5) — the absolute tolerance above cannot see small values
    (Triton's tanh was 2 sigmoid(2z) − 1, whose error stays near 6e-8: tanh(1e-8) came out 0)."""
    backend, _, path = backend.partition("/")
    monkeypatch.setenv(PATH_ENV, path or "fused")
    magnitudes = torch.logspace(-30, math.log10(30), 61, dtype=torch.float64)
    z = torch.cat([magnitudes, -magnitudes]).to(dtype)
    value, slope = activation_through_stack(backend, activation, z.to(_device(backend)))
    exact = ACTIVATIONS[activation]
    for got, want, same_dtype in ((value, exact.fn(z.double()), exact.fn(z)), (slope, exact.grad(z.double()), exact.grad(z))):
        def error(t):  # relative, absolute where the exact value is 0
            return (t.cpu().double() - want).abs() / torch.where(want == 0, 1.0, want.abs())

        too_far = error(got[:, 0]) > 2 * error(same_dtype) + 1e-5
        assert not too_far.any(), (z[too_far], error(got[:, 0])[too_far], error(same_dtype)[too_far])


def _use_reduction(grads, monkeypatch) -> dict:
    """ode_mlp keyword arguments (and environment) that make a Triton backward use `grads`: the layered
    path, or the fused path with that weight-gradient reduction."""
    monkeypatch.setenv(PATH_ENV, "layered" if grads == "layered" else "fused")
    if grads == "atomic":
        return dict(deterministic=False)
    if grads not in (None, "layered"):
        monkeypatch.setenv(WEIGHT_GRADS_ENV, grads)
    return {}


def _run(backend, tensors, grad_out, options, **kwargs):
    device = _device(backend)
    leaves = [None if t is None else t.to(device).requires_grad_(True) for t in tensors]
    out = ode_mlp(*leaves, backend=backend, **options, **kwargs)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out.to(device))
    return [t.detach().cpu() for t in (out, *grads)]


@pytest.mark.parametrize("backward, anchor_every", MODES)
@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("backend, dtype, grads", VARIANTS, ids=lambda v: str(v).replace("torch.", ""))
def test_one_nonfinite_entry_gives_the_references_nonfinite_results(backend, dtype, grads, method, backward,
                                                                   anchor_every, monkeypatch):  # fmt: skip
    # One NaN or ±inf in x, W, V, b or c (a middle layer's: the backward meets it after a layer of the
    # reconstruction and before another). q = 3 and m = 5 pad Triton's tiles in both widths.
    options = _use_reduction(grads, monkeypatch)
    kwargs = dict(method=method, activation="relu", backward=backward, anchor_every=anchor_every)
    clean = make_stack(B=9, q=3, m=5, L=3, method=method, bias=True, dtype=dtype)
    grad_out = torch.randn(9, 3, generator=torch.Generator().manual_seed(1), dtype=dtype)
    for index, position in enumerate([(4, 1), (1, 4, 2), (1, 0, 4), (1, 2), (1, 1)]):
        for value in (math.nan, math.inf, -math.inf):
            tensors = [t.clone() for t in clean]
            tensors[index][position] = value
            got = _run(backend, tensors, grad_out, options, **kwargs)
            want = _run("reference", tensors, grad_out, {}, **kwargs)
            _assert_same_results(got, want, f"with {value} in {'xWVbc'[index]}{list(position)}")


@pytest.mark.parametrize("activation", ["identity", "relu"])
@pytest.mark.parametrize("backward, anchor_every", MODES)
@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("backend, dtype, grads", VARIANTS, ids=lambda v: str(v).replace("torch.", ""))
def test_infinite_states_and_cotangents_stay_infinite(backend, dtype, grads, method, backward, anchor_every,
                                                      activation, monkeypatch):  # fmt: skip
    # q = m = 1 and positive weights: an infinite state or cotangent stays ±inf through every layer, and
    # nothing that the reference keeps infinite may become NaN — which 0 · inf in Triton's padding of
    # the widths (to 16) does, in the forward's residual and in the backward's dz and dx.
    options = _use_reduction(grads, monkeypatch)
    kwargs = dict(method=method, activation=activation, backward=backward, anchor_every=anchor_every)
    P = 4 if method == "heun" else 3
    W, V = torch.full((P, 1, 1), 0.5, dtype=dtype), torch.full((P, 1, 1), 2.0, dtype=dtype)
    finite = torch.tensor([[1.0], [2.0]], dtype=dtype)
    for value in (math.inf, -math.inf):
        infinite = torch.full((2, 1), value, dtype=dtype)
        for x, grad_out in ((infinite, finite), (finite, infinite)):
            got = _run(backend, (x, W, V), grad_out, options, **kwargs)
            want = _run("reference", (x, W, V), grad_out, {}, **kwargs)
            _assert_same_results(got, want, f"x = {x.flatten().tolist()}, grad_out = {grad_out.flatten().tolist()}")


def _assert_same_results(got, want, context):
    for name, a, b in zip(["out", "x", "W", "V", "b", "c"], got, want):
        assert torch.equal(a.isnan(), b.isnan()), f"{name} {context}"
        assert torch.equal(a.isposinf(), b.isposinf()) and torch.equal(a.isneginf(), b.isneginf()), f"{name} {context}"
        finite = b.isfinite()
        torch.testing.assert_close(a[finite], b[finite], rtol=1e-4, atol=1e-4, msg=f"{name} {context}")


@pytest.mark.parametrize("backend", ["cpp", "triton", "triton/layered"])
def test_training_step_with_a_nan_weight_is_nan_as_in_the_reference(backend, monkeypatch):
    backend, _, path = backend.partition("/")
    monkeypatch.setenv(PATH_ENV, path or "fused")
    results = {}
    for name in (backend, "reference"):
        torch.manual_seed(0)
        model = ODEMLP(4, 8, 3, activation="relu", init="iid", backend=name).to(_device(name))
        with torch.no_grad():
            model.V.normal_()
            model.W[1, 2, 0] = math.nan
        x = torch.randn(5, 4, device=_device(name))
        loss = torch.nn.functional.mse_loss(model(x), torch.zeros_like(x))
        loss.backward()
        results[name] = [t.detach().cpu() for t in (loss, model.W.grad, model.V.grad)]
    assert results[backend][0].isnan()
    for got, want in zip(results[backend], results["reference"]):
        assert torch.equal(got.isnan(), want.isnan())
