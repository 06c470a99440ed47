// attention on CPU: argument checks, layout, and registration of the kernels in attention.cpp.
// Every message names the argument and what was expected (ValueError / TypeError in Python).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "cpu/attention.h"

namespace fastdl::cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using namespace attention;

void check_device(const Tensor& t, const char* name, const Tensor& q) {
  TORCH_CHECK_VALUE(t.device() == q.device(), name, ": expected device ", q.device(), " (q's), got ", t.device());
}

// A tensor of q's dtype and device, with exactly the sizes `want` (named in the message as `what`).
void check_like_q(const Tensor& t, const char* name, at::IntArrayRef want, const char* what, const Tensor& q) {
  TORCH_CHECK_VALUE(t.sizes() == want, name, ": expected shape ", want, " ", what, ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), name, ": expected dtype ", q.scalar_type(), " (q's), got ",
                   t.scalar_type());
  check_device(t, name, q);
}

// Checks q (N, H, L, D), k and v (N, Hkv, S, D); the kernels take float32 and float64.
Shape checked_shape(const Tensor& q, const Tensor& k, const Tensor& v) {
  for (auto [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}})
    TORCH_CHECK_VALUE(t->dim() == 4, name, ": expected a 4-D (N, heads, length, head_dim) tensor, got ", t->dim(),
                      "-D");
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
                   "q: the CPU kernel expects float32 or float64, got ", q.scalar_type());
  Shape s{};
  s.N = q.size(0), s.H = q.size(1), s.L = q.size(2), s.D = q.size(3);
  s.Hkv = k.size(1), s.S = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == s.N && k.size(3) == s.D, "k: expected shape (", s.N, ", Hkv, S, ", s.D,
                    ") (q's batch and head_dim), got ", k.sizes());
  TORCH_CHECK_VALUE(s.Hkv > 0 && s.H % s.Hkv == 0, "k: expected a number of heads that divides q's ", s.H,
                    " heads, got ", s.Hkv);
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "v: expected shape ", k.sizes(), " (k's), got ", v.sizes());
  for (auto [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), name, ": expected dtype ", q.scalar_type(),
                     " (q's), got ", t->scalar_type());
    check_device(*t, name, q);
  }
  return s;
}

// t with a dense last dim (any other strides are kept: no copy for (N, L, H, D) storage).
Tensor dense_last(const Tensor& t) { return t.size(3) <= 1 || t.stride(3) == 1 ? t : t.contiguous(); }

// k or v for the kernels, which re-read every key row once per query block: dense rows when
// there are many. Rows a multiple of 1 KB apart ((N, S, H, D) storage, as MultiheadAttention's
// projections give) fall into a few L1 sets and evict each other: at S = 1024, D = 64, E = 512
// attention forward + backward ran 35% slower on AVX2 and 15% on AVX-512 (measured) than after
// one copy to (N, H, S, D).
constexpr int64_t kDenseKeyRows = 256;
Tensor key_rows(const Tensor& t) {
  const Tensor d = dense_last(t);
  return d.size(2) >= kDenseKeyRows && d.stride(2) != d.size(3) ? d.contiguous() : d;
}

Strides strides_of(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// (N, H, L, D) stored (N, L, H, D)-contiguous, like forward's out and every gradient.
Tensor empty_heads_last(int64_t N, int64_t H, int64_t L, int64_t D, const Tensor& q) {
  return at::empty({N, L, H, D}, q.options()).transpose(1, 2);
}

// The checked masks. attn_mask (q's dtype, each dim 1 or (N, H, L, S)'s) comes back expanded to
// (N, H, L, S) in `expanded` (stride 0 on broadcast dims); the others are used in place.
template <typename T>
Masks<T> checked_masks(const OptTensor& attn_mask, const OptTensor& key_padding_mask, const OptTensor& key_lengths,
                       bool is_causal, const Shape& s, const Tensor& q, Tensor& expanded) {
  Masks<T> m{};
  m.is_causal = is_causal;
  if (attn_mask.has_value()) {
    const Tensor& a = *attn_mask;
    const int64_t full[4] = {s.N, s.H, s.L, s.S};
    bool ok = a.dim() == 4;
    for (int64_t d = 0; ok && d < 4; ++d) ok = a.size(d) == 1 || a.size(d) == full[d];
    TORCH_CHECK_VALUE(ok, "attn_mask: expected a 4-D additive mask broadcastable to (N, H, L, S) = ",
                      at::IntArrayRef(full), " (each size 1 or the full size), got ", a.sizes());
    TORCH_CHECK_TYPE(a.scalar_type() == q.scalar_type(), "attn_mask: expected an additive mask of q's dtype ",
                     q.scalar_type(), ", got ", a.scalar_type());
    check_device(a, "attn_mask", q);
    expanded = a.expand(at::IntArrayRef(full));
    m.attn_mask = expanded.data_ptr<T>();
    for (int64_t d = 0; d < 4; ++d) m.attn_mask_stride[d] = expanded.stride(d);
  }
  if (key_padding_mask.has_value()) {
    const Tensor& kpm = *key_padding_mask;
    TORCH_CHECK_TYPE(kpm.scalar_type() == at::kBool, "key_padding_mask: expected dtype bool (True = attend), got ",
                     kpm.scalar_type());
    TORCH_CHECK_VALUE(kpm.dim() == 2 && kpm.size(0) == s.N && kpm.size(1) == s.S,
                      "key_padding_mask: expected shape (N, S) = (", s.N, ", ", s.S, "), got ", kpm.sizes());
    check_device(kpm, "key_padding_mask", q);
    m.key_padding_mask = kpm.data_ptr<bool>();
    m.key_padding_stride[0] = kpm.stride(0), m.key_padding_stride[1] = kpm.stride(1);
  }
  if (key_lengths.has_value()) {
    const Tensor& len = *key_lengths;
    TORCH_CHECK_TYPE(len.scalar_type() == at::kLong, "key_lengths: expected dtype int64, got ", len.scalar_type());
    TORCH_CHECK_VALUE(len.dim() == 1 && len.size(0) == s.N, "key_lengths: expected shape (N,) = (", s.N,
                      ",), got ", len.sizes());
    check_device(len, "key_lengths", q);
    m.key_lengths = len.data_ptr<int64_t>();
    m.key_lengths_stride = len.stride(0);
  }
  return m;
}

Dropout checked_dropout(double dropout_p, const Tensor& seed) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p: expected a probability in [0, 1), got ",
                    dropout_p);
  TORCH_CHECK_VALUE(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
                    "seed: expected an int64 tensor of one element on the CPU, got ", seed.scalar_type(), " ",
                    seed.sizes(), " on ", seed.device());
  // The seed is read (a synchronous item(), ~1 us) only when there is dropout to draw.
  return {dropout_p > 0.0, static_cast<uint32_t>(dropout_p * 16777216.0),
          dropout_p > 0.0 ? static_cast<uint64_t>(seed.item<int64_t>()) : uint64_t(0), 1.0 / (1.0 - dropout_p)};
}

std::tuple<Tensor, Tensor> forward(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                   const OptTensor& attn_mask, const OptTensor& key_padding_mask,
                                   const OptTensor& key_lengths, bool is_causal, double scale, double dropout_p,
                                   const Tensor& seed) {
  const Shape s = checked_shape(q_in, k_in, v_in);
  const Dropout dropout = checked_dropout(dropout_p, seed);
  const Tensor q = dense_last(q_in), k = key_rows(k_in), v = key_rows(v_in);
  Tensor out = empty_heads_last(s.N, s.H, s.L, s.D, q);
  Tensor lse = at::empty({s.N, s.H, s.L}, q.options());
  Tensor mask;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_forward", [&] {
    const Masks<scalar_t> masks =
        checked_masks<scalar_t>(attn_mask, key_padding_mask, key_lengths, is_causal, s, q, mask);
    ForwardParams<scalar_t> p{};
    p.s = s;
    p.q = q.data_ptr<scalar_t>(), p.k = k.data_ptr<scalar_t>(), p.v = v.data_ptr<scalar_t>();
    p.q_st = strides_of(q), p.k_st = strides_of(k), p.v_st = strides_of(v);
    p.masks = masks, p.dropout = dropout, p.scale = scale;
    p.out = out.data_ptr<scalar_t>(), p.out_st = strides_of(out);
    p.lse = lse.data_ptr<scalar_t>();
    FASTDL_CPU_DISPATCH(attention_forward_kernel, p);
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& grad_out_in, const Tensor& q_in, const Tensor& k_in,
                                            const Tensor& v_in, const Tensor& out_in, const Tensor& lse_in,
                                            const OptTensor& attn_mask, const OptTensor& key_padding_mask,
                                            const OptTensor& key_lengths, bool is_causal, double scale,
                                            double dropout_p, const Tensor& seed) {
  const Shape s = checked_shape(q_in, k_in, v_in);
  const Dropout dropout = checked_dropout(dropout_p, seed);
  check_like_q(grad_out_in, "grad_out", q_in.sizes(), "(q's)", q_in);
  check_like_q(out_in, "out", q_in.sizes(), "(q's)", q_in);
  const int64_t lse_shape[3] = {s.N, s.H, s.L};
  check_like_q(lse_in, "lse", at::IntArrayRef(lse_shape), "(N, H, L)", q_in);
  const Tensor q = dense_last(q_in), k = key_rows(k_in), v = key_rows(v_in);
  const Tensor grad_out = dense_last(grad_out_in), out = dense_last(out_in), lse = lse_in.contiguous();
  Tensor grad_q = empty_heads_last(s.N, s.H, s.L, s.D, q);
  Tensor grad_k = empty_heads_last(s.N, s.Hkv, s.S, s.D, q);
  Tensor grad_v = empty_heads_last(s.N, s.Hkv, s.S, s.D, q);
  Tensor mask;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_backward", [&] {
    const Masks<scalar_t> masks =
        checked_masks<scalar_t>(attn_mask, key_padding_mask, key_lengths, is_causal, s, q, mask);
    BackwardParams<scalar_t> p{};
    p.s = s;
    p.grad_out = grad_out.data_ptr<scalar_t>(), p.q = q.data_ptr<scalar_t>(), p.k = k.data_ptr<scalar_t>();
    p.v = v.data_ptr<scalar_t>(), p.out = out.data_ptr<scalar_t>();
    p.grad_out_st = strides_of(grad_out), p.q_st = strides_of(q), p.k_st = strides_of(k);
    p.v_st = strides_of(v), p.out_st = strides_of(out);
    p.lse = lse.data_ptr<scalar_t>();
    p.masks = masks, p.dropout = dropout, p.scale = scale;
    p.grad_q = grad_q.data_ptr<scalar_t>(), p.grad_k = grad_k.data_ptr<scalar_t>();
    p.grad_v = grad_v.data_ptr<scalar_t>();
    p.grad_q_st = strides_of(grad_q), p.grad_k_st = strides_of(grad_k), p.grad_v_st = strides_of(grad_v);
    FASTDL_CPU_DISPATCH(attention_backward_kernel, p);
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("attention_forward", &forward);
  m.impl("attention_backward", &backward);
}

}  // namespace fastdl::cpu
