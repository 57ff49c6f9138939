// Shared by the forward and backward ops of the MLP stack (DESIGN.md §2–5): the validated
// configuration, how the batch is split across threads, and per-layer views of the parameters.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

#include "activations.h"

namespace odenets_fast {

// Everything about a call that is not a tensor, checked against the tensors' shapes.
struct StackConfig {
  bool heun;
  Activation activation;
  double step;
  double scale_in;
  double scale_out;
  bool backprop;
  // Stored states are x_n for n = 0, anchor_interval, 2·anchor_interval, … < depth.
  int64_t anchor_interval;
  // Whether the stored states replace the reconstruction at their layers (backprop, and adjoint
  // with anchor_every); in plain adjoint mode x_0 is stored only to measure the drift.
  bool anchors_replace_reconstruction;
  int64_t depth;
  int64_t batch;
  int64_t width;   // q
  int64_t hidden;  // m

  int64_t num_anchors() const { return (depth + anchor_interval - 1) / anchor_interval; }
  bool stores_stages() const { return heun && backprop; }
  bool anchored(int64_t n) const { return anchors_replace_reconstruction && n % anchor_interval == 0; }
};

// Validates the arguments the two ops share, `state` being the (B, q) x or x_L (TORCH_CHECK: the ops
// may be called directly through torch.ops, without the Python-side checks).
StackConfig check_stack_args(const char* op, const char* state_name, const at::Tensor& state, const at::Tensor& W,
                             const at::Tensor& V, const std::optional<at::Tensor>& b,
                             const std::optional<at::Tensor>& c, c10::string_view method,
                             c10::string_view activation, double step, double scale_in, double scale_out,
                             c10::string_view backward, std::optional<int64_t> anchor_every);

// Checks that `t` is a CPU tensor of `expected` shape and of the dtype of `like`.
void check_tensor(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected,
                  const at::Tensor& like);

// The batch is cut into contiguous row blocks, one per thread, each running the whole depth loop
// on its own: rows never interact, so threads meet only at the end to add weight gradients.
struct RowChunks {
  int64_t count;
  int64_t batch;
  int64_t begin(int64_t chunk) const { return chunk * batch / count; }
  int64_t rows(int64_t chunk) const { return begin(chunk + 1) - begin(chunk); }
};
RowChunks plan_row_chunks(const StackConfig& config);

// Per-layer views made once per call, so that the depth loop creates no tensors.
struct LayerViews {
  std::vector<at::Tensor> W, W_t, V, V_t;  // W_n, W_nᵀ, V_n, V_nᵀ
  LayerViews(const at::Tensor& W, const at::Tensor& V);
};

// Bias of layer n (a row of the stacked (P, width) tensor), or null without biases.
template <typename T>
inline const T* bias_row(const std::optional<at::Tensor>& bias, int64_t n) {
  return bias ? bias->data_ptr<T>() + n * bias->size(1) : nullptr;
}

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> mlp_stack_forward_cpu(
    const at::Tensor& x, const at::Tensor& W, const at::Tensor& V, const std::optional<at::Tensor>& b,
    const std::optional<at::Tensor>& c, c10::string_view method, c10::string_view activation, double step,
    double scale_in, double scale_out, c10::string_view backward, std::optional<int64_t> anchor_every);

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>,
           std::optional<at::Tensor>>
mlp_stack_backward_cpu(const at::Tensor& grad_out, const at::Tensor& final_state, const at::Tensor& anchors,
                       const std::optional<at::Tensor>& stages, const at::Tensor& W, const at::Tensor& V,
                       const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& c,
                       c10::string_view method, c10::string_view activation, double step, double scale_in,
                       double scale_out, c10::string_view backward, std::optional<int64_t> anchor_every);

}  // namespace odenets_fast
