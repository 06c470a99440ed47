// Recurrent cells on CUDA: the launchers of one time step's fused pointwise kernels (rnn.cu; no torch
// here). The checks, the time loop and the registration are in rnn_api.cpp and csrc/rnn_scan.h.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../rnn.h"

namespace fastdl::cuda {

// T is float, double, __half or __nv_bfloat16; the gate math is float (double for double). Layouts
// and the meaning of every pointer: csrc/rnn.h. Nothing is launched when p.B == 0 or p.H == 0.
template <typename T>
void rnn_forward_step(const rnn::StepForward<T>& p, cudaStream_t stream);

template <typename T>
void rnn_backward_step(const rnn::StepBackward<T>& p, cudaStream_t stream);

}  // namespace fastdl::cuda
