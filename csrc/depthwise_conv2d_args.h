// Depthwise conv2d: the argument checks and output allocation shared by the CPU and CUDA API files
// (csrc/{cpu,cuda}/depthwise_conv2d_api.cpp). Messages name the argument and what was expected.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

#include "checks.h"
#include "depthwise_conv2d.h"

namespace fastdl::depthwise {

inline Act parse_activation(const std::string& name) {
  if (name == "none") return Act::None;
  if (name == "relu") return Act::Relu;
  if (name == "relu6") return Act::Relu6;
  TORCH_CHECK_VALUE(false, "activation: expected one of 'none', 'relu', 'relu6', got '", name, "'");
}

inline void check_pair(at::IntArrayRef v, const char* name, int64_t min) {
  TORCH_CHECK_VALUE(v.size() == 2 && v[0] >= min && v[1] >= min, name, ": expected two integers >= ", min,
                    ", got ", v);
}

// Checks x (N, C, H, W) and weight (C * mult, 1, KH, KW) and the conv arguments; returns the Shape
// for x's memory format.
inline Shape shape_of(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK_VALUE(x.dim() == 4, "x: expected a 4-D (N, C, H, W) tensor, got ", x.dim(), "-D");
  TORCH_CHECK_TYPE(x.is_floating_point(), "x: expected a floating-point dtype, got ", x.scalar_type());
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(C > 0, "x: expected at least one channel, got shape ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(1) == 1 && weight.size(0) % C == 0 && weight.size(0) > 0,
                    "weight: expected shape (C * multiplier, 1, KH, KW) with C = ", C,
                    " (x's channels; groups = in_channels), got ", weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), "weight: expected dtype ", x.scalar_type(),
                   " (x's), got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == x.device(), "weight: expected device ", x.device(), " (x's), got ",
                    weight.device());
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);
  Shape s{};
  s.N = x.size(0), s.C = C, s.H = x.size(2), s.W = x.size(3);
  s.mult = weight.size(0) / C;
  s.KH = weight.size(2), s.KW = weight.size(3);
  s.stride_h = stride[0], s.stride_w = stride[1];
  s.pad_h = padding[0], s.pad_w = padding[1];
  s.dil_h = dilation[0], s.dil_w = dilation[1];
  s.OH = (s.H + 2 * s.pad_h - s.dil_h * (s.KH - 1) - 1) / s.stride_h + 1;
  s.OW = (s.W + 2 * s.pad_w - s.dil_w * (s.KW - 1) - 1) / s.stride_w + 1;
  TORCH_CHECK_VALUE(s.H + 2 * s.pad_h >= s.dil_h * (s.KH - 1) + 1 && s.W + 2 * s.pad_w >= s.dil_w * (s.KW - 1) + 1,
                    "x: spatial size ", s.H, "x", s.W, " (padded by ", padding,
                    ") is smaller than the dilated kernel ", s.dil_h * (s.KH - 1) + 1, "x",
                    s.dil_w * (s.KW - 1) + 1);
  s.channels_last = memory_format_of(x) == at::MemoryFormat::ChannelsLast;
  return s;
}

inline at::MemoryFormat format_of(const Shape& s) {
  return s.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// bias / scale / shift: (C * mult,) on x's device, of x's dtype; returned contiguous.
inline std::optional<at::Tensor> per_channel(const std::optional<at::Tensor>& t, const char* name,
                                             const Shape& s, const at::Tensor& x) {
  check_per_channel(t, name, s.C * s.mult, x, x.scalar_type());
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

// The output (N, C * mult, OH, OW), in x's memory format.
inline at::Tensor empty_output(const Shape& s, const at::Tensor& x) {
  return at::empty({s.N, s.C * s.mult, s.OH, s.OW}, x.options().memory_format(format_of(s)));
}

// grad_out: the output's shape, x's dtype and device; returned dense in x's memory format.
inline at::Tensor checked_grad_out(const at::Tensor& grad_out, const Shape& s, const at::Tensor& x) {
  const std::vector<int64_t> want{s.N, s.C * s.mult, s.OH, s.OW};
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(want), "grad_out: expected shape ", at::IntArrayRef(want),
                    " (the output's), got ", grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), "grad_out: expected dtype ", x.scalar_type(),
                   " (x's), got ", grad_out.scalar_type());
  TORCH_CHECK_VALUE(grad_out.device() == x.device(), "grad_out: expected device ", x.device(), " (x's), got ",
                    grad_out.device());
  return grad_out.contiguous(format_of(s));
}

}  // namespace fastdl::depthwise
