#include "mlp_stack.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <string>

namespace odenets_fast {

namespace {

// A row block must be worth waking a thread for: below this many rows the matrix products get too
// thin, and below this much work (rows × q × m × L multiply-adds, one product per layer) the call
// is over before a second thread pays off — and on a busy machine, waiting for a descheduled
// thread costs milliseconds.
constexpr int64_t kMinRowsPerChunk = 16;
constexpr int64_t kMinWorkPerChunk = int64_t(1) << 18;

std::string quoted(c10::string_view s) { return "'" + std::string(s.data(), s.size()) + "'"; }

}  // namespace

void check_tensor(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected,
                  const at::Tensor& like) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, "; got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but expected ",
              like.scalar_type(), "; all tensors must share one dtype");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(), "; this kernel runs on CPU tensors only");
}

StackConfig check_stack_args(const char* op, const char* state_name, const at::Tensor& state, const at::Tensor& W,
                             const at::Tensor& V, const std::optional<at::Tensor>& b,
                             const std::optional<at::Tensor>& c, c10::string_view method,
                             c10::string_view activation, double step, double scale_in, double scale_out,
                             c10::string_view backward, std::optional<int64_t> anchor_every) {
  TORCH_CHECK(state.dim() == 2, op, ": ", state_name, " must have shape (B, q); got ", state.sizes());
  TORCH_CHECK(state.scalar_type() == at::kFloat || state.scalar_type() == at::kDouble, op,
              ": tensors must be float32 or float64 (lower precisions are computed in float32); got ",
              state.scalar_type());
  TORCH_CHECK(method == "euler" || method == "heun", op, ": method must be 'euler' or 'heun'; got ", quoted(method));
  TORCH_CHECK(backward == "adjoint" || backward == "backprop", op, ": backward must be 'adjoint' or 'backprop'; got ",
              quoted(backward));
  TORCH_CHECK(W.dim() == 3 && W.size(1) >= 1 && W.size(2) >= 1, op,
              ": W must have shape (P, m, q) with m, q >= 1; got ", W.sizes());
  const int64_t P = W.size(0), m = W.size(1), q = W.size(2);
  check_tensor(op, state_name, state, {state.size(0), q}, state);
  check_tensor(op, "W", W, {P, m, q}, state);
  check_tensor(op, "V", V, {P, q, m}, state);
  if (b) check_tensor(op, "b", *b, {P, m}, state);
  if (c) check_tensor(op, "c", *c, {P, q}, state);

  StackConfig config;
  config.heun = method == "heun";
  config.activation = parse_activation(activation);
  config.depth = config.heun ? P - 1 : P;
  TORCH_CHECK(config.depth >= 1, op, ": W has P = ", P, " layers but method ", quoted(method), " needs P ",
              config.heun ? ">= 2 (θ_0 … θ_L)" : ">= 1");
  TORCH_CHECK(std::isfinite(step) && step > 0, op, ": step must be finite and > 0; got ", step);
  TORCH_CHECK(std::isfinite(scale_in) && std::isfinite(scale_out), op, ": scale_in and scale_out must be finite; got ",
              scale_in, " and ", scale_out);
  config.step = step;
  config.scale_in = scale_in;
  config.scale_out = scale_out;
  config.backprop = backward == "backprop";
  if (anchor_every) {
    TORCH_CHECK(!config.backprop, op, ": anchor_every is only meaningful with backward='adjoint'");
    TORCH_CHECK(*anchor_every >= 1, op, ": anchor_every must be >= 1; got ", *anchor_every);
  }
  config.anchor_interval = config.backprop ? 1 : anchor_every.value_or(config.depth);
  config.anchors_replace_reconstruction = config.backprop || anchor_every.has_value();
  config.batch = state.size(0);
  config.width = q;
  config.hidden = m;
  return config;
}

RowChunks plan_row_chunks(const StackConfig& config) {
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t work_per_row = config.width * config.hidden * config.depth;
  const int64_t by_rows = config.batch / kMinRowsPerChunk;
  const int64_t by_work = config.batch * work_per_row / kMinWorkPerChunk;
  return RowChunks{std::max<int64_t>(1, std::min({threads, by_rows, by_work})), config.batch};
}

// An alias of its own: select() rewrites the view, which must not move any other handle's.
LayerView::LayerView(const at::Tensor& layer0, int64_t layer_numel)
    : view_(layer0.alias()), offset0_(view_.storage_offset()), layer_numel_(layer_numel) {}

LayerViews::LayerViews(const at::Tensor& W_, const at::Tensor& V_)
    : W(W_[0], W_[0].numel()),
      W_t(W_[0].t(), W_[0].numel()),
      V(V_[0], V_[0].numel()),
      V_t(V_[0].t(), V_[0].numel()) {}

void LayerViews::select(int64_t n) {
  W.select(n);
  W_t.select(n);
  V.select(n);
  V_t.select(n);
}

}  // namespace odenets_fast
