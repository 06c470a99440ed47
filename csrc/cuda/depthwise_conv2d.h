// Depthwise conv2d on CUDA: the launchers of the kernels in depthwise_conv2d.cu (no torch here; the
// checks, allocation and registration are in depthwise_conv2d_api.cpp).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>

#include "../depthwise_conv2d.h"

namespace fastdl::cuda {

// T is float, double, __half or __nv_bfloat16; sums in float (double for double). The shape must
// fit the 32-bit index math of the kernels: spatial sizes, padded sizes and kernel reach < 2^30.

// y = act((conv(x, weight) + bias) * scale + shift) on `stream`.
template <typename T>
void depthwise_conv2d_forward(const depthwise::ForwardParams<T>& p, cudaStream_t stream);

// Bytes of device workspace that depthwise_conv2d_backward needs for grad_weight (the per-block
// partial sums of its deterministic two-level reduction); 0 is never returned.
template <typename T>
size_t depthwise_conv2d_backward_workspace_size(const depthwise::Shape& s);

// grad_x when p.grad_x != nullptr, grad_weight when p.grad_weight != nullptr (then `workspace` holds
// depthwise_conv2d_backward_workspace_size<T>(p.s) bytes, 16-byte aligned) on `stream`.
template <typename T>
void depthwise_conv2d_backward(const depthwise::BackwardParams<T>& p, void* workspace, cudaStream_t stream);

}  // namespace fastdl::cuda
