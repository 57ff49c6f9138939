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
