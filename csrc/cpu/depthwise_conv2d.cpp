// Depthwise conv2d on the CPU, direct (no im2col). channels_last works on output rows and vectorizes
// over channels, keeping the sums of a block of channels (and of a few neighbouring output columns)
// in registers across the taps; NCHW works on (image, channel) planes and vectorizes along rows.
// grad_x is the transposed convolution with one writer per element: in channels_last a forward
// with the rotated filter (stride 1, mult 1) or else a gather per input row, in NCHW a scatter
// into an owned plane. grad_weight sums in double over blocks fixed by the shape alone and adds
// them in a fixed order, so it does not depend on the thread count. Inner loops are `omp simd`.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/depthwise_conv2d.h"
#include "cpu/simd.h"

namespace fastdl::cpu::FASTDL_ISA {

using depthwise::Act;
using depthwise::BackwardParams;
using depthwise::ForwardParams;
using depthwise::Shape;

namespace {

// Channels per register block: 4 vectors with 32 vector registers (AVX-512), 2 with 16 (AVX2,
// SSE), so that kSpan columns' (or kTapGroup taps') sums, the weights and a load fit them.
template <typename T>
constexpr int64_t kBlock = kVectorRegisters / 8 * kVectorBytes / sizeof(T);
// channels_last: output columns summed together, each weight load shared by all of them.
constexpr int64_t kSpan = 4;
// channels_last grad_weight: output positions per block of rows (one partial each), and at most
// this many blocks (bounds the partials' memory).
constexpr int64_t kBlockPositions = 2048;
constexpr int64_t kMaxBlocks = 64;
// channels_last grad_weight: rows, and neighbouring taps of a kernel row, summed in registers.
constexpr int64_t kRowGroup = 4;
constexpr int64_t kTapGroup = 3;

struct Range {
  int64_t lo, hi;
};

// The i in [0, n) whose index i * step + base lies in [0, size) (step > 0): a run [lo, hi) within
// [0, n], empty (lo == hi) when there are none.
inline Range in_bounds(int64_t n, int64_t step, int64_t base, int64_t size) {
  const int64_t lo = base >= 0 ? 0 : std::min(n, (-base + step - 1) / step);
  const int64_t hi = base >= size ? 0 : std::min(n, (size - 1 - base) / step + 1);
  return {lo, std::max(lo, hi)};
}

// NCHW: calls f(oh, tap, ih, off, cols) for each output row oh of a plane and each tap
// (tap = i * KW + j) whose input row ih is in bounds; off = j * dil_w - pad_w is the tap's input
// column offset and cols the output columns whose input column ow * stride_w + off is in bounds.
template <typename F>
inline void for_each_row_tap(const Shape& s, F f) {
  for (int64_t oh = 0; oh < s.OH; ++oh) {
    const int64_t ih0 = oh * s.stride_h - s.pad_h;
    const Range kh = in_bounds(s.KH, s.dil_h, ih0, s.H);
    for (int64_t i = kh.lo; i < kh.hi; ++i)
      for (int64_t j = 0; j < s.KW; ++j) {
        const int64_t off = j * s.dil_w - s.pad_w;
        f(oh, i * s.KW + j, ih0 + i * s.dil_h, off, in_bounds(s.OW, s.stride_w, off, s.W));
      }
  }
}

struct Tap {
  int64_t k, out;  // a kernel index and the output index it reads input index i from
};

// The taps of a K-tap axis that reach input index i (out * stride - pad + k * dil == i for an
// output index 0 <= out < n_out), written to taps; returns how many.
inline int64_t taps_reaching(int64_t i, int64_t K, int64_t stride, int64_t pad, int64_t dil, int64_t n_out,
                             Tap* taps) {
  int64_t n = 0;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t num = i + pad - k * dil;
    if (num < 0) break;  // num falls as k grows
    if (num % stride == 0 && num / stride < n_out) taps[n++] = {k, num / stride};
  }
  return n;
}

// Calls f(c0, width) over [0, C) in blocks of kBlock channels, width a compile-time constant (so
// that a block's sums stay in registers), then once for a narrower last block.
template <typename T, typename F>
inline void for_channel_blocks(int64_t C, F f) {
  int64_t c0 = 0;
  for (; c0 + kBlock<T> <= C; c0 += kBlock<T>) f(c0, std::integral_constant<int64_t, kBlock<T>>{});
  if (c0 < C) f(c0, C - c0);
}

// y[i] += a * x[i * stride + off] for i in r; unit stride gets a loop of contiguous loads.
template <typename T>
inline void axpy_gather(T* y, T a, const T* x, int64_t stride, int64_t off, Range r) {
  if (stride == 1) {
#pragma omp simd
    for (int64_t i = r.lo; i < r.hi; ++i) y[i] += a * x[i + off];
  } else {
#pragma omp simd
    for (int64_t i = r.lo; i < r.hi; ++i) y[i] += a * x[i * stride + off];
  }
}

// x[i * stride + off] += a * y[i] for i in r (distinct targets: stride >= 1).
template <typename T>
inline void axpy_scatter(T* x, T a, const T* y, int64_t stride, int64_t off, Range r) {
  if (stride == 1) {
#pragma omp simd
    for (int64_t i = r.lo; i < r.hi; ++i) x[i + off] += a * y[i];
  } else {
#pragma omp simd
    for (int64_t i = r.lo; i < r.hi; ++i) x[i * stride + off] += a * y[i];
  }
}

// sum of y[i] * x[i * stride + off] for i in r.
template <typename T>
inline T dot(const T* y, const T* x, int64_t stride, int64_t off, Range r) {
  T sum = 0;
  if (stride == 1) {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = r.lo; i < r.hi; ++i) sum += y[i] * x[i + off];
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = r.lo; i < r.hi; ++i) sum += y[i] * x[i * stride + off];
  }
  return sum;
}

template <Act A, typename T>
inline T activate(T z) {
  if constexpr (A == Act::Relu) return z < T(0) ? T(0) : z;  // NaN propagates, as in torch
  if constexpr (A == Act::Relu6) return z < T(0) ? T(0) : (z > T(6) ? T(6) : z);
  return z;
}

template <typename F>
void dispatch_act(Act act, F f) {
  switch (act) {
    case Act::None: return f(std::integral_constant<Act, Act::None>{});
    case Act::Relu: return f(std::integral_constant<Act, Act::Relu>{});
    case Act::Relu6: return f(std::integral_constant<Act, Act::Relu6>{});
  }
}

// weight [Co][KH*KW] as [KH*KW][Co]: one tap's filter values for consecutive channels are
// contiguous. flip: taps in reverse order (the filter rotated by 180 degrees).
template <typename T>
std::vector<T> taps_by_channel(const T* w, const Shape& s, bool flip) {
  const int64_t Co = s.C * s.mult, KK = s.KH * s.KW;
  std::vector<T> wt(KK * Co);
  for (int64_t o = 0; o < Co; ++o)
    for (int64_t t = 0; t < KK; ++t) wt[(flip ? KK - 1 - t : t) * Co + o] = w[o * KK + t];
  return wt;
}

// channels_last forward: one task per output row (n, oh). For each output position and block of
// output channels the sums over the in-bounds taps stay in registers; the epilogue is applied on
// the store. Columns whose taps are all in bounds go kSpan at a time, sharing each weight load.
// Unit: mult == 1, so output channel o reads input channel o (contiguous loads). Reads x through
// s (pad may be negative), so that grad_x of a stride-1 conv can run here too.
template <Act A, bool Unit, typename T>
void forward_rows(const Shape& s, const T* x_in, const T* wt, const T* scale, const T* shift, T* y_out) {
  const int64_t Co = s.C * s.mult, mult = Unit ? 1 : s.mult, step = s.stride_w * s.C;
  const Range full = in_bounds(s.OW, s.stride_w, -s.pad_w, s.W - (s.KW - 1) * s.dil_w);
  at::parallel_for(0, s.N * s.OH, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / s.OH, ih0 = r % s.OH * s.stride_h - s.pad_h;
      const Range kh = in_bounds(s.KH, s.dil_h, ih0, s.H);
      const T* x = x_in + n * s.H * s.W * s.C;
      T* y = y_out + r * s.OW * Co;
      // Output columns [ow, ow + span) through the taps kh x kw.
      auto columns = [&](int64_t ow, auto span, Range kw) {
        const int64_t iw0 = ow * s.stride_w - s.pad_w;
        for_channel_blocks<T>(Co, [&](int64_t o0, auto width) {
          T acc[decltype(span)::value][kBlock<T>] = {};
          for (int64_t i = kh.lo; i < kh.hi; ++i)
            for (int64_t j = kw.lo; j < kw.hi; ++j) {
              const T* xp = x + ((ih0 + i * s.dil_h) * s.W + iw0 + j * s.dil_w) * s.C;
              const T* wp = wt + (i * s.KW + j) * Co + o0;
              for (int64_t q = 0; q < span; ++q) {
#pragma omp simd
                for (int64_t c = 0; c < width; ++c) acc[q][c] += wp[c] * xp[q * step + (o0 + c) / mult];
              }
            }
          for (int64_t q = 0; q < span; ++q) {
            T* yp = y + (ow + q) * Co + o0;
#pragma omp simd
            for (int64_t c = 0; c < width; ++c) yp[c] = activate<A>(acc[q][c] * scale[o0 + c] + shift[o0 + c]);
          }
        });
      };
      const std::integral_constant<int64_t, 1> one;
      int64_t ow = 0;
      for (; ow < full.lo; ++ow)
        columns(ow, one, in_bounds(s.KW, s.dil_w, ow * s.stride_w - s.pad_w, s.W));
      for (; ow + kSpan <= full.hi; ow += kSpan) columns(ow, std::integral_constant<int64_t, kSpan>{}, Range{0, s.KW});
      for (; ow < s.OW; ++ow) columns(ow, one, in_bounds(s.KW, s.dil_w, ow * s.stride_w - s.pad_w, s.W));
    }
  });
}

// NCHW forward: one task per (n, o) plane; each output row is summed in a buffer, tap by tap, over
// the run of output columns whose input column is in bounds.
template <Act A, typename T>
void forward_planes(const ForwardParams<T>& p, const T* scale, const T* shift) {
  const Shape& s = p.s;
  const int64_t Co = s.C * s.mult;
  at::parallel_for(0, s.N * Co, 1, [&](int64_t q0, int64_t q1) {
    std::vector<T> row(s.OW);
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t n = q / Co, o = q % Co;
      const T* x = p.x + (n * s.C + o / s.mult) * s.H * s.W;
      const T* w = p.weight + o * s.KH * s.KW;
      for (int64_t oh = 0; oh < s.OH; ++oh) {
        std::fill(row.begin(), row.end(), T(0));
        const int64_t ih0 = oh * s.stride_h - s.pad_h;
        const Range kh = in_bounds(s.KH, s.dil_h, ih0, s.H);
        for (int64_t i = kh.lo; i < kh.hi; ++i)
          for (int64_t j = 0; j < s.KW; ++j) {
            const int64_t off = j * s.dil_w - s.pad_w;
            axpy_gather(row.data(), w[i * s.KW + j], x + (ih0 + i * s.dil_h) * s.W, s.stride_w, off,
                        in_bounds(s.OW, s.stride_w, off, s.W));
          }
        T* y = p.y + (q * s.OH + oh) * s.OW;
        const T a = scale[o], b = shift[o];
#pragma omp simd
        for (int64_t ow = 0; ow < s.OW; ++ow) y[ow] = activate<A>(row[ow] * a + b);
      }
    }
  });
}

// channels_last grad_x as a gather: one task per input row (n, ih). Each input position sums, per
// block of input channels, w * grad_out over the taps that reach it (output position integral
// and in range), over the mult output channels c * mult + m of input channel c.
template <bool Unit, typename T>
void grad_x_rows(const BackwardParams<T>& p, const T* wt) {
  const Shape& s = p.s;
  const int64_t Co = s.C * s.mult, mult = Unit ? 1 : s.mult;
  at::parallel_for(0, s.N * s.H, 1, [&](int64_t r0, int64_t r1) {
    std::vector<Tap> rows(s.KH), cols(s.KW);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / s.H;
      const int64_t nr = taps_reaching(r % s.H, s.KH, s.stride_h, s.pad_h, s.dil_h, s.OH, rows.data());
      const T* gy = p.grad_out + n * s.OH * s.OW * Co;
      for (int64_t iw = 0; iw < s.W; ++iw) {
        const int64_t nc = taps_reaching(iw, s.KW, s.stride_w, s.pad_w, s.dil_w, s.OW, cols.data());
        T* gx = p.grad_x + (r * s.W + iw) * s.C;
        for_channel_blocks<T>(s.C, [&](int64_t c0, auto width) {
          T acc[kBlock<T>] = {};
          for (int64_t a = 0; a < nr; ++a)
            for (int64_t b = 0; b < nc; ++b) {
              const T* gp = gy + (rows[a].out * s.OW + cols[b].out) * Co + c0 * mult;
              const T* wp = wt + (rows[a].k * s.KW + cols[b].k) * Co + c0 * mult;
              for (int64_t m = 0; m < mult; ++m) {
#pragma omp simd
                for (int64_t c = 0; c < width; ++c) acc[c] += wp[c * mult + m] * gp[c * mult + m];
              }
            }
#pragma omp simd
          for (int64_t c = 0; c < width; ++c) gx[c0 + c] = acc[c];
        });
      }
    }
  });
}

// NCHW grad_x as a scatter into an owned plane: one task per (n, c) input plane, which adds
// w * grad_out of its mult output channels along the in-bounds run of each tap.
template <typename T>
void grad_x_planes(const BackwardParams<T>& p) {
  const Shape& s = p.s;
  const int64_t Co = s.C * s.mult;
  at::parallel_for(0, s.N * s.C, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t n = q / s.C, c = q % s.C;
      T* gx = p.grad_x + q * s.H * s.W;
      std::fill(gx, gx + s.H * s.W, T(0));
      for (int64_t o = c * s.mult; o < (c + 1) * s.mult; ++o) {
        const T* gy = p.grad_out + (n * Co + o) * s.OH * s.OW;
        const T* w = p.weight + o * s.KH * s.KW;
        for_each_row_tap(s, [&](int64_t oh, int64_t tap, int64_t ih, int64_t off, Range cols) {
          axpy_scatter(gx + ih * s.W, w[tap], gy + oh * s.OW, s.stride_w, off, cols);
        });
      }
    }
  });
}

// channels_last grad_weight: the output rows are cut into blocks fixed by the shape, each summed
// into its own [KH*KW][Co] partial in double; the partials are then added in block order. Within
// a block, kRowGroup rows at a time, the sums of kTapGroup neighbouring taps (for one block of
// channels) stay in registers, sharing each grad_out load; columns that not all of the group's
// taps reach are added tap by tap.
template <bool Unit, typename T>
void grad_weight_rows(const BackwardParams<T>& p) {
  const Shape& s = p.s;
  const int64_t Co = s.C * s.mult, mult = Unit ? 1 : s.mult, KK = s.KH * s.KW, rows = s.N * s.OH;
  const int64_t blocks =
      std::clamp<int64_t>(rows * s.OW / kBlockPositions, 1, std::min(kMaxBlocks, std::max<int64_t>(rows, 1)));
  const int64_t per = (rows + blocks - 1) / blocks;
  std::vector<double> part(blocks * KK * Co, 0.0);
  // Adds taps (i, j0 + t), t < group, over rows [g0, g1) to the partial pp.
  auto taps = [&](int64_t g0, int64_t g1, int64_t i, int64_t j0, auto group, double* pp) {
    constexpr int64_t G = decltype(group)::value;
    Range run[G], common{0, s.OW};
    for (int64_t t = 0; t < G; ++t) {
      run[t] = in_bounds(s.OW, s.stride_w, (j0 + t) * s.dil_w - s.pad_w, s.W);
      common = {std::max(common.lo, run[t].lo), std::min(common.hi, run[t].hi)};
    }
    common.hi = std::max(common.lo, common.hi);
    for_channel_blocks<T>(Co, [&](int64_t o0, auto width) {
      T acc[G][kBlock<T>] = {};
      for (int64_t r = g0; r < g1; ++r) {
        const int64_t n = r / s.OH, ih = r % s.OH * s.stride_h - s.pad_h + i * s.dil_h;
        if (ih < 0 || ih >= s.H) continue;
        const T* gy = p.grad_out + r * s.OW * Co + o0;
        const T* x = p.x + (n * s.H + ih) * s.W * s.C;
        const int64_t x0 = (j0 * s.dil_w - s.pad_w) * s.C, tap_step = s.dil_w * s.C, step = s.stride_w * s.C;
        for (int64_t w = common.lo; w < common.hi; ++w)
          for (int64_t t = 0; t < G; ++t) {
#pragma omp simd
            for (int64_t c = 0; c < width; ++c)
              acc[t][c] += gy[w * Co + c] * x[x0 + w * step + t * tap_step + (o0 + c) / mult];
          }
        for (int64_t t = 0; t < G; ++t)
          for (const Range e : {Range{run[t].lo, std::min(run[t].hi, common.lo)},
                                Range{std::max(run[t].lo, common.hi), run[t].hi}})
            for (int64_t w = e.lo; w < e.hi; ++w) {
#pragma omp simd
              for (int64_t c = 0; c < width; ++c)
                acc[t][c] += gy[w * Co + c] * x[x0 + w * step + t * tap_step + (o0 + c) / mult];
            }
      }
      for (int64_t t = 0; t < G; ++t) {
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) pp[t * Co + o0 + c] += acc[t][c];
      }
    });
  };
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk)
      for (int64_t g0 = blk * per; g0 < std::min(rows, (blk + 1) * per); g0 += kRowGroup) {
        const int64_t g1 = std::min({rows, (blk + 1) * per, g0 + kRowGroup});
        for (int64_t i = 0; i < s.KH; ++i) {
          double* pp = part.data() + (blk * KK + i * s.KW) * Co;
          int64_t j = 0;
          for (; j + kTapGroup <= s.KW; j += kTapGroup)
            taps(g0, g1, i, j, std::integral_constant<int64_t, kTapGroup>{}, pp + j * Co);
          for (; j < s.KW; ++j) taps(g0, g1, i, j, std::integral_constant<int64_t, 1>{}, pp + j * Co);
        }
      }
  });
  at::parallel_for(0, Co, 1, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t t = 0; t < KK; ++t) {
        double sum = 0;
        for (int64_t blk = 0; blk < blocks; ++blk) sum += part[(blk * KK + t) * Co + o];
        p.grad_weight[o * KK + t] = T(sum);
      }
  });
}

// NCHW grad_weight: one task per output channel; each tap adds, in double and in (n, oh) order,
// the dot product of a grad_out row with the in-bounds run of an input row.
template <typename T>
void grad_weight_planes(const BackwardParams<T>& p) {
  const Shape& s = p.s;
  const int64_t Co = s.C * s.mult, KK = s.KH * s.KW;
  at::parallel_for(0, Co, 1, [&](int64_t o0, int64_t o1) {
    std::vector<double> acc(KK);
    for (int64_t o = o0; o < o1; ++o) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t n = 0; n < s.N; ++n) {
        const T* gy = p.grad_out + (n * Co + o) * s.OH * s.OW;
        const T* x = p.x + (n * s.C + o / s.mult) * s.H * s.W;
        for_each_row_tap(s, [&](int64_t oh, int64_t tap, int64_t ih, int64_t off, Range cols) {
          acc[tap] += dot(gy + oh * s.OW, x + ih * s.W, s.stride_w, off, cols);
        });
      }
      for (int64_t t = 0; t < KK; ++t) p.grad_weight[o * KK + t] = T(acc[t]);
    }
  });
}

}  // namespace

template <typename T>
void depthwise_conv2d_forward_kernel(const ForwardParams<T>& p) {
  const Shape& s = p.s;
  const int64_t Co = s.C * s.mult;
  std::vector<T> scale(Co), shift(Co);  // z = conv * scale + shift, the bias folded into shift
  for (int64_t o = 0; o < Co; ++o) {
    scale[o] = p.scale ? p.scale[o] : T(1);
    shift[o] = (p.bias ? p.bias[o] : T(0)) * scale[o] + (p.shift ? p.shift[o] : T(0));
  }
  dispatch_act(p.act, [&](auto act) {
    constexpr Act A = decltype(act)::value;
    if (!s.channels_last) return forward_planes<A>(p, scale.data(), shift.data());
    const std::vector<T> wt = taps_by_channel(p.weight, s, false);
    if (s.mult == 1) return forward_rows<A, true>(s, p.x, wt.data(), scale.data(), shift.data(), p.y);
    forward_rows<A, false>(s, p.x, wt.data(), scale.data(), shift.data(), p.y);
  });
}

// channels_last grad_x of a stride-1 conv with mult == 1: the correlation of grad_out with the
// rotated filter, padded by dil * (K - 1) - pad (cropped where that is negative), which is a forward.
template <typename T>
void grad_x_as_forward(const BackwardParams<T>& p) {
  const Shape& s = p.s;
  Shape t = s;
  t.H = s.OH, t.W = s.OW, t.OH = s.H, t.OW = s.W;
  t.pad_h = s.dil_h * (s.KH - 1) - s.pad_h, t.pad_w = s.dil_w * (s.KW - 1) - s.pad_w;
  const std::vector<T> wt = taps_by_channel(p.weight, s, true);
  const std::vector<T> scale(s.C, T(1)), shift(s.C, T(0));
  forward_rows<Act::None, true>(t, p.grad_out, wt.data(), scale.data(), shift.data(), p.grad_x);
}

template <typename T>
void depthwise_conv2d_backward_kernel(const BackwardParams<T>& p) {
  const Shape& s = p.s;
  if (p.grad_x && !s.channels_last) grad_x_planes(p);
  if (p.grad_x && s.channels_last) {
    if (s.mult == 1 && s.stride_h == 1 && s.stride_w == 1) {
      grad_x_as_forward(p);
    } else {
      const std::vector<T> wt = taps_by_channel(p.weight, s, false);
      s.mult == 1 ? grad_x_rows<true>(p, wt.data()) : grad_x_rows<false>(p, wt.data());
    }
  }
  if (p.grad_weight && !s.channels_last) grad_weight_planes(p);
  if (p.grad_weight && s.channels_last) s.mult == 1 ? grad_weight_rows<true>(p) : grad_weight_rows<false>(p);
}

template void depthwise_conv2d_forward_kernel<float>(const ForwardParams<float>&);
template void depthwise_conv2d_forward_kernel<double>(const ForwardParams<double>&);
template void depthwise_conv2d_backward_kernel<float>(const BackwardParams<float>&);
template void depthwise_conv2d_backward_kernel<double>(const BackwardParams<double>&);

}  // namespace fastdl::cpu::FASTDL_ISA
