// depthwise_conv2d_forward's Autograd kernel (see autograd.h): y = act((conv(x) + bias) * scale +
// shift) is differentiable in x, weight and bias; a gradient of scale or shift raises
// NotImplementedError (fastdl.functional.depthwise_conv2d applies a differentiable epilogue then).
#include <torch/library.h>

#include <array>
#include <string>

#include "autograd/autograd.h"

namespace fastdl::autograd {
namespace {

using ForwardFn = Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                         at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, std::string);
using BackwardFn = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, at::IntArrayRef,
                                              at::IntArrayRef, at::IntArrayRef, std::array<bool, 2>);

Tensor forward_op(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& scale,
                  const OptTensor& shift, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                  std::string activation) {
  static const auto handle = op<ForwardFn>("fastdl::depthwise_conv2d_forward");
  at::AutoDispatchBelowADInplaceOrView below;
  return handle.call(x, weight, bias, scale, shift, stride, padding, dilation, activation);
}

class DepthwiseConv2d : public torch::autograd::Function<DepthwiseConv2d> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                        const OptTensor& scale, const OptTensor& shift, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, std::string activation) {
    Tensor y = forward_op(x, weight, bias, scale, shift, stride, padding, dilation, activation);
    const bool act = activation != "none";
    ctx->save_for_backward({x, weight, scale.value_or(Tensor()), act ? y : Tensor()});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["bias"] = bias.has_value();
    ctx->saved_data["epilogue_grad"] = requires_grad(scale) || requires_grad(shift);
    return y;
  }

  // grad_x, grad_weight from act'(y) * scale * grad_y; grad_bias its sum.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto handle = op<BackwardFn>("fastdl::depthwise_conv2d_backward");
    TORCH_CHECK_NOT_IMPLEMENTED(!ctx->saved_data["epilogue_grad"].toBool(),
                                "depthwise_conv2d_forward: gradients of scale / shift are not implemented; "
                                "fastdl.functional.depthwise_conv2d applies a differentiable epilogue instead");
    const variable_list s = ctx->get_saved_variables();
    const Tensor &x = s[0], &weight = s[1], &scale = s[2], &y = s[3];
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    Tensor g = grads[0];
    if (activation == "relu") g = g * y.gt(0);
    if (activation == "relu6") g = g * y.gt(0).logical_and_(y.lt(6));
    if (scale.defined()) g = g * scale.view({1, -1, 1, 1});
    const std::array<bool, 2> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
    std::optional<at::AutoDispatchBelowADInplaceOrView> below;
    if (!at::GradMode::is_enabled()) below.emplace();
    auto [grad_x, grad_w] = handle.call(g, x, weight, ctx->saved_data["stride"].toIntVector(),
                                        ctx->saved_data["padding"].toIntVector(),
                                        ctx->saved_data["dilation"].toIntVector(), mask);
    const bool bias = ctx->saved_data["bias"].toBool();
    return {mask[0] ? grad_x : Tensor(), mask[1] ? grad_w : Tensor(),
            bias && ctx->needs_input_grad(2) ? g.sum({0, 2, 3}) : Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor depthwise_conv2d_forward(const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& scale,
                                const OptTensor& shift, at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, std::string activation) {
  if (!needs_grad(x, weight, bias, scale, shift))
    return forward_op(x, weight, bias, scale, shift, stride, padding, dilation, activation);
  return DepthwiseConv2d::apply(x, weight, bias, scale, shift, stride, padding, dilation, activation);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, Autograd, m) { m.impl("depthwise_conv2d_forward", &depthwise_conv2d_forward); }

}  // namespace fastdl::autograd
