"""σ and σ' of DESIGN.md §2 as @triton.jit helpers, selected by a constexpr code.

The code is a compile-time constant, so each kernel specialisation contains only its own
activation. tanh is written with exp (tanh(z) = 2 sigmoid(2z) − 1) because `tl.math.tanh` is not
available in every Triton release this package supports (3.6 on the GPU machine, 3.9 locally).
Constants are literals: the compiler rejects plain globals, and the interpreter cannot multiply
its tensors by `tl.constexpr` globals. √½ = 0.7071067811865476, 1/√(2π) = 0.3989422804014327,
√(2/π) = 0.7978845608028654; 0.044715 is the cubic coefficient of the tanh form of GELU.
"""

import triton
import triton.language as tl

ACTIVATION_CODES = {"identity": 0, "relu": 1, "tanh": 2, "gelu": 3, "gelu_tanh": 4, "silu": 5}


@triton.jit
def _tanh(z):
    return 2.0 / (1.0 + tl.exp(-2.0 * z)) - 1.0


@triton.jit
def activation(z, ACT: tl.constexpr):
    """σ(z) for a float32 block z."""
    if ACT == 0:
        out = z
    elif ACT == 1:
        # not tl.maximum: on a GPU it is max.f32, which returns the number when the other operand is
        # NaN; the reference's torch.relu(NaN) is NaN
        out = tl.where(z < 0.0, 0.0, z)
    elif ACT == 2:
        out = _tanh(z)
    elif ACT == 3:
        out = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 4:
        out = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    else:
        out = z / (1.0 + tl.exp(-z))
    return out


@triton.jit
def activation_grad(z, ACT: tl.constexpr):
    """σ'(z) for a float32 block z (relu: 0 at z = 0 and at NaN, as in the reference)."""
    if ACT == 0:
        out = tl.full(z.shape, 1.0, tl.float32)
    elif ACT == 1:
        out = tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 2:
        t = _tanh(z)
        out = 1.0 - t * t
    elif ACT == 3:
        out = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == 4:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        dinner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        out = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * dinner
    else:
        s = 1.0 / (1.0 + tl.exp(-z))
        out = s * (1.0 + z * (1.0 - s))
    return out
