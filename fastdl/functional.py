"""Functional forms of fastdl's fused ops (the torch.nn.functional of fastdl)."""
from fastdl.ops import attention as _attn
from fastdl.ops import batch_norm_act as _bna
from fastdl.ops import depthwise_conv2d as _dw


def batch_norm_act(input, running_mean, running_var, weight=None, bias=None, training=False,
                   momentum=0.1, eps=1e-5, *, residual=None, activation=None, negative_slope=0.01,
                   process_group=None):
    """act(F.batch_norm(input, ...) + residual) in one fused kernel.

    The arguments before `*` are those of torch.nn.functional.batch_norm, with the same meaning
    (running statistics updated in place when training). input: (N, C, *); residual: input's shape;
    activation: None, "relu", "relu6" or "leaky_relu" (with `negative_slope`); process_group: a
    torch.distributed group whose whole batch gives the statistics when training (every process
    of the group must call it). Returns a tensor of input's shape and memory format.
    """
    return _bna.batch_norm_act(input, running_mean, running_var, weight, bias, residual, training,
                               momentum, eps, "none" if activation is None else activation, negative_slope,
                               process_group)


def depthwise_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, *, scale=None, shift=None,
                     activation=None):
    """act((F.conv2d(input, weight, bias, stride, padding, dilation, groups=C) * scale + shift)).

    The arguments before `*` are those of torch.nn.functional.conv2d with groups = input's channels:
    input (N, C, H, W), weight (C * multiplier, 1, KH, KW), padding an int, a pair, 'same' or
    'valid'. scale / shift (C * multiplier,) are an eval-mode batch norm folded in; activation is
    None, "relu" or "relu6". Returns (N, C * multiplier, OH, OW) in input's memory format.
    """
    return _dw.depthwise_conv2d(input, weight, bias, stride, padding, dilation, scale, shift,
                                "none" if activation is None else activation)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, key_padding_mask=None, key_lengths=None):
    """F.scaled_dot_product_attention on fastdl's FlashAttention-style kernels, plus key padding.

    query (N, H, L, E) or (N, L, E); key, value (N, Hkv, S, E) or (N, S, E); Hkv divides H (with
    enable_gqa=True when Hkv != H). attn_mask: bool (True = attend) or additive of query's dtype,
    broadcastable to (N, H, L, S). key_padding_mask: bool (N, S), True = attend (the polarity of
    attn_mask; nn.MultiheadAttention's is the opposite); key_lengths: int64 (N,), keys j >=
    key_lengths[n] masked. Both are applied in the kernel, without a dense mask. is_causal: key j >
    query i masked (top-left aligned); unlike F.scaled_dot_product_attention it may be combined
    with attn_mask. A query with no key to attend gets zeros, never NaN. dropout_p: dropout on the
    probabilities (pass 0 in eval), seeded from torch's default CPU generator. Returns (N, H, L, E)
    or (N, L, E), differentiable in query, key and value.
    """
    return _attn.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                              enable_gqa, key_padding_mask, key_lengths)
