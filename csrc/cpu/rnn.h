// Recurrent cells on the CPU: one time step's fused pointwise kernels (csrc/rnn.h), for float and
// double, compiled once per ISA (csrc/cpu/isa.h) and split over rows with OpenMP. The time loop is csrc/rnn_scan.h.
#pragma once
#include "../rnn.h"  // the shared params (a plain "rnn.h" names this file)

#include "cpu/isa.h"

namespace fastdl::cpu {

FASTDL_ISA_DECLARE(
template <typename T>
void rnn_forward_step(const rnn::StepForward<T>& p);
template <typename T>
void rnn_backward_step(const rnn::StepBackward<T>& p);
)

}  // namespace fastdl::cpu
