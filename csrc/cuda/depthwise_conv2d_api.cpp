// depthwise_conv2d on CUDA: argument checks, layout, workspace and registration of the kernels in
// depthwise_conv2d.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "cuda/depthwise_conv2d.h"
#include "depthwise_conv2d_args.h"

namespace fastdl::cuda {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using depthwise::Shape;

// x on a CUDA device, of a dtype the kernels are built for, with sizes their 32-bit index math
// within a plane can hold (sizes, strides, kernel area below 2^30; a plane below 2^31).
void check_cuda_x(const Tensor& x, const Shape& s) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x: expected a CUDA tensor, got device ", x.device());
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
                   "x: the CUDA kernel expects float32, float64, float16 or bfloat16, got ", t);
  constexpr int64_t kMax = int64_t(1) << 30;
  TORCH_CHECK_VALUE(s.H + 2 * s.pad_h < kMax && s.W + 2 * s.pad_w < kMax && s.stride_h < kMax &&
                        s.stride_w < kMax && s.KH * s.KW < kMax,
                    "x: the CUDA kernel expects padded spatial sizes, strides and kernel area below 2^30, got ",
                    "size ", s.H, "x", s.W, ", padding ", s.pad_h, ",", s.pad_w, ", stride ", s.stride_h, ",",
                    s.stride_w, ", kernel ", s.KH, "x", s.KW);
  // The kernels split a flat position into (n, plane offset) in int64 and keep the plane offset (and
  // the tile index within a plane, at most the plane's size) in int: each plane must hold it.
  constexpr int64_t kPlane = (int64_t(1) << 31) - 1;
  TORCH_CHECK_VALUE(s.H * s.W <= kPlane && s.OH * s.OW <= kPlane,
                    "x: the CUDA kernel expects input and output planes (H*W, OH*OW) of at most 2^31 - 1 elements, ",
                    "got ", s.H, "x", s.W, " -> ", s.OH, "x", s.OW);
}

// Calls f(T*{}) with the CUDA type of `type`.
template <typename F>
void dispatch(at::ScalarType type, F&& f) {
  switch (type) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kDouble: f(static_cast<double*>(nullptr)); break;
    case at::kHalf: f(static_cast<__half*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    default: TORCH_CHECK_TYPE(false, "depthwise_conv2d: unsupported dtype ", type);
  }
}

template <typename T>
T* ptr(const Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

template <typename T>
T* ptr(const OptTensor& t) {
  return t.has_value() ? ptr<T>(*t) : nullptr;
}

Tensor forward(const Tensor& x_in, const Tensor& weight_in, const OptTensor& bias_in, const OptTensor& scale_in,
               const OptTensor& shift_in, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
               std::string activation) {
  const depthwise::Act act = depthwise::parse_activation(activation);
  const Shape s = depthwise::shape_of(x_in, weight_in, stride, padding, dilation);
  check_cuda_x(x_in, s);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const OptTensor bias = depthwise::per_channel(bias_in, "bias", s, x_in);
  const OptTensor scale = depthwise::per_channel(scale_in, "scale", s, x_in);
  const OptTensor shift = depthwise::per_channel(shift_in, "shift", s, x_in);
  const Tensor x = x_in.contiguous(depthwise::format_of(s)), weight = weight_in.contiguous();
  Tensor y = depthwise::empty_output(s, x);
  if (y.numel() == 0) return y;
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const depthwise::ForwardParams<T> p{s,           ptr<T>(x),     ptr<T>(weight), ptr<T>(bias),
                                        ptr<T>(scale), ptr<T>(shift), ptr<T>(y),      act};
    depthwise_conv2d_forward(p, at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<Tensor, Tensor> backward(const Tensor& grad_out_in, const Tensor& x_in, const Tensor& weight_in,
                                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                    std::array<bool, 2> output_mask) {
  const Shape s = depthwise::shape_of(x_in, weight_in, stride, padding, dilation);
  check_cuda_x(x_in, s);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::MemoryFormat fmt = depthwise::format_of(s);
  const Tensor grad_out = depthwise::checked_grad_out(grad_out_in, s, x_in);
  const bool want_x = output_mask[0], want_weight = output_mask[1];
  // x is read only for grad_weight, weight only for grad_x.
  const Tensor x = want_weight ? x_in.contiguous(fmt) : x_in;
  const Tensor weight = want_x ? weight_in.contiguous() : weight_in;
  Tensor grad_x = want_x ? at::empty(x_in.sizes(), x_in.options().memory_format(fmt)) : at::empty({0}, x_in.options());
  Tensor grad_weight = want_weight ? at::empty(weight_in.sizes(), weight_in.options()) : at::empty({0}, x_in.options());
  if (x_in.numel() == 0) {  // N == 0: grad_x is empty, grad_weight a sum over nothing
    if (want_weight) grad_weight.zero_();
    return {grad_x, grad_weight};
  }
  if (!want_x && !want_weight) return {grad_x, grad_weight};
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    Tensor workspace;
    if (want_weight)
      workspace = at::empty({int64_t(depthwise_conv2d_backward_workspace_size<T>(s))}, x.options().dtype(at::kByte));
    const depthwise::BackwardParams<T> p{s,
                                         ptr<T>(grad_out),
                                         want_weight ? ptr<T>(x) : nullptr,
                                         want_x ? ptr<T>(weight) : nullptr,
                                         want_x ? ptr<T>(grad_x) : nullptr,
                                         want_weight ? ptr<T>(grad_weight) : nullptr};
    depthwise_conv2d_backward(p, want_weight ? workspace.data_ptr() : nullptr, at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("depthwise_conv2d_forward", &forward);
  m.impl("depthwise_conv2d_backward", &backward);
}

}  // namespace fastdl::cuda
