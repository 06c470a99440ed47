// CPU kernels of depthwise_conv2d on raw pointers (no at::Tensor): see depthwise_conv2d.cpp. The
// params structs are shared with the CUDA kernels (csrc/depthwise_conv2d.h).
#pragma once
#include "../depthwise_conv2d.h"  // the shared params (a plain "depthwise_conv2d.h" names this file)

#include "cpu/isa.h"

namespace fastdl::cpu {

FASTDL_ISA_DECLARE(
template <typename T>
void depthwise_conv2d_forward_kernel(const depthwise::ForwardParams<T>& p);
template <typename T>
void depthwise_conv2d_backward_kernel(const depthwise::BackwardParams<T>& p);
)

}  // namespace fastdl::cpu
