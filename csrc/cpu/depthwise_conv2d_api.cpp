// depthwise_conv2d on CPU: argument checks, layout, and registration of the kernels in
// depthwise_conv2d.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

#include "cpu/depthwise_conv2d.h"
#include "depthwise_conv2d_args.h"

namespace fastdl::cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using namespace depthwise;

// The checked Shape of (x, weight); the kernels take float32 and float64 only.
Shape checked_shape(const Tensor& x, const Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation) {
  const Shape s = shape_of(x, weight, stride, padding, dilation);
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "x: the CPU kernel expects float32 or float64, got ", x.scalar_type());
  return s;
}

template <typename T>
const T* ptr(const OptTensor& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

Tensor forward(const Tensor& x_in, const Tensor& weight_in, const OptTensor& bias_in, const OptTensor& scale_in,
               const OptTensor& shift_in, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
               std::string activation) {
  const Shape s = checked_shape(x_in, weight_in, stride, padding, dilation);
  const Act act = parse_activation(activation);
  const Tensor x = x_in.contiguous(format_of(s)), weight = weight_in.contiguous();
  const OptTensor bias = per_channel(bias_in, "bias", s, x);
  const OptTensor scale = per_channel(scale_in, "scale", s, x);
  const OptTensor shift = per_channel(shift_in, "shift", s, x);
  Tensor y = empty_output(s, x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_conv2d_forward", [&] {
    ForwardParams<scalar_t> p{s,
                              x.data_ptr<scalar_t>(),
                              weight.data_ptr<scalar_t>(),
                              ptr<scalar_t>(bias),
                              ptr<scalar_t>(scale),
                              ptr<scalar_t>(shift),
                              y.data_ptr<scalar_t>(),
                              act};
    FASTDL_CPU_DISPATCH(depthwise_conv2d_forward_kernel, p);
  });
  return y;
}

std::tuple<Tensor, Tensor> backward(const Tensor& grad_out_in, const Tensor& x_in, const Tensor& weight_in,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                    std::array<bool, 2> output_mask) {
  const Shape s = checked_shape(x_in, weight_in, stride, padding, dilation);
  const Tensor x = x_in.contiguous(format_of(s)), weight = weight_in.contiguous();
  const Tensor grad_out = checked_grad_out(grad_out_in, s, x);
  const Tensor none = at::empty({0}, x.options());
  Tensor grad_x = output_mask[0] ? at::empty(x.sizes(), x.options().memory_format(format_of(s))) : none;
  Tensor grad_weight = output_mask[1] ? at::empty_like(weight) : none;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_conv2d_backward", [&] {
    BackwardParams<scalar_t> p{s,
                               grad_out.data_ptr<scalar_t>(),
                               x.data_ptr<scalar_t>(),
                               weight.data_ptr<scalar_t>(),
                               output_mask[0] ? grad_x.data_ptr<scalar_t>() : nullptr,
                               output_mask[1] ? grad_weight.data_ptr<scalar_t>() : nullptr};
    FASTDL_CPU_DISPATCH(depthwise_conv2d_backward_kernel, p);
  });
  return {grad_x, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("depthwise_conv2d_forward", &forward);
  m.impl("depthwise_conv2d_backward", &backward);
}

}  // namespace fastdl::cpu
