// Backward of the whole stack (DESIGN.md §4–5): walks layers L−1 … 0, obtains each layer's input
// (a stored state, or the reverse reconstruction) and applies the exact VJP of the forward step,
// accumulating weight gradients with addmm straight into the stacked gradient tensors.
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <cmath>
#include <limits>

#include "fused_elementwise.h"
#include "mlp_stack.h"

namespace odenets_fast {

namespace {

// Where one block of rows accumulates its parameter gradients: per-layer slices of the stacked
// (P, …) tensors, made once.
struct GradTargets {
  std::vector<at::Tensor> W, V;
  std::optional<at::Tensor> b, c;

  GradTargets(const at::Tensor& gW, const at::Tensor& gV, const std::optional<at::Tensor>& gb,
              const std::optional<at::Tensor>& gc)
      : W(gW.unbind(0)), V(gV.unbind(0)), b(gb), c(gc) {}

  template <typename T>
  T* bias_row(const std::optional<at::Tensor>& grad, int64_t n) const {
    return grad ? grad->data_ptr<T>() + n * grad->size(1) : nullptr;
  }
};

// One block of rows through all L layers backwards, carrying g = ∂ℓ/∂x_{n+1} in `g` (the block's
// rows of the returned grad_x) and reusing the same workspaces at every layer.
template <typename T>
class BackwardChunk {
 public:
  BackwardChunk(const StackConfig& config, const LayerViews& layers, const std::optional<at::Tensor>& b,
                const std::optional<at::Tensor>& c, GradTargets targets, at::Tensor g,
                const at::TensorOptions& options)
      : config_(config),
        layers_(layers),
        b_(b),
        c_(c),
        grads_(std::move(targets)),
        rows_(g.size(0)),
        g_(std::move(g)),
        g_t_(g_.t()),
        state_a_(at::empty({rows_, config.width}, options)),
        state_b_(at::empty({rows_, config.width}, options)),
        hidden_(at::empty({rows_, config.hidden}, options)),
        grad_hidden_(at::empty({rows_, config.hidden}, options)),
        grad_hidden_t_(grad_hidden_.t()) {
    if (config.heun) {
      stage_ = at::empty({rows_, config.width}, options);
      residual_ = at::empty({rows_, config.width}, options);
      grad_stage_ = at::empty({rows_, config.width}, options);
      u1_ = at::empty({rows_, config.width}, options);
      u1_t_ = u1_.t();
      hidden_x_ = at::empty({rows_, config.hidden}, options);
      slope_x_ = at::empty({rows_, config.hidden}, options);
    }
  }

  // Returns (Σ (x̃_0 − x_0)², Σ x_0²) over the block's rows in adjoint mode, zeros in backprop mode.
  std::pair<double, double> run(const at::Tensor& final_rows, const std::vector<at::Tensor>& anchor_rows,
                                const std::vector<at::Tensor>& stage_rows) {
    std::pair<double, double> drift_sums{0.0, 0.0};
    at::Tensor x_next = final_rows;
    for (int64_t n = config_.depth - 1; n >= 0; --n) {
      const bool anchored = config_.anchored(n);
      const bool measure_drift = n == 0 && !config_.backprop;
      at::Tensor x = anchored ? anchor_rows[n / config_.anchor_interval] : at::Tensor();
      if (!anchored || measure_drift) {
        const at::Tensor& reconstructed = x_next.is_same(state_a_) ? state_b_ : state_a_;
        if (config_.heun) {
          heun_reconstruct(x_next, reconstructed, n);
        } else {
          euler_reconstruct(x_next, reconstructed, n);
        }
        if (measure_drift) {
          drift_sums = squared_distance_and_norm<T>(reconstructed.data_ptr<T>(), anchor_rows[0].data_ptr<T>(),
                                                    reconstructed.numel());
        }
        if (!anchored) x = reconstructed;
      }
      if (config_.heun) {
        heun_vjp(x, config_.stores_stages() ? stage_rows[n] : at::Tensor(), n);
      } else {
        euler_vjp(x, n);
      }
      x_next = x;
    }
    return drift_sums;
  }

 private:
  // hidden ← σ(a_in x W_nᵀ + b_n)
  void hidden_activations(const at::Tensor& x, int64_t n) {
    at::mm_out(hidden_, x, layers_.W_t[n]);
    activate<T>(hidden_.data_ptr<T>(), bias_row<T>(b_, n), T(config_.scale_in), rows_, config_.hidden,
                config_.activation);
  }

  // x̃_n = x̃_{n+1} − h f(x̃_{n+1}; θ_n)
  void euler_reconstruct(const at::Tensor& x_next, const at::Tensor& out, int64_t n) {
    const double h = config_.step;
    hidden_activations(x_next, n);
    add_scaled_bias<T>(out.data_ptr<T>(), x_next.data_ptr<T>(), bias_row<T>(c_, n), T(-h), rows_, config_.width);
    out.addmm_(hidden_, layers_.V_t[n], 1, -h * config_.scale_out);
  }

  /// Exact VJP of the Euler step x_{n+1} = x + h f(x; θ_n) at x, with g = ∂ℓ/∂x_{n+1}:
  ///
  ///     z = a_in W_n x + b_n,  a = σ(z),  dz = σ'(z) ⊙ (h a_out V_nᵀ g)
  ///     dV_n += h a_out g aᵀ;  dc_n += h g;  db_n += dz;  dW_n += a_in dz xᵀ   (summed over rows)
  ///     g ← g + a_in W_nᵀ dz
  void euler_vjp(const at::Tensor& x, int64_t n) {
    const double h = config_.step, a_in = config_.scale_in, a_out = config_.scale_out;
    at::mm_out(hidden_, x, layers_.W_t[n]);
    at::mm_out(grad_hidden_, g_, layers_.V[n]);
    activate_and_backprop<T>(hidden_.data_ptr<T>(), grad_hidden_.data_ptr<T>(), bias_row<T>(b_, n), T(a_in),
                             T(h * a_out), grads_.bias_row<T>(grads_.b, n), rows_, config_.hidden,
                             config_.activation);
    grads_.V[n].addmm_(g_t_, hidden_, 1, h * a_out);
    if (grads_.c) {
      accumulate_column_sums<T>(grads_.bias_row<T>(grads_.c, n), g_.data_ptr<T>(), T(h), rows_, config_.width);
    }
    grads_.W[n].addmm_(grad_hidden_t_, x, 1, a_in);
    g_.addmm_(grad_hidden_, layers_.W[n], 1, a_in);
  }

  // ỹ_n = x̃_{n+1} − h k with k = f(x̃_{n+1}; θ_{n+1});  x̃_n = x̃_{n+1} − (h/2)(k + f(ỹ_n; θ_n)).
  // k is the residual the VJP of layer n + 1 computed at the same state, except at the top.
  void heun_reconstruct(const at::Tensor& x_next, const at::Tensor& out, int64_t n) {
    const double h = config_.step, a_out = config_.scale_out;
    if (residual_valid_) {
      add_scaled<T>(stage_.data_ptr<T>(), x_next.data_ptr<T>(), T(-h), residual_.data_ptr<T>(), nullptr, rows_,
                    config_.width);
    } else {
      hidden_activations(x_next, n + 1);
      at::mm_out(residual_, hidden_, layers_.V_t[n + 1]);
      finish_stage<T>(residual_.data_ptr<T>(), stage_.data_ptr<T>(), x_next.data_ptr<T>(), bias_row<T>(c_, n + 1),
                      T(a_out), T(-h), rows_, config_.width);
    }
    hidden_activations(stage_, n);
    add_scaled<T>(out.data_ptr<T>(), x_next.data_ptr<T>(), T(-0.5 * h), residual_.data_ptr<T>(), bias_row<T>(c_, n),
                  rows_, config_.width);
    out.addmm_(hidden_, layers_.V_t[n], 1, -0.5 * h * a_out);
  }

  /// Exact VJP of the Heun step at x, with g = ∂ℓ/∂x_{n+1}. The step is k1 = f(x; θ_n),
  /// y = x + h k1, k2 = f(y; θ_{n+1}), x_{n+1} = x + (h/2)(k1 + k2), so by the chain rule
  ///
  ///     u2 = (h/2) g                      the cotangent of k2
  ///     gy = ∂y f(y; θ_{n+1})ᵀ u2,        dθ_{n+1} += ∂θ f(y; θ_{n+1})ᵀ u2
  ///     u1 = (h/2) g + h gy               the cotangent of k1 (directly, and through y)
  ///     gx = ∂x f(x; θ_n)ᵀ u1,            dθ_n += ∂θ f(x; θ_n)ᵀ u1
  ///     g ← g + gy + gx
  ///
  /// each VJP of f being the one of euler_vjp with u in place of h g. `stored_y` is y_n in backprop
  /// mode; otherwise y is recomputed, and k1 kept for the reconstruction of the layer below.
  void heun_vjp(const at::Tensor& x, const at::Tensor& stored_y, int64_t n) {
    const double h = config_.step, a_in = config_.scale_in, a_out = config_.scale_out;
    at::mm_out(hidden_x_, x, layers_.W_t[n]);
    activate_with_slope<T>(hidden_x_.data_ptr<T>(), slope_x_.data_ptr<T>(), bias_row<T>(b_, n), T(a_in), rows_,
                           config_.hidden, config_.activation);
    at::Tensor y = stored_y;
    if (!y.defined()) {
      at::mm_out(residual_, hidden_x_, layers_.V_t[n]);
      finish_stage<T>(residual_.data_ptr<T>(), stage_.data_ptr<T>(), x.data_ptr<T>(), bias_row<T>(c_, n), T(a_out),
                      T(h), rows_, config_.width);
      y = stage_;
    }
    residual_valid_ = !stored_y.defined();

    at::mm_out(hidden_, y, layers_.W_t[n + 1]);
    at::mm_out(grad_hidden_, g_, layers_.V[n + 1]);
    activate_and_backprop<T>(hidden_.data_ptr<T>(), grad_hidden_.data_ptr<T>(), bias_row<T>(b_, n + 1), T(a_in),
                             T(0.5 * h * a_out), grads_.bias_row<T>(grads_.b, n + 1), rows_, config_.hidden,
                             config_.activation);
    grads_.V[n + 1].addmm_(g_t_, hidden_, 1, 0.5 * h * a_out);
    grads_.W[n + 1].addmm_(grad_hidden_t_, y, 1, a_in);
    at::mm_out(grad_stage_, grad_hidden_, layers_.W[n + 1]);
    heun_cotangents<T>(u1_.data_ptr<T>(), g_.data_ptr<T>(), grad_stage_.data_ptr<T>(), T(a_in), T(0.5 * h), T(h),
                       grads_.bias_row<T>(grads_.c, n + 1), grads_.bias_row<T>(grads_.c, n), rows_, config_.width);

    at::mm_out(grad_hidden_, u1_, layers_.V[n]);
    scale_by_slope<T>(grad_hidden_.data_ptr<T>(), slope_x_.data_ptr<T>(), T(a_out), grads_.bias_row<T>(grads_.b, n),
                      rows_, config_.hidden);
    grads_.V[n].addmm_(u1_t_, hidden_x_, 1, a_out);
    grads_.W[n].addmm_(grad_hidden_t_, x, 1, a_in);
    g_.addmm_(grad_hidden_, layers_.W[n], 1, a_in);
  }

  const StackConfig& config_;
  const LayerViews& layers_;
  const std::optional<at::Tensor>& b_;
  const std::optional<at::Tensor>& c_;
  const GradTargets grads_;
  const int64_t rows_;
  // Workspaces: handles are not const because at::mm_out takes its output by non-const reference.
  at::Tensor g_, g_t_;                      // (rows, q): ∂ℓ/∂x_{n+1}, updated in place
  at::Tensor state_a_, state_b_;            // (rows, q): reconstructed states
  at::Tensor hidden_;                       // (rows, m): pre-activations, then σ of them
  at::Tensor grad_hidden_, grad_hidden_t_;  // (rows, m): V_nᵀ u, then dz
  // Heun only.
  at::Tensor stage_;              // (rows, q): ỹ_n of the reconstruction, then y_n of the VJP
  at::Tensor residual_;           // (rows, q): k = f(x; θ_n) of the latest VJP, reused one layer down
  bool residual_valid_ = false;   // whether residual_ holds it
  at::Tensor grad_stage_;         // (rows, q): W_{n+1}ᵀ dz, a_in⁻¹ times ∂ℓ/∂y_n
  at::Tensor u1_, u1_t_;          // (rows, q): the cotangent of k1
  at::Tensor hidden_x_, slope_x_;  // (rows, m): σ(z1) and σ'(z1) at x
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>,
           std::optional<at::Tensor>>
mlp_stack_backward_cpu(const at::Tensor& grad_out, const at::Tensor& final_state, const at::Tensor& anchors,
                       const std::optional<at::Tensor>& stages, const at::Tensor& W, const at::Tensor& V,
                       const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& c,
                       c10::string_view method, c10::string_view activation, double step, double scale_in,
                       double scale_out, c10::string_view backward, std::optional<int64_t> anchor_every) {
  const char* op = "odenets_fast::mlp_stack_backward";
  const StackConfig config = check_stack_args(op, "final", final_state, W, V, b, c, method, activation, step,
                                              scale_in, scale_out, backward, anchor_every);
  const int64_t B = config.batch, q = config.width, L = config.depth;
  check_tensor(op, "grad_out", grad_out, {B, q}, final_state);
  check_tensor(op, "anchors", anchors, {config.num_anchors(), B, q}, final_state);
  TORCH_CHECK(stages.has_value() == config.stores_stages(), op, ": stages ",
              config.stores_stages() ? "(L, B, q) are required" : "must be None", " with method '",
              std::string(method.data(), method.size()), "' and backward '",
              std::string(backward.data(), backward.size()), "'");
  if (stages) check_tensor(op, "stages", *stages, {L, B, q}, final_state);

  // As in the forward op: buffers are written through out= and in-place products.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor final_c = final_state.contiguous(), anchors_c = anchors.contiguous();
  const at::Tensor W_c = W.contiguous(), V_c = V.contiguous();
  const std::optional<at::Tensor> stages_c = stages ? std::optional<at::Tensor>(stages->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> b_c = b ? std::optional<at::Tensor>(b->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> c_c = c ? std::optional<at::Tensor>(c->contiguous()) : std::nullopt;

  const at::TensorOptions options = final_state.options();
  const at::Tensor grad_x = grad_out.contiguous().clone();
  const at::Tensor grad_W = at::zeros(W.sizes(), options), grad_V = at::zeros(V.sizes(), options);
  const std::optional<at::Tensor> grad_b = b ? std::optional<at::Tensor>(at::zeros(b->sizes(), options)) : std::nullopt;
  const std::optional<at::Tensor> grad_c = c ? std::optional<at::Tensor>(at::zeros(c->sizes(), options)) : std::nullopt;

  // Blocks after the first accumulate into their own copies, added in once all are done.
  const RowChunks chunks = plan_row_chunks(config);
  const int64_t extra = chunks.count - 1;
  const at::Tensor extra_W = at::zeros({extra, W.size(0), W.size(1), W.size(2)}, options);
  const at::Tensor extra_V = at::zeros({extra, V.size(0), V.size(1), V.size(2)}, options);
  const at::Tensor extra_b = b ? at::zeros({extra, b->size(0), b->size(1)}, options) : at::Tensor();
  const at::Tensor extra_c = c ? at::zeros({extra, c->size(0), c->size(1)}, options) : at::Tensor();
  std::vector<std::pair<double, double>> drift_sums(chunks.count);
  const LayerViews layers(W_c, V_c);

  AT_DISPATCH_FLOATING_TYPES(final_state.scalar_type(), "mlp_stack_backward", [&] {
    at::parallel_for(0, chunks.count, 1, [&](int64_t first, int64_t last) {
      at::AutoDispatchBelowADInplaceOrView worker_below_autograd;
      for (int64_t chunk = first; chunk < last; ++chunk) {
        const int64_t row0 = chunks.begin(chunk), rows = chunks.rows(chunk);
        auto extra_bias = [&](const at::Tensor& t) {
          return t.defined() ? std::optional<at::Tensor>(t[chunk - 1]) : std::nullopt;
        };
        GradTargets targets = chunk == 0 ? GradTargets(grad_W, grad_V, grad_b, grad_c)
                                         : GradTargets(extra_W[chunk - 1], extra_V[chunk - 1], extra_bias(extra_b),
                                                       extra_bias(extra_c));
        BackwardChunk<scalar_t> backward_rows(config, layers, b_c, c_c, std::move(targets),
                                              grad_x.narrow(0, row0, rows), options);
        drift_sums[chunk] = backward_rows.run(
            final_c.narrow(0, row0, rows), anchors_c.narrow(1, row0, rows).unbind(0),
            stages_c ? stages_c->narrow(1, row0, rows).unbind(0) : std::vector<at::Tensor>());
      }
    });
  });

  if (extra > 0) {
    grad_W.add_(extra_W.sum(0));
    grad_V.add_(extra_V.sum(0));
    if (grad_b) grad_b->add_(extra_b.sum(0));
    if (grad_c) grad_c->add_(extra_c.sum(0));
  }
  std::optional<at::Tensor> drift;
  if (!config.backprop) {
    double distance = 0.0, norm = 0.0;
    for (const auto& [chunk_distance, chunk_norm] : drift_sums) {
      distance += chunk_distance;
      norm += chunk_norm;
    }
    // ‖x̃_0 − x_0‖ / ‖x_0‖, 0 for an all-zero x_0 (as reference.relative_drift).
    const double tiny = final_state.scalar_type() == at::kDouble ? std::numeric_limits<double>::min()
                                                                 : std::numeric_limits<float>::min();
    drift = at::scalar_tensor(std::sqrt(distance) / std::max(std::sqrt(norm), tiny), options);
  }
  return {grad_x, grad_W, grad_V, grad_b, grad_c, drift};
}

}  // namespace odenets_fast
