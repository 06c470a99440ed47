"""FusedAttention (drop-in for nn.MultiheadAttention) and FusedTransformerEncoderLayer (for
nn.TransformerEncoderLayer), on fastdl's FlashAttention-style attention op."""
import math

import torch
import torch.nn.functional as tF
from torch import nn

from fastdl._tensor import same_device
from fastdl.nn._share import share_parameters
from fastdl.ops import attention as _attn


class FusedAttention(nn.MultiheadAttention):
    """Drop-in for nn.MultiheadAttention: same constructor, parameters, state_dict and forward, with
    the attention itself in one FlashAttention-style kernel (no L x S matrix in memory).

    forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False), shapes as nn.MultiheadAttention:
      query (L, N, E) or (N, L, E) with batch_first, or unbatched (L, E); key, value likewise with S
      and kdim / vdim; key_padding_mask (N, S) or (S,): bool, True = ignore the key, or float, added;
      attn_mask (L, S) or (N * num_heads, L, S): bool, True = not allowed, or float, added.
    Returns (attn_output of query's shape with embed_dim features, attn_weights or None): weights
    (N, L, S) averaged over heads, or (N, num_heads, L, S).

    Differences from nn.MultiheadAttention, all documented in docs/design.md:
    - is_causal=True masks key j > query i in the kernel and ignores attn_mask (MHA treats it as a
      hint that attn_mask is that mask, and requires one); attn_mask may be None.
    - A query whose keys are all masked gets zeros (and zero weights), where MHA gives NaN.
    - need_weights=True rebuilds the weights in a second pass from the saved log-sum-exp (a q k^T
      product, no softmax); they are not differentiable (a backward through them raises).
    - Dropout masks come from fastdl's counter-based hash, seeded from torch's default generator.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None):
        if num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"num_heads: expected a positive divisor of embed_dim ({embed_dim}), got {num_heads}")
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
                         device, dtype)

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention):
        """A FusedAttention with mha's configuration and parameters (shared, not copied)."""
        p = mha.out_proj.weight
        m = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.in_proj_bias is not None, mha.bias_k is not None,
                mha.add_zero_attn, mha.kdim, mha.vdim, mha.batch_first, device=p.device, dtype=p.dtype)
        share_parameters(m, mha)
        return m.train(mha.training)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        batched = self._check_shapes(query, key, value, key_padding_mask, attn_mask)
        self_attention = query is key and key is value
        if not batched:  # (L, E) -> (1, L, E), batch first
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        batch_first = self.batch_first or not batched
        q, k, v = self._project(query, key, value, self_attention, batch_first)  # (N, H, L|S, D)
        N, H, L, D = q.shape
        padding, mask = self._masks(key_padding_mask, None if is_causal else attn_mask, q)
        k, v, padding, mask = self._extend_keys(k, v, padding, mask)
        if mask is not None:
            mask = mask.expand(N, H, L, k.shape[2])
        p = self.dropout if self.training else 0.0
        seed = _attn.new_seed(p)
        out, lse = _attn.attention(q, k, v, mask, padding, None, is_causal, None, p, seed)
        # out is stored (N, L, H, D): (N, L, E) is a free view, (L, N, E) one copy.
        out = out.transpose(1, 2).reshape(N, L, H * D) if batch_first else out.permute(2, 0, 1, 3).reshape(L, N, H * D)
        out = tF.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(0)
        weights = None
        if need_weights:
            weights = _attn.attention_weights(q, k, lse, mask, padding, None, is_causal, None, p, seed,
                                              average_attn_weights)
            weights = weights if batched else weights.squeeze(0)
        return out, weights

    def _check_shapes(self, query, key, value, key_padding_mask, attn_mask):
        """True for batched inputs; ValueError / TypeError naming the argument otherwise."""
        if not isinstance(query, torch.Tensor) or query.dim() not in (2, 3):
            raise ValueError("query: expected (L, N, E), (N, L, E) with batch_first, or unbatched (L, E); got "
                             f"{tuple(query.shape) if isinstance(query, torch.Tensor) else type(query).__name__}")
        batched = query.dim() == 3
        param = self.out_proj.weight
        for name, t, dim in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if not isinstance(t, torch.Tensor) or t.dim() != query.dim():
                raise ValueError(f"{name}: expected {query.dim()} dims like query, got "
                                 f"{t.dim() if isinstance(t, torch.Tensor) else type(t).__name__}")
            if t.shape[-1] != dim:
                raise ValueError(f"{name}: expected {dim} features (the module's "
                                 f"{'embed_dim' if name == 'query' else name[0] + 'dim'}), got {t.shape[-1]}")
            if not t.is_floating_point():
                raise TypeError(f"{name}: expected a floating-point dtype, got {t.dtype}")
            if not same_device(t, param):
                raise ValueError(f"{name}: expected the module's device {param.device}, got {t.device}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"value: expected key's sequence and batch sizes {tuple(key.shape[:-1])}, "
                             f"got {tuple(value.shape[:-1])}")
        b = 0 if (self.batch_first or not batched) else 1
        N = query.shape[b] if batched else 1
        if batched and key.shape[b] != N:
            raise ValueError(f"key: expected batch size {N} (query's), got {key.shape[b]}")
        L, S = query.shape[1 - b] if batched else query.shape[0], key.shape[1 - b] if batched else key.shape[0]
        if key_padding_mask is not None:
            want = (N, S) if batched else (S,)
            if tuple(key_padding_mask.shape) != want:
                raise ValueError(f"key_padding_mask: expected shape {want}, got {tuple(key_padding_mask.shape)}")
            if key_padding_mask.dtype != torch.bool and not key_padding_mask.is_floating_point():
                raise TypeError(f"key_padding_mask: expected bool or float, got {key_padding_mask.dtype}")
        if attn_mask is not None:
            ok = (L, S), (N * self.num_heads, L, S)
            if tuple(attn_mask.shape) not in ok:
                raise ValueError(f"attn_mask: expected shape {ok[0]} or {ok[1]}, got {tuple(attn_mask.shape)}")
            if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
                raise TypeError(f"attn_mask: expected bool or float, got {attn_mask.dtype}")
        return batched

    def _project(self, query, key, value, self_attention, batch_first):
        """The in-projections as (N, H, length, D) views of the projected tensors (no copies)."""
        E, H = self.embed_dim, self.num_heads
        D = E // H

        def heads(t):
            if batch_first:  # (N, T, E) -> (N, H, T, D)
                return t.view(t.shape[0], t.shape[1], H, D).transpose(1, 2)
            return t.view(t.shape[0], t.shape[1], H, D).permute(1, 2, 0, 3)  # (T, N, E) -> (N, H, T, D)

        if self._qkv_same_embed_dim and self_attention:
            qkv = tF.linear(query, self.in_proj_weight, self.in_proj_bias)  # (., ., 3E)
            return tuple(heads(t) for t in qkv.split(E, dim=-1))
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight.split(E)
        else:
            w = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        b = self.in_proj_bias.split(E) if self.in_proj_bias is not None else (None,) * 3
        return tuple(heads(tF.linear(t, wi, bi)) for t, wi, bi in zip((query, key, value), w, b))

    def _masks(self, key_padding_mask, attn_mask, q):
        """(padding, mask): padding bool (N, S), True = attend, for the kernel; mask additive in q's
        dtype, (N or 1, H or 1, L or 1, S), merging a float key_padding_mask with attn_mask."""
        N, H, L, _ = q.shape
        padding = mask = None
        if key_padding_mask is not None:
            if key_padding_mask.dtype == torch.bool:
                padding = ~key_padding_mask
            else:
                mask = key_padding_mask.to(q.dtype).view(N, 1, 1, -1)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(attn_mask, -math.inf)
            attn_mask = attn_mask.to(q.dtype).view((1, 1, L, -1) if attn_mask.dim() == 2 else (N, H, L, -1))
            mask = attn_mask if mask is None else mask + attn_mask
        return padding, mask

    def _extend_keys(self, k, v, padding, mask):
        """Appends bias_k / bias_v (add_bias_kv) and a zero key / value (add_zero_attn) to every
        sequence, each attended by every query."""
        N, H, _, D = k.shape
        extra = []
        if self.bias_k is not None:
            extra.append((self.bias_k.view(1, H, 1, D), self.bias_v.view(1, H, 1, D)))
        if self.add_zero_attn:
            zero = k.new_zeros(1, H, 1, D)
            extra.append((zero, zero))
        for bk, bv in extra:
            k = torch.cat([k, bk.expand(N, H, 1, D)], dim=2)
            v = torch.cat([v, bv.expand(N, H, 1, D)], dim=2)
            padding = tF.pad(padding, (0, 1), value=True) if padding is not None else None
            mask = tF.pad(mask, (0, 1)) if mask is not None else None
        return k, v, padding, mask


def _activation(activation):
    if callable(activation):
        return activation
    if activation in ("relu", "gelu"):
        return getattr(tF, activation)
    raise ValueError(f"activation: expected 'relu', 'gelu' or a callable, got {activation!r}")


class FusedTransformerEncoderLayer(nn.Module):
    """Drop-in for nn.TransformerEncoderLayer: same constructor, module names and state_dict
    (self_attn, linear1, dropout, linear2, norm1, norm2, dropout1, dropout2), same
    forward(src, src_mask=None, src_key_padding_mask=None, is_causal=False) and masks, with
    self-attention on FusedAttention.

    src (S, N, E), (N, S, E) with batch_first, or unbatched (S, E). Not an nn.TransformerEncoderLayer
    subclass on purpose: nn.TransformerEncoder would send such layers nested tensors on its
    inference fast path.
    """

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation=tF.relu, layer_norm_eps=1e-5,
                 batch_first=False, norm_first=False, bias=True, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.self_attn = FusedAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first,
                                        **factory)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.batch_first = batch_first

    @classmethod
    def from_module(cls, layer: nn.TransformerEncoderLayer):
        """A FusedTransformerEncoderLayer with layer's configuration and parameters (shared)."""
        w = layer.linear1.weight
        m = cls(layer.linear1.in_features, layer.self_attn.num_heads, layer.linear1.out_features,
                layer.dropout.p, layer.activation, layer.norm1.eps, layer.self_attn.batch_first, layer.norm_first,
                layer.linear1.bias is not None, device=w.device, dtype=w.dtype)
        share_parameters(m, layer)
        return m.train(layer.training)

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._ff_block(x))

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal):
        x = self.self_attn(x, x, x, key_padding_mask=key_padding_mask, attn_mask=attn_mask, need_weights=False,
                           is_causal=is_causal)[0]
        return self.dropout1(x)

    def _ff_block(self, x):
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))
