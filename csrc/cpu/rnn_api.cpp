// rnn_forward / rnn_backward on CPU: the checks and time loop of csrc/rnn_scan.h around the
// pointwise kernels of rnn.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "cpu/rnn.h"
#include "rnn_scan.h"

namespace fastdl::cpu {
namespace {

using at::Tensor;
using rnn::OptTensor;

void check_cpu_dtype(const Tensor& h0) {
  TORCH_CHECK_TYPE(h0.scalar_type() == at::kFloat || h0.scalar_type() == at::kDouble,
                   "h0: the CPU kernel expects float32 or float64, got ", h0.scalar_type());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> forward(const Tensor& gates_x, const OptTensor& batch_sizes,
                                                   const Tensor& h0, const OptTensor& c0, const Tensor& w_hh,
                                                   const OptTensor& b_hh, std::string mode, bool reverse,
                                                   bool save_workspace) {
  const rnn::Args a = rnn::check_forward(gates_x, batch_sizes, h0, c0, w_hh, b_hh, mode);
  check_cpu_dtype(h0);
  return AT_DISPATCH_FLOATING_TYPES(h0.scalar_type(), "rnn_forward", [&] {
    return rnn::scan_forward<scalar_t>(a, gates_x, h0, c0, w_hh, b_hh, reverse, save_workspace,
                                       [](const rnn::StepForward<scalar_t>& p) {
                                         FASTDL_CPU_DISPATCH(rnn_forward_step, p);
                                       });
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward(const Tensor& grad_output, const Tensor& grad_h_n,
                                                            const OptTensor& grad_c_n, const OptTensor& batch_sizes,
                                                            const Tensor& h0, const OptTensor& c0, const Tensor& w_hh,
                                                            const Tensor& output, const Tensor& workspace,
                                                            std::string mode, bool reverse) {
  const rnn::Args a =
      rnn::check_backward(grad_output, grad_h_n, grad_c_n, batch_sizes, h0, c0, w_hh, output, workspace, mode);
  check_cpu_dtype(h0);
  return AT_DISPATCH_FLOATING_TYPES(h0.scalar_type(), "rnn_backward", [&] {
    return rnn::scan_backward<scalar_t>(a, grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, output, workspace, reverse,
                                        [](const rnn::StepBackward<scalar_t>& p) {
                                          FASTDL_CPU_DISPATCH(rnn_backward_step, p);
                                        });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("rnn_forward", &forward);
  m.impl("rnn_backward", &backward);
}

}  // namespace fastdl::cpu
