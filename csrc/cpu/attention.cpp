// Attention on the CPU, FlashAttention-2 style: no L x S matrix is ever stored.
//
// Tiles are transposed: a tile holds kBN keys as rows and kBM queries as lanes (kNV vectors), so
// the per-query softmax statistics (max, sum, lse, delta) are plain vectors and every reduction
// over keys is a vertical max / add. Every product is one register-blocked micro-kernel
//   C[r][lanes] (+)= sum_k A[r * ar + k * ak] * B[k][lanes]
// with A broadcast from memory (any strides: k and v are read in place) and B a packed, aligned
// scratch. Vectors and micro-tile fit the ISA of the copy (csrc/cpu/simd.h): kMR x kNV
// accumulators, kNV loads of B and one broadcast of A live in registers (6 x 4 zmm on AVX-512,
// 6 x 2 ymm on AVX2, 6 x 2 xmm on SSE):
//   S^T  [keys][queries]  = K  . Q^T          (k = head dim)
//   O^T  [dims][queries] += V^T . P^T         (k = key; forward, rescaled by the online softmax)
//   dP^T [keys][queries]  = V  . dO^T
//   dV   [keys][dims]    += Pd^T . dO         (k = query; backward)
//   dK   [keys][dims]    += dS^T . Q
//   dQ^T [dims][queries] += K^T . dS^T
//
// Forward: threads take (n, h, query block). Backward: either one task per (n, kv head) walking
// all its query heads and query blocks (five products per tile), or, when that leaves threads
// idle, one pass over (n, kv head, key block) for dK, dV and one over (n, h, query block) for dQ
// (seven products, all parallel). Both sum every gradient in the same order with the same
// instructions, so the result is bitwise the same whichever runs, for any thread count.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>

#include "cpu/attention.h"
#include "cpu/simd.h"
#include "cpu/vec_math.h"

namespace fastdl::cpu::FASTDL_ISA {

using attention::BackwardParams;
using attention::Dropout;
using attention::ForwardParams;
using attention::Masks;
using attention::Shape;
using attention::Strides;

namespace {

// ---------------------------------------------------------------------------------------------
// Vectors, tiles, scratch

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(kVectorBytes), __may_alias__));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(kVectorBytes), __may_alias__));
};
template <typename T>
using Vec = typename VecOf<T>::type;

template <typename T>
constexpr int64_t kW = kVectorBytes / sizeof(T);  // lanes of a vector
constexpr int kNV = kVectorRegisters >= 32 ? 4 : 2;  // vectors of a micro-tile
constexpr int kMR = 6;                               // rows of a micro-tile
static_assert(kMR * kNV + kNV + 1 <= kVectorRegisters, "the micro-tile must fit the vector registers");
template <typename T>
constexpr int64_t kBM = kNV * kW<T>;  // queries per block: the lanes of a tile, one micro-tile wide
constexpr int64_t kBN = 64;           // keys per block: the rows of a tile

template <typename T>
inline Vec<T> load(const T* p) {
  return *reinterpret_cast<const Vec<T>*>(p);
}
template <typename T>
inline void store(T* p, Vec<T> x) {
  *reinterpret_cast<Vec<T>*>(p) = x;
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// A 64-byte (any vector's) aligned scratch array of n elements (uninitialized).
template <typename T>
class Buffer {
 public:
  explicit Buffer(int64_t n) {
    const size_t bytes = static_cast<size_t>(round_up(std::max<int64_t>(n, 1) * sizeof(T), 64));
    p_.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
    if (!p_) throw std::bad_alloc();
  }
  T* get() const { return p_.get(); }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> p_;
};

constexpr double kInf = std::numeric_limits<double>::infinity();

// ---------------------------------------------------------------------------------------------
// The micro-kernel

enum class Init { Zero, Add, Rescale };

// C[r][lanes] for r < MR and NV vectors of lanes (C row stride cs):
//   Zero:    C  = sum_{k < K} A[r * ar + k * ak] * B[k * bs + lanes]
//   Add:     C += the sum
//   Rescale: C  = C * lane_scale[lanes] + the sum
// B, C and lane_scale are vector-aligned; the sums stay in registers over the whole k loop.
template <typename T, int MR, int NV, Init init>
inline void micro_tile(int64_t K, const T* A, int64_t ar, int64_t ak, const T* B, int64_t bs, T* C,
                       int64_t cs, const T* lane_scale) {
  constexpr int64_t W = kW<T>;
  Vec<T> acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      if constexpr (init == Init::Zero) {
        acc[r][v] = Vec<T>{};
      } else if constexpr (init == Init::Add) {
        acc[r][v] = load(C + r * cs + v * W);
      } else {
        acc[r][v] = load(C + r * cs + v * W) * load(lane_scale + v * W);
      }
    }
  for (int64_t k = 0; k < K; ++k) {
    Vec<T> b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = load(B + k * bs + v * W);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const T a = A[r * ar + k * ak];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store(C + r * cs + v * W, acc[r][v]);
}

// micro_tile over `rows` rows (< kMR): the narrower last tile of a column.
template <typename T, int NV, Init init, int MR = kMR - 1>
inline void micro_tail(int64_t rows, int64_t K, const T* A, int64_t ar, int64_t ak, const T* B, int64_t bs,
                       T* C, int64_t cs, const T* lane_scale) {
  if constexpr (MR > 0) {
    if (rows == MR) return micro_tile<T, MR, NV, init>(K, A, ar, ak, B, bs, C, cs, lane_scale);
    micro_tail<T, NV, init, MR - 1>(rows, K, A, ar, ak, B, bs, C, cs, lane_scale);
  }
}

// C[r][lanes] for all r < rows, NV vectors of lanes: micro-tiles of kMR rows.
template <typename T, int NV, Init init>
void gemm_rows(int64_t rows, int64_t K, const T* A, int64_t ar, int64_t ak, const T* B, int64_t bs, T* C,
               int64_t cs, const T* lane_scale = nullptr) {
  int64_t r = 0;
  for (; r + kMR <= rows; r += kMR)
    micro_tile<T, kMR, NV, init>(K, A + r * ar, ar, ak, B, bs, C + r * cs, cs, lane_scale);
  if (r < rows) micro_tail<T, NV, init>(rows - r, K, A + r * ar, ar, ak, B, bs, C + r * cs, cs, lane_scale);
}

// C += A B over a panel of nv <= NV vectors of lanes.
template <typename T, int NV = kNV>
void gemm_panel(int64_t nv, int64_t rows, int64_t K, const T* A, int64_t ar, int64_t ak, const T* B, int64_t bs,
                T* C, int64_t cs) {
  if constexpr (NV > 1)
    if (nv < NV) return gemm_panel<T, NV - 1>(nv, rows, K, A, ar, ak, B, bs, C, cs);
  gemm_rows<T, NV, Init::Add>(rows, K, A, ar, ak, B, bs, C, cs);
}

// C += A B for rows r < rows and nvec vectors of lanes (any count: column panels of kNV vectors).
template <typename T>
void gemm_add(int64_t rows, int64_t nvec, int64_t K, const T* A, int64_t ar, int64_t ak, const T* B,
              int64_t bs, T* C, int64_t cs) {
  for (int64_t v0 = 0; v0 < nvec; v0 += kNV)
    gemm_panel<T>(std::min<int64_t>(kNV, nvec - v0), rows, K, A, ar, ak, B + v0 * kW<T>, bs, C + v0 * kW<T>, cs);
}

// ---------------------------------------------------------------------------------------------
// The dropout hash (exp_of is in csrc/cpu/vec_math.h)

// The lowbias32 integer hash and the per-row hash of fastdl/reference/attention.py.
constexpr uint32_t kGolden = 0x9E3779B9u;
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}
inline uint32_t row_hash(uint64_t seed, uint64_t r) {
  const uint32_t lo = static_cast<uint32_t>(seed), hi = static_cast<uint32_t>(seed >> 32);
  return mix32(lo ^ mix32(static_cast<uint32_t>(r) ^ mix32(static_cast<uint32_t>(r >> 32) ^ hi)));
}

// ---------------------------------------------------------------------------------------------
// Masks

// Keys [0, end) that query rows [i0, i0 + ni) of batch n may attend (key_lengths, causal).
template <typename T>
int64_t key_end(const Masks<T>& m, const Shape& s, int64_t n, int64_t i0, int64_t ni) {
  int64_t end = s.S;
  if (m.key_lengths) end = std::clamp<int64_t>(m.key_lengths[n * m.key_lengths_stride], 0, s.S);
  if (m.is_causal) end = std::min(end, i0 + ni);
  return end;
}

// Whether key_padding_mask lets batch n attend any key of [j0, j0 + nj).
template <typename T>
bool any_key(const Masks<T>& m, int64_t n, int64_t j0, int64_t nj) {
  if (!m.key_padding_mask) return true;
  const bool* row = m.key_padding_mask + n * m.key_padding_stride[0];
  for (int64_t j = j0; j < j0 + nj; ++j)
    if (row[j * m.key_padding_stride[1]]) return true;
  return false;
}

// The size of key block [j0, j0 + kBN) for query rows [i0, i0 + ni) of batch n: how many of its
// keys lie below key_end, or 0 when there are none or key_padding_mask masks them all (the block
// is then skipped). Forward and both backward schemes skip exactly the same blocks.
template <typename T>
int64_t key_block(const Masks<T>& m, const Shape& s, int64_t n, int64_t i0, int64_t ni, int64_t j0) {
  const int64_t nj = std::min(kBN, key_end(m, s, n, i0, ni) - j0);
  return nj > 0 && any_key(m, n, j0, nj) ? nj : 0;
}

// Calls f(j0, nj) for each key block of query rows [i0, i0 + ni) that is not skipped.
template <typename T, typename F>
inline void for_key_blocks(const Masks<T>& m, const Shape& s, int64_t n, int64_t i0, int64_t ni, F f) {
  const int64_t end = key_end(m, s, n, i0, ni);
  for (int64_t j0 = 0; j0 < end; j0 += kBN)
    if (const int64_t nj = key_block(m, s, n, i0, ni, j0)) f(j0, nj);
}

// st [nj][kBM] holds q . k for keys j0.. (rows) and queries i0.. (lanes, ni valid): turns it into
// s = scale * q . k + attn_mask, -inf where a key is masked out.
template <typename T>
void scores(T* st, const Masks<T>& m, T scale, int64_t n, int64_t h, int64_t i0, int64_t ni, int64_t j0,
            int64_t nj) {
  constexpr int64_t BM = kBM<T>;
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  const int64_t* ms = m.attn_mask_stride;
  for (int64_t j = 0; j < nj; ++j) {
    T* row = st + j * BM;
    const int64_t key = j0 + j;
    if (m.key_padding_mask && !m.key_padding_mask[n * m.key_padding_stride[0] + key * m.key_padding_stride[1]]) {
      std::fill(row, row + BM, ninf);
      continue;
    }
#pragma omp simd
    for (int64_t i = 0; i < BM; ++i) row[i] *= scale;
    if (m.attn_mask) {
      const T* mask = m.attn_mask + n * ms[0] + h * ms[1] + i0 * ms[2] + key * ms[3];
      for (int64_t i = 0; i < ni; ++i) row[i] += mask[i * ms[2]];
    }
    if (m.is_causal) std::fill(row, row + std::clamp<int64_t>(key - i0, 0, BM), ninf);
  }
}

// Dropout on rows [0, nj) of a tile: keep[j][i] from the hash of (rows[i], key j0 + j); kept
// entries of src times scale go to dst, the others are 0 (dst may be src).
template <typename T>
void drop(const T* src, T* dst, int64_t nj, int64_t j0, const uint32_t* rows, const Dropout& d) {
  constexpr int64_t BM = kBM<T>;
  const T scale = static_cast<T>(d.scale);
  const uint32_t threshold = d.threshold;
  for (int64_t j = 0; j < nj; ++j) {
    const uint32_t col = static_cast<uint32_t>(j0 + j) * kGolden;
#pragma omp simd
    for (int64_t i = 0; i < BM; ++i)
      dst[j * BM + i] = (mix32(rows[i] ^ col) >> 8) >= threshold ? src[j * BM + i] * scale : T(0);
  }
}

// The row hashes of query rows i0.. of head (n, h), padded to kBM lanes.
template <typename T>
void row_hashes(uint32_t* rows, const Shape& s, const Dropout& d, int64_t n, int64_t h, int64_t i0, int64_t ni) {
  for (int64_t i = 0; i < kBM<T>; ++i)
    rows[i] = i < ni ? row_hash(d.seed, static_cast<uint64_t>((n * s.H + h) * s.L + i0 + i)) : 0;
}

// ---------------------------------------------------------------------------------------------
// Packing: query-block operands as aligned, zero-padded scratch

// xt[d][i] = x[i][d] for i < ni, d < D (x row stride rs), lanes ni..kBM zero: [D][kBM].
template <typename T>
void pack_transposed(const T* x, int64_t rs, int64_t ni, int64_t D, T* xt) {
  constexpr int64_t BM = kBM<T>;
  if (ni < BM)
    for (int64_t d = 0; d < D; ++d) std::fill(xt + d * BM + ni, xt + d * BM + BM, T(0));
  for (int64_t i = 0; i < ni; ++i)
    for (int64_t d = 0; d < D; ++d) xt[d * BM + i] = x[i * rs + d];
}

// xp[i][d] = x[i][d], zero-padded to [kBM][Dp].
template <typename T>
void pack_rows(const T* x, int64_t rs, int64_t ni, int64_t D, int64_t Dp, T* xp) {
  for (int64_t i = 0; i < kBM<T>; ++i) {
    T* row = xp + i * Dp;
    if (i < ni) std::copy(x + i * rs, x + i * rs + D, row);
    std::fill(row + (i < ni ? D : 0), row + Dp, T(0));
  }
}

// y[i][d] = scale * xt[d][i] for i < ni, d < D (y row stride rs): a [D][kBM] scratch written out.
template <typename T>
void unpack_transposed(const T* xt, int64_t ni, int64_t D, T scale, T* y, int64_t rs) {
  for (int64_t i = 0; i < ni; ++i)
    for (int64_t d = 0; d < D; ++d) y[i * rs + d] = xt[d * kBM<T> + i] * scale;
}

// ---------------------------------------------------------------------------------------------
// Forward

// One thread's scratch for the forward.
template <typename T>
struct ForwardScratch {
  Buffer<T> qt, ot, st;               // Q^T [D][BM], O^T [D][BM], the tile [BN][BM]
  Buffer<T> m, l, alpha, shift, sum;  // per query lane
  Buffer<uint32_t> rows;              // dropout row hashes
  explicit ForwardScratch(int64_t D)
      : qt(D * kBM<T>), ot(D * kBM<T>), st(kBN * kBM<T>), m(kBM<T>), l(kBM<T>), alpha(kBM<T>),
        shift(kBM<T>), sum(kBM<T>), rows(kBM<T>) {}
};

// The online softmax over one tile of scores st [nj][BM] (rows = keys): updates the running max m
// and sum l, sets alpha = exp(m_old - m_new) (the factor on the output so far) and replaces st by
// p = exp(s - m_new). A max still at -inf counts as 0, so a row with no finite score gets p = 0.
template <typename T>
void online_softmax(T* st, int64_t nj, ForwardScratch<T>& w) {
  constexpr int64_t BM = kBM<T>;
  T *m = w.m.get(), *l = w.l.get(), *alpha = w.alpha.get(), *shift = w.shift.get(), *sum = w.sum.get();
  constexpr T ninf = -std::numeric_limits<T>::infinity();
#pragma omp simd
  for (int64_t i = 0; i < BM; ++i) shift[i] = m[i];
  for (int64_t j = 0; j < nj; ++j)
#pragma omp simd
    for (int64_t i = 0; i < BM; ++i) shift[i] = std::max(shift[i], st[j * BM + i]);
#pragma omp simd
  for (int64_t i = 0; i < BM; ++i) {
    const T m_new = shift[i];
    shift[i] = m_new == ninf ? T(0) : m_new;
    alpha[i] = exp_of(m[i] - shift[i]);
    m[i] = m_new;
    sum[i] = 0;
  }
  for (int64_t j = 0; j < nj; ++j)
#pragma omp simd
    for (int64_t i = 0; i < BM; ++i) {
      const T p = exp_of(st[j * BM + i] - shift[i]);
      st[j * BM + i] = p;
      sum[i] += p;
    }
#pragma omp simd
  for (int64_t i = 0; i < BM; ++i) l[i] = l[i] * alpha[i] + sum[i];
}

// Query rows [i0, i0 + ni) of head (n, h): out and lse.
template <typename T>
void forward_block(const ForwardParams<T>& p, int64_t n, int64_t h, int64_t i0, int64_t ni, ForwardScratch<T>& w) {
  constexpr int64_t BM = kBM<T>;
  const Shape& s = p.s;
  const int64_t D = s.D, kv = h / (s.H / s.Hkv);
  const T* K = p.k + n * p.k_st.n + kv * p.k_st.h;
  const T* V = p.v + n * p.v_st.n + kv * p.v_st.h;
  T *qt = w.qt.get(), *ot = w.ot.get(), *st = w.st.get();

  pack_transposed(p.q + n * p.q_st.n + h * p.q_st.h + i0 * p.q_st.row, p.q_st.row, ni, D, qt);
  std::fill(ot, ot + D * BM, T(0));
  std::fill(w.m.get(), w.m.get() + BM, -std::numeric_limits<T>::infinity());
  std::fill(w.l.get(), w.l.get() + BM, T(0));
  if (p.dropout.enabled) row_hashes<T>(w.rows.get(), s, p.dropout, n, h, i0, ni);

  for_key_blocks(p.masks, s, n, i0, ni, [&](int64_t j0, int64_t nj) {
    gemm_rows<T, kNV, Init::Zero>(nj, D, K + j0 * p.k_st.row, p.k_st.row, 1, qt, BM, st, BM);  // S^T = K Q^T
    scores(st, p.masks, static_cast<T>(p.scale), n, h, i0, ni, j0, nj);
    online_softmax(st, nj, w);
    if (p.dropout.enabled) drop(st, st, nj, j0, w.rows.get(), p.dropout);
    // O^T = alpha * O^T + V^T P^T
    gemm_rows<T, kNV, Init::Rescale>(D, nj, V + j0 * p.v_st.row, 1, p.v_st.row, st, BM, ot, BM, w.alpha.get());
  });

  // out = O / l, lse = m + log l (a row with l = 0 attended nothing: out 0, lse +inf).
  T* lse = p.lse + (n * s.H + h) * s.L + i0;
  T* inv = w.sum.get();  // reused: 1 / l per lane
  for (int64_t i = 0; i < BM; ++i) {
    const T l = w.l.get()[i];
    inv[i] = l > 0 ? T(1) / l : T(0);
    if (i < ni) lse[i] = l > 0 ? w.m.get()[i] + std::log(l) : static_cast<T>(kInf);
  }
  T* out = p.out + n * p.out_st.n + h * p.out_st.h + i0 * p.out_st.row;
  for (int64_t i = 0; i < ni; ++i)
    for (int64_t d = 0; d < D; ++d) out[i * p.out_st.row + d] = ot[d * BM + i] * inv[i];
}

// ---------------------------------------------------------------------------------------------
// Backward

// One query block's operands, packed: Q^T, dO^T [D][BM]; Q, dO [BM][Dp]; lse, delta and the
// dropout row hashes per lane (padding lanes: lse = +inf, so p = 0 and they add nothing).
template <typename T>
struct QueryBlock {
  int64_t n, h, i0, ni;
  Buffer<T> qt, dot, qp, dop, lse, delta;
  Buffer<uint32_t> rows;
  QueryBlock(int64_t D, int64_t Dp)
      : qt(D * kBM<T>), dot(D * kBM<T>), qp(kBM<T> * Dp), dop(kBM<T> * Dp), lse(kBM<T>), delta(kBM<T>),
        rows(kBM<T>) {}
};

template <typename T>
void pack_query_block(const BackwardParams<T>& p, const T* delta, int64_t n, int64_t h, int64_t i0, int64_t ni,
                      int64_t Dp, QueryBlock<T>& b) {
  const Shape& s = p.s;
  b.n = n, b.h = h, b.i0 = i0, b.ni = ni;
  const T* q = p.q + n * p.q_st.n + h * p.q_st.h + i0 * p.q_st.row;
  const T* dout = p.grad_out + n * p.grad_out_st.n + h * p.grad_out_st.h + i0 * p.grad_out_st.row;
  pack_transposed(q, p.q_st.row, ni, s.D, b.qt.get());
  pack_transposed(dout, p.grad_out_st.row, ni, s.D, b.dot.get());
  pack_rows(q, p.q_st.row, ni, s.D, Dp, b.qp.get());
  pack_rows(dout, p.grad_out_st.row, ni, s.D, Dp, b.dop.get());
  const int64_t row0 = (n * s.H + h) * s.L + i0;
  for (int64_t i = 0; i < kBM<T>; ++i) {
    b.lse.get()[i] = i < ni ? p.lse[row0 + i] : static_cast<T>(kInf);
    b.delta.get()[i] = i < ni ? delta[row0 + i] : T(0);
  }
  if (p.dropout.enabled) row_hashes<T>(b.rows.get(), s, p.dropout, n, h, i0, ni);
}

// One thread's tiles for the backward: P^T, dP^T / dS^T and the dropped P^T, each [BN][BM].
template <typename T>
struct BackwardTiles {
  Buffer<T> p, ds, pd;
  BackwardTiles() : p(kBN * kBM<T>), ds(kBN * kBM<T>), pd(kBN * kBM<T>) {}
};

// Keys [j0, j0 + nj) against query block b: recomputes P, dP and dS, then adds
//   dV[j][:] += sum_i Pd[i][j] dO[i][:],  dK[j][:] += sum_i dS[i][j] Q[i][:]   (when dv, dk: rows
//   j0.. of [.][Dp] accumulators) and dQ^T[:][i] += sum_j K[j][:] dS[i][j]   (when dqt: [D][BM]).
// dK and dQ lack the factor scale, applied when they are written out.
template <typename T>
void backward_tile(const BackwardParams<T>& p, const QueryBlock<T>& b, int64_t j0, int64_t nj, int64_t Dp,
                   BackwardTiles<T>& t, T* dk, T* dv, T* dqt) {
  constexpr int64_t BM = kBM<T>;
  const Shape& s = p.s;
  const int64_t D = s.D, kv = b.h / (s.H / s.Hkv);
  const T* K = p.k + b.n * p.k_st.n + kv * p.k_st.h + j0 * p.k_st.row;
  const T* V = p.v + b.n * p.v_st.n + kv * p.v_st.h + j0 * p.v_st.row;
  T *pt = t.p.get(), *ds = t.ds.get();
  const T *lse = b.lse.get(), *delta = b.delta.get();

  // P^T = exp(S^T - lse)
  gemm_rows<T, kNV, Init::Zero>(nj, D, K, p.k_st.row, 1, b.qt.get(), BM, pt, BM);
  scores(pt, p.masks, static_cast<T>(p.scale), b.n, b.h, b.i0, b.ni, j0, nj);
  for (int64_t j = 0; j < nj; ++j)
#pragma omp simd
    for (int64_t i = 0; i < BM; ++i) pt[j * BM + i] = exp_of(pt[j * BM + i] - lse[i]);
  // dP^T = V dO^T, then both P (for dV) and dP go through the dropout mask.
  gemm_rows<T, kNV, Init::Zero>(nj, D, V, p.v_st.row, 1, b.dot.get(), BM, ds, BM);
  const T* pd = pt;
  if (p.dropout.enabled) {
    drop(pt, t.pd.get(), nj, j0, b.rows.get(), p.dropout);
    drop(ds, ds, nj, j0, b.rows.get(), p.dropout);
    pd = t.pd.get();
  }
  if (dv) gemm_add(nj, Dp / kW<T>, b.ni, pd, BM, 1, b.dop.get(), Dp, dv, Dp);
  // dS^T = P^T (dP^T - delta)
  for (int64_t j = 0; j < nj; ++j)
#pragma omp simd
    for (int64_t i = 0; i < BM; ++i) ds[j * BM + i] = pt[j * BM + i] * (ds[j * BM + i] - delta[i]);
  if (dk) gemm_add(nj, Dp / kW<T>, b.ni, ds, BM, 1, b.qp.get(), Dp, dk, Dp);
  if (dqt) gemm_rows<T, kNV, Init::Add>(D, nj, K, 1, p.k_st.row, ds, BM, dqt, BM);
}

// delta[(n * H + h) * L + i] = sum_d dO[n, h, i, d] * O[n, h, i, d].
template <typename T>
void row_deltas(const BackwardParams<T>& p, T* delta) {
  const Shape& s = p.s;
  at::parallel_for(0, s.N * s.H, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / s.H, h = r % s.H;
      const T* o = p.out + n * p.out_st.n + h * p.out_st.h;
      const T* g = p.grad_out + n * p.grad_out_st.n + h * p.grad_out_st.h;
      for (int64_t i = 0; i < s.L; ++i) {
        T sum = 0;
        for (int64_t d = 0; d < s.D; ++d) sum += o[i * p.out_st.row + d] * g[i * p.grad_out_st.row + d];
        delta[r * s.L + i] = sum;
      }
    }
  });
}

// grad_k / grad_v rows [j0, j0 + nj) of kv head (n, kv) from [nj][Dp] accumulators.
template <typename T>
void write_dkv(const BackwardParams<T>& p, int64_t n, int64_t kv, int64_t j0, int64_t nj, int64_t Dp, const T* dk,
               const T* dv) {
  const T scale = static_cast<T>(p.scale);
  T* gk = p.grad_k + n * p.grad_k_st.n + kv * p.grad_k_st.h + j0 * p.grad_k_st.row;
  T* gv = p.grad_v + n * p.grad_v_st.n + kv * p.grad_v_st.h + j0 * p.grad_v_st.row;
  for (int64_t j = 0; j < nj; ++j)
    for (int64_t d = 0; d < p.s.D; ++d) {
      gk[j * p.grad_k_st.row + d] = dk[j * Dp + d] * scale;
      gv[j * p.grad_v_st.row + d] = dv[j * Dp + d];
    }
}

template <typename T>
T* grad_q_rows(const BackwardParams<T>& p, int64_t n, int64_t h, int64_t i0) {
  return p.grad_q + n * p.grad_q_st.n + h * p.grad_q_st.h + i0 * p.grad_q_st.row;
}

// One task per (n, kv head): for each of its query heads and query blocks, all key blocks; dQ of a
// query block is complete after its key blocks, dK / dV of the head after the last query block.
template <typename T>
void backward_fused(const BackwardParams<T>& p, const T* delta, int64_t Dp) {
  constexpr int64_t BM = kBM<T>;
  const Shape& s = p.s;
  const int64_t group = s.H / s.Hkv;
  at::parallel_for(0, s.N * s.Hkv, 1, [&](int64_t t0, int64_t t1) {
    QueryBlock<T> b(s.D, Dp);
    BackwardTiles<T> tiles;
    Buffer<T> dk(s.S * Dp), dv(s.S * Dp), dqt(s.D * BM);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t n = task / s.Hkv, kv = task % s.Hkv;
      std::fill(dk.get(), dk.get() + s.S * Dp, T(0));
      std::fill(dv.get(), dv.get() + s.S * Dp, T(0));
      for (int64_t h = kv * group; h < (kv + 1) * group; ++h)
        for (int64_t i0 = 0; i0 < s.L; i0 += BM) {
          const int64_t ni = std::min(BM, s.L - i0);
          pack_query_block(p, delta, n, h, i0, ni, Dp, b);
          std::fill(dqt.get(), dqt.get() + s.D * BM, T(0));
          for_key_blocks(p.masks, s, n, i0, ni, [&](int64_t j0, int64_t nj) {
            backward_tile(p, b, j0, nj, Dp, tiles, dk.get() + j0 * Dp, dv.get() + j0 * Dp, dqt.get());
          });
          unpack_transposed(dqt.get(), ni, s.D, static_cast<T>(p.scale), grad_q_rows(p, n, h, i0), p.grad_q_st.row);
        }
      write_dkv(p, n, kv, 0, s.S, Dp, dk.get(), dv.get());
    }
  });
}

// Two passes: dK / dV per (n, kv head, key block), then dQ per (n, h, query block). The same sums
// in the same order as backward_fused.
template <typename T>
void backward_split(const BackwardParams<T>& p, const T* delta, int64_t Dp) {
  constexpr int64_t BM = kBM<T>;
  const Shape& s = p.s;
  const int64_t group = s.H / s.Hkv, key_blocks = (s.S + kBN - 1) / kBN, query_blocks = (s.L + BM - 1) / BM;
  at::parallel_for(0, s.N * s.Hkv * key_blocks, 1, [&](int64_t t0, int64_t t1) {
    QueryBlock<T> b(s.D, Dp);
    BackwardTiles<T> tiles;
    Buffer<T> dk(kBN * Dp), dv(kBN * Dp);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t n = task / (s.Hkv * key_blocks), kv = task / key_blocks % s.Hkv;
      const int64_t k0 = task % key_blocks * kBN;
      std::fill(dk.get(), dk.get() + kBN * Dp, T(0));
      std::fill(dv.get(), dv.get() + kBN * Dp, T(0));
      for (int64_t h = kv * group; h < (kv + 1) * group; ++h)
        for (int64_t i0 = 0; i0 < s.L; i0 += BM) {
          const int64_t ni = std::min(BM, s.L - i0);
          const int64_t nj = key_block(p.masks, s, n, i0, ni, k0);
          if (nj == 0) continue;
          pack_query_block(p, delta, n, h, i0, ni, Dp, b);
          backward_tile<T>(p, b, k0, nj, Dp, tiles, dk.get(), dv.get(), nullptr);
        }
      write_dkv(p, n, kv, k0, std::min(kBN, s.S - k0), Dp, dk.get(), dv.get());
    }
  });
  at::parallel_for(0, s.N * s.H * query_blocks, 1, [&](int64_t t0, int64_t t1) {
    QueryBlock<T> b(s.D, Dp);
    BackwardTiles<T> tiles;
    Buffer<T> dqt(s.D * BM);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t n = task / (s.H * query_blocks), h = task / query_blocks % s.H;
      const int64_t i0 = task % query_blocks * BM, ni = std::min(BM, s.L - i0);
      pack_query_block(p, delta, n, h, i0, ni, Dp, b);
      std::fill(dqt.get(), dqt.get() + s.D * BM, T(0));
      for_key_blocks(p.masks, s, n, i0, ni, [&](int64_t j0, int64_t nj) {
        backward_tile<T>(p, b, j0, nj, Dp, tiles, nullptr, nullptr, dqt.get());
      });
      unpack_transposed(dqt.get(), ni, s.D, static_cast<T>(p.scale), grad_q_rows(p, n, h, i0), p.grad_q_st.row);
    }
  });
}

}  // namespace

template <typename T>
void attention_forward_kernel(const ForwardParams<T>& p) {
  const Shape& s = p.s;
  const int64_t blocks = (s.L + kBM<T> - 1) / kBM<T>;
  at::parallel_for(0, s.N * s.H * blocks, 1, [&](int64_t t0, int64_t t1) {
    ForwardScratch<T> w(s.D);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t n = task / (s.H * blocks), h = task / blocks % s.H, i0 = task % blocks * kBM<T>;
      forward_block(p, n, h, i0, std::min(kBM<T>, s.L - i0), w);
    }
  });
}

template <typename T>
void attention_backward_kernel(const BackwardParams<T>& p) {
  const Shape& s = p.s;
  if (s.N * s.H * s.L == 0 && s.N * s.Hkv * s.S == 0) return;
  std::unique_ptr<T[]> delta(new T[std::max<int64_t>(s.N * s.H * s.L, 1)]);
  row_deltas(p, delta.get());
  const int64_t Dp = round_up(s.D, kW<T>);
  // The fused scheme does 5 tile products per (query block, key block), the split one 7 but in
  // parallel over key blocks and query blocks: take the fused one unless it leaves threads idle.
  const int64_t tasks = s.N * s.Hkv, threads = at::get_num_threads();
  const bool fused = 5 * ((tasks + threads - 1) / threads) * threads <= 7 * tasks;
  fused ? backward_fused(p, delta.get(), Dp) : backward_split(p, delta.get(), Dp);
}

template void attention_forward_kernel<float>(const ForwardParams<float>&);
template void attention_forward_kernel<double>(const ForwardParams<double>&);
template void attention_backward_kernel<float>(const BackwardParams<float>&);
template void attention_backward_kernel<double>(const BackwardParams<double>&);

}  // namespace fastdl::cpu::FASTDL_ISA
