// Forward of the whole stack, x_0 → x_L (DESIGN.md §3), with the depth loop in C++.
#include <ATen/Parallel.h>

#include "fused_elementwise.h"
#include "mlp_stack.h"

namespace odenets_fast {

namespace {

// One block of rows through all L layers. States go straight into the slot where they must end
// up (an anchor, x_L, or one of two scratch buffers), so storing costs no copies.
template <typename T>
class ForwardChunk {
 public:
  ForwardChunk(const StackConfig& config, const at::Tensor& W, const at::Tensor& V, const std::optional<at::Tensor>& b,
               const std::optional<at::Tensor>& c, int64_t rows, const at::TensorOptions& options)
      : config_(config),
        layer_(W, V),
        b_(b),
        c_(c),
        rows_(rows),
        scratch_a_(at::empty({rows, config.width}, options)),
        scratch_b_(at::empty({rows, config.width}, options)),
        hidden_(at::empty({rows, config.hidden}, options)),
        residual_(config.heun ? at::empty({rows, config.width}, options) : at::Tensor()),
        stage_(config.heun ? at::empty({rows, config.width}, options) : at::Tensor()) {}

  void run(const at::Tensor& x_rows, const at::Tensor& final_rows, const std::vector<at::Tensor>& anchor_rows,
           const std::vector<at::Tensor>& stage_rows) {
    const int64_t L = config_.depth, every = config_.anchor_interval;
    anchor_rows[0].copy_(x_rows);
    at::Tensor state = x_rows;
    for (int64_t n = 0; n < L; ++n) {
      const at::Tensor& next = n + 1 == L                ? final_rows
                               : (n + 1) % every == 0    ? anchor_rows[(n + 1) / every]
                               : state.is_same(scratch_a_) ? scratch_b_
                                                           : scratch_a_;
      if (config_.heun) {
        heun_step(state, next, config_.stores_stages() ? stage_rows[n] : stage_, n);
      } else {
        euler_step(state, next, n);
      }
      state = next;
    }
  }

 private:
  // The views of θ_n; this block's own, since the blocks walk the depth independently.
  const LayerViews& layer(int64_t n) {
    layer_.select(n);
    return layer_;
  }

  // hidden ← σ(a_in x W_nᵀ + b_n)
  void hidden_activations(const at::Tensor& x, int64_t n) {
    at::mm_out(hidden_, x, *layer(n).W_t);
    activate<T>(hidden_.data_ptr<T>(), bias_row<T>(b_, n), T(config_.scale_in), rows_, config_.hidden,
                config_.activation);
  }

  // next = x + h (a_out σ(z) V_nᵀ + c_n)
  void euler_step(const at::Tensor& x, const at::Tensor& next, int64_t n) {
    const double h = config_.step;
    hidden_activations(x, n);
    add_scaled_bias<T>(next.data_ptr<T>(), x.data_ptr<T>(), bias_row<T>(c_, n), T(h), rows_, config_.width);
    next.addmm_(hidden_, *layer(n).V_t, 1, h * config_.scale_out);
  }

  // k1 = f(x; θ_n), y = x + h k1, next = x + (h/2)(k1 + f(y; θ_{n+1})), with y written into `stage`.
  void heun_step(const at::Tensor& x, const at::Tensor& next, const at::Tensor& stage, int64_t n) {
    const double h = config_.step, a_out = config_.scale_out;
    hidden_activations(x, n);
    at::mm_out(residual_, hidden_, *layer(n).V_t);
    finish_stage<T>(residual_.data_ptr<T>(), stage.data_ptr<T>(), x.data_ptr<T>(), bias_row<T>(c_, n), T(a_out),
                    T(h), rows_, config_.width);
    hidden_activations(stage, n + 1);
    add_scaled<T>(next.data_ptr<T>(), x.data_ptr<T>(), T(0.5 * h), residual_.data_ptr<T>(), bias_row<T>(c_, n + 1),
                  rows_, config_.width);
    next.addmm_(hidden_, *layer(n + 1).V_t, 1, 0.5 * h * a_out);
  }

  const StackConfig& config_;
  LayerViews layer_;
  const std::optional<at::Tensor>& b_;
  const std::optional<at::Tensor>& c_;
  const int64_t rows_;
  // Workspaces: handles are not const because at::mm_out takes its output by non-const reference.
  at::Tensor scratch_a_, scratch_b_;  // (rows, q): states that are stored nowhere
  at::Tensor hidden_;                 // (rows, m): a_in x W_nᵀ, then σ of it
  at::Tensor residual_;               // (rows, q), Heun: k1
  at::Tensor stage_;                  // (rows, q), Heun: y_n when stages are not stored
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> mlp_stack_forward_cpu(
    const at::Tensor& x, const at::Tensor& W, const at::Tensor& V, const std::optional<at::Tensor>& b,
    const std::optional<at::Tensor>& c, c10::string_view method, c10::string_view activation, double step,
    double scale_in, double scale_out, c10::string_view backward, std::optional<int64_t> anchor_every) {
  const char* op = "odenets_fast::mlp_stack_forward";
  const StackConfig config = check_stack_args(op, "x", x, W, V, b, c, method, activation, step, scale_in, scale_out,
                                              backward, anchor_every);
  // The products below write into preallocated buffers (out= and in-place), which autograd
  // rejects for parameters that require grad; this op is differentiated by its backward op.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor x_c = x.contiguous(), W_c = W.contiguous(), V_c = V.contiguous();
  const std::optional<at::Tensor> b_c = b ? std::optional<at::Tensor>(b->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> c_c = c ? std::optional<at::Tensor>(c->contiguous()) : std::nullopt;

  const int64_t B = config.batch, q = config.width;
  const at::Tensor final_state = at::empty({B, q}, x.options());
  const at::Tensor anchors = at::empty({config.num_anchors(), B, q}, x.options());
  const std::optional<at::Tensor> stages =
      config.stores_stages() ? std::optional<at::Tensor>(at::empty({config.depth, B, q}, x.options())) : std::nullopt;
  const RowChunks chunks = plan_row_chunks(config);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlp_stack_forward", [&] {
    at::parallel_for(0, chunks.count, 1, [&](int64_t first, int64_t last) {
      TaskScope scope;
      for (int64_t chunk = first; chunk < last; ++chunk) {
        const int64_t row0 = chunks.begin(chunk), rows = chunks.rows(chunk);
        ForwardChunk<scalar_t> forward(config, W_c, V_c, b_c, c_c, rows, x.options());
        forward.run(x_c.narrow(0, row0, rows), final_state.narrow(0, row0, rows),
                    anchors.narrow(1, row0, rows).unbind(0),
                    stages ? stages->narrow(1, row0, rows).unbind(0) : std::vector<at::Tensor>());
      }
    });
  });
  return {final_state, anchors, stages};
}

}  // namespace odenets_fast
