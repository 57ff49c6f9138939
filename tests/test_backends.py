"""Backend selection: explicit name, environment variable, automatic choice, clear unavailability."""

import pytest
import torch

from helpers import make_stack
from odenets_fast import BackendUnavailableError, available_backends, backends, ode_mlp, reference


def test_reference_always_available():
    assert available_backends()["reference"] == "available"


def test_automatic_choice_on_cpu_is_an_available_backend():
    chosen = backends.select_backend(None, torch.device("cpu"))
    available = [name for name, status in available_backends().items() if status == "available"]
    assert any(chosen is backends.load_backend(name) for name in available)


@pytest.mark.parametrize("device", ["meta", "mps", "xpu"])
def test_automatic_choice_on_other_devices_is_the_reference(device):
    """Only the reference's PyTorch operations run on devices other than CPU and CUDA (the automatic choice
    was the CPU-only C++ backend, which `backend="cpp"` itself rejects there)."""
    assert backends.resolve_backend(None, torch.device(device)) == "reference"
    x, W, V = [t.to("meta") for t in make_stack()[:3]]
    assert ode_mlp(x, W, V).shape == x.shape


def test_error_controlled_anchors_on_meta_tensors_are_a_clear_error():
    """(The layout read from the mask's values failed inside torch.nonzero's meta kernel.)"""
    x, W, V = [t.to("meta") for t in make_stack()[:3]]
    assert ode_mlp(x, W, V, anchor_every=2).shape == x.shape
    with pytest.raises(ValueError, match="anchor_every='auto' reads its layout .* meta tensors"):
        ode_mlp(x, W, V, anchor_every="auto")


def test_env_var_overrides(monkeypatch):
    monkeypatch.setenv("ODENETS_FAST_BACKEND", "reference")
    assert backends.select_backend(None, torch.device("cpu")) is reference


def test_every_unavailable_backend_says_why():
    for name, status in available_backends().items():
        assert status == "available" or status.startswith(f"backend {name!r} is not available: ")


def test_asking_for_an_unavailable_backend_raises(monkeypatch):
    def unavailable():
        raise BackendUnavailableError("backend 'cpp' is not available: no compiler")

    monkeypatch.setitem(backends._LOADERS, "cpp", unavailable)
    x, W, V, b, c = make_stack()
    with pytest.raises(BackendUnavailableError, match="backend 'cpp' is not available: no compiler"):
        ode_mlp(x, W, V, backend="cpp")
    assert backends.select_backend(None, torch.device("cpu")) is reference  # automatic choice falls back


def test_spec_travels_through_the_op_arguments_unchanged():
    """StackSpec.op_args / from_op_args are the one conversion between a spec and the library ops'
    scalar arguments: a round trip gives the same spec (anchor_every None travels as 0)."""
    from odenets_fast.spec import OP_FIELDS, StackSpec, check_stack

    x, W, V, b, c = make_stack(L=4, method="heun")
    for anchor_every in (None, 2):
        spec = check_stack(x, W, V, b, c, method="heun", activation="silu", T=2.0, backward="adjoint",
                           anchor_every=anchor_every, scale_in=0.5, scale_out=None, deterministic=False)  # fmt: skip
        args = spec.op_args()
        assert len(args) == len(OP_FIELDS) and all(isinstance(a, (str, int, float, bool)) for a in args)
        assert StackSpec.from_op_args(W, *args) == spec


def test_every_backend_knows_the_same_activations():
    """One table per language — Python's ACTIVATIONS, Triton's codes, the C++ names — and the three agree
    (the values each computes are compared in tests/test_nonfinite.py and the backend tests)."""
    from odenets_fast import _C
    from odenets_fast.activations import ACTIVATIONS
    from odenets_fast.triton_kernels.activations import ACTIVATION_CODES

    assert list(_C.ACTIVATIONS) == list(ACTIVATIONS)
    assert set(ACTIVATION_CODES) == set(ACTIVATIONS) and sorted(ACTIVATION_CODES.values()) == list(range(len(ACTIVATIONS)))
