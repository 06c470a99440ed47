// attention_forward's Autograd kernel (see autograd.h): out is differentiable in q, k and v; lse
// is not. A gradient of attn_mask raises NotImplementedError.
#include <torch/library.h>

#include "autograd/autograd.h"

namespace fastdl::autograd {
namespace {

using ForwardFn = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                             const OptTensor&, const OptTensor&, bool, double, double, const Tensor&);
using BackwardFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                      const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                                      const OptTensor&, bool, double, double, const Tensor&);

std::tuple<Tensor, Tensor> forward_op(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& attn_mask,
                                      const OptTensor& key_padding_mask, const OptTensor& key_lengths, bool is_causal,
                                      double scale, double dropout_p, const Tensor& seed) {
  static const auto handle = op<ForwardFn>("fastdl::attention_forward");
  at::AutoDispatchBelowADInplaceOrView below;
  return handle.call(q, k, v, attn_mask, key_padding_mask, key_lengths, is_causal, scale, dropout_p, seed);
}

class Attention : public torch::autograd::Function<Attention> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               const OptTensor& attn_mask, const OptTensor& key_padding_mask,
                               const OptTensor& key_lengths, bool is_causal, double scale, double dropout_p,
                               const Tensor& seed) {
    auto [out, lse] = forward_op(q, k, v, attn_mask, key_padding_mask, key_lengths, is_causal, scale, dropout_p, seed);
    ctx->mark_non_differentiable({lse});
    ctx->save_for_backward({q, k, v, out, lse, attn_mask.value_or(Tensor()), key_padding_mask.value_or(Tensor()),
                            key_lengths.value_or(Tensor()), seed});
    ctx->saved_data["is_causal"] = is_causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["mask_grad"] = requires_grad(attn_mask);
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK_NOT_IMPLEMENTED(!ctx->saved_data["mask_grad"].toBool(),
                                "attention_forward: gradients of attn_mask are not implemented");
    const variable_list s = ctx->get_saved_variables();
    static const auto handle = op<BackwardFn>("fastdl::attention_backward");
    // In grad mode (create_graph=True) through the backward op's own autograd, else below it.
    std::optional<at::AutoDispatchBelowADInplaceOrView> below;
    if (!at::GradMode::is_enabled()) below.emplace();
    auto [dq, dk, dv] = handle.call(grads[0], s[0], s[1], s[2], s[3], s[4], optional(s[5]), optional(s[6]),
                                    optional(s[7]), ctx->saved_data["is_causal"].toBool(),
                                    ctx->saved_data["scale"].toDouble(), ctx->saved_data["dropout_p"].toDouble(), s[8]);
    return {dq, dk, dv, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                             const OptTensor& attn_mask, const OptTensor& key_padding_mask,
                                             const OptTensor& key_lengths, bool is_causal, double scale,
                                             double dropout_p, const Tensor& seed) {
  if (!needs_grad(q, k, v, attn_mask))
    return forward_op(q, k, v, attn_mask, key_padding_mask, key_lengths, is_causal, scale, dropout_p, seed);
  const variable_list out =
      Attention::apply(q, k, v, attn_mask, key_padding_mask, key_lengths, is_causal, scale, dropout_p, seed);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, Autograd, m) { m.impl("attention_forward", &attention_forward); }

}  // namespace fastdl::autograd
