// The op schemas (torch.ops.odenets_fast.*), their CPU kernels, and the Python module whose import
// runs these registrations. The schemas name no device, so the Triton backend can register CUDA
// kernels under the same ops.
#include <torch/extension.h>
#include <torch/library.h>

#include "mlp_stack.h"

TORCH_LIBRARY(odenets_fast, m) {
  // x_0 → x_L. Returns x_L, the stored states x_n for n in range(0, L, anchor interval) as
  // (S, B, q), and Heun's stages y_n as (L, B, q) in backprop mode only. The anchor interval is 1
  // for backward='backprop', anchor_every if given, else L (x_0 only, kept to measure the drift).
  m.def(
      "mlp_stack_forward(Tensor x, Tensor W, Tensor V, Tensor? b, Tensor? c, str method, str activation, "
      "float step, float scale_in, float scale_out, str backward, int? anchor_every) "
      "-> (Tensor final_state, Tensor anchors, Tensor? stages)");
  // Gradients from the outputs of mlp_stack_forward and grad_out = ∂ℓ/∂x_L. drift is the 0-dim
  // ‖x̃_0 − x_0‖ / ‖x_0‖ in adjoint mode, None in backprop mode.
  m.def(
      "mlp_stack_backward(Tensor grad_out, Tensor final_state, Tensor anchors, Tensor? stages, Tensor W, Tensor V, "
      "Tensor? b, Tensor? c, str method, str activation, float step, float scale_in, float scale_out, str backward, "
      "int? anchor_every) -> (Tensor grad_x, Tensor grad_W, Tensor grad_V, Tensor? grad_b, Tensor? grad_c, "
      "Tensor? drift)");
}

TORCH_LIBRARY_IMPL(odenets_fast, CPU, m) {
  m.impl("mlp_stack_forward", &odenets_fast::mlp_stack_forward_cpu);
  m.impl("mlp_stack_backward", &odenets_fast::mlp_stack_backward_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "C++ CPU kernels of odenets_fast; importing this module registers torch.ops.odenets_fast.*";
  pybind11::list names;
  for (const odenets_fast::ActivationName& entry : odenets_fast::kActivationNames) names.append(entry.name);
  module.attr("ACTIVATIONS") = names;
}
