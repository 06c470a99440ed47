// Depthwise conv2d on CUDA: forward (with the bias / folded batch norm / activation epilogue),
// grad_x and a deterministic grad_weight, for NCHW and channels_last (NHWC) tensors.
//
// Every pass stages its input tile (with halo) in shared memory:
// - forward, NCHW: a block of 32 x 8 threads computes a tile of 32 x TOH outputs of one (n, o)
//   plane; thread (tx, ty) owns output column tx and rows ty, ty + 8, ...
// - forward, channels_last: lane tx of a 32 x 8 block owns output channel o0 + tx (coalesced along
//   channels) over a TOH x TOW tile of positions, shared by the 8 rows of threads.
// - grad_x ("gather" form, deterministic): each thread owns input elements and sums grad_out over
//   the taps whose output position is integral and in range, in the same two layouts (an input tile
//   per block; the grad_out tile that reaches it is staged in shared memory, one multiplier at a time).
// - grad_weight: stage 1 gives each block one output channel (NCHW) or 32 of them (channels_last)
//   and a fixed slice of the N * OH * OW positions, and writes the block's sums to the workspace;
//   stage 2 adds the slices of each weight in slice order. No atomics: results are bitwise
//   reproducible for a given shape.
// Kernel sizes 3, 5 and 7 (square) are template parameters (weights and per-tap sums in registers);
// every other size takes the runtime-size path (K = 0). When a tile does not fit in 48 KiB of shared
// memory (large kernel reach or strides), forward and grad_x fall back to one thread per element.
//
// The per-block work is written as __host__ __device__ "phase" functions (load a tile, compute from
// it) separated by __syncthreads() in the kernels, so the index math can be exercised on the host.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cuda/depthwise_conv2d.h"
#include "cuda/element_types.cuh"

#define DW_HD __host__ __device__ __forceinline__

namespace fastdl::cuda {
namespace dw {

using depthwise::Act;
using depthwise::BackwardParams;
using depthwise::ForwardParams;
using depthwise::Shape;

constexpr int kLanes = 32;                 // blockDim.x: output columns (NCHW) or channels (NHWC)
constexpr int kRows = 8;                   // blockDim.y
constexpr int kThreads = kLanes * kRows;   // 256
constexpr size_t kSmemBudget = 48 * 1024;  // dynamic shared memory without an opt-in

// The conv geometry in 32-bit ints (the API checks that the sizes fit); offsets into tensors are
// formed in 64 bits.
struct Geo {
  int H, W, OH, OW, KH, KW, sh, sw, ph, pw, dh, dw;
};

DW_HD Geo geo_of(const Shape& s) {
  return {int(s.H),  int(s.W),  int(s.OH),       int(s.OW),       int(s.KH),    int(s.KW),
          int(s.stride_h), int(s.stride_w), int(s.pad_h), int(s.pad_w), int(s.dil_h), int(s.dil_w)};
}

DW_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
DW_HD int ceil_div(int a, int b) { return (a + b - 1) / b; }  // a >= 0, b > 0
DW_HD int floor_div(int a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }  // b > 0

// Forward, along one axis: the inputs read by `t` consecutive outputs (stride s, kernel k,
// dilation d): from (first output) * s - pad, (t - 1) * s + (k - 1) * d + 1 of them.
// (Templated so that the launchers can size tiles in 64 bits before knowing that they are small.)
template <typename I>
DW_HD I fwd_span(I t, I k, I s, I d) {
  return (t - 1) * s + (k - 1) * d + 1;
}

// Gather, along one axis: input i receives output o through tap k when o * s = i + pad - k * d.
// For the inputs [i0, i0 + t), every such o lies in [gather_base, gather_base + gather_span).
DW_HD int gather_base(int i0, int k, int s, int pad, int d) { return floor_div(i0 + pad - (k - 1) * d, s); }
template <typename I>
DW_HD I gather_span(I t, I k, I s, I d) {
  return (t - 1 + (k - 1) * d + s - 1) / s + 1;  // ceil((t - 1 + (k - 1) * d) / s) + 1
}
// With off = i + pad - base * s (>= (k - 1) * d >= tap * d): is off - tap * d on the output grid,
// and which local output is it.
DW_HD bool on_grid(int u, int s) { return s == 1 || u % s == 0; }
DW_HD int grid_index(int u, int s) { return s == 1 ? u : u / s; }

// The filter of one channel. K > 0: a K x K filter held in registers; K == 0: any KH x KW, read
// from memory. dot() sums in[kh * rs + kw * cs] * w[kh][kw] (the forward taps); gather() sums the
// taps of the gather form over a grad_out tile (offh, offw as in on_grid).
template <int K, typename T>
struct Filter {
  using A = Acc<T>;
  A w[K * K];
  DW_HD void load(const T* wp, int, int) {
#pragma unroll
    for (int i = 0; i < K * K; ++i) w[i] = to_acc(wp[i]);
  }
  DW_HD A dot(const A* in, int rs, int cs) const {
    A acc = 0;
#pragma unroll
    for (int kh = 0; kh < K; ++kh)
#pragma unroll
      for (int kw = 0; kw < K; ++kw) acc += in[kh * rs + kw * cs] * w[kh * K + kw];
    return acc;
  }
  DW_HD A gather(const A* go, int rs, int cs, int offh, int offw, const Geo& g) const {
    bool col_ok[K];
    int col[K];
#pragma unroll
    for (int kw = 0; kw < K; ++kw) {
      const int u = offw - kw * g.dw;
      col_ok[kw] = on_grid(u, g.sw);
      col[kw] = grid_index(u, g.sw) * cs;
    }
    A acc = 0;
#pragma unroll
    for (int kh = 0; kh < K; ++kh) {
      const int u = offh - kh * g.dh;
      if (!on_grid(u, g.sh)) continue;
      const A* row = go + grid_index(u, g.sh) * rs;
#pragma unroll
      for (int kw = 0; kw < K; ++kw)
        if (col_ok[kw]) acc += row[col[kw]] * w[kh * K + kw];
    }
    return acc;
  }
};

template <typename T>
struct Filter<0, T> {
  using A = Acc<T>;
  const T* w;
  int KH, KW;
  DW_HD void load(const T* wp, int kh, int kw) { w = wp, KH = kh, KW = kw; }
  DW_HD A dot(const A* in, int rs, int cs) const {
    A acc = 0;
    for (int kh = 0; kh < KH; ++kh)
      for (int kw = 0; kw < KW; ++kw) acc += in[kh * rs + kw * cs] * to_acc(w[kh * KW + kw]);
    return acc;
  }
  DW_HD A gather(const A* go, int rs, int cs, int offh, int offw, const Geo& g) const {
    A acc = 0;
    for (int kh = 0; kh < KH; ++kh) {
      const int u = offh - kh * g.dh;
      if (!on_grid(u, g.sh)) continue;
      const A* row = go + grid_index(u, g.sh) * rs;
      for (int kw = 0; kw < KW; ++kw) {
        const int v = offw - kw * g.dw;
        if (on_grid(v, g.sw)) acc += row[grid_index(v, g.sw) * cs] * to_acc(w[kh * KW + kw]);
      }
    }
    return acc;
  }
};

// y = act((v + bias) * scale + shift); NaN stays NaN through relu / relu6 (as in PyTorch).
template <typename A>
struct Epilogue {
  A bias, scale, shift;
  Act act;
  DW_HD A operator()(A v) const {
    v = (v + bias) * scale + shift;
    if (act == Act::Relu) v = v < A(0) ? A(0) : v;
    if (act == Act::Relu6) v = v < A(0) ? A(0) : (v > A(6) ? A(6) : v);
    return v;
  }
};

template <typename T>
DW_HD Epilogue<Acc<T>> epilogue_of(const ForwardParams<T>& p, int64_t o) {
  using A = Acc<T>;
  return {p.bias ? to_acc(p.bias[o]) : A(0), p.scale ? to_acc(p.scale[o]) : A(1),
          p.shift ? to_acc(p.shift[o]) : A(0), p.act};
}

// ---------------------------------------------------------------------------------------------
// Forward, NCHW. Block: the 32 x toh outputs at (oh0, ow0) of plane (n, o) = (plane / Cout,
// plane % Cout). Shared: the input tile fwd_span(toh) x fwd_span(32) of channel o / mult.

struct FwdNchwTile {
  int toh, in_h, in_w;
  DW_HD static FwdNchwTile make(const Geo& g, int toh) {
    return {toh, fwd_span(toh, g.KH, g.sh, g.dh), fwd_span(kLanes, g.KW, g.sw, g.dw)};
  }
  DW_HD int elems() const { return in_h * in_w; }
};

template <typename T>
DW_HD void fwd_nchw_load(const ForwardParams<T>& p, const Geo& g, const FwdNchwTile& t, int64_t plane, int oh0,
                         int ow0, int tid, Acc<T>* tile) {
  const int64_t Cout = p.s.C * p.s.mult;
  const int64_t n = plane / Cout, c = plane % Cout / p.s.mult;
  const T* xp = p.x + (n * p.s.C + c) * g.H * int64_t(g.W);
  const int ih0 = oh0 * g.sh - g.ph, iw0 = ow0 * g.sw - g.pw;
  for (int i = tid; i < t.elems(); i += kThreads) {
    const int r = i / t.in_w, col = i - r * t.in_w;
    const int ih = ih0 + r, iw = iw0 + col;
    tile[i] = ih >= 0 && ih < g.H && iw >= 0 && iw < g.W ? to_acc(xp[int64_t(ih) * g.W + iw]) : Acc<T>(0);
  }
}

template <int K, typename T>
DW_HD void fwd_nchw_compute(const ForwardParams<T>& p, const Geo& g, const FwdNchwTile& t, int64_t plane, int oh0,
                            int ow0, int tx, int ty, const Acc<T>* tile) {
  const int ow = ow0 + tx;
  if (ow >= g.OW) return;
  const int64_t o = plane % (p.s.C * p.s.mult);
  Filter<K, T> f;
  f.load(p.weight + o * g.KH * g.KW, g.KH, g.KW);
  const auto epi = epilogue_of(p, o);
  T* yp = p.y + plane * g.OH * int64_t(g.OW);
  for (int r = ty; r < t.toh && oh0 + r < g.OH; r += kRows) {
    const Acc<T> v = f.dot(tile + r * g.sh * t.in_w + tx * g.sw, g.dh * t.in_w, g.dw);
    store(yp + int64_t(oh0 + r) * g.OW + ow, epi(v));
  }
}

template <typename T, int K>
__global__ void __launch_bounds__(kThreads) fwd_nchw_kernel(const ForwardParams<T> p, int toh, int tiles_w) {
  extern __shared__ __align__(16) unsigned char smem[];
  Acc<T>* tile = reinterpret_cast<Acc<T>*>(smem);
  const Geo g = geo_of(p.s);
  const FwdNchwTile t = FwdNchwTile::make(g, toh);
  const int64_t tiles = int64_t(tiles_w) * ceil_div(g.OH, toh), planes = p.s.N * p.s.C * p.s.mult;
  const int tid = threadIdx.y * kLanes + threadIdx.x;
  for (int64_t b = blockIdx.x; b < tiles; b += gridDim.x) {
    const int oh0 = int(b / tiles_w) * toh, ow0 = int(b % tiles_w) * kLanes;
    for (int64_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
      fwd_nchw_load(p, g, t, plane, oh0, ow0, tid, tile);
      __syncthreads();
      fwd_nchw_compute<K>(p, g, t, plane, oh0, ow0, threadIdx.x, threadIdx.y, tile);
      __syncthreads();
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward, channels_last. Block: output channels [o0, o0 + 32) (lane tx: o0 + tx) at the toh x tow
// positions from (oh0, ow0) of image n. Shared: tile[in position][lane] = x[n, ., ., (o0 + lane) / mult].

struct ClTile {  // a th x tw tile of positions and the in_h x in_w tile (per lane) it reads
  int th, tw, in_h, in_w;
  DW_HD int elems() const { return in_h * in_w; }
};

DW_HD ClTile fwd_cl_tile(const Geo& g, int th, int tw) {
  return {th, tw, fwd_span(th, g.KH, g.sh, g.dh), fwd_span(tw, g.KW, g.sw, g.dw)};
}

template <typename T>
DW_HD void fwd_cl_load(const ForwardParams<T>& p, const Geo& g, const ClTile& t, int64_t n, int oh0, int ow0,
                       int64_t o0, int tx, int ty, Acc<T>* tile) {
  const int64_t o = o0 + tx, C = p.s.C;
  const bool live = o < C * p.s.mult;
  const int64_t c = live ? o / p.s.mult : 0;
  const int ih0 = oh0 * g.sh - g.ph, iw0 = ow0 * g.sw - g.pw;
  for (int i = ty; i < t.elems(); i += kRows) {
    const int r = i / t.in_w, col = i - r * t.in_w;
    const int ih = ih0 + r, iw = iw0 + col;
    const bool in = live && ih >= 0 && ih < g.H && iw >= 0 && iw < g.W;
    tile[i * kLanes + tx] = in ? to_acc(p.x[((n * g.H + ih) * g.W + iw) * C + c]) : Acc<T>(0);
  }
}

template <int K, typename T>
DW_HD void fwd_cl_compute(const ForwardParams<T>& p, const Geo& g, const ClTile& t, int64_t n, int oh0, int ow0,
                          int64_t o0, int tx, int ty, const Acc<T>* tile) {
  const int64_t o = o0 + tx, Cout = p.s.C * p.s.mult;
  if (o >= Cout) return;
  Filter<K, T> f;
  f.load(p.weight + o * g.KH * g.KW, g.KH, g.KW);
  const auto epi = epilogue_of(p, o);
  for (int q = ty; q < t.th * t.tw; q += kRows) {
    const int r = q / t.tw, col = q - r * t.tw;
    const int oh = oh0 + r, ow = ow0 + col;
    if (oh >= g.OH || ow >= g.OW) continue;
    const Acc<T> v = f.dot(tile + ((r * g.sh) * t.in_w + col * g.sw) * kLanes + tx, g.dh * t.in_w * kLanes,
                           g.dw * kLanes);
    store(p.y + ((n * g.OH + oh) * g.OW + ow) * Cout + o, epi(v));
  }
}

template <typename T, int K>
__global__ void __launch_bounds__(kThreads) fwd_cl_kernel(const ForwardParams<T> p, int th, int tw) {
  extern __shared__ __align__(16) unsigned char smem[];
  Acc<T>* tile = reinterpret_cast<Acc<T>*>(smem);
  const Geo g = geo_of(p.s);
  const ClTile t = fwd_cl_tile(g, th, tw);
  const int tiles_h = ceil_div(g.OH, th), tiles_w = ceil_div(g.OW, tw);
  const int64_t items = p.s.N * tiles_h * tiles_w;
  const int64_t chunks = (p.s.C * p.s.mult + kLanes - 1) / kLanes;
  for (int64_t b = blockIdx.x; b < items; b += gridDim.x) {
    const int64_t n = b / (int64_t(tiles_h) * tiles_w);
    const int rem = int(b - n * tiles_h * tiles_w);
    const int oh0 = rem / tiles_w * th, ow0 = rem % tiles_w * tw;
    for (int64_t ch = blockIdx.y; ch < chunks; ch += gridDim.y) {
      fwd_cl_load(p, g, t, n, oh0, ow0, ch * kLanes, threadIdx.x, threadIdx.y, tile);
      __syncthreads();
      fwd_cl_compute<K>(p, g, t, n, oh0, ow0, ch * kLanes, threadIdx.x, threadIdx.y, tile);
      __syncthreads();
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward, any layout, one thread per output (when no tile fits in shared memory).

template <typename T>
DW_HD void fwd_direct_element(const ForwardParams<T>& p, const Geo& g, int64_t e) {
  const int64_t Cout = p.s.C * p.s.mult;
  int64_t n, o;
  int oh, ow;
  if (p.s.channels_last) {
    o = e % Cout;
    const int64_t pos = e / Cout;
    ow = int(pos % g.OW), oh = int(pos / g.OW % g.OH), n = pos / g.OW / g.OH;
  } else {
    ow = int(e % g.OW), oh = int(e / g.OW % g.OH);
    const int64_t plane = e / g.OW / g.OH;
    o = plane % Cout, n = plane / Cout;
  }
  const int64_t c = o / p.s.mult;
  const T* w = p.weight + o * g.KH * g.KW;
  Acc<T> acc = 0;
  for (int kh = 0; kh < g.KH; ++kh) {
    const int ih = oh * g.sh - g.ph + kh * g.dh;
    if (ih < 0 || ih >= g.H) continue;
    for (int kw = 0; kw < g.KW; ++kw) {
      const int iw = ow * g.sw - g.pw + kw * g.dw;
      if (iw < 0 || iw >= g.W) continue;
      const int64_t xi = p.s.channels_last ? ((n * g.H + ih) * g.W + iw) * p.s.C + c
                                           : ((n * p.s.C + c) * g.H + ih) * g.W + iw;
      acc += to_acc(p.x[xi]) * to_acc(w[kh * g.KW + kw]);
    }
  }
  store(p.y + e, epilogue_of(p, o)(acc));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) fwd_direct_kernel(const ForwardParams<T> p, int64_t count) {
  const Geo g = geo_of(p.s);
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < count; e += int64_t(gridDim.x) * blockDim.x)
    fwd_direct_element(p, g, e);
}

// ---------------------------------------------------------------------------------------------
// grad_x, NCHW. Block: the 32 x tih inputs at (ih0, iw0) of plane (n, c); for each multiplier m it
// stages the grad_out tile of plane (n, c * mult + m) that reaches them (zeros outside the output),
// and each thread adds the taps of its inputs into `sum` (its own entries; kept in shared memory
// across the multipliers when mult > 1).

struct GatherTile {  // inputs ti_h x ti_w from (ih0, iw0); grad_out rows/cols from (bh, bw)
  int ti_h, ti_w, go_h, go_w;
  DW_HD int elems() const { return go_h * go_w; }
};

DW_HD GatherTile gather_tile(const Geo& g, int ti_h, int ti_w) {
  return {ti_h, ti_w, gather_span(ti_h, g.KH, g.sh, g.dh), gather_span(ti_w, g.KW, g.sw, g.dw)};
}

template <typename T>
DW_HD void gx_nchw_load(const BackwardParams<T>& p, const Geo& g, const GatherTile& t, int64_t n, int64_t c,
                        int64_t m, int ih0, int iw0, int tid, Acc<T>* tile) {
  const int64_t Cout = p.s.C * p.s.mult;
  const T* gp = p.grad_out + (n * Cout + c * p.s.mult + m) * g.OH * int64_t(g.OW);
  const int bh = gather_base(ih0, g.KH, g.sh, g.ph, g.dh), bw = gather_base(iw0, g.KW, g.sw, g.pw, g.dw);
  for (int i = tid; i < t.elems(); i += kThreads) {
    const int r = i / t.go_w, col = i - r * t.go_w;
    const int oh = bh + r, ow = bw + col;
    tile[i] = oh >= 0 && oh < g.OH && ow >= 0 && ow < g.OW ? to_acc(gp[int64_t(oh) * g.OW + ow]) : Acc<T>(0);
  }
}

template <int K, typename T>
DW_HD void gx_nchw_compute(const BackwardParams<T>& p, const Geo& g, const GatherTile& t, int64_t n, int64_t c,
                           int64_t m, int ih0, int iw0, int tx, int ty, const Acc<T>* tile, Acc<T>* sum) {
  const int iw = iw0 + tx;
  if (iw >= g.W) return;
  const int64_t o = c * p.s.mult + m;
  const bool first = m == 0, last = m == p.s.mult - 1;
  Filter<K, T> f;
  f.load(p.weight + o * g.KH * g.KW, g.KH, g.KW);
  const int bh = gather_base(ih0, g.KH, g.sh, g.ph, g.dh), bw = gather_base(iw0, g.KW, g.sw, g.pw, g.dw);
  const int offw = iw + g.pw - bw * g.sw;
  for (int r = ty; r < t.ti_h && ih0 + r < g.H; r += kRows) {
    const int offh = ih0 + r + g.ph - bh * g.sh;
    Acc<T> v = f.gather(tile, t.go_w, 1, offh, offw, g);
    const int si = r * kLanes + tx;
    if (!first) v = sum[si] + v;
    if (last)
      store(p.grad_x + ((n * p.s.C + c) * g.H + ih0 + r) * g.W + iw, v);
    else
      sum[si] = v;
  }
}

template <typename T, int K>
__global__ void __launch_bounds__(kThreads) gx_nchw_kernel(const BackwardParams<T> p, int tih, int tiles_w) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Geo g = geo_of(p.s);
  const GatherTile t = gather_tile(g, tih, kLanes);
  Acc<T>* tile = reinterpret_cast<Acc<T>*>(smem);
  Acc<T>* sum = tile + t.elems();
  const int64_t tiles = int64_t(tiles_w) * ceil_div(g.H, tih), planes = p.s.N * p.s.C;
  const int tid = threadIdx.y * kLanes + threadIdx.x;
  for (int64_t b = blockIdx.x; b < tiles; b += gridDim.x) {
    const int ih0 = int(b / tiles_w) * tih, iw0 = int(b % tiles_w) * kLanes;
    for (int64_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
      const int64_t n = plane / p.s.C, c = plane - n * p.s.C;
      for (int64_t m = 0; m < p.s.mult; ++m) {
        gx_nchw_load(p, g, t, n, c, m, ih0, iw0, tid, tile);
        __syncthreads();
        gx_nchw_compute<K>(p, g, t, n, c, m, ih0, iw0, threadIdx.x, threadIdx.y, tile, sum);
        __syncthreads();
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// grad_x, channels_last. Block: input channels [c0, c0 + 32) (lane tx: c0 + tx) at the tih x tiw
// positions from (ih0, iw0) of image n; per multiplier m, tile[go position][lane] =
// grad_out[n, ., ., (c0 + lane) * mult + m].

template <typename T>
DW_HD void gx_cl_load(const BackwardParams<T>& p, const Geo& g, const GatherTile& t, int64_t n, int64_t m, int ih0,
                      int iw0, int64_t c0, int tx, int ty, Acc<T>* tile) {
  const int64_t c = c0 + tx, Cout = p.s.C * p.s.mult;
  const bool live = c < p.s.C;
  const int64_t o = c * p.s.mult + m;
  const int bh = gather_base(ih0, g.KH, g.sh, g.ph, g.dh), bw = gather_base(iw0, g.KW, g.sw, g.pw, g.dw);
  for (int i = ty; i < t.elems(); i += kRows) {
    const int r = i / t.go_w, col = i - r * t.go_w;
    const int oh = bh + r, ow = bw + col;
    const bool in = live && oh >= 0 && oh < g.OH && ow >= 0 && ow < g.OW;
    tile[i * kLanes + tx] = in ? to_acc(p.grad_out[((n * g.OH + oh) * g.OW + ow) * Cout + o]) : Acc<T>(0);
  }
}

template <int K, typename T>
DW_HD void gx_cl_compute(const BackwardParams<T>& p, const Geo& g, const GatherTile& t, int64_t n, int64_t m, int ih0,
                         int iw0, int64_t c0, int tx, int ty, const Acc<T>* tile, Acc<T>* sum) {
  const int64_t c = c0 + tx;
  if (c >= p.s.C) return;
  const int64_t o = c * p.s.mult + m;
  const bool first = m == 0, last = m == p.s.mult - 1;
  Filter<K, T> f;
  f.load(p.weight + o * g.KH * g.KW, g.KH, g.KW);
  const int bh = gather_base(ih0, g.KH, g.sh, g.ph, g.dh), bw = gather_base(iw0, g.KW, g.sw, g.pw, g.dw);
  for (int q = ty; q < t.ti_h * t.ti_w; q += kRows) {
    const int r = q / t.ti_w, col = q - r * t.ti_w;
    const int ih = ih0 + r, iw = iw0 + col;
    if (ih >= g.H || iw >= g.W) continue;
    Acc<T> v = f.gather(tile + tx, t.go_w * kLanes, kLanes, ih + g.ph - bh * g.sh, iw + g.pw - bw * g.sw, g);
    const int si = q * kLanes + tx;
    if (!first) v = sum[si] + v;
    if (last)
      store(p.grad_x + ((n * g.H + ih) * g.W + iw) * p.s.C + c, v);
    else
      sum[si] = v;
  }
}

template <typename T, int K>
__global__ void __launch_bounds__(kThreads) gx_cl_kernel(const BackwardParams<T> p, int th, int tw) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Geo g = geo_of(p.s);
  const GatherTile t = gather_tile(g, th, tw);
  Acc<T>* tile = reinterpret_cast<Acc<T>*>(smem);
  Acc<T>* sum = tile + t.elems() * kLanes;
  const int tiles_h = ceil_div(g.H, th), tiles_w = ceil_div(g.W, tw);
  const int64_t items = p.s.N * tiles_h * tiles_w, chunks = (p.s.C + kLanes - 1) / kLanes;
  for (int64_t b = blockIdx.x; b < items; b += gridDim.x) {
    const int64_t n = b / (int64_t(tiles_h) * tiles_w);
    const int rem = int(b - n * tiles_h * tiles_w);
    const int ih0 = rem / tiles_w * th, iw0 = rem % tiles_w * tw;
    for (int64_t ch = blockIdx.y; ch < chunks; ch += gridDim.y) {
      for (int64_t m = 0; m < p.s.mult; ++m) {
        gx_cl_load(p, g, t, n, m, ih0, iw0, ch * kLanes, threadIdx.x, threadIdx.y, tile);
        __syncthreads();
        gx_cl_compute<K>(p, g, t, n, m, ih0, iw0, ch * kLanes, threadIdx.x, threadIdx.y, tile, sum);
        __syncthreads();
      }
    }
  }
}

// grad_x, any layout, one thread per input element (when no tile fits in shared memory).
template <typename T>
DW_HD void gx_direct_element(const BackwardParams<T>& p, const Geo& g, int64_t e) {
  const int64_t C = p.s.C, Cout = C * p.s.mult;
  int64_t n, c;
  int ih, iw;
  if (p.s.channels_last) {
    c = e % C;
    const int64_t pos = e / C;
    iw = int(pos % g.W), ih = int(pos / g.W % g.H), n = pos / g.W / g.H;
  } else {
    iw = int(e % g.W), ih = int(e / g.W % g.H);
    const int64_t plane = e / g.W / g.H;
    c = plane % C, n = plane / C;
  }
  Acc<T> acc = 0;
  for (int64_t m = 0; m < p.s.mult; ++m) {
    const int64_t o = c * p.s.mult + m;
    const T* w = p.weight + o * g.KH * g.KW;
    for (int kh = 0; kh < g.KH; ++kh) {
      const int u = ih + g.ph - kh * g.dh;  // = oh * sh
      if (u < 0 || u % g.sh != 0 || u / g.sh >= g.OH) continue;
      const int oh = u / g.sh;
      for (int kw = 0; kw < g.KW; ++kw) {
        const int v = iw + g.pw - kw * g.dw;
        if (v < 0 || v % g.sw != 0 || v / g.sw >= g.OW) continue;
        const int ow = v / g.sw;
        const int64_t gi = p.s.channels_last ? ((n * g.OH + oh) * g.OW + ow) * Cout + o
                                             : ((n * Cout + o) * g.OH + oh) * g.OW + ow;
        acc += to_acc(p.grad_out[gi]) * to_acc(w[kh * g.KW + kw]);
      }
    }
  }
  store(p.grad_x + e, acc);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) gx_direct_kernel(const BackwardParams<T> p, int64_t count) {
  const Geo g = geo_of(p.s);
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < count; e += int64_t(gridDim.x) * blockDim.x)
    gx_direct_element(p, g, e);
}

// ---------------------------------------------------------------------------------------------
// grad_weight, stage 1. The N * OH * OW positions q = (n * OH + oh) * OW + ow are cut into `parts`
// slices of `chunk`; block (group, part) writes ws[part][o][tap] for its output channels: the sum
// over the slice of grad_out[n, o, oh, ow] * x[n, o / mult, ih(oh, tap), iw(ow, tap)]. Taps are
// handled CH at a time (all K * K for K > 0, chunks of 8 for the runtime size).

struct WeightSplit {
  int64_t parts, chunk;
};

inline WeightSplit weight_split(const Shape& s) {
  const int64_t positions = s.N * s.OH * s.OW, Cout = s.C * s.mult;
  const int64_t groups = s.channels_last ? (Cout + kLanes - 1) / kLanes : Cout;
  const int64_t per_part = s.channels_last ? 8 * kRows : 2 * kThreads;  // positions a slice has at least
  int64_t parts = (1024 + groups - 1) / groups;                         // ~1024 blocks in all
  parts = std::min(parts, (positions + per_part - 1) / per_part);
  parts = std::max<int64_t>(1, std::min<int64_t>(parts, 512));
  return {parts, std::max<int64_t>(1, (positions + parts - 1) / parts)};
}

template <int K>
constexpr int kTapsPerPass = K > 0 ? K * K : 8;

// Adds thread `lane` of `lanes` of the slice [q0, q1) of channel o into acc[0, CH) (taps t0 + j).
template <int K, typename T>
DW_HD void gw_accumulate(const BackwardParams<T>& p, const Geo& g, int64_t o, int64_t q0, int64_t q1, int t0,
                         int lane, int lanes, Acc<T>* acc) {
  constexpr int CH = kTapsPerPass<K>;
  const int KK = g.KH * g.KW, KW = K > 0 ? K : g.KW;
  const int64_t C = p.s.C, Cout = C * p.s.mult, c = o / p.s.mult, ohw = int64_t(g.OH) * g.OW;
#pragma unroll
  for (int j = 0; j < CH; ++j) acc[j] = 0;
  for (int64_t q = q0 + lane; q < q1; q += lanes) {
    const int64_t n = q / ohw;
    const int rem = int(q - n * ohw), oh = rem / g.OW, ow = rem - oh * g.OW;
    const Acc<T> go =
        to_acc(p.s.channels_last ? p.grad_out[q * Cout + o] : p.grad_out[(n * Cout + o) * ohw + rem]);
    const int ihb = oh * g.sh - g.ph, iwb = ow * g.sw - g.pw;
#pragma unroll
    for (int j = 0; j < CH; ++j) {
      const int tap = t0 + j;
      if (K == 0 && tap >= KK) continue;
      const int kh = tap / KW, kw = tap - kh * KW;
      const int ih = ihb + kh * g.dh, iw = iwb + kw * g.dw;
      if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) continue;
      const int64_t xi = p.s.channels_last ? ((n * g.H + ih) * g.W + iw) * C + c : ((n * C + c) * g.H + ih) * g.W + iw;
      acc[j] += go * to_acc(p.x[xi]);
    }
  }
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {  // butterfly: every lane gets the same, fixed-order sum
#pragma unroll
  for (int off = kLanes / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// NCHW: block (o, part), 256 threads along the slice; warps reduce by shuffles, then thread j adds
// the 8 warp sums of tap t0 + j in warp order.
template <typename T, int K>
__global__ void __launch_bounds__(kThreads) gw_nchw_kernel(const BackwardParams<T> p, int64_t parts, int64_t chunk,
                                                           Acc<T>* ws) {
  using A = Acc<T>;
  constexpr int CH = kTapsPerPass<K>;
  __shared__ A red[kRows][CH];
  const Geo g = geo_of(p.s);
  const int KK = g.KH * g.KW, tid = threadIdx.x, warp = tid / kLanes, lane = tid % kLanes;
  const int64_t Cout = p.s.C * p.s.mult, positions = p.s.N * g.OH * int64_t(g.OW);
  for (int64_t b = blockIdx.x; b < Cout * parts; b += gridDim.x) {
    const int64_t o = b / parts, part = b % parts;
    const int64_t q0 = min64(part * chunk, positions), q1 = min64(q0 + chunk, positions);
    for (int t0 = 0; t0 < KK; t0 += CH) {
      A acc[CH];
      gw_accumulate<K>(p, g, o, q0, q1, t0, tid, kThreads, acc);
#pragma unroll
      for (int j = 0; j < CH; ++j) {
        const A v = warp_sum(acc[j]);
        if (lane == 0) red[warp][j] = v;
      }
      __syncthreads();
      if (tid < CH && t0 + tid < KK) {
        A v = 0;
        for (int w = 0; w < kRows; ++w) v += red[w][tid];
        ws[(part * Cout + o) * KK + t0 + tid] = v;
      }
      __syncthreads();
    }
  }
}

// channels_last: block (group of 32 output channels, part); lane tx owns channel o0 + tx, the 8 rows
// of threads split the slice. Rows are reduced through red[row][j][lane], 8 taps per round: thread
// (tx, ty) adds tap j0 + ty of its lane over the rows in row order.
template <typename A, int CH>
DW_HD void gw_cl_round_write(const A* acc, int j0, int tx, int ty, A* red) {
#pragma unroll
  for (int jj = 0; jj < kRows; ++jj)
    if (j0 + jj < CH) red[(ty * kRows + jj) * kLanes + tx] = acc[j0 + jj];
}

template <typename A, int CH>
DW_HD void gw_cl_round_sum(const A* red, int64_t part, int64_t o, int64_t Cout, int KK, int t0, int j0, int tx,
                           int ty, A* ws) {
  const int j = j0 + ty;
  if (j >= CH || t0 + j >= KK || o >= Cout) return;
  A v = 0;
  for (int row = 0; row < kRows; ++row) v += red[(row * kRows + ty) * kLanes + tx];
  ws[(part * Cout + o) * KK + t0 + j] = v;
}

template <typename T, int K>
__global__ void __launch_bounds__(kThreads) gw_cl_kernel(const BackwardParams<T> p, int64_t parts, int64_t chunk,
                                                         Acc<T>* ws) {
  using A = Acc<T>;
  constexpr int CH = kTapsPerPass<K>;
  __shared__ A red[kRows * kRows * kLanes];
  const Geo g = geo_of(p.s);
  const int KK = g.KH * g.KW, tx = threadIdx.x, ty = threadIdx.y;
  const int64_t Cout = p.s.C * p.s.mult, positions = p.s.N * g.OH * int64_t(g.OW);
  const int64_t groups = (Cout + kLanes - 1) / kLanes;
  for (int64_t b = blockIdx.x; b < groups * parts; b += gridDim.x) {
    const int64_t o = b / parts * kLanes + tx, part = b % parts;
    const int64_t q0 = min64(part * chunk, positions), q1 = min64(q0 + chunk, positions);
    for (int t0 = 0; t0 < KK; t0 += CH) {
      A acc[CH];
      if (o < Cout)
        gw_accumulate<K>(p, g, o, q0, q1, t0, ty, kRows, acc);
      else
#pragma unroll
        for (int j = 0; j < CH; ++j) acc[j] = 0;
#pragma unroll
      for (int j0 = 0; j0 < CH; j0 += kRows) {
        gw_cl_round_write<A, CH>(acc, j0, tx, ty, red);
        __syncthreads();
        gw_cl_round_sum<A, CH>(red, part, o, Cout, KK, t0, j0, tx, ty, ws);
        __syncthreads();
      }
    }
  }
}

// Stage 2: grad_weight[e] = sum over part = 0, 1, ... of ws[part][e], e = o * KK + tap.
template <typename T>
__global__ void __launch_bounds__(kThreads) gw_finish_kernel(const Acc<T>* ws, int64_t parts, int64_t count,
                                                             T* grad_weight) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < count; e += int64_t(gridDim.x) * blockDim.x) {
    Acc<T> v = 0;
    for (int64_t part = 0; part < parts; ++part) v += ws[part * count + e];
    store(grad_weight + e, v);
  }
}

// ---------------------------------------------------------------------------------------------
// Launch helpers.

// The specialised square sizes; 0 = runtime size.
inline int special_k(const Shape& s) {
  return s.KH == s.KW && (s.KH == 3 || s.KH == 5 || s.KH == 7) ? int(s.KH) : 0;
}

template <typename F>
void with_k(int k, F&& f) {
  switch (k) {
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 0>{}); break;
  }
}

inline dim3 grid_of(int64_t x, int64_t y = 1) {
  return dim3(unsigned(std::min<int64_t>(x, 0x7fffffff)), unsigned(std::min<int64_t>(y, 65535)));
}

inline int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Shared memory of a rows x cols tile plus `extra` entries, `entry` bytes each (spans computed in
// 64 bits; anything over the budget is reported as such without overflowing).
inline int64_t tile_bytes(int64_t rows, int64_t cols, int64_t extra, size_t entry) {
  const int64_t limit = int64_t(kSmemBudget);
  if (rows > limit || cols > limit) return limit + 1;
  return (rows * cols + extra) * int64_t(entry);
}

// Tiles tried, largest first: rows of an NCHW tile (32 wide), positions (rows, cols) of an NHWC tile.
constexpr int kNchwRows[] = {32, 8};
constexpr int kClTiles[][2] = {{8, 8}, {4, 8}, {4, 4}, {2, 2}, {1, 1}};

template <typename T>
void launch_forward(const ForwardParams<T>& p, cudaStream_t stream) {
  using A = Acc<T>;
  const Geo g = geo_of(p.s);
  const dim3 block(kLanes, kRows);
  bool done = false;
  with_k(special_k(p.s), [&](auto kc) {
    constexpr int K = decltype(kc)::value;
    if (!p.s.channels_last) {
      for (int toh : kNchwRows) {
        const int64_t bytes = tile_bytes(fwd_span<int64_t>(toh, p.s.KH, p.s.stride_h, p.s.dil_h),
                                         fwd_span<int64_t>(kLanes, p.s.KW, p.s.stride_w, p.s.dil_w), 0, sizeof(A));
        if (bytes > int64_t(kSmemBudget)) continue;
        const int tiles_w = ceil_div(g.OW, kLanes);
        const int64_t tiles = int64_t(tiles_w) * ceil_div(g.OH, toh);
        fwd_nchw_kernel<T, K><<<grid_of(tiles, p.s.N * p.s.C * p.s.mult), block, bytes, stream>>>(p, toh, tiles_w);
        done = true;
        return;
      }
    } else {
      for (const auto& tl : kClTiles) {
        const int64_t bytes = tile_bytes(fwd_span<int64_t>(tl[0], p.s.KH, p.s.stride_h, p.s.dil_h),
                                         fwd_span<int64_t>(tl[1], p.s.KW, p.s.stride_w, p.s.dil_w), 0,
                                         kLanes * sizeof(A));
        if (bytes > int64_t(kSmemBudget)) continue;
        const int64_t items = p.s.N * ceil_div(g.OH, tl[0]) * ceil_div(g.OW, tl[1]);
        fwd_cl_kernel<T, K><<<grid_of(items, ceil_div64(p.s.C * p.s.mult, kLanes)), block, bytes, stream>>>(
            p, tl[0], tl[1]);
        done = true;
        return;
      }
    }
  });
  if (done) return;
  const int64_t count = p.s.N * p.s.C * p.s.mult * p.s.OH * p.s.OW;
  fwd_direct_kernel<T><<<grid_of(std::min<int64_t>(ceil_div64(count, kThreads), 65536)), kThreads, 0, stream>>>(
      p, count);
}

template <typename T>
void launch_grad_x(const BackwardParams<T>& p, cudaStream_t stream) {
  using A = Acc<T>;
  const Geo g = geo_of(p.s);
  const dim3 block(kLanes, kRows);
  bool done = false;
  with_k(special_k(p.s), [&](auto kc) {
    constexpr int K = decltype(kc)::value;
    if (!p.s.channels_last) {
      for (int tih : kNchwRows) {
        const int64_t bytes = tile_bytes(gather_span<int64_t>(tih, p.s.KH, p.s.stride_h, p.s.dil_h),
                                         gather_span<int64_t>(kLanes, p.s.KW, p.s.stride_w, p.s.dil_w),
                                         tih * kLanes, sizeof(A));
        if (bytes > int64_t(kSmemBudget)) continue;
        const int tiles_w = ceil_div(g.W, kLanes);
        const int64_t tiles = int64_t(tiles_w) * ceil_div(g.H, tih);
        gx_nchw_kernel<T, K><<<grid_of(tiles, p.s.N * p.s.C), block, bytes, stream>>>(p, tih, tiles_w);
        done = true;
        return;
      }
    } else {
      for (const auto& tl : kClTiles) {
        const int64_t bytes = tile_bytes(gather_span<int64_t>(tl[0], p.s.KH, p.s.stride_h, p.s.dil_h),
                                         gather_span<int64_t>(tl[1], p.s.KW, p.s.stride_w, p.s.dil_w),
                                         tl[0] * tl[1], kLanes * sizeof(A));
        if (bytes > int64_t(kSmemBudget)) continue;
        const int64_t items = p.s.N * ceil_div(g.H, tl[0]) * ceil_div(g.W, tl[1]);
        gx_cl_kernel<T, K><<<grid_of(items, ceil_div64(p.s.C, kLanes)), block, bytes, stream>>>(p, tl[0], tl[1]);
        done = true;
        return;
      }
    }
  });
  if (done) return;
  const int64_t count = p.s.N * p.s.C * p.s.H * p.s.W;
  gx_direct_kernel<T><<<grid_of(std::min<int64_t>(ceil_div64(count, kThreads), 65536)), kThreads, 0, stream>>>(
      p, count);
}

template <typename T>
void launch_grad_weight(const BackwardParams<T>& p, Acc<T>* ws, cudaStream_t stream) {
  const WeightSplit split = weight_split(p.s);
  const int64_t Cout = p.s.C * p.s.mult;
  with_k(special_k(p.s), [&](auto kc) {
    constexpr int K = decltype(kc)::value;
    if (!p.s.channels_last)
      gw_nchw_kernel<T, K><<<grid_of(Cout * split.parts), kThreads, 0, stream>>>(p, split.parts, split.chunk, ws);
    else
      gw_cl_kernel<T, K><<<grid_of(ceil_div64(Cout, kLanes) * split.parts), dim3(kLanes, kRows), 0, stream>>>(
          p, split.parts, split.chunk, ws);
  });
  const int64_t count = Cout * p.s.KH * p.s.KW;
  gw_finish_kernel<T><<<grid_of(std::min<int64_t>(ceil_div64(count, kThreads), 65536)), kThreads, 0, stream>>>(
      ws, split.parts, count, p.grad_weight);
}

}  // namespace dw

template <typename T>
void depthwise_conv2d_forward(const depthwise::ForwardParams<T>& p, cudaStream_t stream) {
  dw::launch_forward(p, stream);
}

template <typename T>
size_t depthwise_conv2d_backward_workspace_size(const depthwise::Shape& s) {
  return size_t(dw::weight_split(s).parts * s.C * s.mult * s.KH * s.KW) * sizeof(Acc<T>);
}

template <typename T>
void depthwise_conv2d_backward(const depthwise::BackwardParams<T>& p, void* workspace, cudaStream_t stream) {
  if (p.grad_x) dw::launch_grad_x(p, stream);
  if (p.grad_weight) dw::launch_grad_weight(p, static_cast<Acc<T>*>(workspace), stream);
}

#define FASTDL_DW_INSTANTIATE(T)                                                                       \
  template void depthwise_conv2d_forward<T>(const depthwise::ForwardParams<T>&, cudaStream_t);         \
  template size_t depthwise_conv2d_backward_workspace_size<T>(const depthwise::Shape&);                \
  template void depthwise_conv2d_backward<T>(const depthwise::BackwardParams<T>&, void*, cudaStream_t);

FASTDL_DW_INSTANTIATE(float)
FASTDL_DW_INSTANTIATE(double)
FASTDL_DW_INSTANTIATE(__half)
FASTDL_DW_INSTANTIATE(__nv_bfloat16)

#undef FASTDL_DW_INSTANTIATE

}  // namespace fastdl::cuda
