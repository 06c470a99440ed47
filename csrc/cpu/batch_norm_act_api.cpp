// batch_norm_act on CPU: argument checks, layout, and registration of the kernels in batch_norm_act.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "checks.h"
#include "cpu/batch_norm_act.h"

namespace fastdl::cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

Act parse_activation(const std::string& name) {
  if (name == "none") return Act::None;
  if (name == "relu") return Act::Relu;
  if (name == "relu6") return Act::Relu6;
  if (name == "leaky_relu") return Act::LeakyRelu;
  TORCH_CHECK_VALUE(false, "activation: expected one of 'none', 'relu', 'relu6', 'leaky_relu', got '",
                    name, "'");
}

Layout layout_of(const Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1);
  return {N, C, N * C == 0 ? 0 : x.numel() / (N * C),
          memory_format_of(x) == at::MemoryFormat::ChannelsLast};
}

void check_x(const Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() >= 2, "x: expected at least 2 dimensions (N, C, ...), got ", x.dim());
  TORCH_CHECK_VALUE(x.size(1) > 0, "x: expected at least one channel, got shape ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                   "x: the CPU kernel expects float32 or float64, got ", x.scalar_type());
}

template <typename T>
T* ptr(const OptTensor& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> forward(const Tensor& x_in, const OptTensor& weight,
                                                   const OptTensor& bias, const OptTensor& residual_in,
                                                   const OptTensor& running_mean, const OptTensor& running_var,
                                                   bool training, double momentum, double eps,
                                                   std::string activation, double slope, bool save_mask) {
  check_x(x_in);
  const Act act = parse_activation(activation);
  const int64_t C = x_in.size(1);
  for (auto [t, name] : {std::pair{&weight, "weight"}, {&bias, "bias"}, {&running_mean, "running_mean"},
                         {&running_var, "running_var"}})
    check_per_channel(*t, name, C, x_in, x_in.scalar_type());
  TORCH_CHECK_VALUE(running_mean.has_value() == running_var.has_value(),
                    "running_mean, running_var: expected both or neither");
  TORCH_CHECK_VALUE(training || running_mean.has_value(),
                    "running_mean: required when training=False (eval uses the running statistics)");
  for (const auto& t : {running_mean, running_var})
    TORCH_CHECK_VALUE(!t.has_value() || t->is_contiguous(), "running statistics: expected contiguous tensors");
  const at::MemoryFormat fmt = memory_format_of(x_in);
  const Tensor x = x_in.contiguous(fmt);
  const Layout l = layout_of(x);
  TORCH_CHECK_VALUE(!training || l.N * l.HW > 1,
                    "x: expected more than 1 value per channel when training, got input size ", x.sizes());
  OptTensor residual;
  if (residual_in.has_value()) {
    check_like_x(*residual_in, "residual", x);
    residual = residual_in->contiguous(fmt);
  }
  const OptTensor w = weight.has_value() ? OptTensor(weight->contiguous()) : std::nullopt;
  const OptTensor b = bias.has_value() ? OptTensor(bias->contiguous()) : std::nullopt;
  Tensor y = at::empty_like(x);
  Tensor mean = at::empty({C}, x.options());
  Tensor invstd = at::empty({C}, x.options());
  const bool with_mask = save_mask && act != Act::None;
  Tensor mask = with_mask ? at::empty_like(x, x.options().dtype(at::kBool)) : at::empty({0}, x.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_act_forward", [&] {
    ForwardParams<scalar_t> p{l, x.data_ptr<scalar_t>(), ptr<scalar_t>(residual), ptr<scalar_t>(w), ptr<scalar_t>(b),
                              ptr<scalar_t>(running_mean), ptr<scalar_t>(running_var), mean.data_ptr<scalar_t>(),
                              invstd.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                              with_mask ? mask.data_ptr<bool>() : nullptr, training, momentum, eps, slope, act};
    FASTDL_CPU_DISPATCH(batch_norm_act_forward_kernel, p);
  });
  return {y, mean, invstd, mask};
}

std::tuple<Tensor, Tensor> stats(const Tensor& x_in) {
  check_x(x_in);
  const Tensor x = x_in.contiguous(memory_format_of(x_in));
  const Layout l = layout_of(x);
  TORCH_CHECK_VALUE(l.N * l.HW > 0, "x: expected at least one value per channel, got input size ", x.sizes());
  Tensor mean = at::empty({l.C}, x.options());
  Tensor m2 = at::empty({l.C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_stats", [&] {
    FASTDL_CPU_DISPATCH(batch_norm_stats_kernel, x.data_ptr<scalar_t>(), l, mean.data_ptr<scalar_t>(),
                        m2.data_ptr<scalar_t>());
  });
  return {mean, m2};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> backward(const Tensor& grad_out_in, const Tensor& x_in,
                                                    const OptTensor& weight, const Tensor& mean,
                                                    const Tensor& invstd, const Tensor& mask_in, bool training,
                                                    std::string activation, double slope, bool residual_grad) {
  check_x(x_in);
  const Act act = parse_activation(activation);
  const int64_t C = x_in.size(1);
  check_like_x(grad_out_in, "grad_out", x_in);
  check_per_channel(weight, "weight", C, x_in, x_in.scalar_type());
  check_per_channel(mean, "mean", C, x_in, x_in.scalar_type());
  check_per_channel(invstd, "invstd", C, x_in, x_in.scalar_type());
  if (act != Act::None) {
    TORCH_CHECK_VALUE(mask_in.sizes() == x_in.sizes() && mask_in.scalar_type() == at::kBool,
                      "mask: expected a bool tensor of x's shape ", x_in.sizes(), " (forward with save_mask=True), got ",
                      mask_in.scalar_type(), " ", mask_in.sizes());
  }
  const at::MemoryFormat fmt = memory_format_of(x_in);
  const Tensor x = x_in.contiguous(fmt), grad_out = grad_out_in.contiguous(fmt);
  const Tensor mask = act != Act::None ? mask_in.contiguous(fmt) : mask_in;
  const OptTensor w = weight.has_value() ? OptTensor(weight->contiguous()) : std::nullopt;
  const Tensor m = mean.contiguous(), s = invstd.contiguous();
  Tensor grad_x = at::empty_like(x);
  Tensor grad_weight = at::empty({C}, x.options());
  Tensor grad_bias = at::empty({C}, x.options());
  const bool with_res = residual_grad && act != Act::None;
  Tensor grad_res = with_res ? at::empty_like(x) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_act_backward", [&] {
    BackwardParams<scalar_t> p{layout_of(x), grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                               act != Act::None ? reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()) : nullptr, ptr<scalar_t>(w),
                               m.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(),
                               grad_weight.data_ptr<scalar_t>(), grad_bias.data_ptr<scalar_t>(),
                               with_res ? grad_res.data_ptr<scalar_t>() : nullptr, training, slope, act};
    FASTDL_CPU_DISPATCH(batch_norm_act_backward_kernel, p);
  });
  return {grad_x, grad_weight, grad_bias, grad_res};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("batch_norm_act_forward", &forward);
  m.impl("batch_norm_act_backward", &backward);
  m.impl("batch_norm_stats", &stats);
}

}  // namespace fastdl::cpu
