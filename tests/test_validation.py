"""Bad input: one test per case, each a clear ValueError/TypeError naming the argument."""

import math

import pytest
import torch

from helpers import make_stack
from odenets_fast import ODEMLP, ode_mlp


@pytest.fixture
def stack():
    return make_stack(B=4, q=3, m=5, L=2, bias=True, dtype=torch.float32)


def _call(x, W, V, b=None, c=None, **kwargs):
    return ode_mlp(x, W, V, b, c, backend="reference", **kwargs)


def test_x_scalar(stack):
    x, W, V, b, c = stack
    with pytest.raises(ValueError, match="x must have at least 1 dimension"):
        _call(torch.tensor(1.0), W, V)


def test_W_wrong_rank(stack):
    x, W, V, b, c = stack
    with pytest.raises(ValueError, match="W must have 3 dimensions"):
        _call(x, W[0], V)


def test_V_wrong_rank(stack):
    x, W, V, b, c = stack
    with pytest.raises(ValueError, match="V must have 3 dimensions"):
        _call(x, W, V[None])


def test_b_wrong_rank(stack):
    x, W, V, b, c = stack
    with pytest.raises(ValueError, match="b must have 2 dimensions"):
        _call(x, W, V, b[0], c)


def test_c_wrong_rank(stack):
    x, W, V, b, c = stack
    with pytest.raises(ValueError, match="c must have 2 dimensions"):
        _call(x, W, V, b, c[..., None])


def test_q_mismatch_x(stack):
    x, W, V, b, c = stack
    with pytest.raises(ValueError, match=r"x has q \(last dim\) = 4 but W"):
        _call(torch.zeros(4, 4), W, V)


def test_q_mismatch_V(stack):
    x, W, V, b, c = stack
    with pytest.raises(ValueError, match=r"V has q \(dim 1\)"):
        _call(x, W, torch.zeros(2, 4, 5))


def test_m_mismatch_V(stack):
    x, W, V, b, c = stack
    with pytest.raises(ValueError, match=r"V has m \(dim 2\)"):
        _call(x, W, torch.zeros(2, 3, 6))


def test_m_mismatch_b(stack):
    x, W, V, b, c = stack
    with pytest.raises(ValueError, match=r"b has m \(dim 1\)"):
        _call(x, W, V, torch.zeros(2, 4), c)


def test_q_mismatch_c(stack):
    x, W, V, b, c = stack
    with pytest.raises(ValueError, match=r"c has q \(dim 1\)"):
        _call(x, W, V, b, torch.zeros(2, 2))


def test_P_mismatch_V(stack):
    x, W, V, b, c = stack
    with pytest.raises(ValueError, match=r"V has P \(dim 0\) = 3"):
        _call(x, W, torch.zeros(3, 3, 5))


def test_P_mismatch_b(stack):
    x, W, V, b, c = stack
    with pytest.raises(ValueError, match=r"b has P \(dim 0\) = 1"):
        _call(x, W, V, b[:1], c)


def test_P_mismatch_c(stack):
    x, W, V, b, c = stack
    with pytest.raises(ValueError, match=r"c has P \(dim 0\) = 1"):
        _call(x, W, V, b, c[:1])


def test_P_inconsistent_with_heun(stack):
    x, W, V, b, c = stack
    with pytest.raises(ValueError, match=r"method='heun' needs P = L \+ 1 >= 2"):
        _call(x, W[:1], V[:1], method="heun")


def test_P_zero_for_euler(stack):
    x, W, V, b, c = stack
    with pytest.raises(ValueError, match=r"method='euler' needs P = L >= 1"):
        _call(x, W[:0], V[:0])


def test_zero_width(stack):
    x, W, V, b, c = stack
    with pytest.raises(ValueError, match="m, q >= 1"):
        _call(x, W[:, :0], V[:, :, :0])


def test_unknown_method(stack):
    with pytest.raises(ValueError, match="method must be one of"):
        _call(*stack, method="rk4")


def test_unknown_activation(stack):
    with pytest.raises(ValueError, match="activation must be one of"):
        _call(*stack, activation="swish")


def test_activation_not_a_string(stack):
    with pytest.raises(TypeError, match="activation must be a string"):
        _call(*stack, activation=torch.relu)


def test_unknown_backward_mode(stack):
    with pytest.raises(ValueError, match="backward must be one of"):
        _call(*stack, backward="checkpoint")


def test_unknown_backend(stack):
    with pytest.raises(ValueError, match="backend must be one of"):
        ode_mlp(*stack, backend="cuda")


def test_unknown_backend_env(stack, monkeypatch):
    monkeypatch.setenv("ODENETS_FAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="ODENETS_FAST_BACKEND must be one of"):
        ode_mlp(*stack)


@pytest.mark.parametrize("bad", [0, -2])
def test_anchor_every_not_positive(stack, bad):
    with pytest.raises(ValueError, match="anchor_every must be a positive int"):
        _call(*stack, anchor_every=bad)


@pytest.mark.parametrize("bad", [1.5, True])  # a string other than "auto": tests/test_error_control.py
def test_anchor_every_not_int(stack, bad):
    with pytest.raises(TypeError, match="anchor_every must be a positive int"):
        _call(*stack, anchor_every=bad)


def test_anchor_every_with_backprop(stack):
    with pytest.raises(ValueError, match="anchor_every is only meaningful with backward='adjoint'"):
        _call(*stack, backward="backprop", anchor_every=2)


def test_different_devices(stack):
    x, W, V, b, c = stack
    with pytest.raises(ValueError, match="V is on device meta but x is on cpu"):
        _call(x, W, V.to("meta"))


def test_different_dtypes(stack):
    x, W, V, b, c = stack
    with pytest.raises(TypeError, match="W has dtype torch.float64 but x has dtype torch.float32"):
        _call(x, W.double(), V)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_or_bool_dtype(stack, dtype):
    x, W, V, b, c = stack
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        _call(x.to(dtype), W, V)


def test_complex_dtype(stack):
    x, W, V, b, c = stack
    with pytest.raises(TypeError, match="W must be a floating-point tensor"):
        _call(x, W.to(torch.complex64), V)


def test_sparse_tensor(stack):
    x, W, V, b, c = stack
    with pytest.raises(TypeError, match="W must be a dense \\(strided\\) tensor; got layout torch.sparse_coo"):
        _call(x, W.to_sparse(), V)


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_nested_tensor(stack, layout):
    """Ragged batches (PyTorch's internal error, "NestedTensorImpl doesn't support sizes", before)."""
    x, W, V, b, c = stack
    ragged = torch.nested.nested_tensor([x[:1], x[1:]], layout=layout)
    with pytest.raises(TypeError, match="x must be a dense \\(strided\\) tensor; got a nested tensor"):
        _call(ragged, W, V)


def test_numpy_bool_is_named_as_numpy_s(stack):
    """numpy ≥ 2 calls its bool type "bool": the message names its module, not "must be a bool; got bool"."""
    import numpy as np

    with pytest.raises(TypeError, match=f"deterministic must be a bool; got numpy.{type(np.True_).__qualname__}$"):
        _call(*stack, deterministic=np.True_)


def test_not_a_tensor(stack):
    x, W, V, b, c = stack
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        _call(x.tolist(), W, V)


@pytest.mark.parametrize("T", [0.0, -1.0])
def test_T_not_positive(stack, T):
    with pytest.raises(ValueError, match="T must be > 0"):
        _call(*stack, T=T)


@pytest.mark.parametrize("T", [math.nan, math.inf, -math.inf])
def test_T_not_finite(stack, T):
    with pytest.raises(ValueError, match="T must be finite"):
        _call(*stack, T=T)


def test_T_not_a_number(stack):
    with pytest.raises(TypeError, match="T must be a real number"):
        _call(*stack, T="1")


def test_scale_in_not_finite(stack):
    with pytest.raises(ValueError, match="scale_in must be finite"):
        _call(*stack, scale_in=math.nan)


def test_unknown_input_precision(stack):
    with pytest.raises(ValueError, match="input_precision must be one of"):
        _call(*stack, input_precision="fp16")


def test_deterministic_not_bool(stack):
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        _call(*stack, deterministic=1)


@pytest.mark.parametrize(
    "bad", [3.0, torch.zeros(1), torch.zeros((), device="meta"), torch.zeros((), dtype=torch.int64)]
)
def test_drift_out_not_a_floating_scalar_tensor_on_the_device(stack, bad):
    with pytest.raises(TypeError, match="drift_out must be a 0-dim floating-point tensor on cpu"):
        _call(*stack, drift_out=bad)


@pytest.mark.parametrize(
    "kwargs, exc, message",
    [
        ({"dim": 0}, ValueError, "dim must be a positive int"),
        ({"hidden": 2.0}, TypeError, "hidden must be a positive int"),
        ({"depth": -1}, ValueError, "depth must be a positive int"),
        ({"init": "xavier"}, ValueError, "init must be one of"),
        ({"smooth_lengthscale": 0.0}, ValueError, "smooth_lengthscale must be > 0"),
        ({"method": "rk4"}, ValueError, "method must be one of"),
        ({"backend": "gpu"}, ValueError, "backend must be one of"),
        ({"backward": "backprop", "anchor_every": 4}, ValueError, "anchor_every is only meaningful"),
        ({"bias": 1}, TypeError, "bias must be a bool"),
        ({"input_precision": "bf16"}, ValueError, "input_precision must be one of"),
        ({"deterministic": None}, TypeError, "deterministic must be a bool"),
        ({"dtype": torch.int64}, TypeError, "dtype must be float16, bfloat16, float32, float64 or None"),
        ({"dtype": torch.complex64}, TypeError, "dtype must be float16, bfloat16, float32, float64 or None"),
    ],
)
def test_module_arguments(kwargs, exc, message):
    args = {"dim": 3, "hidden": 4, "depth": 5, **kwargs}
    with pytest.raises(exc, match=message):
        ODEMLP(args.pop("dim"), args.pop("hidden"), args.pop("depth"), **args)


def test_module_wrong_input_width():
    model = ODEMLP(3, 4, 5, backend="reference")
    with pytest.raises(ValueError, match=r"x has q \(last dim\) = 7"):
        model(torch.zeros(2, 7))
