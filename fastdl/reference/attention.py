"""Reference attention with the kernels' conventions, in plain PyTorch ops (differentiable).

The kernels (csrc/cpu/attention.cpp, fastdl/triton/attention.py) follow the contract of the
fastdl::attention_forward schema (csrc/fastdl.cpp); this file spells it out in PyTorch:

- q (N, H, L, D), k and v (N, Hkv, S, D); query head h reads kv head h // (H // Hkv).
- s = scale * q k^T + attn_mask; a key is attended when key_padding_mask (N, S) is True, j <
  key_lengths[n] and, if is_causal, j <= i (top-left aligned, as F.scaled_dot_product_attention).
- lse = log sum_j exp(s_ij) over attended keys; a row with no attended key (or all s = -inf) has
  lse = +inf and an output row of zeros, and passes no gradient: never NaN.
- dropout keeps p_ij when `dropout_keep` says so and scales it by 1 / (1 - dropout_p).

`dropout_keep` is the counter-based hash every backend uses, so a seed gives the same mask on CPU,
under the Triton interpreter and on the GPU, and backward regenerates forward's mask.
"""
import math

import torch

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9  # the per-column multiplier
MIX1, MIX2 = 0x7FEB352D, 0x846CA68B  # the multipliers of the "lowbias32" integer hash


def _mul32(x, c):
    """(x * c) mod 2**32 for int64 x in [0, 2**32) and a 32-bit constant c, without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def mix32(x):
    """lowbias32: x ^= x >> 16; x *= MIX1; x ^= x >> 15; x *= MIX2; x ^= x >> 16 (all mod 2**32),
    on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, MIX1)
    x = x ^ (x >> 15)
    x = _mul32(x, MIX2)
    return x ^ (x >> 16)


def dropout_threshold(p: float) -> int:
    """Keep an element when its 24-bit hash is >= this: int(p * 2**24) (C's double -> uint32 cast)."""
    return int(p * 16777216.0)


def dropout_keep(seed, N: int, H: int, L: int, S: int, p: float, device="cpu") -> torch.Tensor:
    """Bool (N, H, L, S): which probabilities dropout keeps. For row r = (n * H + h) * L + i
    (64-bit), seed (an int or an int64 scalar tensor) split into 32-bit halves (lo, hi):
        row_hash = mix32(lo ^ mix32((r mod 2**32) ^ mix32((r >> 32) ^ hi)))
        u        = mix32(row_hash ^ (j * GOLDEN mod 2**32))
        keep     = (u >> 8) >= dropout_threshold(p)
    """
    lo, hi = seed & MASK32, (seed >> 32) & MASK32
    r = torch.arange(N * H * L, dtype=torch.int64, device=device).view(N, H, L)
    row = mix32(lo ^ mix32((r & MASK32) ^ mix32((r >> 32) ^ hi)))
    col = _mul32(torch.arange(S, dtype=torch.int64, device=device), GOLDEN)
    u = mix32(row[..., None] ^ col)
    return (u >> 8) >= dropout_threshold(p)


def attended(N, L, S, key_padding_mask, key_lengths, is_causal, device):
    """Bool broadcastable to (N, 1, L, S): which (query, key) pairs the masks other than attn_mask allow."""
    ok = torch.ones(1, 1, 1, S, dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        ok = ok & key_padding_mask.view(N, 1, 1, S)
    if key_lengths is not None:
        ok = ok & (torch.arange(S, device=device) < key_lengths.view(N, 1, 1, 1))
    if is_causal:
        ok = ok & torch.ones(L, S, dtype=torch.bool, device=device).tril()
    return ok


def scores(q, k, attn_mask, key_padding_mask, key_lengths, is_causal, scale):
    """s (N, H, L, S) with -inf where a key is masked out; k has H or Hkv heads."""
    N, H, L, _ = q.shape
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if attn_mask is not None:
        s = s + attn_mask
    ok = attended(N, L, k.shape[2], key_padding_mask, key_lengths, is_causal, q.device)
    return s.masked_fill(~ok, -math.inf)


def attention(q, k, v, attn_mask=None, key_padding_mask=None, key_lengths=None, is_causal=False, scale=None,
              dropout_p=0.0, seed=0):
    """(out (N, H, L, D), lse (N, H, L)) by the contract above, computed in q's dtype (fp32 for fp16 /
    bf16, cast back). Differentiable in q, k, v and attn_mask."""
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
        attn_mask = attn_mask.float() if attn_mask is not None else None
    N, H, L, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = scores(q, k, attn_mask, key_padding_mask, key_lengths, is_causal, scale)
    live = (s > -math.inf).any(-1, keepdim=True)
    s_safe = torch.where(live, s, torch.zeros((), dtype=s.dtype, device=s.device))
    lse = torch.logsumexp(s_safe, dim=-1, keepdim=True)
    p = torch.where(live, torch.exp(s_safe - lse), torch.zeros((), dtype=s.dtype, device=s.device))
    if dropout_p > 0:
        keep = dropout_keep(seed, N, H, L, s.shape[-1], dropout_p, q.device)
        p = p * keep / (1.0 - dropout_p)
    out = torch.matmul(p, v.repeat_interleave(H // v.shape[1], dim=1))
    lse = torch.where(live, lse, math.inf).squeeze(-1)
    return out.to(dtype), lse.detach()
