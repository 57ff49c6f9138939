"""The activations σ of DESIGN.md §2, each with its derivative σ'.

Backward passes never call autograd through σ: they recompute z and apply σ'(z) by hand, so every
activation ships the closed form of its derivative. The formulas here are the ones every backend
(Triton, C++) reproduces.
"""

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_CUBIC = 0.044715


class Activation(NamedTuple):
    fn: Callable[[Tensor], Tensor]
    grad: Callable[[Tensor], Tensor]


def _gelu(z: Tensor) -> Tensor:
    return 0.5 * z * (1.0 + torch.erf(z * _SQRT_HALF))


def _gelu_grad(z: Tensor) -> Tensor:
    # d/dz [z Φ(z)] = Φ(z) + z φ(z)
    return 0.5 * (1.0 + torch.erf(z * _SQRT_HALF)) + z * _INV_SQRT_2PI * torch.exp(-0.5 * z * z)


def _gelu_tanh(z: Tensor) -> Tensor:
    return 0.5 * z * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_CUBIC * z**3)))


def _gelu_tanh_grad(z: Tensor) -> Tensor:
    t = torch.tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_CUBIC * z**3))
    dinner = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_CUBIC * z * z)
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * dinner


def _silu_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def _tanh_grad(z: Tensor) -> Tensor:
    t = torch.tanh(z)
    return 1.0 - t * t


ACTIVATIONS: dict[str, Activation] = {
    "identity": Activation(lambda z: z, torch.ones_like),
    "relu": Activation(torch.relu, lambda z: (z > 0).to(z.dtype)),
    "tanh": Activation(torch.tanh, _tanh_grad),
    "gelu": Activation(_gelu, _gelu_grad),
    "gelu_tanh": Activation(_gelu_tanh, _gelu_tanh_grad),
    "silu": Activation(lambda z: z * torch.sigmoid(z), _silu_grad),
}
