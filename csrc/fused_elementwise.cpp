#include "fused_elementwise.h"

#include <c10/util/Exception.h>

#include <algorithm>

// Multiversioned so that one build runs everywhere yet uses the widest vectors the CPU has: GCC
// 12 is the first to accept the x86-64-v3/v4 levels here, and the choice at load time is a glibc
// ifunc. Elsewhere the compiler's default target.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__) && __GNUC__ >= 12
#define ODENETS_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ODENETS_SIMD_CLONES
#endif

namespace odenets_fast {

Activation parse_activation(c10::string_view name) {
  std::string names;
  for (const ActivationName& entry : kActivationNames) {
    if (name == entry.name) return entry.activation;
    names += std::string(names.empty() ? "'" : ", '") + entry.name + "'";
  }
  TORCH_CHECK(false, "activation must be one of [", names, "]; got '", std::string(name.data(), name.size()), "'");
}

namespace {

// Runs Kernel::run<σ, with_bias> so that every loop is compiled with its activation inlined and
// never tests the bias pointer per element (a vectorized conditional load of an absent bias is a
// masked load from a null address: legal, but microcode-slow on some CPUs).
template <typename T, typename Kernel, bool with_bias, typename... Args>
ODENETS_ALWAYS_INLINE void with_activation_and_bias(Activation act, Args... args) {
  switch (act) {
    case Activation::identity: return Kernel::template run<Identity<T>, with_bias>(args...);
    case Activation::relu: return Kernel::template run<Relu<T>, with_bias>(args...);
    case Activation::tanh: return Kernel::template run<Tanh<T>, with_bias>(args...);
    case Activation::gelu: return Kernel::template run<Gelu<T>, with_bias>(args...);
    case Activation::gelu_tanh: return Kernel::template run<GeluTanh<T>, with_bias>(args...);
    case Activation::silu: return Kernel::template run<Silu<T>, with_bias>(args...);
  }
}

template <typename T, typename Kernel, typename... Args>
ODENETS_ALWAYS_INLINE void with_activation(Activation act, const T* bias, Args... args) {
  if (bias) {
    with_activation_and_bias<T, Kernel, true>(act, bias, args...);
  } else {
    with_activation_and_bias<T, Kernel, false>(act, bias, args...);
  }
}

template <typename T, bool with_bias>
ODENETS_ALWAYS_INLINE T preactivation(T acc, T scale_in, const T* bias, int64_t j) {
  if constexpr (with_bias) {
    return scale_in * acc + bias[j];
  } else {
    return scale_in * acc;
  }
}

template <typename T>
struct Activate {
  template <typename Act, bool with_bias>
  static ODENETS_ALWAYS_INLINE void run(const T* bias, T* acc, T scale_in, int64_t rows, int64_t cols) {
    for (int64_t i = 0; i < rows; ++i) {
      T* row = acc + i * cols;
      for (int64_t j = 0; j < cols; ++j) row[j] = Act::value(preactivation<T, with_bias>(row[j], scale_in, bias, j));
    }
  }
};

template <typename T>
struct ActivateWithSlope {
  template <typename Act, bool with_bias>
  static ODENETS_ALWAYS_INLINE void run(const T* bias, T* acc, T* slope, T scale_in, int64_t rows, int64_t cols) {
    for (int64_t i = 0; i < rows; ++i) {
      T* row = acc + i * cols;
      T* slope_row = slope + i * cols;
      for (int64_t j = 0; j < cols; ++j) {
        Act::both(preactivation<T, with_bias>(row[j], scale_in, bias, j), row[j], slope_row[j]);
      }
    }
  }
};

template <typename T>
struct ActivateAndBackprop {
  template <typename Act, bool with_bias>
  static ODENETS_ALWAYS_INLINE void run(const T* bias, T* acc, T* grad, T scale_in, T grad_scale, int64_t rows,
                                        int64_t cols) {
    for (int64_t i = 0; i < rows; ++i) {
      T* row = acc + i * cols;
      T* grad_row = grad + i * cols;
      for (int64_t j = 0; j < cols; ++j) {
        T slope;
        Act::both(preactivation<T, with_bias>(row[j], scale_in, bias, j), row[j], slope);
        grad_row[j] *= grad_scale * slope;
      }
    }
  }
};

template <typename T>
ODENETS_ALWAYS_INLINE void scale_by_slope_impl(T* grad, const T* slope, T grad_scale, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows * cols; ++i) grad[i] *= grad_scale * slope[i];
}

template <typename T>
ODENETS_ALWAYS_INLINE void add_scaled_bias_impl(T* out, const T* in, const T* bias, T bias_scale, int64_t rows,
                                                int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    T* out_row = out + i * cols;
    const T* in_row = in + i * cols;
    if (bias) {
      for (int64_t j = 0; j < cols; ++j) out_row[j] = in_row[j] + bias_scale * bias[j];
    } else {
      for (int64_t j = 0; j < cols; ++j) out_row[j] = in_row[j];
    }
  }
}

template <typename T>
ODENETS_ALWAYS_INLINE void add_scaled_impl(T* out, const T* x, T s, const T* k, const T* bias, int64_t rows,
                                           int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    T* out_row = out + i * cols;
    const T* x_row = x + i * cols;
    const T* k_row = k + i * cols;
    if (bias) {
      for (int64_t j = 0; j < cols; ++j) out_row[j] = x_row[j] + s * (k_row[j] + bias[j]);
    } else {
      for (int64_t j = 0; j < cols; ++j) out_row[j] = x_row[j] + s * k_row[j];
    }
  }
}

template <typename T>
ODENETS_ALWAYS_INLINE void finish_stage_impl(T* k, T* y, const T* x, const T* bias, T k_scale, T h, int64_t rows,
                                             int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    T* k_row = k + i * cols;
    T* y_row = y + i * cols;
    const T* x_row = x + i * cols;
    if (bias) {
      for (int64_t j = 0; j < cols; ++j) k_row[j] = k_scale * k_row[j] + bias[j];
    } else {
      for (int64_t j = 0; j < cols; ++j) k_row[j] = k_scale * k_row[j];
    }
    for (int64_t j = 0; j < cols; ++j) y_row[j] = x_row[j] + h * k_row[j];
  }
}

template <typename T>
ODENETS_ALWAYS_INLINE void heun_cotangents_impl(T* u1, const T* g, T* gy_raw, T gy_scale, T half_h, T h,
                                                int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows * cols; ++i) {
    const T gy = gy_scale * gy_raw[i];
    u1[i] = half_h * g[i] + h * gy;
    gy_raw[i] = g[i] + gy;
  }
}

// Bias gradients sum over the whole batch: a float32 running sum of 10^5–10^6 rows loses about B·2^-24
// of its value (500× the reference's torch.sum at B = 2^18), so the rows are summed in double. Each term
// is still scale·row in T, so an overflow there gives the reference's inf. The double sums live on the
// stack, a chunk of columns at a time: this runs per layer, where a heap buffer would be an allocation each.
template <typename T>
ODENETS_ALWAYS_INLINE void accumulate_column_sums_impl(T* sums, const T* data, T scale, int64_t rows, int64_t cols,
                                                       int64_t stride) {
  constexpr int64_t kChunk = 256;
  for (int64_t j0 = 0; j0 < cols; j0 += kChunk) {
    const int64_t width = std::min(kChunk, cols - j0);
    double column[kChunk] = {};
    for (int64_t i = 0; i < rows; ++i) {
      const T* row = data + i * stride + j0;
      for (int64_t j = 0; j < width; ++j) column[j] += static_cast<double>(scale * row[j]);
    }
    for (int64_t j = 0; j < width; ++j) sums[j0 + j] = static_cast<T>(static_cast<double>(sums[j0 + j]) + column[j]);
  }
}

template <typename T>
ODENETS_ALWAYS_INLINE std::pair<double, double> squared_distance_and_norm_impl(const T* a, const T* b, int64_t size) {
  double distance = 0.0, norm = 0.0;
  for (int64_t i = 0; i < size; ++i) {
    const double d = static_cast<double>(a[i]) - static_cast<double>(b[i]);
    distance += d * d;
    norm += static_cast<double>(b[i]) * static_cast<double>(b[i]);
  }
  return {distance, norm};
}

}  // namespace

#define ODENETS_DEFINE_KERNELS(T)                                                                                   \
  template <>                                                                                                       \
  ODENETS_SIMD_CLONES void activate<T>(T * acc, const T* bias, T scale_in, int64_t rows, int64_t cols,              \
                                       Activation act) {                                                            \
    with_activation<T, Activate<T>>(act, bias, acc, scale_in, rows, cols);                                          \
  }                                                                                                                 \
  template <>                                                                                                       \
  ODENETS_SIMD_CLONES void activate_with_slope<T>(T * acc, T * slope, const T* bias, T scale_in, int64_t rows,      \
                                                  int64_t cols, Activation act) {                                   \
    with_activation<T, ActivateWithSlope<T>>(act, bias, acc, slope, scale_in, rows, cols);                          \
  }                                                                                                                 \
  template <>                                                                                                       \
  ODENETS_SIMD_CLONES void activate_and_backprop<T>(T * acc, T * grad, const T* bias, T scale_in, T grad_scale,     \
                                                    int64_t rows, int64_t cols, Activation act) {                   \
    with_activation<T, ActivateAndBackprop<T>>(act, bias, acc, grad, scale_in, grad_scale, rows, cols);             \
  }                                                                                                                 \
  template <>                                                                                                       \
  ODENETS_SIMD_CLONES void scale_by_slope<T>(T * grad, const T* slope, T grad_scale, int64_t rows, int64_t cols) {  \
    scale_by_slope_impl(grad, slope, grad_scale, rows, cols);                                                       \
  }                                                                                                                 \
  template <>                                                                                                       \
  ODENETS_SIMD_CLONES void add_scaled_bias<T>(T * out, const T* in, const T* bias, T bias_scale, int64_t rows,      \
                                              int64_t cols) {                                                       \
    add_scaled_bias_impl(out, in, bias, bias_scale, rows, cols);                                                    \
  }                                                                                                                 \
  template <>                                                                                                       \
  ODENETS_SIMD_CLONES void add_scaled<T>(T * out, const T* x, T s, const T* k, const T* bias, int64_t rows,         \
                                         int64_t cols) {                                                            \
    add_scaled_impl(out, x, s, k, bias, rows, cols);                                                                \
  }                                                                                                                 \
  template <>                                                                                                       \
  ODENETS_SIMD_CLONES void finish_stage<T>(T * k, T * y, const T* x, const T* bias, T k_scale, T h, int64_t rows,   \
                                           int64_t cols) {                                                          \
    finish_stage_impl(k, y, x, bias, k_scale, h, rows, cols);                                                       \
  }                                                                                                                 \
  template <>                                                                                                       \
  ODENETS_SIMD_CLONES void heun_cotangents<T>(T * u1, const T* g, T * gy_raw, T gy_scale, T half_h, T h,            \
                                              int64_t rows, int64_t cols) {                                         \
    heun_cotangents_impl(u1, g, gy_raw, gy_scale, half_h, h, rows, cols);                                           \
  }                                                                                                                 \
  template <>                                                                                                       \
  ODENETS_SIMD_CLONES void accumulate_column_sums<T>(T * sums, const T* data, T scale, int64_t rows, int64_t cols,  \
                                                     int64_t stride) {                                              \
    accumulate_column_sums_impl(sums, data, scale, rows, cols, stride);                                             \
  }                                                                                                                 \
  template <>                                                                                                       \
  std::pair<double, double> squared_distance_and_norm<T>(const T* a, const T* b, int64_t size) {                    \
    return squared_distance_and_norm_impl(a, b, size);                                                              \
  }

ODENETS_DEFINE_KERNELS(float)
ODENETS_DEFINE_KERNELS(double)

}  // namespace odenets_fast
