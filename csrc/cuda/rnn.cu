// Recurrent cells on CUDA: one time step's fused pointwise kernels (csrc/rnn.h), forward and
// backward, for the four modes. The per-element math is csrc/rnn_cell.h, evaluated in float (double
// for double) with the device math policy below; inputs and outputs are T.
//
// One thread per (row, unit) element of the step, in a 2-D grid: x over the H units (coalesced:
// every array is row-major with the units contiguous, a gate's columns H apart), y over the B rows;
// both axes are grid-stride loops and every offset is 64-bit. The block is 256 threads, its x extent
// H rounded up to a warp (at most 256; larger H takes several blocks along x) and its y extent the
// rows that fill the rest. One kernel per mode (a template parameter), so each keeps the registers of
// its own math.
//
// The index math (which element of gx / gh / ws / out each thread reads and writes) is in
// __host__ __device__ functions (forward_thread / backward_thread and the element functions they
// loop over), so it can be emulated on the host.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cuda/rnn.h"
#include "cuda/element_types.cuh"
#include "rnn_cell.h"

#define RNN_HD __host__ __device__ __forceinline__

namespace fastdl::cuda {
namespace rnn_k {

using rnn::Mode;
using rnn::StepBackward;
using rnn::StepForward;

// The math policy of csrc/rnn_cell.h on the device: the accurate expf / tanhf (a few ulp) and a fast
// reciprocal (__fdividef: 2 ulp; for 1 + e^-x above 2^126 it gives 0, where sigmoid < 2^-126
// anyway). Float results are within ~5 ulp (< 1e-6 relative) of the exact sigmoid and tanh. On the
// host (the emulation of the kernels) the same formulas with the C library's functions.
struct DeviceMath {
  static RNN_HD float sigmoid(float x) {
#if defined(__CUDA_ARCH__)
    return __fdividef(1.f, 1.f + expf(-x));
#else
    return 1.f / (1.f + expf(-x));
#endif
  }
  static RNN_HD double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
  static RNN_HD float tanh(float x) { return tanhf(x); }
  static RNN_HD double tanh(double x) { return ::tanh(x); }
};

// Forward of element (r, j): reads gx, gh (G gates, columns H apart), h (Gru) and c (Lstm); writes
// h', out, c' (Lstm) and, when p.ws, the workspace row's columns j, H + j, ...
template <typename M, Mode kMode, typename T>
RNN_HD void forward_element(const StepForward<T>& p, int64_t r, int64_t j) {
  using A = Acc<T>;
  const int64_t H = p.H, e = r * H + j;
  A h_new;
  if constexpr (kMode == Mode::Lstm) {
    const int64_t k = r * 4 * H + j;
    const A xi = to_acc(p.gx[k]) + to_acc(p.gh[k]);
    const A xf = to_acc(p.gx[k + H]) + to_acc(p.gh[k + H]);
    const A xg = to_acc(p.gx[k + 2 * H]) + to_acc(p.gh[k + 2 * H]);
    const A xo = to_acc(p.gx[k + 3 * H]) + to_acc(p.gh[k + 3 * H]);
    A i, f, g, o, c_new;
    rnn::lstm_forward<M>(xi, xf, xg, xo, to_acc(p.c[e]), i, f, g, o, c_new, h_new);
    store(p.c + e, c_new);
    if (p.ws) {
      T* w = p.ws + r * 5 * H + j;
      store(w, i), store(w + H, f), store(w + 2 * H, g), store(w + 3 * H, o), store(w + 4 * H, c_new);
    }
  } else if constexpr (kMode == Mode::Gru) {
    const int64_t k = r * 3 * H + j;
    const T hn = p.gh[k + 2 * H];
    A rg, z, n;
    rnn::gru_forward<M>(to_acc(p.gx[k]), to_acc(p.gx[k + H]), to_acc(p.gx[k + 2 * H]), to_acc(p.gh[k]),
                        to_acc(p.gh[k + H]), to_acc(hn), to_acc(p.h[e]), rg, z, n, h_new);
    if (p.ws) {
      T* w = p.ws + r * 4 * H + j;
      store(w, rg), store(w + H, z), store(w + 2 * H, n);
      w[3 * H] = hn;
    }
  } else {
    h_new = rnn::rnn_forward<M>(kMode == Mode::RnnRelu, to_acc(p.gx[e]) + to_acc(p.gh[e]));
  }
  store(p.h + e, h_new);
  store(p.out + e, h_new);
}

// Backward of element (r, j), with dh' = grad_out + dh (in): writes dgx (G gates); Lstm: dc (c's
// gradient); Gru: dgh and dh = dh' z. Lstm and the plain cells leave dh alone (the caller overwrites
// it) and do not touch dgh (it is dgx).
template <typename M, Mode kMode, typename T>
RNN_HD void backward_element(const StepBackward<T>& p, int64_t r, int64_t j) {
  using A = Acc<T>;
  const int64_t H = p.H, e = r * H + j;
  const A dh = to_acc(p.grad_out[e]) + to_acc(p.dh[e]);
  if constexpr (kMode == Mode::Lstm) {
    const T* w = p.ws + r * 5 * H + j;
    A dc = to_acc(p.dc[e]), d_i, d_f, d_g, d_o;
    rnn::lstm_backward<M>(dh, dc, to_acc(w[0]), to_acc(w[H]), to_acc(w[2 * H]), to_acc(w[3 * H]),
                          to_acc(w[4 * H]), to_acc(p.c_prev[e]), d_i, d_f, d_g, d_o);
    T* dgx = p.dgx + r * 4 * H + j;
    store(dgx, d_i), store(dgx + H, d_f), store(dgx + 2 * H, d_g), store(dgx + 3 * H, d_o);
    store(p.dc + e, dc);
  } else if constexpr (kMode == Mode::Gru) {
    const T* w = p.ws + r * 4 * H + j;
    const A rg = to_acc(w[0]);
    A d_xr, d_xz, d_xn, dh_direct;
    rnn::gru_backward<M>(dh, rg, to_acc(w[H]), to_acc(w[2 * H]), to_acc(w[3 * H]), to_acc(p.h_prev[e]), d_xr, d_xz,
                         d_xn, dh_direct);
    const int64_t k = r * 3 * H + j;
    store(p.dgx + k, d_xr), store(p.dgx + k + H, d_xz), store(p.dgx + k + 2 * H, d_xn);
    store(p.dgh + k, d_xr), store(p.dgh + k + H, d_xz), store(p.dgh + k + 2 * H, d_xn * rg);
    store(p.dh + e, dh_direct);
  } else {
    store(p.dgx + e, rnn::rnn_backward(kMode == Mode::RnnRelu, dh, to_acc(p.out[e])));
  }
}

// One thread's elements: rows r0, r0 + dr, ... < B by units j0, j0 + dj, ... < H.
template <typename M, Mode kMode, typename T>
RNN_HD void forward_thread(const StepForward<T>& p, int64_t j0, int64_t r0, int64_t dj, int64_t dr) {
  for (int64_t r = r0; r < p.B; r += dr)
    for (int64_t j = j0; j < p.H; j += dj) forward_element<M, kMode>(p, r, j);
}

template <typename M, Mode kMode, typename T>
RNN_HD void backward_thread(const StepBackward<T>& p, int64_t j0, int64_t r0, int64_t dj, int64_t dr) {
  for (int64_t r = r0; r < p.B; r += dr)
    for (int64_t j = j0; j < p.H; j += dj) backward_element<M, kMode>(p, r, j);
}

constexpr int kThreads = 256;
constexpr int kWarp = 32;

// The launch shape of a step of B rows and H units (B, H > 0): blocks of bx * by <= 256 threads,
// bx a multiple of 32 covering H in gx blocks, by rows per block; gy is capped at max_gy (the
// kernels loop over the rest).
struct Launch {
  unsigned gx, gy, bx, by;
};

inline Launch launch_of(int64_t B, int64_t H, int64_t max_gy = 65535) {
  const int64_t chunks = (H + kThreads - 1) / kThreads;
  const int64_t bx = ((H + chunks - 1) / chunks + kWarp - 1) / kWarp * kWarp;  // <= 256
  const int64_t by = kThreads / bx;
  return {unsigned(std::min<int64_t>(chunks, 0x7fffffff)), unsigned(std::min<int64_t>((B + by - 1) / by, max_gy)),
          unsigned(bx), unsigned(by)};
}

template <Mode kMode, typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(const StepForward<T> p) {
  forward_thread<DeviceMath, kMode>(p, blockIdx.x * int64_t(blockDim.x) + threadIdx.x,
                                    blockIdx.y * int64_t(blockDim.y) + threadIdx.y, int64_t(gridDim.x) * blockDim.x,
                                    int64_t(gridDim.y) * blockDim.y);
}

template <Mode kMode, typename T>
__global__ void __launch_bounds__(kThreads) backward_kernel(const StepBackward<T> p) {
  backward_thread<DeviceMath, kMode>(p, blockIdx.x * int64_t(blockDim.x) + threadIdx.x,
                                     blockIdx.y * int64_t(blockDim.y) + threadIdx.y, int64_t(gridDim.x) * blockDim.x,
                                     int64_t(gridDim.y) * blockDim.y);
}

// Calls f(std::integral_constant<Mode, m>{}).
template <typename F>
void with_mode(Mode m, F&& f) {
  switch (m) {
    case Mode::Lstm: f(std::integral_constant<Mode, Mode::Lstm>{}); break;
    case Mode::Gru: f(std::integral_constant<Mode, Mode::Gru>{}); break;
    case Mode::RnnTanh: f(std::integral_constant<Mode, Mode::RnnTanh>{}); break;
    case Mode::RnnRelu: f(std::integral_constant<Mode, Mode::RnnRelu>{}); break;
  }
}

}  // namespace rnn_k

template <typename T>
void rnn_forward_step(const rnn::StepForward<T>& p, cudaStream_t stream) {
  if (p.B <= 0 || p.H <= 0) return;
  const rnn_k::Launch l = rnn_k::launch_of(p.B, p.H);
  rnn_k::with_mode(p.mode, [&](auto mc) {
    rnn_k::forward_kernel<decltype(mc)::value, T><<<dim3(l.gx, l.gy), dim3(l.bx, l.by), 0, stream>>>(p);
  });
}

template <typename T>
void rnn_backward_step(const rnn::StepBackward<T>& p, cudaStream_t stream) {
  if (p.B <= 0 || p.H <= 0) return;
  const rnn_k::Launch l = rnn_k::launch_of(p.B, p.H);
  rnn_k::with_mode(p.mode, [&](auto mc) {
    rnn_k::backward_kernel<decltype(mc)::value, T><<<dim3(l.gx, l.gy), dim3(l.bx, l.by), 0, stream>>>(p);
  });
}

#define FASTDL_RNN_INSTANTIATE(T)                                                    \
  template void rnn_forward_step<T>(const rnn::StepForward<T>&, cudaStream_t);       \
  template void rnn_backward_step<T>(const rnn::StepBackward<T>&, cudaStream_t);

FASTDL_RNN_INSTANTIATE(float)
FASTDL_RNN_INSTANTIATE(double)
FASTDL_RNN_INSTANTIATE(__half)
FASTDL_RNN_INSTANTIATE(__nv_bfloat16)

#undef FASTDL_RNN_INSTANTIATE

}  // namespace fastdl::cuda
