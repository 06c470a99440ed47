// rnn_forward's Autograd kernel (see autograd.h): output, h_n and c_n are differentiable in
// gates_x, h0, c0, w_hh and b_hh; the workspace is not. Backpropagation through time is one
// rnn_backward call, given zeros for the outputs that got no gradient.
#include <torch/library.h>

#include <string>

#include "autograd/autograd.h"

namespace fastdl::autograd {
namespace {

using Outputs = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using ForwardFn = Outputs(const Tensor&, const OptTensor&, const Tensor&, const OptTensor&, const Tensor&,
                          const OptTensor&, std::string, bool, bool);
using BackwardFn = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const Tensor&, const OptTensor&, const Tensor&,
    const Tensor&, const Tensor&, std::string, bool);

Outputs forward_op(const Tensor& gates_x, const OptTensor& batch_sizes, const Tensor& h0, const OptTensor& c0,
                   const Tensor& w_hh, const OptTensor& b_hh, std::string mode, bool reverse,
                   bool save_workspace) {
  static const auto handle = op<ForwardFn>("fastdl::rnn_forward");
  at::AutoDispatchBelowADInplaceOrView below;
  return handle.call(gates_x, batch_sizes, h0, c0, w_hh, b_hh, mode, reverse, save_workspace);
}

class Rnn : public torch::autograd::Function<Rnn> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& gates_x, const OptTensor& batch_sizes,
                               const Tensor& h0, const OptTensor& c0, const Tensor& w_hh, const OptTensor& b_hh,
                               std::string mode, bool reverse, bool save_workspace) {
    auto [out, h_n, c_n, workspace] =
        forward_op(gates_x, batch_sizes, h0, c0, w_hh, b_hh, mode, reverse, save_workspace);
    ctx->mark_non_differentiable({workspace});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({batch_sizes.value_or(Tensor()), h0, c0.value_or(Tensor()), w_hh, out, workspace});
    ctx->saved_data["mode"] = std::string(mode);
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["bias"] = b_hh.has_value();
    ctx->saved_data["workspace"] = save_workspace;
    return {out, h_n, c_n, workspace};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto handle = op<BackwardFn>("fastdl::rnn_backward");
    TORCH_CHECK(ctx->saved_data["workspace"].toBool(),
                "rnn_forward: called with save_workspace=False, so it cannot be differentiated");
    const variable_list s = ctx->get_saved_variables();
    const Tensor &h0 = s[1], &c0 = s[2], &out = s[4];
    const bool lstm = c0.defined();
    const Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(out);
    const Tensor grad_h_n = grads[1].defined() ? grads[1] : at::zeros_like(h0);
    const OptTensor grad_c_n = !lstm ? OptTensor() : grads[2].defined() ? grads[2] : at::zeros_like(h0);
    std::optional<at::AutoDispatchBelowADInplaceOrView> below;
    if (!at::GradMode::is_enabled()) below.emplace();
    auto [dgx, dh0, dc0, dw_hh, db_hh] = handle.call(grad_out, grad_h_n, grad_c_n, optional(s[0]), h0, optional(c0),
                                                     s[3], out, s[5], ctx->saved_data["mode"].toStringRef(),
                                                     ctx->saved_data["reverse"].toBool());
    const bool bias = ctx->saved_data["bias"].toBool();
    return {dgx, Tensor(), dh0, lstm ? dc0 : Tensor(), dw_hh, bias ? db_hh : Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Outputs rnn_forward(const Tensor& gates_x, const OptTensor& batch_sizes, const Tensor& h0, const OptTensor& c0,
                    const Tensor& w_hh, const OptTensor& b_hh, std::string mode, bool reverse,
                    bool save_workspace) {
  if (!needs_grad(gates_x, h0, c0, w_hh, b_hh))
    return forward_op(gates_x, batch_sizes, h0, c0, w_hh, b_hh, mode, reverse, save_workspace);
  const variable_list out = Rnn::apply(gates_x, batch_sizes, h0, c0, w_hh, b_hh, mode, reverse, save_workspace);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, Autograd, m) { m.impl("rnn_forward", &rnn_forward); }

}  // namespace fastdl::autograd
