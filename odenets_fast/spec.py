"""Argument checking for the ODE-MLP op, and the validated configuration every backend receives.

All user-facing entry points (`ode_mlp`, `ODEMLP`, `diagnostics`) go through `check_stack`, so a
bad argument gets the same `TypeError`/`ValueError` whichever backend would have run it. Backends
may then assume shapes, dtypes and devices are consistent.
"""

import math
import numbers
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from .activations import ACTIVATIONS

METHODS = ("euler", "heun")
BACKWARD_MODES = ("adjoint", "backprop")
VJP_POINTS = ("state", "reconstruction", "extrapolated")  # AdjointResidualStack's vjp_at
INPUT_PRECISIONS = ("ieee", "tf32", "tf32x3")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# The scalars of a StackSpec as the library ops take them: primitive types, in this order (the depth
# comes from W's shape; anchor_every travels as 0 for None). `StackSpec.op_args` and
# `StackSpec.from_op_args` are the one pair that converts between the two.
OP_FIELDS = ("method", "activation", "step", "scale_in", "scale_out", "backward", "anchor_every", "input_precision",
             "deterministic", "drift_tol", "strict")  # fmt: skip
AUTO = "auto"  # anchor_every="auto": anchors placed by the error controller (odenets_fast.segments)
DEFAULT_DRIFT_TOL = 1e-3


@dataclass(frozen=True)
class StackSpec:
    """Everything about an ODE-MLP stack that is not a tensor.

    `depth` is L; the parameter tensors hold `num_params` = L (Euler) or L + 1 (Heun) layers.
    `anchor_every` is None in plain adjoint mode and always None in backprop mode. `drift_tol` is set
    exactly when the anchors are placed by the error controller (anchor_every="auto"; `adaptive`), and
    `strict` redoes the segments whose drift exceeds it.
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
    drift_tol: Optional[float] = None
    strict: bool = False

    @property
    def adaptive(self) -> bool:
        return self.drift_tol is not None

    @property
    def num_params(self) -> int:
        return self.depth + (1 if self.method == "heun" else 0)

    @property
    def anchor_interval(self) -> int:
        """Distance between stored states: every state (backprop), every k-th, or x_0 only (adjoint)."""
        if self.backward == "backprop":
            return 1
        return self.anchor_every or self.depth

    @property
    def num_anchors(self) -> int:
        return len(range(0, self.depth, self.anchor_interval))

    def storing_least(self) -> "StackSpec":
        """The same stack storing what plain adjoint mode stores (x_0), for a call no backward can follow:
        a plain loop under no_grad keeps no activations either, and backprop mode's L states or the
        anchors would be allocated for nothing."""
        return replace(self, backward="adjoint", anchor_every=None, drift_tol=None, strict=False)

    def op_args(self) -> tuple:
        """The OP_FIELDS values, as the library ops take them (None travels as 0)."""
        absent = {"anchor_every": 0, "drift_tol": 0.0}
        return tuple(absent[name] if name in absent and getattr(self, name) is None else getattr(self, name)
                     for name in OP_FIELDS)  # fmt: skip

    @classmethod
    def from_op_args(cls, W, *args) -> "StackSpec":
        """The spec of a stack with stacked weights W (P, m, q) from `op_args()`'s values."""
        fields = dict(zip(OP_FIELDS, args, strict=True))
        fields["anchor_every"] = fields["anchor_every"] or None
        fields["drift_tol"] = fields["drift_tol"] or None
        return cls(depth=W.shape[0] - (1 if fields["method"] == "heun" else 0), **fields)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a stack with tensors of `dtype` computes in (DESIGN.md §6)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_not_torchscript(what: str) -> None:
    """TorchScript cannot hold these ops (Python custom ops with a hand-written backward): a clear error
    instead of the tracer's or the compiler's own, which do not say what to use instead."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        raise RuntimeError(torchscript_unsupported(what))


def torchscript_unsupported(what: str) -> str:
    return (f"{what} does not support TorchScript (torch.jit.trace / torch.jit.script); use torch.compile "
            f"(fullgraph=True works) or torch.export instead")  # fmt: skip


@torch.compiler.assume_constant_result  # a compiled graph holds the setting it was traced under
def torch_uses_tf32() -> bool:
    """Whether eager PyTorch's float32 matrix products on CUDA use TF32 now
    (`torch.set_float32_matmul_precision`, `torch.backends.cuda.matmul`)."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):  # torch < 2.9: the legacy flag only
        return bool(matmul.allow_tf32)
    setting = matmul.fp32_precision
    if setting == "none":  # not set for matmul: the backend-wide setting applies
        setting = getattr(torch.backends, "fp32_precision", "none")
    return setting == "tf32"


def resolve_precision(input_precision: Optional[str], device: torch.device) -> str:
    """The precision of float32 products: `input_precision` when given, else what eager PyTorch uses on
    `device` — "tf32" on CUDA when TF32 is enabled there, "ieee" otherwise (CPU products never use TF32)."""
    if input_precision is not None:
        return check_choice("input_precision", input_precision, INPUT_PRECISIONS)
    return "tf32" if device.type == "cuda" and torch_uses_tf32() else "ieee"


def type_name(value) -> str:
    """The type of `value` as an error message names it: qualified outside builtins, so that numpy.bool
    is not reported as "bool" (numpy ≥ 2 names its bool type that)."""
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {list(choices)}; got {type_name(value)}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}; got {value!r}")
    return value


def check_real(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type_name(value)}")
    value = float(value)
    # comparisons, not math.isfinite: under torch.compile(dynamic=True) a float attribute is a SymFloat,
    # which comparisons guard on and math.isfinite breaks the graph on (False for NaN too)
    if not -math.inf < value < math.inf:
        raise ValueError(f"{name} must be finite; got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0; got {value}")
    return value


def check_representable(name: str, value: float, dtype: torch.dtype, *, nonzero: bool = False) -> float:
    """`value` (a scale or the step, which the kernels multiply by) must be finite in the compute dtype
    `dtype` and not flush to 0 there: every backend then computes with the same number (a float32
    kernel would otherwise see inf or 0 where the float64 Python reference does not)."""
    info = torch.finfo(dtype)
    if abs(value) > info.max:
        raise ValueError(f"{name} must be at most {info.max:.4g} in magnitude for a stack computed in {dtype}; "
                         f"got {value}")  # fmt: skip
    if (nonzero or value != 0) and abs(value) < info.tiny:
        raise ValueError(f"{name} must be {'' if nonzero else '0 or '}at least {info.tiny:.4g} in magnitude for a "
                         f"stack computed in {dtype}; got {value}")  # fmt: skip
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type_name(value)}")
    return value


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int; got {type_name(value)}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int; got {value}")
    return int(value)


def check_vjp_at(vjp_at, backward: str, method: str = "euler") -> str:
    """One of VJP_POINTS; other than "state" in adjoint mode only (backprop differentiates the forward);
    "extrapolated" for Euler only."""
    vjp_at = check_choice("vjp_at", vjp_at, VJP_POINTS)
    if vjp_at != "state" and backward != "adjoint":
        raise ValueError(f"vjp_at is only meaningful with backward='adjoint' (backprop differentiates the forward "
                         f"itself); got vjp_at={vjp_at!r} with backward={backward!r}")  # fmt: skip
    if vjp_at == "extrapolated" and method != "euler":
        raise ValueError(f"vjp_at='extrapolated' is defined for method='euler' (Heun's reconstruction points are "
                         f"O(h²) from the forward's already: use vjp_at='reconstruction'); got method={method!r}")  # fmt: skip
    return vjp_at


def check_anchor_every(anchor_every, backward: str):
    """None, a positive int, or "auto" (adjoint mode only)."""
    if anchor_every is None:
        return None
    if backward != "adjoint":
        raise ValueError(
            f"anchor_every is only meaningful with backward='adjoint' (backprop stores every state); "
            f"got anchor_every={anchor_every!r} with backward={backward!r}"
        )
    if anchor_every == AUTO:
        return AUTO
    if isinstance(anchor_every, str):
        raise ValueError(f"anchor_every must be a positive int, 'auto' or None; got {anchor_every!r}")
    return check_positive_int("anchor_every", anchor_every)


def check_fixed_layout(anchor_every, what: str) -> None:
    """`what` needs the stored states' layout before anything runs: "auto" (placed at run time) is an error."""
    if anchor_every == AUTO:
        raise ValueError(f"{what}: anchor_every='auto' places the stored states at run time; pass an int (the "
                         f"typical distance between stored states) or None")  # fmt: skip


def check_error_control(anchor_every, drift_tol, strict) -> tuple:
    """(drift_tol, strict) of a checked `anchor_every`: the tolerance (DEFAULT_DRIFT_TOL unless given)
    with "auto", and nothing without it, where either would silently do nothing."""
    strict = check_bool("strict", strict)
    if anchor_every == AUTO:
        return (DEFAULT_DRIFT_TOL if drift_tol is None else check_real("drift_tol", drift_tol, positive=True)), strict
    if drift_tol is not None:
        raise ValueError(f"drift_tol is only meaningful with anchor_every='auto'; got drift_tol={drift_tol!r} "
                         f"with anchor_every={anchor_every!r}")  # fmt: skip
    if strict:
        raise ValueError(f"strict=True redoes the segments of anchor_every='auto' that exceed drift_tol; got "
                         f"anchor_every={anchor_every!r}")  # fmt: skip
    return None, False


def _check_tensor(name: str, t, ndim: Optional[int]) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type_name(t)}")
    if t.layout != torch.strided or t.is_nested:
        got = "a nested tensor" if t.is_nested else f"layout {t.layout}"
        raise TypeError(f"{name} must be a dense (strided) tensor; got {got}")
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
    input_precision: Optional[str] = None,
    deterministic: bool = True,
    drift_tol: Optional[float] = None,
    strict: bool = False,
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
    # the one check of the scalars every backend shares, in the dtype the stack computes in
    dtype = compute_dtype(x.dtype)
    step = check_representable(f"T / L (the step, L = {depth})", T / depth, dtype, nonzero=True)
    scale_in = 1.0 / math.sqrt(q) if scale_in is None else check_representable(
        "scale_in", check_real("scale_in", scale_in), dtype)  # fmt: skip
    scale_out = 1.0 / math.sqrt(m) if scale_out is None else check_representable(
        "scale_out", check_real("scale_out", scale_out), dtype)  # fmt: skip
    # the kernels also multiply by h·a_out (Heun: h/2·a_out), formed before it reaches them
    for factor in (1.0, 0.5) if method == "heun" else (1.0,):
        check_representable(f"{'' if factor == 1 else '0.5 × '}T / L × scale_out (a factor of the step's update)",
                            factor * step * scale_out, dtype)  # fmt: skip
    anchor_every = check_anchor_every(anchor_every, backward)
    drift_tol, strict = check_error_control(anchor_every, drift_tol, strict)
    if anchor_every == AUTO:
        anchor_every = None  # the controller's anchors travel as a mask (odenets_fast.segments)
    input_precision = resolve_precision(input_precision, x.device)
    check_bool("deterministic", deterministic)
    return StackSpec(
        method=method,
        activation=activation,
        depth=depth,
        step=step,
        scale_in=scale_in,
        scale_out=scale_out,
        backward=backward,
        # every k >= L stores x_0 alone: one value for all of them keeps the backends' integer types
        # (int64 in C++, Triton's kernel arguments) out of reach of a huge k
        anchor_every=None if anchor_every is None else min(anchor_every, depth),
        input_precision=input_precision,
        deterministic=deterministic,
        drift_tol=drift_tol,
        strict=strict,
    )
