"""nn.Modules built on the ops."""

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import segments
from .activations import ACTIVATIONS
from .backends import BACKEND_NAMES
from .ops import ode_mlp
from .spec import (
    AUTO,
    BACKWARD_MODES,
    FLOAT_DTYPES,
    INPUT_PRECISIONS,
    METHODS,
    check_anchor_every,
    check_bool,
    check_choice,
    check_error_control,
    check_positive_int,
    check_real,
    torchscript_unsupported,
)

INITS = ("tied", "iid", "smooth")
SMOOTH_V_STD = 0.1  # "smooth" init: V small so that the stack starts close to the identity map
# The `drift` buffer before the first adjoint backward. Not NaN: a drift is ≥ 0 or NaN (a non-finite
# batch), and a NaN drift must read as nan, not as "not measured yet".
NOT_MEASURED = -1.0


def smooth_in_depth(num_layers: int, depth: int, shape: tuple, lengthscale: float) -> Tensor:
    """Gaussian-process samples over depth: a (num_layers, *shape) float64 tensor whose entries,
    as functions of s = k / depth, are independent GPs with covariance exp(−(s − s')² / 2ℓ²).

    Sampled through the eigenvectors of the covariance with non-negligible eigenvalues: the
    squared-exponential spectrum decays fast, so this is a cheap, well-conditioned factor even at
    depths where a Cholesky factorisation would fail.
    """
    s = torch.arange(num_layers, dtype=torch.float64) / depth
    cov = torch.exp(-0.5 * ((s[:, None] - s[None, :]) / lengthscale) ** 2)
    evals, evecs = torch.linalg.eigh(cov)
    keep = evals > evals.max() * 1e-12
    factor = evecs[:, keep] * evals[keep].sqrt()
    noise = torch.randn(int(keep.sum()), math.prod(shape), dtype=torch.float64)
    return (factor @ noise).reshape(num_layers, *shape)


class ODEMLP(nn.Module):
    """A depth-L residual MLP x_{n+1} = x_n + (T/L) f(x_n; θ_n) with stacked parameters.

    Parameters: ``W`` (P, hidden, dim), ``V`` (P, dim, hidden) and with ``bias=True`` ``b``
    (P, hidden), ``c`` (P, dim); P = depth (Euler) or depth + 1 (Heun).

    Inits: ``"tied"`` — V = 0 and every W_k the same standard-Gaussian matrix (the weight-tied
    init of "Implicit regularization of deep residual networks towards neural ODEs");
    ``"iid"`` — independent standard-Gaussian W_k, V = 0; ``"smooth"`` — the entries of W and V
    are Gaussian processes over depth s = k / depth with squared-exponential covariance of length
    ``smooth_lengthscale`` (W standard, V with std ``SMOOTH_V_STD``). Biases start at zero.

    ``input_precision`` and ``deterministic`` are the Triton backend's knobs (see ``ode_mlp``).

    After a backward pass in adjoint mode, ``last_drift`` is the float ‖x̃_0 − x_0‖ / ‖x_0‖ of
    that batch (None before the first one; nan after a batch with a non-finite state; backprop-mode
    passes leave it unchanged).

    ``anchor_every="auto"``: anchors placed by the error controller to keep each segment's drift
    under ``drift_tol`` (``strict=True`` redoes those that exceed it; see ``ode_mlp`` and
    ``odenets_fast.segments``). The layout is the buffer ``anchor_mask`` (in ``state_dict``),
    ``anchor_positions`` lists it, and ``last_segment_drift`` gives (first layer, length, drift) of
    each segment of the latest backward.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        depth: int,
        *,
        method: str = "euler",
        activation: str = "gelu",
        T: float = 1.0,
        backward: str = "adjoint",
        anchor_every: Union[int, str, None] = None,
        drift_tol: Optional[float] = None,
        strict: bool = False,
        bias: bool = False,
        init: str = "tied",
        smooth_lengthscale: float = 0.2,
        backend: Optional[str] = None,
        input_precision: Optional[str] = None,
        deterministic: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.hidden = check_positive_int("hidden", hidden)
        self.depth = check_positive_int("depth", depth)
        self.method = check_choice("method", method, METHODS)
        self.activation = check_choice("activation", activation, ACTIVATIONS)
        self.T = check_real("T", T, positive=True)
        self.backward_mode = check_choice("backward", backward, BACKWARD_MODES)
        self.anchor_every = check_anchor_every(anchor_every, backward)
        self.drift_tol, self.strict = check_error_control(self.anchor_every, drift_tol, strict)
        self.init = check_choice("init", init, INITS)
        self.smooth_lengthscale = check_real("smooth_lengthscale", smooth_lengthscale, positive=True)
        self.backend = None if backend is None else check_choice("backend", backend, BACKEND_NAMES)
        self.input_precision = (None if input_precision is None
                                else check_choice("input_precision", input_precision, INPUT_PRECISIONS))  # fmt: skip
        self.deterministic = check_bool("deterministic", deterministic)
        check_bool("bias", bias)
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float16, bfloat16, float32, float64 or None; got {dtype}")

        P = depth + 1 if method == "heun" else depth
        factory = {"device": device, "dtype": dtype}
        self.W = nn.Parameter(torch.empty(P, hidden, dim, **factory))
        self.V = nn.Parameter(torch.empty(P, dim, hidden, **factory))
        self.b = nn.Parameter(torch.empty(P, hidden, **factory)) if bias else None
        self.c = nn.Parameter(torch.empty(P, dim, **factory)) if bias else None
        # written by the adjoint backward (a tensor, not a Python attribute, so that it also works under
        # torch.compile); NOT_MEASURED until the first one
        self.register_buffer("drift", torch.full((), NOT_MEASURED, **factory), persistent=False)
        if self.anchor_every == AUTO:  # the controller's state, from plain adjoint's one segment on
            self.register_buffer("anchor_mask", torch.zeros(depth, dtype=torch.bool, device=device))
            self.register_buffer("segment_drift", torch.full((depth,), segments.NO_SEGMENT, device=device),
                                 persistent=False)  # fmt: skip
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        P, hidden, dim = self.W.shape
        if self.init == "tied":
            self.W.copy_(torch.randn(hidden, dim, dtype=torch.float64).expand(P, hidden, dim))
            self.V.zero_()
        elif self.init == "iid":
            self.W.copy_(torch.randn(P, hidden, dim, dtype=torch.float64))
            self.V.zero_()
        else:
            ell = self.smooth_lengthscale
            self.W.copy_(smooth_in_depth(P, self.depth, (hidden, dim), ell))
            self.V.copy_(SMOOTH_V_STD * smooth_in_depth(P, self.depth, (dim, hidden), ell))
        for bias in (self.b, self.c):
            if bias is not None:
                bias.zero_()

    def __prepare_scriptable__(self):
        raise RuntimeError(torchscript_unsupported("ODEMLP"))

    @property
    def last_drift(self) -> Optional[float]:
        value = float(self.drift)
        return None if value == NOT_MEASURED else value

    @property
    def anchor_positions(self) -> Optional[list]:
        """The layers whose input the next forward stores (anchor_every="auto"; None otherwise)."""
        return segments.positions_of(self.anchor_mask) if self.anchor_every == AUTO else None

    @property
    def last_segment_drift(self) -> Optional[list]:
        """[(first layer, length, drift)] of the latest backward's segments (anchor_every="auto")."""
        return segments.described(self.segment_drift) if self.anchor_every == AUTO else None

    def forward(self, x: Tensor) -> Tensor:
        layers = self.depth + (1 if self.method == "heun" else 0)
        if isinstance(self.W, Tensor) and tuple(self.W.shape) != (layers, self.hidden, self.dim):
            # a replaced W would run as a stack of another shape while depth, T / depth and the repr say otherwise
            raise ValueError(f"an ODEMLP of depth {self.depth}, hidden {self.hidden}, dim {self.dim} and method "
                             f"{self.method!r} (set at construction) needs W of shape {(layers, self.hidden, self.dim)}; "
                             f"got {tuple(self.W.shape)}: build a new ODEMLP for other sizes")  # fmt: skip
        auto = self.anchor_every == AUTO
        return ode_mlp(
            x, self.W, self.V, self.b, self.c,
            method=self.method, activation=self.activation, T=self.T,
            backward=self.backward_mode, anchor_every=self.anchor_every,
            backend=self.backend, input_precision=self.input_precision, deterministic=self.deterministic,
            drift_out=self.drift, drift_tol=self.drift_tol, strict=self.strict,
            anchor_mask=self.anchor_mask if auto else None, segment_drift_out=self.segment_drift if auto else None,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden={self.hidden}, depth={self.depth}, method={self.method!r}, "
            f"activation={self.activation!r}, T={self.T}, backward={self.backward_mode!r}, "
            f"anchor_every={self.anchor_every!r}, bias={self.b is not None}, init={self.init!r}"
            + (f", drift_tol={self.drift_tol}, strict={self.strict}" if self.anchor_every == AUTO else "")
        )
