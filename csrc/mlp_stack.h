// Shared by the forward and backward ops of the MLP stack (DESIGN.md §2–5): the validated
// configuration, how the batch is split across threads, and per-layer views of the parameters.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>

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

  // ceil(depth / interval) for depth >= 1 (checked) without forming depth + interval - 1, which
  // overflows for an interval near INT64_MAX (any interval >= depth means one anchor, x_0)
  int64_t num_anchors() const { return 1 + (depth - 1) / anchor_interval; }
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

// The batch is cut into contiguous row blocks, and the threads take whole blocks. Rows never interact:
// the forward runs each block through the whole depth on its own; the backward runs the blocks through
// one layer at a time, because the weight gradients sum over all rows (mlp_stack_backward.cpp).
//
// The blocks depend on the problem (B, q, m), never on the number of threads, so that the results do
// not either: each block is the rows of one matrix product, and a product may give a row different
// bits depending on its number of rows (MKL does: with q > m, 301 rows in one block or in 150 + 151).
struct RowChunks {
  int64_t count;
  int64_t batch;
  int64_t begin(int64_t chunk) const { return chunk * batch / count; }
  int64_t rows(int64_t chunk) const { return begin(chunk + 1) - begin(chunk); }
};
RowChunks plan_row_chunks(const StackConfig& config);

// How many row blocks to cut a weight gradient's `rows` (q of dV, m of dW) into, each a product over the
// whole batch done by one thread; like the row blocks, fixed by the problem alone.
int64_t gradient_blocks(const StackConfig& config, int64_t rows);

// What every task of the ops' parallel loops runs under. Thread-local state, which worker threads do
// not inherit from the caller: dispatch below autograd (the products write into preallocated buffers,
// which autograd rejects for parameters that require grad), and one BLAS thread. MKL otherwise picks
// its kernels by the thread count it may use, in a worker thread too, and gives other bits with 2
// threads than with 1, e.g. for a 64 × 32 weight gradient summed over 128 rows; with one thread each
// product is computed as in a single-threaded run.
class TaskScope {
 public:
  TaskScope();
  ~TaskScope();
  TaskScope(const TaskScope&) = delete;
  TaskScope& operator=(const TaskScope&) = delete;

 private:
  at::AutoDispatchBelowADInplaceOrView below_autograd_;
  int previous_blas_threads_;
};

// A view into layer 0 of a contiguous stacked (P, …) tensor — W_0, W_0ᵀ, rows of dW_0 … — that
// select(n) moves to layer n in place, by rewriting its storage offset. Walking the depth this way
// creates no tensors: keeping a view per layer would hold O(L) memory, which the adjoint backward
// must not, and making one per layer would allocate inside the loop. A view must not be moved while
// another thread uses it.
class LayerView {
 public:
  LayerView(const at::Tensor& layer0, int64_t layer_numel);
  void select(int64_t n) { view_.unsafeGetTensorImpl()->set_storage_offset(offset0_ + n * layer_numel_); }
  const at::Tensor& operator*() const { return view_; }

 private:
  at::Tensor view_;
  int64_t offset0_;
  int64_t layer_numel_;
};

// The matrices of one layer that the products take, W_n, W_nᵀ, V_n and V_nᵀ, for W (P, m, q) and
// V (P, q, m) contiguous.
struct LayerViews {
  LayerView W, W_t, V, V_t;
  LayerViews(const at::Tensor& W, const at::Tensor& V);
  void select(int64_t n);
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
