// rnn_forward / rnn_backward on CUDA: the checks and time loop of csrc/rnn_scan.h (cuBLAS GEMMs
// through ATen on the current stream) around the pointwise step kernels of rnn.cu.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "cuda/rnn.h"
#include "rnn_scan.h"

namespace fastdl::cuda {
namespace {

using at::Tensor;
using rnn::OptTensor;

// The kernels' element type of an ATen scalar type (same size and bits).
template <typename S>
struct KernelType {
  using type = S;
};
template <>
struct KernelType<c10::Half> {
  using type = __half;
};
template <>
struct KernelType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// h0 (whose device and dtype every other tensor was checked to share) on a CUDA device, of a dtype
// the kernels are built for.
void check_cuda(const Tensor& h0) {
  TORCH_CHECK_VALUE(h0.is_cuda(), "h0: expected a CUDA tensor, got device ", h0.device());
  const auto t = h0.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
                   "h0: the CUDA kernel expects float32, float64, float16 or bfloat16, got ", t);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> forward(const Tensor& gates_x, const OptTensor& batch_sizes,
                                                   const Tensor& h0, const OptTensor& c0, const Tensor& w_hh,
                                                   const OptTensor& b_hh, std::string mode, bool reverse,
                                                   bool save_workspace) {
  const rnn::Args a = rnn::check_forward(gates_x, batch_sizes, h0, c0, w_hh, b_hh, mode);
  check_cuda(h0);
  const c10::cuda::CUDAGuard guard(h0.device());
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h0.scalar_type(), "rnn_forward", [&] {
    using T = typename KernelType<scalar_t>::type;
    return rnn::scan_forward<T>(a, gates_x, h0, c0, w_hh, b_hh, reverse, save_workspace,
                                [](const rnn::StepForward<T>& p) {
                                  rnn_forward_step(p, at::cuda::getCurrentCUDAStream());
                                  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  check_cuda(h0);
  const c10::cuda::CUDAGuard guard(h0.device());
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h0.scalar_type(), "rnn_backward", [&] {
    using T = typename KernelType<scalar_t>::type;
    return rnn::scan_backward<T>(a, grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, output, workspace, reverse,
                                 [](const rnn::StepBackward<T>& p) {
                                   rnn_backward_step(p, at::cuda::getCurrentCUDAStream());
                                   C10_CUDA_KERNEL_LAUNCH_CHECK();
                                 });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("rnn_forward", &forward);
  m.impl("rnn_backward", &backward);
}

}  // namespace fastdl::cuda
