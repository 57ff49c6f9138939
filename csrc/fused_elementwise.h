// The elementwise work of one layer, fused into single passes over a block of `rows` contiguous
// rows of `cols` values: the activation with its pre-activation affine map and its derivative
// (hidden width m), and the residual updates (state width q). A pointer documented as "may be null"
// stands for an absent bias.
//
// Defined for float and double only. Each definition is compiled for AVX-512, AVX2 and baseline
// x86-64, and the best one the CPU supports is picked when the extension loads.
#pragma once

#include <cstdint>
#include <utility>

#include "activations.h"

namespace odenets_fast {

// acc ← σ(z) with z = scale_in·acc + bias (bias may be null).
template <typename T>
void activate(T* acc, const T* bias, T scale_in, int64_t rows, int64_t cols, Activation act);

// acc ← σ(z), slope ← σ'(z) with z = scale_in·acc + bias (bias may be null).
template <typename T>
void activate_with_slope(T* acc, T* slope, const T* bias, T scale_in, int64_t rows, int64_t cols, Activation act);

// acc ← σ(z); grad ← grad_scale·σ'(z)·grad (bias may be null).
template <typename T>
void activate_and_backprop(T* acc, T* grad, const T* bias, T scale_in, T grad_scale, int64_t rows, int64_t cols,
                           Activation act);

// grad ← grad_scale·slope·grad.
template <typename T>
void scale_by_slope(T* grad, const T* slope, T grad_scale, int64_t rows, int64_t cols);

// out ← in + bias_scale·bias, the bias broadcast over rows; a copy when bias is null.
template <typename T>
void add_scaled_bias(T* out, const T* in, const T* bias, T bias_scale, int64_t rows, int64_t cols);

// out ← x + s·(k + bias) (bias may be null).
template <typename T>
void add_scaled(T* out, const T* x, T s, const T* k, const T* bias, int64_t rows, int64_t cols);

// k ← k_scale·k + bias; y ← x + h·k. Finishes a residual f = k from the raw product σ(z) Vᵀ and
// takes the step y = x + h f in the same pass (bias may be null).
template <typename T>
void finish_stage(T* k, T* y, const T* x, const T* bias, T k_scale, T h, int64_t rows, int64_t cols);

// Heun's cotangents from g = ∂ℓ/∂x_{n+1} and gy = gy_scale·gy_raw = ∂ℓ/∂y_n:
//   u1 ← half_h·g + h·gy;  gy_raw ← g + gy
// (g itself is left as it is: the weight gradients of θ_{n+1} still need it).
template <typename T>
void heun_cotangents(T* u1, const T* g, T* gy_raw, T gy_scale, T half_h, T h, int64_t rows, int64_t cols);

// sums[j] += Σ_i scale·data[i·stride + j] for j < cols, the rows added in order in double.
template <typename T>
void accumulate_column_sums(T* sums, const T* data, T scale, int64_t rows, int64_t cols, int64_t stride);

// (Σ (a − b)², Σ b²), accumulated in double.
template <typename T>
std::pair<double, double> squared_distance_and_norm(const T* a, const T* b, int64_t size);

}  // namespace odenets_fast
