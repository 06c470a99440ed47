// Attention (FlashAttention-style) on the CPU: the params of the kernels in attention.cpp. Raw
// pointers, sizes and element strides only, no at::Tensor. The math is fastdl/reference/attention.py.
#pragma once
#include <cstdint>

#include "cpu/isa.h"

namespace fastdl::attention {

// q (N, H, L, D), k and v (N, Hkv, S, D); H % Hkv == 0 and query head h reads kv head h / (H / Hkv).
struct Shape {
  int64_t N, H, Hkv, L, S, D;
};

// Element strides of a (N, heads, rows, D) tensor whose last dim is dense: element (n, h, r, d)
// sits at n * this->n + h * this->h + r * row + d.
struct Strides {
  int64_t n, h, row;
};

// Which keys a query attends, and the additive mask; every pointer is nullable (absent).
// s_ij = scale * q_i . k_j + attn_mask[n, h, i, j]; key j is masked out (s = -inf) when
// key_padding_mask[n, j] is false, when j >= key_lengths[n], or when is_causal and j > i.
template <typename T>
struct Masks {
  const T* attn_mask;              // (N, H, L, S), element strides below (0 on broadcast dims)
  int64_t attn_mask_stride[4];
  const bool* key_padding_mask;    // (N, S): true = attend
  int64_t key_padding_stride[2];
  const int64_t* key_lengths;      // (N,); values outside [0, S] act as 0 / S
  int64_t key_lengths_stride;
  bool is_causal;                  // top-left aligned: key j > query i masked (L != S allowed)
};

// Dropout of the probabilities (fastdl/reference/attention.py: dropout_keep): p_ij is kept when
// (mix32(row_hash(r) ^ j * 0x9E3779B9) >> 8) >= threshold, r = (n * H + h) * L + i, and kept
// ones are multiplied by scale.
struct Dropout {
  bool enabled;        // dropout_p > 0
  uint32_t threshold;  // (uint32_t)(dropout_p * 2^24)
  uint64_t seed;       // split into 32-bit halves by the hash
  double scale;        // 1 / (1 - dropout_p)
};

template <typename T>
struct ForwardParams {
  Shape s;
  const T* q;  // (N, H, L, D)
  const T* k;  // (N, Hkv, S, D)
  const T* v;  // (N, Hkv, S, D)
  Strides q_st, k_st, v_st;
  Masks<T> masks;
  Dropout dropout;
  double scale;
  T* out;  // (N, H, L, D), every element written; a row with no attended key is 0
  Strides out_st;
  T* lse;  // dense (N, H, L): log sum_j exp(s_ij), +inf for a row with no attended key
};

// FlashAttention-2 backward: p is recomputed from lse. grad_k / grad_v of a kv head sum over the
// H / Hkv query heads that read it, in a fixed order (no atomics: the same bits for any thread
// count).
template <typename T>
struct BackwardParams {
  Shape s;
  const T* grad_out;  // (N, H, L, D)
  const T* q;         // (N, H, L, D)
  const T* k;         // (N, Hkv, S, D)
  const T* v;         // (N, Hkv, S, D)
  const T* out;       // (N, H, L, D)
  Strides grad_out_st, q_st, k_st, v_st, out_st;
  const T* lse;  // dense (N, H, L)
  Masks<T> masks;
  Dropout dropout;
  double scale;
  T* grad_q;  // (N, H, L, D), every element written
  T* grad_k;  // (N, Hkv, S, D), every element written
  T* grad_v;  // (N, Hkv, S, D), every element written
  Strides grad_q_st, grad_k_st, grad_v_st;
};

}  // namespace fastdl::attention

namespace fastdl::cpu {

FASTDL_ISA_DECLARE(
template <typename T>
void attention_forward_kernel(const attention::ForwardParams<T>& p);
template <typename T>
void attention_backward_kernel(const attention::BackwardParams<T>& p);
)

}  // namespace fastdl::cpu
