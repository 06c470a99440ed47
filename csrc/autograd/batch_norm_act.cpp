// batch_norm_act_forward's Autograd kernel (see autograd.h): y is differentiable in x, weight,
// bias and residual; mean, invstd and mask are not. The running statistics it updates in place get
// their version counters bumped, as an in-place ATen op's would.
#include <torch/library.h>

#include <string>

#include "autograd/autograd.h"

namespace fastdl::autograd {
namespace {

using Outputs = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using ForwardFn = Outputs(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                          const OptTensor&, bool, double, double, std::string, double, bool);
using BackwardFn = Outputs(const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&,
                           bool, std::string, double, bool);

Outputs forward_op(const Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& residual,
                   const OptTensor& running_mean, const OptTensor& running_var, bool training, double momentum,
                   double eps, std::string activation, double slope, bool save_mask) {
  static const auto handle = op<ForwardFn>("fastdl::batch_norm_act_forward");
  Outputs out;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    out = handle.call(x, weight, bias, residual, running_mean, running_var, training, momentum, eps, activation, slope,
                      save_mask);
  }
  if (training) {
    for (const OptTensor& t : {running_mean, running_var})
      if (t.has_value()) torch::autograd::impl::bump_version(*t);
  }
  return out;
}

class BatchNormAct : public torch::autograd::Function<BatchNormAct> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                               const OptTensor& residual, const OptTensor& running_mean,
                               const OptTensor& running_var, bool training, double momentum, double eps,
                               std::string activation, double slope) {
    const bool act = activation != "none";
    auto [y, mean, invstd, mask] = forward_op(x, weight, bias, residual, running_mean, running_var, training, momentum,
                                              eps, activation, slope, act);
    ctx->mark_non_differentiable({mean, invstd, mask});
    ctx->save_for_backward({x, weight.value_or(Tensor()), mean, invstd, mask});
    ctx->saved_data["training"] = training;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["slope"] = slope;
    ctx->saved_data["residual"] = residual.has_value();
    ctx->saved_data["bias"] = bias.has_value();
    ctx->saved_data["bias_dtype"] = bias.has_value() ? bias->scalar_type() : x.scalar_type();
    return {y, mean, invstd, mask};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto handle = op<BackwardFn>("fastdl::batch_norm_act_backward");
    const variable_list s = ctx->get_saved_variables();
    const Tensor &x = s[0], &weight = s[1];
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const bool act = activation != "none", residual = ctx->saved_data["residual"].toBool();
    // In grad mode (create_graph=True) through the backward op's own autograd, else below it.
    std::optional<at::AutoDispatchBelowADInplaceOrView> below;
    if (!at::GradMode::is_enabled()) below.emplace();
    auto [dx, dw, db, dres] = handle.call(grads[0], x, optional(weight), s[2], s[3], s[4],
                                          ctx->saved_data["training"].toBool(), activation,
                                          ctx->saved_data["slope"].toDouble(), residual && act);
    if (residual && !act) dres = grads[0];
    const bool bias = ctx->saved_data["bias"].toBool();
    return {dx,
            weight.defined() ? dw.to(weight.scalar_type()) : Tensor(),
            bias ? db.to(ctx->saved_data["bias_dtype"].toScalarType()) : Tensor(),
            residual ? dres : Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Outputs batch_norm_act_forward(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                               const OptTensor& residual, const OptTensor& running_mean, const OptTensor& running_var,
                               bool training, double momentum, double eps, std::string activation, double slope,
                               bool save_mask) {
  if (!needs_grad(x, weight, bias, residual))
    return forward_op(x, weight, bias, residual, running_mean, running_var, training, momentum, eps, activation, slope,
                      save_mask);
  const variable_list out = BatchNormAct::apply(x, weight, bias, residual, running_mean, running_var, training,
                                                momentum, eps, activation, slope);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, Autograd, m) { m.impl("batch_norm_act_forward", &batch_norm_act_forward); }

}  // namespace fastdl::autograd
