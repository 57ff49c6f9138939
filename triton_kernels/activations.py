"""σ and σ' of DESIGN.md §2 as @triton.jit helpers, selected by a constexpr code.

The code is a compile-time constant, so each kernel specialisation contains only its own
activation. tanh is written with exp (tanh(z) = 2 sigmoid(2z) − 1) because
`tl.math.tanh` is not available in every Triton release this package supports (3.6 on the GPU machine,
3.9 locally); the forms below keep float32's accuracy where the plain formula cancels.
Constants are literals: the compiler rejects plain globals, and the interpreter cannot multiply
its tensors by `tl.constexpr` globals. √½ = 0.7071067811865476, 1/√(2π) = 0.3989422804014327,
√(2/π) = 0.7978845608028654; 0.044715 is the cubic coefficient of the tanh form of GELU.
"""

import triton
import triton.language as tl

ACTIVATION_CODES = {"identity": 0, "relu": 1, "tanh": 2, "gelu": 3, "gelu_tanh": 4, "silu": 5}


@triton.jit
def _sigmoid_of_twice(u):
    """s = sigmoid(2u) = (1 + tanh u)/2 and s (1 − s) = (1 − tanh² u)/4 through e = exp(−2|u|) ≤ 1: no
    overflow, and neither cancels as 1 ± tanh u does where tanh u is near ∓1."""
    e = tl.exp(-2.0 * tl.abs(u))
    r = 1.0 / (1.0 + e)
    return tl.where(u < 0.0, e * r, r), e * r * r


@triton.jit
def _tanh(z):
    # sign(z) (1 − e)/(1 + e), e = exp(−2|z|), cancels where |z| is small (its error stays near float32's
    # rounding of 1, 6e-8: all of tanh(1e-8)); there the odd Taylor series to z¹¹ (1/3, 2/15, 17/315,
    # 62/2835, 1382/155925), whose first omitted term is below float32's rounding for |z| < 0.4. Both
    # within a few ulp of tanh.
    z2 = z * z
    series = z * (1.0 + z2 * (-0.3333333333333333 + z2 * (0.13333333333333333 + z2 * (-0.05396825396825397
                  + z2 * (0.021869488536155203 + z2 * -0.008863235529902197)))))  # fmt: skip
    e = tl.exp(-2.0 * tl.abs(z))
    magnitude = (1.0 - e) / (1.0 + e)
    return tl.where(tl.abs(z) < 0.4, series, tl.where(z < 0.0, -magnitude, magnitude))


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
        # 0.5 z (1 + tanh u) = z sigmoid(2u)
        s, _ = _sigmoid_of_twice(0.7978845608028654 * (z + 0.044715 * z * z * z))
        out = z * s
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
        _, s_times_complement = _sigmoid_of_twice(z)
        out = 4.0 * s_times_complement  # 1 − tanh² z
    elif ACT == 3:
        out = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == 4:
        # 0.5 (1 + t) + 0.5 z (1 − t²) du/dz with t = tanh u: s + 2 z s (1 − s) du/dz, s = sigmoid(2u)
        s, s_times_complement = _sigmoid_of_twice(0.7978845608028654 * (z + 0.044715 * z * z * z))
        dinner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        out = s + 2.0 * z * s_times_complement * dinner
    else:
        s = 1.0 / (1.0 + tl.exp(-z))
        out = s * (1.0 + z * (1.0 - s))
    return out
