"""Backend registry and automatic choice (DESIGN.md §7).

A backend is a module with `forward(x, W, V, b, c, spec)` and `backward(grad_out, saved, W, V, b,
c, spec)` (`interface.Backend`). Choice, in order: the explicit `backend=` argument,
then the environment variable `ODENETS_FAST_BACKEND`, then the device: CUDA tensors → "triton",
CPU tensors → "cpp", each falling back to "reference" when it is not available; tensors on any other
device (MPS, XPU, meta) → "reference".
"""

import os
import warnings
from types import ModuleType
from typing import Callable, Optional

import torch

from . import reference
from .spec import check_choice

ENV_VAR = "ODENETS_FAST_BACKEND"
BACKEND_NAMES = ("reference", "triton", "cpp")


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why."""


def _load_reference() -> ModuleType:
    return reference


def _load_triton() -> ModuleType:
    try:
        import triton  # noqa: F401
    except ImportError as err:
        raise BackendUnavailableError(f"backend 'triton' is not available: triton is not installed ({err})") from err
    from . import triton_backend

    if not (torch.cuda.is_available() or triton_backend.INTERPRETED):
        raise BackendUnavailableError(
            "backend 'triton' is not available: no CUDA device (set TRITON_INTERPRET=1 before importing "
            "odenets_fast to run the kernels on CPU tensors through Triton's interpreter, for testing)"
        )
    return triton_backend


def _load_cpp() -> ModuleType:
    try:
        from . import cpp_backend
    except ImportError as err:
        raise BackendUnavailableError(
            f"backend 'cpp' is not available: the C++ extension odenets_fast._C could not be imported ({err}); "
            f"build it from the source checkout with `pip install --no-build-isolation -e .` "
            f"(needs a C++ compiler; see setup.py)"
        ) from err
    return cpp_backend


# Each loader returns the backend module or raises BackendUnavailableError saying why.
_LOADERS: dict[str, Callable[[], ModuleType]] = {
    "reference": _load_reference,
    "triton": _load_triton,
    "cpp": _load_cpp,
}


def load_backend(name: str) -> ModuleType:
    check_choice("backend", name, BACKEND_NAMES)
    return _LOADERS[name]()


def available_backends() -> dict[str, str]:
    """Map every backend name to "available" or the reason it is not."""
    status = {}
    for name in BACKEND_NAMES:
        try:
            load_backend(name)
            status[name] = "available"
        except BackendUnavailableError as err:
            status[name] = str(err)
    return status


_warned_fallbacks: set[str] = set()


def _automatic(device: torch.device) -> str:
    preferred = {"cuda": "triton", "cpu": "cpp"}.get(device.type)
    if preferred is None:  # MPS, XPU, meta, …: only the reference's PyTorch operations run there
        return "reference"
    try:
        load_backend(preferred)
        return preferred
    except BackendUnavailableError as err:
        if preferred not in _warned_fallbacks:  # once per process: the reason does not change
            _warned_fallbacks.add(preferred)
            warnings.warn(f"{err}. Falling back to the slower 'reference' backend.", stacklevel=4)
        return "reference"


def _check_device(name: str, device: torch.device) -> None:
    if name == "cpp" and device.type != "cpu":
        raise ValueError(f"backend 'cpp' runs on CPU tensors only; got tensors on {device}")


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """The name of the backend for tensors on `device`: `backend=`, else ODENETS_FAST_BACKEND, else
    automatic. Raises if the named backend cannot run here."""
    if backend is None:
        backend = os.environ.get(ENV_VAR, "") or None
        if backend is not None and backend not in BACKEND_NAMES:
            raise ValueError(f"environment variable {ENV_VAR} must be one of {list(BACKEND_NAMES)}; got {backend!r}")
    if backend is None:
        return _automatic(device)
    check_choice("backend", backend, BACKEND_NAMES)
    _check_device(backend, device)
    load_backend(backend)
    return backend


def select_backend(backend: Optional[str], device: torch.device) -> ModuleType:
    """The backend module for tensors on `device` (see `resolve_backend`)."""
    return load_backend(resolve_backend(backend, device))
