// y = act(batch_norm(x) + residual) on the CPU: batch statistics by chunked two-pass means merged
// with Chan's formula (no sum of squares), then one fused elementwise pass; backward is one
// reduction pass and one elementwise pass. x is viewed either as planes ([N*C][HW], NCHW) or as
// rows ([N*HW][C], channels_last); inner loops are `omp simd` loops vectorized for -march.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/batch_norm_act.h"
#include "cpu/simd.h"

namespace fastdl::cpu::FASTDL_ISA {

namespace {

constexpr int64_t kChunk = 2048;  // elements per two-pass chunk: stays in L1 between the passes
// channels_last: elements per block of rows reduced to one per-channel partial. Large enough that
// merging the partials stays cheap, small enough (128 KB of fp32) to stay in L2 between two passes.
constexpr int64_t kRowBlock = 32768;

struct Moments {  // count, mean and sum of squared deviations of a set of values
  double n = 0, mean = 0, m2 = 0;
  void merge(double nb, double mb, double m2b) {  // Chan et al.'s parallel update
    if (nb == 0) return;
    const double total = n + nb, delta = mb - mean;
    mean += delta * nb / total;
    m2 += m2b + delta * delta * n * nb / total;
    n = total;
  }
};

// Moments of a contiguous run, merged chunk by chunk; each chunk is two passes over L1-resident data.
template <typename T>
void run_moments(const T* x, int64_t len, Moments& out) {
  for (int64_t start = 0; start < len; start += kChunk) {
    const int64_t n = std::min(kChunk, len - start);
    const T* p = x + start;
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) sum += p[i];
    const T mean = sum / T(n);
    T m2 = 0;
#pragma omp simd reduction(+ : m2)
    for (int64_t i = 0; i < n; ++i) m2 += (p[i] - mean) * (p[i] - mean);
    out.merge(double(n), double(mean), double(m2));
  }
}

// Per-channel moments of x. Planar: one partial per (n, c) plane. Rows: one partial per block of
// rows, each a two-pass column mean / deviation over the block. Partials merge in a fixed order.
template <typename T>
std::vector<Moments> channel_moments(const T* x, const Layout& l) {
  std::vector<Moments> out(l.C);
  if (!l.channels_last) {
    std::vector<Moments> part(l.N * l.C);
    at::parallel_for(0, l.N * l.C, std::max<int64_t>(1, 4096 / std::max<int64_t>(l.HW, 1)),
                     [&](int64_t b, int64_t e) {
                       for (int64_t p = b; p < e; ++p) run_moments(x + p * l.HW, l.HW, part[p]);
                     });
    for (int64_t p = 0; p < l.N * l.C; ++p) out[p % l.C].merge(part[p].n, part[p].mean, part[p].m2);
    return out;
  }
  const int64_t M = l.N * l.HW, C = l.C;
  const int64_t R = std::max<int64_t>(1, kRowBlock / C);  // rows per block
  const int64_t blocks = (M + R - 1) / R;
  std::vector<T> mean_part(blocks * C), m2_part(blocks * C);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * R, rows = std::min(R, M - r0);
      T* mean = mean_part.data() + blk * C;
      T* m2 = m2_part.data() + blk * C;
      std::fill(mean, mean + C, T(0));
      std::fill(m2, m2 + C, T(0));
      for (int64_t r = r0; r < r0 + rows; ++r) {
        const T* row = x + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) mean[c] += row[c];
      }
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) mean[c] /= T(rows);
      for (int64_t r = r0; r < r0 + rows; ++r) {
        const T* row = x + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) m2[c] += (row[c] - mean[c]) * (row[c] - mean[c]);
      }
    }
  });
  at::parallel_for(0, C, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t blk = 0; blk < blocks; ++blk)
        out[c].merge(double(std::min(R, M - blk * R)), mean_part[blk * C + c], m2_part[blk * C + c]);
  });
  return out;
}

template <Act A, typename T>
inline T act_forward(T z, T slope) {
  if constexpr (A == Act::Relu) return z < T(0) ? T(0) : z;  // NaN propagates, as in torch
  if constexpr (A == Act::Relu6) return z < T(0) ? T(0) : (z > T(6) ? T(6) : z);
  if constexpr (A == Act::LeakyRelu) return z < T(0) ? z * slope : z;
  return z;
}

// The condition under which act'(z) is 1. Relu6's two comparisons are joined with `&`, not `&&`:
// the short circuit is a branch, which kept the loop from vectorizing (14x slower on random data).
template <Act A, typename T>
inline bool act_mask(T z) {
  if constexpr (A == Act::Relu6) return (z > T(0)) & (z < T(6));
  return z > T(0);
}

// dz = dy * act'(z) from the saved mask (0 / 1): arithmetic, not a branch, so it vectorizes.
template <Act A, typename T>
inline T act_backward(T dy, uint8_t mask, T slope) {
  if constexpr (A == Act::None) return dy;
  if constexpr (A == Act::LeakyRelu) return dy * (slope + (T(1) - slope) * T(mask));
  return dy * T(mask);
}

// Calls f(offset, len, channel, per_channel) over x in parallel: for planes, a run of HW values of
// one channel (per_channel: std::false_type); for rows, a run of C values, one per channel
// (std::true_type). Per-channel arrays are then indexed [i * per_channel] from `channel`.
template <typename F>
void for_each_run(const Layout& l, F f) {
  if (!l.channels_last) {
    at::parallel_for(0, l.N * l.C, std::max<int64_t>(1, 16384 / std::max<int64_t>(l.HW, 1)),
                     [&](int64_t b, int64_t e) {
                       for (int64_t p = b; p < e; ++p) f(p * l.HW, l.HW, p % l.C, std::false_type{});
                     });
  } else {
    at::parallel_for(0, l.N * l.HW, std::max<int64_t>(1, 16384 / l.C), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) f(r * l.C, l.C, 0, std::true_type{});
    });
  }
}

// Calls f(std::bool_constant<a>{}, std::bool_constant<b>{}): optional inputs become compile-time
// flags, so the inner loops carry no null checks.
template <typename F>
void dispatch_flags(bool a, bool b, F f) {
  if (a && b) return f(std::true_type{}, std::true_type{});
  if (a) return f(std::true_type{}, std::false_type{});
  if (b) return f(std::false_type{}, std::true_type{});
  return f(std::false_type{}, std::false_type{});
}

// y = act((x - mean[c]) * scale[c] + shift[c] + residual); mask = act'(...) > 0 when mask != null.
template <Act A, typename T>
void apply_forward(const T* x, const T* res, const T* mean, const T* scale, const T* shift, T slope,
                   T* y, bool* mask, const Layout& l) {
  dispatch_flags(res != nullptr, mask != nullptr, [&](auto has_res, auto has_mask) {
    for_each_run(l, [&](int64_t off, int64_t len, int64_t c, auto per_channel) {
      constexpr int64_t k = decltype(per_channel)::value;
      const T *xp = x + off, *mp = mean + c, *sp = scale + c, *hp = shift + c;
      const T* rp = decltype(has_res)::value ? res + off : nullptr;
      bool* mk = decltype(has_mask)::value ? mask + off : nullptr;
      T* yp = y + off;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        T z = (xp[i] - mp[i * k]) * sp[i * k] + hp[i * k];
        if constexpr (decltype(has_res)::value) z += rp[i];
        yp[i] = act_forward<A>(z, slope);
        if constexpr (decltype(has_mask)::value) mk[i] = act_mask<A>(z);
      }
    });
  });
}

// Per-channel sums of dz and dz * (x - mean), dz = dy * act'(z).
template <Act A, typename T>
void grad_sums(const T* dy, const T* x, const uint8_t* mask, const T* mean, T slope, const Layout& l,
               std::vector<double>& sum_dz, std::vector<double>& sum_dzx) {
  if (!l.channels_last) {
    const int64_t P = l.N * l.C;
    std::vector<double> s1(P), s2(P);
    at::parallel_for(0, P, std::max<int64_t>(1, 4096 / std::max<int64_t>(l.HW, 1)), [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const T m = mean[p % l.C];
        double a1 = 0, a2 = 0;
        for (int64_t start = 0; start < l.HW; start += kChunk) {
          const int64_t o = p * l.HW + start, n = std::min(kChunk, l.HW - start);
          const T *dyp = dy + o, *xp = x + o;  // local pointers: contiguous loads, not gathers
          const uint8_t* mk = A == Act::None ? nullptr : mask + o;
          T c1 = 0, c2 = 0;
#pragma omp simd reduction(+ : c1, c2)
          for (int64_t i = 0; i < n; ++i) {
            const T dz = act_backward<A>(dyp[i], A == Act::None ? uint8_t(0) : mk[i], slope);
            c1 += dz;
            c2 += dz * (xp[i] - m);
          }
          a1 += c1;
          a2 += c2;
        }
        s1[p] = a1;
        s2[p] = a2;
      }
    });
    for (int64_t p = 0; p < P; ++p) {
      sum_dz[p % l.C] += s1[p];
      sum_dzx[p % l.C] += s2[p];
    }
    return;
  }
  const int64_t M = l.N * l.HW, C = l.C;
  const int64_t R = std::max<int64_t>(1, kRowBlock / C);
  const int64_t blocks = (M + R - 1) / R;
  std::vector<T> p1(blocks * C, T(0)), p2(blocks * C, T(0));
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      T* a1 = p1.data() + blk * C;
      T* a2 = p2.data() + blk * C;
      for (int64_t r = blk * R; r < std::min(M, (blk + 1) * R); ++r) {
        const T *dyp = dy + r * C, *xp = x + r * C, *mp = mean;
        const uint8_t* mk = A == Act::None ? nullptr : mask + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const T dz = act_backward<A>(dyp[c], A == Act::None ? uint8_t(0) : mk[c], slope);
          a1[c] += dz;
          a2[c] += dz * (xp[c] - mp[c]);
        }
      }
    }
  });
  for (int64_t blk = 0; blk < blocks; ++blk)
    for (int64_t c = 0; c < C; ++c) {
      sum_dz[c] += p1[blk * C + c];
      sum_dzx[c] += p2[blk * C + c];
    }
}

// dx = dz * a[c] + (x - mean[c]) * b[c] + d[c]; dres = dz when dres != null.
template <Act A, typename T>
void apply_backward(const T* dy, const T* x, const uint8_t* mask, const T* mean, const T* a, const T* b,
                    const T* d, T slope, T* dx, T* dres, const Layout& l) {
  dispatch_flags(dres != nullptr, false, [&](auto has_dres, auto) {
    for_each_run(l, [&](int64_t off, int64_t len, int64_t c, auto per_channel) {
      constexpr int64_t k = decltype(per_channel)::value;
      const T *dyp = dy + off, *xp = x + off, *mp = mean + c, *ap = a + c, *bp = b + c, *dp = d + c;
      const uint8_t* mk = A == Act::None ? nullptr : mask + off;
      T* rp = decltype(has_dres)::value ? dres + off : nullptr;
      T* dxp = dx + off;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const T dz = act_backward<A>(dyp[i], A == Act::None ? uint8_t(0) : mk[i], slope);
        dxp[i] = dz * ap[i * k] + (xp[i] - mp[i * k]) * bp[i * k] + dp[i * k];
        if constexpr (decltype(has_dres)::value) rp[i] = dz;
      }
    });
  });
}

template <typename F>
void dispatch_act(Act act, F f) {
  switch (act) {
    case Act::None: return f(std::integral_constant<Act, Act::None>{});
    case Act::Relu: return f(std::integral_constant<Act, Act::Relu>{});
    case Act::Relu6: return f(std::integral_constant<Act, Act::Relu6>{});
    case Act::LeakyRelu: return f(std::integral_constant<Act, Act::LeakyRelu>{});
  }
}

}  // namespace

template <typename T>
void batch_norm_act_forward_kernel(const ForwardParams<T>& p) {
  const Layout& l = p.layout;
  const int64_t C = l.C;
  std::vector<T> mean(C), scale(C), shift(C);
  if (p.training) {
    const std::vector<Moments> mom = channel_moments(p.x, l);
    for (int64_t c = 0; c < C; ++c) {
      const double n = mom[c].n, var = mom[c].m2 / n, invstd = 1.0 / std::sqrt(var + p.eps);
      p.save_mean[c] = T(mom[c].mean);
      p.save_invstd[c] = T(invstd);
      if (p.running_mean) {
        p.running_mean[c] = T((1 - p.momentum) * p.running_mean[c] + p.momentum * mom[c].mean);
        p.running_var[c] = T((1 - p.momentum) * p.running_var[c] + p.momentum * mom[c].m2 / (n - 1));
      }
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      p.save_mean[c] = p.running_mean[c];
      p.save_invstd[c] = T(1.0 / std::sqrt(double(p.running_var[c]) + p.eps));
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = p.save_mean[c];
    scale[c] = (p.weight ? p.weight[c] : T(1)) * p.save_invstd[c];
    shift[c] = p.bias ? p.bias[c] : T(0);
  }
  dispatch_act(p.act, [&](auto a) {
    apply_forward<decltype(a)::value>(p.x, p.residual, mean.data(), scale.data(), shift.data(),
                                      T(p.slope), p.y, p.mask, l);
  });
}

template <typename T>
void batch_norm_stats_kernel(const T* x, const Layout& l, T* mean, T* m2) {
  const std::vector<Moments> mom = channel_moments(x, l);
  for (int64_t c = 0; c < l.C; ++c) {
    mean[c] = T(mom[c].mean);
    m2[c] = T(mom[c].m2);
  }
}

template <typename T>
void batch_norm_act_backward_kernel(const BackwardParams<T>& p) {
  const Layout& l = p.layout;
  const int64_t C = l.C;
  std::vector<double> sum_dz(C, 0.0), sum_dzx(C, 0.0);
  dispatch_act(p.act, [&](auto a) {
    grad_sums<decltype(a)::value>(p.grad_out, p.x, p.mask, p.mean, T(p.slope), l, sum_dz, sum_dzx);
  });
  const double count = double(l.N) * double(l.HW);
  std::vector<T> a(C), b(C), d(C);
  for (int64_t c = 0; c < C; ++c) {
    const double w = p.weight ? double(p.weight[c]) : 1.0, invstd = p.invstd[c];
    p.grad_weight[c] = T(sum_dzx[c] * invstd);
    p.grad_bias[c] = T(sum_dz[c]);
    a[c] = T(w * invstd);
    b[c] = p.training ? T(-w * invstd * invstd * invstd * sum_dzx[c] / count) : T(0);
    d[c] = p.training ? T(-w * invstd * sum_dz[c] / count) : T(0);
  }
  dispatch_act(p.act, [&](auto act) {
    apply_backward<decltype(act)::value>(p.grad_out, p.x, p.mask, p.mean, a.data(), b.data(),
                                         d.data(), T(p.slope), p.grad_x, p.grad_residual, l);
  });
}

template void batch_norm_act_forward_kernel<float>(const ForwardParams<float>&);
template void batch_norm_act_forward_kernel<double>(const ForwardParams<double>&);
template void batch_norm_stats_kernel<float>(const float*, const Layout&, float*, float*);
template void batch_norm_stats_kernel<double>(const double*, const Layout&, double*, double*);
template void batch_norm_act_backward_kernel<float>(const BackwardParams<float>&);
template void batch_norm_act_backward_kernel<double>(const BackwardParams<double>&);

}  // namespace fastdl::cpu::FASTDL_ISA
