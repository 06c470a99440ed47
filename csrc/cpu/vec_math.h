// Elementwise math for the CPU kernels, written so that `#pragma omp simd` loops vectorize it for
// each ISA copy (no calls, no branches: selects only; in the copy's namespace, csrc/cpu/isa.h). The float versions are polynomials; the double
// versions call libm (they run scalar, at full double accuracy).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/simd.h"

namespace fastdl::cpu::FASTDL_ISA {

// exp(x) in float, to ~1 ulp, written so that a simd loop vectorizes it: exp(x) = 2^n * exp(r)
// with n = round(x / ln 2), r = x - n ln 2 (Cody-Waite), exp(r) a degree-7 polynomial (Cephes
// expf). 0 below -87 (so exp(-inf) = 0 exactly); x is never above 0 here.
inline float exp_of(float x) {
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float pow2n;
  std::memcpy(&pow2n, &bits, sizeof(float));
  return x < -87.0f ? 0.0f : y * pow2n;
}
inline double exp_of(double x) { return std::exp(x); }

// The activations of the recurrent cells (the math policy `M` of csrc/rnn_cell.h). Both go
// through e = exp(-|x|), whose argument is never positive, so every finite or infinite x gives a
// finite result (sigmoid in [0, 1], tanh in [-1, 1]); NaN stays NaN. Float: absolute error
// ~1e-7 (tanh also ~1 ulp relative near 0, from the Cephes tanhf polynomial below |x| = 0.625).
struct VecMath {
  // sigmoid(x) = 1 / (1 + e) for x >= 0, e / (1 + e) below.
  static float sigmoid(float x) {
    const float e = exp_of(-std::fabs(x)), s = 1.0f / (1.0f + e);
    return x >= 0.0f ? s : e * s;
  }
  static double sigmoid(double x) {
    const double e = std::exp(-std::fabs(x)), s = 1.0 / (1.0 + e);
    return x >= 0.0 ? s : e * s;
  }
  // tanh(|x|) = (1 - e^2) / (1 + e^2), with the sign of x; a polynomial in x^2 below 0.625.
  static float tanh(float x) {
    const float a = std::fabs(x), e = exp_of(-2.0f * a), big = (1.0f - e) / (1.0f + e);
    const float s = x * x;
    const float small =
        ((((-5.70498872745e-3f * s + 2.06390887954e-2f) * s - 5.37397155531e-2f) * s + 1.33314422036e-1f) * s -
         3.33332819422e-1f) * s * a + a;
    return std::copysign(a < 0.625f ? small : big, x);
  }
  static double tanh(double x) { return std::tanh(x); }
};

}  // namespace fastdl::cpu::FASTDL_ISA
