#include "mlp_stack.h"

#include <algorithm>
#include <cmath>
#include <string>

// MKL's per-thread BLAS thread count (the C entry point behind mkl_set_num_threads_local; the
// lower-case symbol is the Fortran one, which takes a pointer), exported by libtorch_cpu where torch
// uses MKL. Weak: where it does not, this is null and TaskScope leaves the BLAS alone.
#if defined(__GNUC__)
extern "C" int MKL_Set_Num_Threads_Local(int threads) __attribute__((weak));
static int (*const set_blas_threads_of_this_thread)(int) = MKL_Set_Num_Threads_Local;
#else
static int (*const set_blas_threads_of_this_thread)(int) = nullptr;  // no weak symbols
#endif

namespace odenets_fast {

namespace {

// A row block's products must be large enough to run near their best speed: 2^18 multiply-adds are
// 128 rows at q × m = 32 × 64, where MKL's time per row of a float32 product is half that at 16 rows
// and 10 % above that at 256. So a batch of B rows runs on at most B q m / 2^18 threads; one of
// B q m < 2^19 on one. (A block cannot follow the number of threads: see RowChunks.)
constexpr int64_t kMinRowsPerChunk = 16;
constexpr int64_t kMinWorkPerChunk = int64_t(1) << 18;  // rows × q × m
// A weight-gradient block is a product over the whole batch; splitting one pays only when it is large.
constexpr int64_t kMinRowsPerGradientBlock = 16;
constexpr int64_t kMinWorkPerGradientBlock = int64_t(1) << 20;  // its rows × the other width × B

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
  const int64_t by_rows = config.batch / kMinRowsPerChunk;
  const int64_t by_work = config.batch * config.width * config.hidden / kMinWorkPerChunk;
  return RowChunks{std::max<int64_t>(1, std::min(by_rows, by_work)), config.batch};
}

int64_t gradient_blocks(const StackConfig& config, int64_t rows) {
  const int64_t by_rows = rows / kMinRowsPerGradientBlock;
  const int64_t by_work = config.width * config.hidden * config.batch / kMinWorkPerGradientBlock;
  return std::max<int64_t>(1, std::min(by_rows, by_work));
}

TaskScope::TaskScope()
    : previous_blas_threads_(set_blas_threads_of_this_thread ? set_blas_threads_of_this_thread(1) : 0) {}

TaskScope::~TaskScope() {
  // 0, what MKL returns where the thread had no setting of its own, restores "follow the global one"
  if (set_blas_threads_of_this_thread) set_blas_threads_of_this_thread(previous_blas_threads_);
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
