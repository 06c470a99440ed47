// CPU kernels of batch_norm_act on raw pointers (no at::Tensor): see batch_norm_act.cpp.
#pragma once
#include <cstdint>

#include "cpu/isa.h"

namespace fastdl::cpu {

enum class Act { None, Relu, Relu6, LeakyRelu };

// x as N * C * HW values: planes [N][C][HW] (NCHW) or rows [N*HW][C] (channels_last), contiguous.
struct Layout {
  int64_t N, C, HW;
  bool channels_last;
};

template <typename T>
struct ForwardParams {
  Layout layout;
  const T* x;
  const T* residual;     // nullable, x's layout
  const T* weight;       // nullable, [C]
  const T* bias;         // nullable, [C]
  T* running_mean;       // [C]; read in eval, updated in training when non-null
  T* running_var;        // [C]
  T* save_mean;          // [C] out: batch mean (training) or running mean (eval)
  T* save_invstd;        // [C] out: 1 / sqrt(var + eps)
  T* y;                  // x's layout
  bool* mask;            // nullable, x's layout: act'(z) != 0
  bool training;
  double momentum, eps, slope;
  Act act;
};

template <typename T>
struct BackwardParams {
  Layout layout;
  const T* grad_out;
  const T* x;
  const uint8_t* mask;   // null when act == None: act'(z) != 0 as 0 / 1 (a bool tensor's bytes)
  const T* weight;       // nullable
  const T* mean;         // [C]
  const T* invstd;       // [C]
  T* grad_x;
  T* grad_weight;        // [C]: sum(dz * x_hat)
  T* grad_bias;          // [C]: sum(dz)
  T* grad_residual;      // nullable: dz
  bool training;
  double slope;
  Act act;
};

FASTDL_ISA_DECLARE(
template <typename T>
void batch_norm_act_forward_kernel(const ForwardParams<T>& p);
// Per-channel mean and M2 (sum of squared deviations) of x: [C] each.
template <typename T>
void batch_norm_stats_kernel(const T* x, const Layout& layout, T* mean, T* m2);
template <typename T>
void batch_norm_act_backward_kernel(const BackwardParams<T>& p);
)

}  // namespace fastdl::cpu
