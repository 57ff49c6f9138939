"""Argument checking for the ODE-MLP op, and the validated configuration every backend receives.

All user-facing entry points (`ode_mlp`, `ODEMLP`, `diagnostics`) go through `check_stack`, so a
bad argument gets the same `TypeError`/`ValueError` whichever backend would have run it. Backends
may then assume shapes, dtypes and devices are consistent.
"""

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .activations import ACTIVATIONS

METHODS = ("euler", "heun")
BACKWARD_MODES = ("adjoint", "backprop")
INPUT_PRECISIONS = ("ieee", "tf32", "tf32x3")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class StackSpec:
    """Everything about an ODE-MLP stack that is not a tensor.

    `depth` is L; the parameter tensors hold `num_params` = L (Euler) or L + 1 (Heun) layers.
    `anchor_every` is None in plain adjoint mode and always None in backprop mode.
    `input_precision` and `deterministic` are execution knobs of the Triton backend (float32
    products in IEEE or TF32; weight gradients reduced in a fixed order or with atomics); the
    reference and C++ backends always compute in IEEE float32/float64 and are deterministic.
    """

    method: str
    activation: str
    depth: int
    step: float
    scale_in: float
    scale_out: float
    backward: str
    anchor_every: Optional[int]
    input_precision: str = "ieee"
    deterministic: bool = True

    @property
    def num_params(self) -> int:
        return self.depth + (1 if self.method == "heun" else 0)


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {list(choices)}; got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}; got {value!r}")
    return value


def check_real(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0; got {value}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
    return value


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int; got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int; got {value}")
    return int(value)


def check_anchor_every(anchor_every, backward: str) -> Optional[int]:
    if anchor_every is None:
        return None
    if backward != "adjoint":
        raise ValueError(
            f"anchor_every is only meaningful with backward='adjoint' (backprop stores every state); "
            f"got anchor_every={anchor_every!r} with backward={backward!r}"
        )
    return check_positive_int("anchor_every", anchor_every)


def _check_tensor(name: str, t, ndim: Optional[int]) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor; got layout {t.layout}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64); got {t.dtype}"
        )
    if ndim is None:
        if t.dim() < 1:
            raise ValueError(f"{name} must have at least 1 dimension (..., q); got a 0-dim tensor")
    elif t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions; got shape {tuple(t.shape)}")


def _check_dim(name: str, axis: str, got: int, expected: int, source: str) -> None:
    if got != expected:
        raise ValueError(f"{name} has {axis} = {got} but {source} has {expected}")


def check_stack(
    x: Tensor,
    W: Tensor,
    V: Tensor,
    b: Optional[Tensor],
    c: Optional[Tensor],
    *,
    method: str,
    activation: str,
    T: float,
    backward: str,
    anchor_every,
    scale_in,
    scale_out,
    input_precision: str = "ieee",
    deterministic: bool = True,
) -> StackSpec:
    """Validate the arguments of `ode_mlp`; return the stack's `StackSpec`."""
    _check_tensor("x", x, None)
    _check_tensor("W", W, 3)
    _check_tensor("V", V, 3)
    if b is not None:
        _check_tensor("b", b, 2)
    if c is not None:
        _check_tensor("c", c, 2)
    named = [("x", x), ("W", W), ("V", V)] + [(n, t) for n, t in (("b", b), ("c", c)) if t is not None]
    for name, t in named[1:]:
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; all tensors must share one dtype")
        if t.device != x.device:
            raise ValueError(f"{name} is on device {t.device} but x is on {x.device}; all tensors must share one device")

    P, m, q = W.shape
    if q < 1 or m < 1:
        raise ValueError(f"W must have shape (P, m, q) with m, q >= 1; got {tuple(W.shape)}")
    _check_dim("x", "q (last dim)", x.shape[-1], q, "W (P, m, q)")
    _check_dim("V", "P (dim 0)", V.shape[0], P, "W (P, m, q)")
    _check_dim("V", "q (dim 1)", V.shape[1], q, "W (P, m, q)")
    _check_dim("V", "m (dim 2)", V.shape[2], m, "W (P, m, q)")
    if b is not None:
        _check_dim("b", "P (dim 0)", b.shape[0], P, "W (P, m, q)")
        _check_dim("b", "m (dim 1)", b.shape[1], m, "W (P, m, q)")
    if c is not None:
        _check_dim("c", "P (dim 0)", c.shape[0], P, "W (P, m, q)")
        _check_dim("c", "q (dim 1)", c.shape[1], q, "W (P, m, q)")

    check_choice("method", method, METHODS)
    check_choice("activation", activation, ACTIVATIONS)
    check_choice("backward", backward, BACKWARD_MODES)
    depth = P - 1 if method == "heun" else P
    if depth < 1:
        needed = "L + 1 >= 2 (θ_0 … θ_L)" if method == "heun" else "L >= 1"
        raise ValueError(f"W has P = {P} layers but method={method!r} needs P = {needed}")
    T = check_real("T", T, positive=True)
    check_choice("input_precision", input_precision, INPUT_PRECISIONS)
    check_bool("deterministic", deterministic)
    return StackSpec(
        method=method,
        activation=activation,
        depth=depth,
        step=T / depth,
        scale_in=1.0 / math.sqrt(q) if scale_in is None else check_real("scale_in", scale_in),
        scale_out=1.0 / math.sqrt(m) if scale_out is None else check_real("scale_out", scale_out),
        backward=backward,
        anchor_every=check_anchor_every(anchor_every, backward),
        input_precision=input_precision,
        deterministic=deterministic,
    )
