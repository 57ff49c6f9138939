// Backward of the whole stack (DESIGN.md §4–5): walks layers L−1 … 0, obtains each layer's input
// (a stored state, or the reverse reconstruction) and applies the exact VJP of the forward step.
//
// Besides the gradients themselves, the backward holds only workspaces of B × q and B × m values,
// allocated once per call and reused at every layer, so that its memory does not grow with the depth.
// Each layer takes two parallel passes, every thread waiting for the others at the end of each:
//   1. row chunks: the reconstruction, the recomputation and the VJP's products with rows of the
//      batch, writing dz, σ(z) and the cotangents into the workspaces;
//   2. gradient blocks: the weight and bias gradients of the layer, sums over the whole batch, each
//      thread adding whole products dV += scale uᵀ a or dW += scale dzᵀ x (or blocks of their rows,
//      for large products) with the matching bias sums.
// Every gradient entry is thus one product or sum over all rows, and like the row chunks the blocks
// are fixed by the problem, so the result is the same whatever the number of threads, where
// per-thread partial gradients would cost a copy of the gradients per thread. Giving each product to
// one thread, rather than rows of every product to every thread, also has each thread read fewer of
// the rows the others wrote.
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "fused_elementwise.h"
#include "mlp_stack.h"

namespace odenets_fast {

namespace {

// Where a state x_n is: the output x_L, a stored state, or one of the two reconstruction workspaces.
struct StateRef {
  enum class Kind { final_state, anchor, workspace } kind;
  int64_t index;
};

// The backward's tensors over some rows of the batch: all of them (what the gradient pass reads),
// or one row chunk's (narrow views made once per call).
struct Rows {
  at::Tensor final_state;           // x_L
  std::vector<at::Tensor> anchors;  // the stored states
  std::vector<at::Tensor> stages;   // Heun's y_n, stored in backprop mode
  // Workspaces; handles are not const because at::mm_out takes its output by non-const reference.
  at::Tensor g[2];                  // (·, q): ∂ℓ/∂x_{n+1}; Heun: the other holds ∂ℓ/∂x_{n+1} + ∂ℓ/∂y_n
  at::Tensor states[2];             // (·, q): reconstructed states, alternately
  at::Tensor hidden;                // (·, m): pre-activations at x_n (Heun: at y_n), then σ of them
  at::Tensor grad_hidden;           // (·, m): V_nᵀ u, then dz
  // Heun only.
  at::Tensor stage;                 // (·, q): ỹ_n of the reconstruction, then y_n of the VJP
  at::Tensor residual;              // (·, q): k1 = f(x_n; θ_n), reused by the reconstruction one layer down
  at::Tensor u1;                    // (·, q): the cotangent of k1
  at::Tensor hidden_x, slope_x, grad_hidden_x;  // (·, m): σ(z1), σ'(z1) and dz1 at x_n

  const at::Tensor& state(StateRef ref) const {
    if (ref.kind == StateRef::Kind::final_state) return final_state;
    return ref.kind == StateRef::Kind::anchor ? anchors[ref.index] : states[ref.index];
  }

  int64_t count() const { return g[0].size(0); }

  Rows narrow(int64_t row0, int64_t rows) const {
    auto part = [&](const at::Tensor& t) { return t.defined() ? t.narrow(0, row0, rows) : t; };
    auto parts = [&](const std::vector<at::Tensor>& ts) {
      std::vector<at::Tensor> out;
      for (const at::Tensor& t : ts) out.push_back(part(t));
      return out;
    };
    return Rows{part(final_state), parts(anchors), parts(stages), {part(g[0]), part(g[1])},
                {part(states[0]), part(states[1])}, part(hidden), part(grad_hidden), part(stage), part(residual),
                part(u1), part(hidden_x), part(slope_x), part(grad_hidden_x)};
  }
};

// What the row chunks do at layer n, decided once for all of them.
struct LayerPlan {
  int64_t n;
  StateRef above;          // x̃_{n+1}
  StateRef input;          // x_n: a stored state, or `reconstructed`
  bool reconstruct;        // compute x̃_n into `reconstructed` (also where x_n is stored, to measure the drift)
  StateRef reconstructed;
  bool finish_above;       // first add layer n + 1's last term, a_in dz W_{n+1}, to ∂ℓ/∂x_{n+1}
  int64_t g;               // the index of ∂ℓ/∂x_{n+1} in Rows::g
  bool reuse_residual;     // Heun: `residual` holds f(x̃_{n+1}; θ_{n+1})
};

// The parameter gradients of a step are sums over the batch, one per term:
//     grad[layer] += scale · leftᵀ right     bias_grad[layer] += bias_scale · Σ_rows left
// with grad, bias_grad = dV, dc for even terms (left a cotangent u, right σ(z)) and dW, db for odd
// ones (left dz, right the state). Euler: θ_n's; Heun: θ_{n+1}'s at y, then θ_n's at x.
int64_t num_terms(const StackConfig& config) { return config.heun ? 4 : 2; }

// The left operand of a term, in g workspace `g_index` where it is g.
const at::Tensor& term_left(const Rows& rows, int64_t term, int64_t g_index) {
  switch (term) {
    case 0: return rows.g[g_index];
    case 1: return rows.grad_hidden;
    case 2: return rows.u1;
    default: return rows.grad_hidden_x;
  }
}

// What the terms take from the layer being walked (see StackBackward::plan_terms).
struct TermPlan {
  int64_t layer;
  const at::Tensor* right;
  double scale;
  double bias_scale;
};

// Rows [row0, row0 + rows) of one term's matrix, with the matching bias entries: a unit of work of
// the gradient pass.
struct GradBlock {
  int64_t term;
  int64_t row0, rows;
  LayerView grad;        // these rows of dV_0 or dW_0, moved to the term's layer
  at::Tensor left_t[2];  // these columns of the left operand, transposed, for either g workspace
};

template <typename T>
class StackBackward {
 public:
  StackBackward(const StackConfig& config, const RowChunks& chunks, const at::Tensor& W, const at::Tensor& V,
                const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& c, const at::Tensor& grad_W,
                const at::Tensor& grad_V, const std::optional<at::Tensor>& grad_b,
                const std::optional<at::Tensor>& grad_c, Rows all)
      : config_(config),
        layer_(W, V),
        above_(W, V),
        b_(b),
        c_(c),
        grad_b_(grad_b),
        grad_c_(grad_c),
        all_(std::move(all)) {
    for (int64_t i = 0; i < chunks.count; ++i) chunks_.push_back(all_.narrow(chunks.begin(i), chunks.rows(i)));
    for (int64_t term = 0; term < num_terms(config); ++term) {
      const bool of_V = term % 2 == 0;
      const int64_t rows = of_V ? config.width : config.hidden;
      const RowChunks split{gradient_blocks(config, rows), rows};
      for (int64_t i = 0; i < split.count; ++i) {
        const int64_t row0 = split.begin(i), rows = split.rows(i);
        auto left_t = [&](int64_t g_index) {
          const at::Tensor& left = term_left(all_, term, g_index);
          return left.defined() ? left.narrow(1, row0, rows).t() : left;
        };
        blocks_.push_back(GradBlock{term, row0, rows,
                                    LayerView((of_V ? grad_V : grad_W)[0].narrow(0, row0, rows), W[0].numel()),
                                    {left_t(0), left_t(1)}});
      }
    }
    // A problem too small to split its rows (plan_row_chunks) is too small to wake threads for its gradients.
    gradient_grain_ = chunks.count > 1 ? 1 : static_cast<int64_t>(blocks_.size());
  }

  // Returns ∂ℓ/∂x_0 (one of the g workspaces) and, in adjoint mode, (Σ (x̃_0 − x_0)², Σ x_0²).
  std::pair<at::Tensor, std::pair<double, double>> run() {
    const bool heun = config_.heun;
    LayerPlan plan{config_.depth, {StateRef::Kind::final_state, 0}, {}, false, {}, false, 0, false};
    for (int64_t n = config_.depth - 1; n >= 0; --n) {
      const bool anchored = config_.anchored(n);
      const bool above_is_workspace = plan.above.kind == StateRef::Kind::workspace;
      plan.finish_above = n + 1 < config_.depth;
      if (heun && plan.finish_above) plan.g = 1 - plan.g;  // see heun_rows
      plan.n = n;
      plan.reconstruct = !anchored || (n == 0 && !config_.backprop);
      plan.reconstructed = {StateRef::Kind::workspace, above_is_workspace ? 1 - plan.above.index : 0};
      plan.input = anchored ? StateRef{StateRef::Kind::anchor, n / config_.anchor_interval} : plan.reconstructed;
      layer_.select(n);
      if (heun || plan.finish_above) above_.select(n + 1);
      for_each_chunk([&](Rows& rows) {
        if (heun) {
          heun_rows(rows, plan);
        } else {
          euler_rows(rows, plan);
        }
      });
      plan_terms(plan);
      for (GradBlock& block : blocks_) block.grad.select(terms_[block.term].layer);
      at::parallel_for(0, static_cast<int64_t>(blocks_.size()), gradient_grain_, [&](int64_t first, int64_t last) {
        TaskScope scope;
        for (int64_t i = first; i < last; ++i) add_gradient_block(blocks_[i], plan.g);
      });
      plan.reuse_residual = heun && !config_.stores_stages();
      plan.above = plan.input;
    }
    // The last term of ∂ℓ/∂x_0, a_in dz W_0.
    if (heun) plan.g = 1 - plan.g;
    for_each_chunk([&](Rows& rows) { rows.g[plan.g].addmm_(last_dz(rows), *layer_.W, 1, config_.scale_in); });

    std::pair<double, double> drift_sums{0.0, 0.0};
    if (!config_.backprop) {
      const at::Tensor& reconstructed = all_.state(plan.reconstructed);
      drift_sums = squared_distance_and_norm<T>(reconstructed.data_ptr<T>(), all_.anchors[0].data_ptr<T>(),
                                                reconstructed.numel());
    }
    return {all_.g[plan.g], drift_sums};
  }

 private:
  template <typename F>
  void for_each_chunk(const F& work) {
    at::parallel_for(0, static_cast<int64_t>(chunks_.size()), 1, [&](int64_t first, int64_t last) {
      TaskScope scope;
      for (int64_t i = first; i < last; ++i) work(chunks_[i]);
    });
  }

  // dz of the VJP of f at x_n (the one whose a_in dz W_n completes ∂ℓ/∂x_n).
  const at::Tensor& last_dz(const Rows& rows) const { return config_.heun ? rows.grad_hidden_x : rows.grad_hidden; }

  // hidden ← σ(a_in x W_nᵀ + b_n), with `layer` holding θ_n.
  void hidden_activations(Rows& rows, const at::Tensor& x, const LayerViews& layer, int64_t n) {
    at::mm_out(rows.hidden, x, *layer.W_t);
    activate<T>(rows.hidden.data_ptr<T>(), bias_row<T>(b_, n), T(config_.scale_in), rows.count(), config_.hidden,
                config_.activation);
  }

  // x̃_n = x̃_{n+1} − h f(x̃_{n+1}; θ_n)
  void euler_reconstruct(Rows& rows, const at::Tensor& x_next, const at::Tensor& out, int64_t n) {
    const double h = config_.step;
    hidden_activations(rows, x_next, layer_, n);
    add_scaled_bias<T>(out.data_ptr<T>(), x_next.data_ptr<T>(), bias_row<T>(c_, n), T(-h), rows.count(),
                       config_.width);
    out.addmm_(rows.hidden, *layer_.V_t, 1, -h * config_.scale_out);
  }

  /// Exact VJP of the Euler step x_{n+1} = x + h f(x; θ_n) at x, with g = ∂ℓ/∂x_{n+1}:
  ///
  ///     z = a_in W_n x + b_n,  a = σ(z),  dz = σ'(z) ⊙ (h a_out V_nᵀ g)
  ///     dV_n += h a_out g aᵀ;  dc_n += h g;  db_n += dz;  dW_n += a_in dz xᵀ   (summed over rows)
  ///     g ← g + a_in W_nᵀ dz
  ///
  /// Here the row chunks' part: a and dz into `hidden` and `grad_hidden`, from which the gradient
  /// pass forms the sums (plan_terms); the update of g waits for them, and is made by the row chunks
  /// of the layer below (finish_above) or after the last layer.
  void euler_rows(Rows& rows, const LayerPlan& plan) {
    const double h = config_.step, a_in = config_.scale_in, a_out = config_.scale_out;
    const int64_t n = plan.n;
    const at::Tensor& g = rows.g[plan.g];
    if (plan.finish_above) g.addmm_(rows.grad_hidden, *above_.W, 1, a_in);
    if (plan.reconstruct) euler_reconstruct(rows, rows.state(plan.above), rows.state(plan.reconstructed), n);
    at::mm_out(rows.hidden, rows.state(plan.input), *layer_.W_t);
    at::mm_out(rows.grad_hidden, g, *layer_.V);
    activate_and_backprop<T>(rows.hidden.data_ptr<T>(), rows.grad_hidden.data_ptr<T>(), bias_row<T>(b_, n), T(a_in),
                             T(h * a_out), rows.count(), config_.hidden, config_.activation);
  }

  // ỹ_n = x̃_{n+1} − h k with k = f(x̃_{n+1}; θ_{n+1});  x̃_n = x̃_{n+1} − (h/2)(k + f(ỹ_n; θ_n)).
  // k is the residual the VJP of layer n + 1 computed at the same state, except at the top.
  void heun_reconstruct(Rows& rows, const at::Tensor& x_next, const at::Tensor& out, const LayerPlan& plan) {
    const double h = config_.step, a_out = config_.scale_out;
    const int64_t n = plan.n, count = rows.count();
    if (plan.reuse_residual) {
      add_scaled<T>(rows.stage.data_ptr<T>(), x_next.data_ptr<T>(), T(-h), rows.residual.data_ptr<T>(), nullptr,
                    count, config_.width);
    } else {
      hidden_activations(rows, x_next, above_, n + 1);
      at::mm_out(rows.residual, rows.hidden, *above_.V_t);
      finish_stage<T>(rows.residual.data_ptr<T>(), rows.stage.data_ptr<T>(), x_next.data_ptr<T>(),
                      bias_row<T>(c_, n + 1), T(a_out), T(-h), count, config_.width);
    }
    hidden_activations(rows, rows.stage, layer_, n);
    add_scaled<T>(out.data_ptr<T>(), x_next.data_ptr<T>(), T(-0.5 * h), rows.residual.data_ptr<T>(),
                  bias_row<T>(c_, n), count, config_.width);
    out.addmm_(rows.hidden, *layer_.V_t, 1, -0.5 * h * a_out);
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
  /// each VJP of f being the one of euler_rows with u in place of h g. Here the row chunks' part:
  /// σ(z2), dz2 at y and σ(z1), dz1, u1 at x into the workspaces, from which the gradient pass forms
  /// the sums (plan_terms). These still need g, so g + gy goes into the other g workspace, which
  /// becomes g once the row chunks of the layer below (or after the last layer) have added
  /// gx = a_in W_nᵀ dz1 to it. y is the stored y_n in backprop mode; otherwise it is recomputed, and
  /// k1 kept for the reconstruction of the layer below.
  void heun_rows(Rows& rows, const LayerPlan& plan) {
    const double h = config_.step, a_in = config_.scale_in, a_out = config_.scale_out;
    const int64_t n = plan.n, count = rows.count();
    const at::Tensor& g = rows.g[plan.g];
    at::Tensor& g_next = rows.g[1 - plan.g];
    if (plan.finish_above) g.addmm_(rows.grad_hidden_x, *above_.W, 1, a_in);
    if (plan.reconstruct) heun_reconstruct(rows, rows.state(plan.above), rows.state(plan.reconstructed), plan);
    const at::Tensor& x = rows.state(plan.input);

    at::mm_out(rows.hidden_x, x, *layer_.W_t);
    activate_with_slope<T>(rows.hidden_x.data_ptr<T>(), rows.slope_x.data_ptr<T>(), bias_row<T>(b_, n), T(a_in),
                           count, config_.hidden, config_.activation);
    const at::Tensor& y = config_.stores_stages() ? rows.stages[n] : rows.stage;
    if (!config_.stores_stages()) {
      at::mm_out(rows.residual, rows.hidden_x, *layer_.V_t);
      finish_stage<T>(rows.residual.data_ptr<T>(), rows.stage.data_ptr<T>(), x.data_ptr<T>(), bias_row<T>(c_, n),
                      T(a_out), T(h), count, config_.width);
    }

    at::mm_out(rows.hidden, y, *above_.W_t);
    at::mm_out(rows.grad_hidden, g, *above_.V);
    activate_and_backprop<T>(rows.hidden.data_ptr<T>(), rows.grad_hidden.data_ptr<T>(), bias_row<T>(b_, n + 1),
                             T(a_in), T(0.5 * h * a_out), count, config_.hidden, config_.activation);
    at::mm_out(g_next, rows.grad_hidden, *above_.W);
    heun_cotangents<T>(rows.u1.data_ptr<T>(), g.data_ptr<T>(), g_next.data_ptr<T>(), T(a_in), T(0.5 * h), T(h), count,
                       config_.width);

    at::mm_out(rows.grad_hidden_x, rows.u1, *layer_.V);
    scale_by_slope<T>(rows.grad_hidden_x.data_ptr<T>(), rows.slope_x.data_ptr<T>(), T(a_out), count, config_.hidden);
  }

  // The terms of step n (see num_terms), from the workspaces that euler_rows or heun_rows filled.
  void plan_terms(const LayerPlan& plan) {
    const double h = config_.step, a_in = config_.scale_in, a_out = config_.scale_out;
    const int64_t n = plan.n;
    const at::Tensor& x = all_.state(plan.input);
    if (!config_.heun) {
      terms_[0] = {n, &all_.hidden, h * a_out, h};
      terms_[1] = {n, &x, a_in, 1};
      return;
    }
    const at::Tensor& y = config_.stores_stages() ? all_.stages[n] : all_.stage;
    terms_[0] = {n + 1, &all_.hidden, 0.5 * h * a_out, 0.5 * h};
    terms_[1] = {n + 1, &y, a_in, 1};
    terms_[2] = {n, &all_.hidden_x, a_out, 1};
    terms_[3] = {n, &x, a_in, 1};
  }

  void add_gradient_block(const GradBlock& block, int64_t g_index) {
    const TermPlan& term = terms_[block.term];
    (*block.grad).addmm_(block.left_t[g_index], *term.right, 1, term.scale);
    const std::optional<at::Tensor>& bias_grad = block.term % 2 == 0 ? grad_c_ : grad_b_;
    if (bias_grad) {
      const at::Tensor& left = term_left(all_, block.term, g_index);
      const int64_t width = left.size(1);
      accumulate_column_sums<T>(bias_grad->data_ptr<T>() + term.layer * width + block.row0,
                                left.data_ptr<T>() + block.row0, T(term.bias_scale), left.size(0), block.rows,
                                width);
    }
  }

  const StackConfig& config_;
  LayerViews layer_, above_;  // θ_n and θ_{n+1}, moved between the parallel passes
  const std::optional<at::Tensor>& b_;
  const std::optional<at::Tensor>& c_;
  const std::optional<at::Tensor>& grad_b_;
  const std::optional<at::Tensor>& grad_c_;
  Rows all_;
  std::vector<Rows> chunks_;
  std::vector<GradBlock> blocks_;
  int64_t gradient_grain_;
  TermPlan terms_[4];
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
  const int64_t B = config.batch, q = config.width, m = config.hidden, L = config.depth;
  check_tensor(op, "grad_out", grad_out, {B, q}, final_state);
  check_tensor(op, "anchors", anchors, {config.num_anchors(), B, q}, final_state);
  TORCH_CHECK(stages.has_value() == config.stores_stages(), op, ": stages ",
              config.stores_stages() ? "(L, B, q) are required" : "must be None", " with method '",
              std::string(method.data(), method.size()), "' and backward '",
              std::string(backward.data(), backward.size()), "'");
  if (stages) check_tensor(op, "stages", *stages, {L, B, q}, final_state);

  // As in the forward op: buffers are written through out= and in-place products.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor W_c = W.contiguous(), V_c = V.contiguous();
  const std::optional<at::Tensor> b_c = b ? std::optional<at::Tensor>(b->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> c_c = c ? std::optional<at::Tensor>(c->contiguous()) : std::nullopt;

  const at::TensorOptions options = final_state.options();
  const at::Tensor grad_W = at::zeros(W.sizes(), options), grad_V = at::zeros(V.sizes(), options);
  const std::optional<at::Tensor> grad_b = b ? std::optional<at::Tensor>(at::zeros(b->sizes(), options)) : std::nullopt;
  const std::optional<at::Tensor> grad_c = c ? std::optional<at::Tensor>(at::zeros(c->sizes(), options)) : std::nullopt;

  auto workspace = [&](int64_t width, bool needed = true) {
    return needed ? at::empty({B, width}, options) : at::Tensor();
  };
  const bool heun = config.heun;
  Rows all{final_state.contiguous(),
           anchors.contiguous().unbind(0),
           stages ? stages->contiguous().unbind(0) : std::vector<at::Tensor>(),
           {grad_out.contiguous().clone(), workspace(q, heun)},
           {workspace(q), workspace(q)},
           workspace(m),
           workspace(m),
           workspace(q, heun),
           workspace(q, heun),
           workspace(q, heun),
           workspace(m, heun),
           workspace(m, heun),
           workspace(m, heun)};

  at::Tensor grad_x;
  std::pair<double, double> drift_sums;
  AT_DISPATCH_FLOATING_TYPES(final_state.scalar_type(), "mlp_stack_backward", [&] {
    StackBackward<scalar_t> backward_pass(config, plan_row_chunks(config), W_c, V_c, b_c, c_c, grad_W, grad_V, grad_b,
                                          grad_c, std::move(all));
    std::tie(grad_x, drift_sums) = backward_pass.run();
  });

  std::optional<at::Tensor> drift;
  if (!config.backprop) {
    // ‖x̃_0 − x_0‖ / ‖x_0‖, 0 for an all-zero x_0 (as reference.relative_drift).
    const double tiny = final_state.scalar_type() == at::kDouble ? std::numeric_limits<double>::min()
                                                                 : std::numeric_limits<float>::min();
    drift = at::scalar_tensor(std::sqrt(drift_sums.first) / std::max(std::sqrt(drift_sums.second), tiny), options);
  }
  return {grad_x, grad_W, grad_V, grad_b, grad_c, drift};
}

}  // namespace odenets_fast
