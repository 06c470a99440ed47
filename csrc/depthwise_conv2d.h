// Depthwise conv2d: the parameters shared by the CPU kernels (csrc/cpu/depthwise_conv2d.cpp) and the
// CUDA kernels (csrc/cuda/depthwise_conv2d.cu). Raw pointers and sizes only, no at::Tensor.
#pragma once
#include <cstdint>

namespace fastdl::depthwise {

enum class Act { None, Relu, Relu6 };

// nn.Conv2d(C, C * mult, (KH, KW), groups=C): output channel o = c * mult + m reads input channel
// c = o / mult through the filter weight[o]. Input position of output (oh, ow) and tap (kh, kw):
//   ih = oh * stride_h - pad_h + kh * dil_h,  iw = ow * stride_w - pad_w + kw * dil_w
// (zeros outside [0, H) x [0, W)). x, y and their gradients are dense in one of two layouts:
// NCHW ([N][C][H][W]) or channels_last ([N][H][W][C]); weight is [C * mult][KH][KW].
struct Shape {
  int64_t N, C, H, W;  // input
  int64_t mult;        // depth multiplier: C * mult output channels
  int64_t OH, OW;      // output: (H + 2 * pad_h - dil_h * (KH - 1) - 1) / stride_h + 1, likewise OW
  int64_t KH, KW;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  bool channels_last;
};

// y = act((conv(x, weight) + bias) * scale + shift); bias, scale, shift are optional (nullptr:
// 0, 1, 0). scale / shift are an eval-mode batch norm folded in.
template <typename T>
struct ForwardParams {
  Shape s;
  const T* x;       // [N, C, H, W]
  const T* weight;  // [C * mult, KH, KW]
  const T* bias;    // nullable, [C * mult]
  const T* scale;   // nullable, [C * mult]
  const T* shift;   // nullable, [C * mult]
  T* y;             // [N, C * mult, OH, OW], every element written
  Act act;
};

// Gradients of z = conv(x, weight) (the epilogue's gradient is applied to grad_out before).
template <typename T>
struct BackwardParams {
  Shape s;
  const T* grad_out;  // [N, C * mult, OH, OW]
  const T* x;         // [N, C, H, W]; read when grad_weight != nullptr
  const T* weight;    // [C * mult, KH, KW]; read when grad_x != nullptr
  T* grad_x;          // nullable: [N, C, H, W], every element written
  T* grad_weight;     // nullable: [C * mult, KH, KW], every element written; summed in a fixed
                      // order (deterministic: no atomics on the final sums)
};

}  // namespace fastdl::depthwise
