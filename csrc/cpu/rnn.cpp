// Recurrent cells on the CPU: one time step's fused pointwise kernels (csrc/rnn.h), the element math
// of csrc/rnn_cell.h with the vectorizable activations of vec_math.h. Each kernel walks a step's
// rows in column blocks; the inner loop over a block's units is an `omp simd` loop (vectorized for
// -march), and the blocks are split over OpenMP threads when the step is big enough to pay for it.
#include "cpu/rnn.h"

#include <omp.h>

#include <algorithm>
#include <cstdint>

#include "cpu/simd.h"
#include "cpu/vec_math.h"
#include "rnn_cell.h"

namespace fastdl::cpu::FASTDL_ISA {
namespace {

using rnn::Mode;
using rnn::StepBackward;
using rnn::StepForward;
using M = VecMath;

// Columns per work item (a multiple of every vector width).
constexpr int64_t kBlock = 1024;

// When a step is worth a parallel region: its elements times a kernel's cost per element (relative
// units, ~0.15 ns each serial with AVX-512: LSTM forward ~3 ns per element, the plain cells'
// backward ~0.15 ns, memory bound) reach kParallelMin, ~5 us of serial work. Below it the fork /
// join (~1-3 us on 2 threads, measured) eats the gain. At B = 64, H = 512 every kernel splits.
constexpr int64_t kParallelMin = 32768;
constexpr int64_t cost_forward(Mode m) {
  return m == Mode::Lstm ? 16 : m == Mode::Gru ? 10 : m == Mode::RnnTanh ? 3 : 1;
}
constexpr int64_t cost_backward(Mode m) { return m == Mode::Lstm ? 6 : m == Mode::Gru ? 4 : 1; }

// Calls body(r, j0, j1) for columns [j0, j1) of row r, over all of the step's B x H elements.
template <typename F>
void for_blocks(int64_t B, int64_t H, int64_t cost, const F& body) {
  const int64_t per_row = (H + kBlock - 1) / kBlock, items = B * per_row;
  const auto run = [&](int64_t k) {
    const int64_t r = k / per_row, j0 = k % per_row * kBlock;
    body(r, j0, std::min(H, j0 + kBlock));
  };
  if (B * H * cost < kParallelMin || items < 2 || omp_get_max_threads() < 2 || omp_in_parallel()) {
    for (int64_t k = 0; k < items; ++k) run(k);
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t k = 0; k < items; ++k) run(k);
}

// ---------------------------------------------------------------------------------------------
// Forward

template <bool kSave, typename T>
void lstm_forward_block(const StepForward<T>& p, int64_t r, int64_t j0, int64_t j1) {
  const int64_t H = p.H;
  const T* gx = p.gx + r * 4 * H;
  const T* gh = p.gh + r * 4 * H;
  T *h = p.h + r * H, *c = p.c + r * H, *out = p.out + r * H;
  T* ws = kSave ? p.ws + r * 5 * H : nullptr;
#pragma omp simd
  for (int64_t j = j0; j < j1; ++j) {
    T i, f, g, o, c_new, h_new;
    rnn::lstm_forward<M, T>(gx[j] + gh[j], gx[H + j] + gh[H + j], gx[2 * H + j] + gh[2 * H + j],
                            gx[3 * H + j] + gh[3 * H + j], c[j], i, f, g, o, c_new, h_new);
    if constexpr (kSave) {
      ws[j] = i, ws[H + j] = f, ws[2 * H + j] = g, ws[3 * H + j] = o, ws[4 * H + j] = c_new;
    }
    c[j] = c_new, h[j] = h_new, out[j] = h_new;
  }
}

template <bool kSave, typename T>
void gru_forward_block(const StepForward<T>& p, int64_t r, int64_t j0, int64_t j1) {
  const int64_t H = p.H;
  const T* gx = p.gx + r * 3 * H;
  const T* gh = p.gh + r * 3 * H;
  T *h = p.h + r * H, *out = p.out + r * H;
  T* ws = kSave ? p.ws + r * 4 * H : nullptr;
#pragma omp simd
  for (int64_t j = j0; j < j1; ++j) {
    T rr, z, n, h_new;
    const T hn = gh[2 * H + j];
    rnn::gru_forward<M, T>(gx[j], gx[H + j], gx[2 * H + j], gh[j], gh[H + j], hn, h[j], rr, z, n, h_new);
    if constexpr (kSave) {
      ws[j] = rr, ws[H + j] = z, ws[2 * H + j] = n, ws[3 * H + j] = hn;
    }
    h[j] = h_new, out[j] = h_new;
  }
}

template <bool kRelu, typename T>
void rnn_forward_block(const StepForward<T>& p, int64_t r, int64_t j0, int64_t j1) {
  const int64_t H = p.H;
  const T *gx = p.gx + r * H, *gh = p.gh + r * H;
  T *h = p.h + r * H, *out = p.out + r * H;
#pragma omp simd
  for (int64_t j = j0; j < j1; ++j) {
    const T h_new = rnn::rnn_forward<M, T>(kRelu, gx[j] + gh[j]);
    h[j] = h_new, out[j] = h_new;
  }
}

// ---------------------------------------------------------------------------------------------
// Backward

template <typename T>
void lstm_backward_block(const StepBackward<T>& p, int64_t r, int64_t j0, int64_t j1) {
  const int64_t H = p.H;
  const T *go = p.grad_out + r * H, *dh = p.dh + r * H, *c_prev = p.c_prev + r * H;
  const T* ws = p.ws + r * 5 * H;
  T *dc = p.dc + r * H, *dgx = p.dgx + r * 4 * H;
#pragma omp simd
  for (int64_t j = j0; j < j1; ++j) {
    T d_i, d_f, d_g, d_o, dcj = dc[j];
    rnn::lstm_backward<M, T>(go[j] + dh[j], dcj, ws[j], ws[H + j], ws[2 * H + j], ws[3 * H + j], ws[4 * H + j],
                             c_prev[j], d_i, d_f, d_g, d_o);
    dc[j] = dcj;
    dgx[j] = d_i, dgx[H + j] = d_f, dgx[2 * H + j] = d_g, dgx[3 * H + j] = d_o;
  }
}

template <typename T>
void gru_backward_block(const StepBackward<T>& p, int64_t r, int64_t j0, int64_t j1) {
  const int64_t H = p.H;
  const T *go = p.grad_out + r * H, *h_prev = p.h_prev + r * H;
  const T* ws = p.ws + r * 4 * H;
  T *dh = p.dh + r * H, *dgx = p.dgx + r * 3 * H, *dgh = p.dgh + r * 3 * H;
#pragma omp simd
  for (int64_t j = j0; j < j1; ++j) {
    T d_xr, d_xz, d_xn, dh_direct;
    const T rr = ws[j];
    rnn::gru_backward<M, T>(go[j] + dh[j], rr, ws[H + j], ws[2 * H + j], ws[3 * H + j], h_prev[j], d_xr, d_xz, d_xn,
                            dh_direct);
    dgx[j] = d_xr, dgx[H + j] = d_xz, dgx[2 * H + j] = d_xn;
    dgh[j] = d_xr, dgh[H + j] = d_xz, dgh[2 * H + j] = d_xn * rr;
    dh[j] = dh_direct;
  }
}

template <bool kRelu, typename T>
void rnn_backward_block(const StepBackward<T>& p, int64_t r, int64_t j0, int64_t j1) {
  const int64_t H = p.H;
  const T *go = p.grad_out + r * H, *dh = p.dh + r * H, *out = p.out + r * H;
  T* dgx = p.dgx + r * H;
#pragma omp simd
  for (int64_t j = j0; j < j1; ++j) dgx[j] = rnn::rnn_backward<T>(kRelu, go[j] + dh[j], out[j]);
}

}  // namespace

template <typename T>
void rnn_forward_step(const StepForward<T>& p) {
  const auto run = [&](auto block) {
    for_blocks(p.B, p.H, cost_forward(p.mode), [&](int64_t r, int64_t j0, int64_t j1) { block(p, r, j0, j1); });
  };
  const bool save = p.ws != nullptr;
  switch (p.mode) {
    case Mode::Lstm: save ? run(lstm_forward_block<true, T>) : run(lstm_forward_block<false, T>); break;
    case Mode::Gru: save ? run(gru_forward_block<true, T>) : run(gru_forward_block<false, T>); break;
    case Mode::RnnTanh: run(rnn_forward_block<false, T>); break;
    case Mode::RnnRelu: run(rnn_forward_block<true, T>); break;
  }
}

template <typename T>
void rnn_backward_step(const StepBackward<T>& p) {
  const auto run = [&](auto block) {
    for_blocks(p.B, p.H, cost_backward(p.mode), [&](int64_t r, int64_t j0, int64_t j1) { block(p, r, j0, j1); });
  };
  switch (p.mode) {
    case Mode::Lstm: run(lstm_backward_block<T>); break;
    case Mode::Gru: run(gru_backward_block<T>); break;
    case Mode::RnnTanh: run(rnn_backward_block<false, T>); break;
    case Mode::RnnRelu: run(rnn_backward_block<true, T>); break;
  }
}

template void rnn_forward_step<float>(const StepForward<float>&);
template void rnn_forward_step<double>(const StepForward<double>&);
template void rnn_backward_step<float>(const StepBackward<float>&);
template void rnn_backward_step<double>(const StepBackward<double>&);

}  // namespace fastdl::cpu::FASTDL_ISA
