// The activations σ of DESIGN.md §2 with their derivatives σ', one scalar at a time.
//
// float uses branch-free polynomial and rational approximations (a few ulp) so that the fused
// loops in fused_elementwise.cpp vectorize; double uses the C library, because float64 is the
// precision the C++ backend is checked against the reference in, to ~1e-10.
#pragma once

#include <c10/util/string_view.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__)
#define ODENETS_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ODENETS_ALWAYS_INLINE inline
#endif

namespace odenets_fast {

enum class Activation { identity, relu, tanh, gelu, gelu_tanh, silu };

// The names the ops accept, in the order of odenets_fast/activations.py's ACTIVATIONS (the extension
// exposes them as odenets_fast._C.ACTIVATIONS; a test checks that the two agree).
struct ActivationName {
  const char* name;
  Activation activation;
};
inline constexpr ActivationName kActivationNames[] = {
    {"identity", Activation::identity}, {"relu", Activation::relu},           {"tanh", Activation::tanh},
    {"gelu", Activation::gelu},         {"gelu_tanh", Activation::gelu_tanh}, {"silu", Activation::silu},
};

// Throws (TORCH_CHECK) for a name outside odenets_fast/activations.py's ACTIVATIONS.
Activation parse_activation(c10::string_view name);

namespace math {

ODENETS_ALWAYS_INLINE double exp(double x) { return std::exp(x); }
ODENETS_ALWAYS_INLINE double erf(double x) { return std::erf(x); }
ODENETS_ALWAYS_INLINE double tanh(double x) { return std::tanh(x); }

// Cephes expf: x = n ln2 + r with |r| <= ln2/2, exp(r) by a degree-6 polynomial, 2^n through the
// exponent bits. 2^n is applied as two factors 2^(n/2) 2^(n - n/2), each a normal float, so that the
// result overflows to inf and underflows through the subnormals to 0 where the true exp does, rather
// than saturating at the ends of the normal range: σ and σ' must see exp(±inf) = inf and 0, as in the
// reference. The clamp only keeps n in range (exp is inf above 89 and 0 below -110 anyway); NaN passes
// through it and the polynomial, and its integer part is read from bits, not converted (which would
// be undefined), in unsigned arithmetic, so it comes out as NaN with no extra select.
ODENETS_ALWAYS_INLINE float exp(float x) {
  const float clamped = std::min(std::max(x, -110.0f), 89.0f);  // operand order: max(NaN, -110) = NaN
  // Adding 1.5·2^23 rounds to the nearest integer, which is then the low bits of the sum, without a
  // (non-vectorizable) call.
  const float round_magic = 12582912.0f;
  const float shifted = clamped * 1.44269504088896341f + round_magic;
  const float n = shifted - round_magic;
  float r = clamped - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  uint32_t shifted_bits, magic_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof(float));
  std::memcpy(&magic_bits, &round_magic, sizeof(float));
  const uint32_t n_bits = shifted_bits - magic_bits;  // n in two's complement
  const uint32_t n_low = static_cast<uint32_t>(static_cast<int32_t>(n_bits) >> 1);  // floor(n / 2) in [-80, 64]
  const uint32_t low_bits = (n_low + 127u) << 23, high_bits = (n_bits - n_low + 127u) << 23;
  float two_to_low, two_to_high;
  std::memcpy(&two_to_low, &low_bits, sizeof(float));
  std::memcpy(&two_to_high, &high_bits, sizeof(float));
  return p * two_to_low * two_to_high;
}

// Rational minimax approximation (Eigen's float erf); |x| >= 4 rounds to ±1 in float anyway.
ODENETS_ALWAYS_INLINE float erf(float x) {
  x = std::min(std::max(x, -4.0f), 4.0f);
  const float x2 = x * x;
  float num = -2.72614225801306e-10f;
  num = num * x2 + 2.77068142495902e-08f;
  num = num * x2 + -2.10102402082508e-06f;
  num = num * x2 + -5.69250639462346e-05f;
  num = num * x2 + -7.34990630326855e-04f;
  num = num * x2 + -2.95459980854025e-03f;
  num = num * x2 + -1.60960333262415e-02f;
  float den = -1.45660718464996e-05f;
  den = den * x2 + -2.13374055278905e-04f;
  den = den * x2 + -1.68282697438203e-03f;
  den = den * x2 + -7.37332916720468e-03f;
  den = den * x2 + -1.42647390514189e-02f;
  return x * num / den;
}

// Rational minimax approximation (Eigen's float tanh); beyond |x| = 7.9 tanh is ±1 in float.
ODENETS_ALWAYS_INLINE float tanh(float x) {
  x = std::min(std::max(x, -7.90531110763549805f), 7.90531110763549805f);
  const float x2 = x * x;
  float num = -2.76076847742355e-16f;
  num = num * x2 + 2.00018790482477e-13f;
  num = num * x2 + -8.60467152213735e-11f;
  num = num * x2 + 5.12229709037114e-08f;
  num = num * x2 + 1.48572235717979e-05f;
  num = num * x2 + 6.37261928875436e-04f;
  num = num * x2 + 4.89352455891786e-03f;
  float den = 1.19825839466702e-06f;
  den = den * x2 + 1.18534705686654e-04f;
  den = den * x2 + 2.26843463243900e-03f;
  den = den * x2 + 4.89352518554385e-03f;
  return x * num / den;
}

}  // namespace math

// Each activation: value(z) = σ(z), and both(z, a, s) sets a = σ(z), s = σ'(z) sharing the
// transcendental work. Formulas as in odenets_fast/activations.py.
template <typename T>
struct Identity {
  static ODENETS_ALWAYS_INLINE T value(T z) { return z; }
  static ODENETS_ALWAYS_INLINE void both(T z, T& a, T& s) {
    a = z;
    s = T(1);
  }
};

// As the reference (torch.relu and z > 0): σ(NaN) = NaN, σ'(NaN) = σ'(0) = 0.
template <typename T>
struct Relu {
  static ODENETS_ALWAYS_INLINE T value(T z) { return z < T(0) ? T(0) : z; }
  static ODENETS_ALWAYS_INLINE void both(T z, T& a, T& s) {
    a = value(z);
    s = z > T(0) ? T(1) : T(0);
  }
};

template <typename T>
struct Tanh {
  static ODENETS_ALWAYS_INLINE T value(T z) { return math::tanh(z); }
  static ODENETS_ALWAYS_INLINE void both(T z, T& a, T& s) {
    a = math::tanh(z);
    s = T(1) - a * a;
  }
};

// σ(z) = z Φ(z) with Φ(z) = (1 + erf(z/√2))/2;  σ'(z) = Φ(z) + z φ(z), φ the normal density.
template <typename T>
struct Gelu {
  static constexpr T sqrt_half = T(0.70710678118654752440);
  static constexpr T inv_sqrt_2pi = T(0.39894228040143267794);
  static ODENETS_ALWAYS_INLINE T value(T z) { return T(0.5) * z * (T(1) + math::erf(z * sqrt_half)); }
  static ODENETS_ALWAYS_INLINE void both(T z, T& a, T& s) {
    const T cdf = T(0.5) * (T(1) + math::erf(z * sqrt_half));
    a = z * cdf;
    s = cdf + z * inv_sqrt_2pi * math::exp(T(-0.5) * z * z);
  }
};

// σ(z) = z (1 + t)/2 with t = tanh(k (z + c z³));  σ'(z) = (1 + t)/2 + z (1 − t²) k (1 + 3 c z²)/2.
template <typename T>
struct GeluTanh {
  static constexpr T k = T(0.79788456080286535588);  // √(2/π)
  static constexpr T c = T(0.044715);
  static ODENETS_ALWAYS_INLINE T value(T z) { return T(0.5) * z * (T(1) + math::tanh(k * (z + c * z * z * z))); }
  static ODENETS_ALWAYS_INLINE void both(T z, T& a, T& s) {
    const T t = math::tanh(k * (z + c * z * z * z));
    a = T(0.5) * z * (T(1) + t);
    s = T(0.5) * (T(1) + t) + T(0.5) * z * (T(1) - t * t) * k * (T(1) + T(3) * c * z * z);
  }
};

// σ(z) = z s with s the logistic sigmoid;  σ'(z) = s (1 + z (1 − s)).
template <typename T>
struct Silu {
  static ODENETS_ALWAYS_INLINE T value(T z) { return z * (T(1) / (T(1) + math::exp(-z))); }
  static ODENETS_ALWAYS_INLINE void both(T z, T& a, T& s) {
    const T sigmoid = T(1) / (T(1) + math::exp(-z));
    a = z * sigmoid;
    s = sigmoid * (T(1) + z * (T(1) - sigmoid));
  }
};

}  // namespace odenets_fast
