"""attention: out = softmax(scale * q k^T + masks) v, FlashAttention-style (no L x S matrix kept).

The fastdl::attention_forward / _backward schemas (csrc/fastdl.cpp) have C++ kernels for CPU
(csrc/cpu/attention_api.cpp) and Triton launchers for CUDA (fastdl/triton/attention.py, registered
here); the dispatcher picks one. The forward op's autograd is C++ (csrc/autograd/attention.cpp);
the backward op is not differentiable (a create_graph=True gradient raises when differentiated).
This module adds their fake impls, the entry point `attention`,
which routes to fastdl/reference/attention.py only when fastdl._backends says no kernel applies,
and `attention_weights`, which rebuilds the probabilities from the saved log-sum-exp.
"""
import math

import torch

import fastdl.triton as _triton
from fastdl import _autograd, _backends, _extension
from fastdl._tensor import device_type, same_device
from fastdl.reference import attention as reference

SPEC = _backends.register(_backends.OpSpec(
    "attention", gpu="triton",
    cpu_dtypes=(torch.float32, torch.float64),
    gpu_dtypes=(torch.float16, torch.bfloat16, torch.float32)))


def _same_device(name, t, q):
    if not same_device(t, q):
        raise ValueError(f"{name}: expected device {q.device} (query's), got {t.device}")


def check_args(q, k, v, attn_mask, key_padding_mask, key_lengths, dropout_p):
    """Raises ValueError / TypeError naming the offending argument; shapes as in `attention`."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = f"{t.dim()}-D" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a 4-D (N, heads, length, head_dim) tensor, got {got}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (query's), got {t.dtype}")
        _same_device(name, t, q)
    if not q.is_floating_point():
        raise TypeError(f"query: expected a floating-point dtype, got {q.dtype}")
    N, H, L, D = q.shape
    if k.shape[0] != N or k.shape[3] != D:
        raise ValueError(f"key: expected shape ({N}, Hkv, S, {D}) for query {tuple(q.shape)}, got {tuple(k.shape)}")
    Hkv, S = k.shape[1], k.shape[2]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"key: its {Hkv} heads must divide query's {H} heads")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"value: expected key's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if attn_mask is not None:
        if attn_mask.dtype != q.dtype:
            raise TypeError(f"attn_mask: expected an additive mask of query's dtype {q.dtype}, got {attn_mask.dtype}")
        if attn_mask.dim() != 4 or any(m not in (1, f) for m, f in zip(attn_mask.shape, (N, H, L, S))):
            raise ValueError(f"attn_mask: expected 4 dims, each 1 or the size of ({N}, {H}, {L}, {S}), "
                             f"got {tuple(attn_mask.shape)}")
        _same_device("attn_mask", attn_mask, q)
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (N, S):
            raise ValueError(f"key_padding_mask: expected a bool ({N}, {S}) tensor, got "
                             f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        _same_device("key_padding_mask", key_padding_mask, q)
    if key_lengths is not None:
        if key_lengths.dtype != torch.int64 or tuple(key_lengths.shape) != (N,):
            raise ValueError(f"key_lengths: expected an int64 ({N},) tensor, got "
                             f"{key_lengths.dtype} {tuple(key_lengths.shape)}")
        _same_device("key_lengths", key_lengths, q)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a probability in [0, 1), got {dropout_p}")


def attention(q, k, v, attn_mask=None, key_padding_mask=None, key_lengths=None, is_causal=False, scale=None,
              dropout_p=0.0, seed=0):
    """(out, lse): attention of q (N, H, L, D) over k, v (N, Hkv, S, D); Hkv divides H.

    attn_mask: additive, q's dtype, 4-D with sizes 1 or (N, H, L, S); key_padding_mask: bool (N, S),
    True = attend; key_lengths: int64 (N,); is_causal: key j > query i masked. A query with no key
    to attend gets zeros (lse = +inf). dropout_p, seed: dropout on the probabilities, from the
    counter-based hash of fastdl.reference.attention.dropout_keep (an int, or an int64 scalar tensor
    on the CPU, as `new_seed` draws). Returns out (N, H, L, D), stored
    (N, L, H, D)-contiguous, differentiable in q, k, v; lse (N, H, L), fp32 (fp64 for fp64 q).
    """
    check_args(q, k, v, attn_mask, key_padding_mask, key_lengths, dropout_p)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    seed = seed if isinstance(seed, torch.Tensor) else _NO_SEED if seed == 0 else torch.tensor(seed, dtype=torch.int64)
    if attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError("attn_mask: gradients of a float attn_mask are not implemented; "
                                  "pass attn_mask.detach()")
    if _backends.choose(SPEC.name, device_type(q), q.dtype).name == "reference":
        return reference.attention(q, k, v, attn_mask, key_padding_mask, key_lengths, is_causal, scale,
                                   dropout_p, seed)
    return torch.ops.fastdl.attention_forward.default(q, k, v, attn_mask, key_padding_mask, key_lengths,
                                                      is_causal, scale, float(dropout_p), seed)


class _Undifferentiable(torch.autograd.Function):
    """Passes `weights` through; a backward through it raises instead of silently giving no gradient."""

    @staticmethod
    def forward(ctx, weights, *inputs):
        return weights

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("need_weights: the returned attention weights are not differentiable; "
                                  "take gradients through the attention output only")


# attention_weights does every head in one product when the (N, H, L, S) scores have at most this
# many elements (4 MiB in fp32): at small shapes the per-head loop's ~8 tensor ops a head cost more
# than the math, and beyond the result only this much more memory is live.
_ALL_HEADS_MAX = 1 << 20


def attention_weights(q, k, lse, attn_mask=None, key_padding_mask=None, key_lengths=None, is_causal=False,
                      scale=None, dropout_p=0.0, seed=0, average=True):
    """The probabilities `attention` used, rebuilt from its lse: exp(s - lse) (times dropout's mask /
    (1 - p)), per head (N, H, L, S) or averaged over heads (N, L, S). One batched q k^T product (with
    the additive mask as its addend), then in place: - lse, exp, the masked keys zeroed. No softmax
    reductions. Heads are done all at once when the scores are small (_ALL_HEADS_MAX) or wanted per
    head, else one at a time, so that beyond the result one N x L x S buffer is live. Not
    differentiable: a backward through the result raises NotImplementedError."""
    N, H, L, D = q.shape
    S = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    group = H // k.shape[1]
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    masked = None
    if key_padding_mask is not None or key_lengths is not None or is_causal:
        masked = ~reference.attended(N, L, S, key_padding_mask, key_lengths, is_causal, q.device)  # (N|1, 1, L|1, S)
    keep = reference.dropout_keep(seed, N, H, L, S, dropout_p, q.device) if dropout_p > 0 else None
    with torch.no_grad():
        if not average or N * H * L * S <= _ALL_HEADS_MAX:
            out = _probabilities(q, k, lse, attn_mask, masked, keep, dropout_p, scale, group, acc)
            out = out.sum(1).div_(H) if average else out
        else:
            out = q.new_zeros((N, L, S), dtype=acc)
            for h in range(H):
                out.add_(_probabilities(q, k, lse, attn_mask, masked, keep, dropout_p, scale, group, acc, h)[:, 0],
                         alpha=1.0 / H)
    out = out.to(q.dtype)
    return _Undifferentiable.apply(out, q, k) if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad) else out


def _probabilities(q, k, lse, attn_mask, masked, keep, dropout_p, scale, group, acc, h=None):
    """exp(scale q k^T + attn_mask - lse), masked and dropped, for head h ((N, 1, L, S)) or every
    head (h None: (N, H, L, S)), in dtype acc. attn_mask: (N|1, H|1, L|1, S); masked: (N|1, 1, L|1, S).
    (No Python indexing for every head: at small shapes a tensor __getitem__ costs microseconds.)"""
    if h is not None:
        heads = slice(h, h + 1)
        q, k, lse = q[:, heads], k[:, h // group:h // group + 1], lse[:, heads]
        attn_mask = attn_mask[:, heads] if attn_mask is not None and attn_mask.shape[1] > 1 else attn_mask
        keep = keep[:, heads] if keep is not None else None
    elif group > 1:
        k = k.repeat_interleave(group, dim=1)
    p = torch.matmul((q * scale).to(acc), k.to(acc).transpose(-1, -2))
    if attn_mask is not None:
        p.add_(attn_mask.to(acc))
    p.sub_(lse.to(acc).unsqueeze(-1)).exp_()  # lse = +inf (no key attended): 0
    if masked is not None:
        p.masked_fill_(masked, 0.0)
    if keep is not None:
        p.mul_(keep).div_(1.0 - dropout_p)
    return p


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _like_output(t):
    """An empty tensor of t's (N, H, L, D) shape stored (N, L, H, D)-contiguous."""
    N, H, L, D = t.shape
    return t.new_empty((N, L, H, D)).transpose(1, 2)


def _fake_forward(q, k, v, attn_mask, key_padding_mask, key_lengths, is_causal, scale, dropout_p, seed):
    return _like_output(q), q.new_empty(q.shape[:3], dtype=_acc_dtype(q.dtype))


def _fake_backward(grad_out, q, k, v, out, lse, attn_mask, key_padding_mask, key_lengths, is_causal, scale,
                   dropout_p, seed):
    return _like_output(q), _like_output(k), _like_output(v)


def _checked_forward(q, k, v, attn_mask, key_padding_mask, key_lengths, is_causal, scale, dropout_p, seed):
    check_args(q, k, v, attn_mask, key_padding_mask, key_lengths, dropout_p)
    return _kernels.forward(q, k, v, attn_mask, key_padding_mask, key_lengths, is_causal, scale, dropout_p, seed)


def _checked_backward(grad_out, q, k, v, out, lse, attn_mask, key_padding_mask, key_lengths, is_causal, scale,
                      dropout_p, seed):
    check_args(q, k, v, attn_mask, key_padding_mask, key_lengths, dropout_p)
    for name, t in (("grad_out", grad_out), ("out", out)):
        if t.shape != q.shape or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name}: expected query's shape, dtype and device {tuple(q.shape)}, {q.dtype}, "
                             f"{q.device}; got {tuple(t.shape)}, {t.dtype}, {t.device}")
    if lse.shape != q.shape[:3] or lse.dtype != _acc_dtype(q.dtype):
        raise ValueError(f"lse: expected {_acc_dtype(q.dtype)} {tuple(q.shape[:3])} (from attention_forward), got "
                         f"{lse.dtype} {tuple(lse.shape)}")
    return _kernels.backward(grad_out, q, k, v, out, lse, attn_mask, key_padding_mask, key_lengths, is_causal,
                             scale, dropout_p, seed)


if _extension.loaded():
    torch.library.register_fake("fastdl::attention_forward")(_fake_forward)
    torch.library.register_fake("fastdl::attention_backward")(_fake_backward)
    torch.library.register_autograd("fastdl::attention_backward", _autograd.refused("attention"))
    if _triton.AVAILABLE:
        from fastdl.triton import attention as _kernels

        torch.library.register_kernel("fastdl::attention_forward", "cuda", _checked_forward)
        torch.library.register_kernel("fastdl::attention_backward", "cuda", _checked_backward)


def new_seed(dropout_p):
    """The dropout seed of one call: an int64 scalar tensor on the CPU, drawn from torch's default
    generator when dropout_p > 0 (so torch.manual_seed reproduces it), else 0. A tensor, not an int,
    so that torch.compile keeps the draw in the graph."""
    if dropout_p > 0:
        return torch.randint(0, 2**62, (), dtype=torch.int64)
    return _NO_SEED


_NO_SEED = torch.zeros((), dtype=torch.int64)  # read only: one tensor for every call without dropout


def _additive(name, mask, dtype, attend_when_true):
    """A float mask of `dtype` (0 = attend, -inf = masked out) from a bool or additive float mask."""
    if mask.dtype == torch.bool:
        masked = ~mask if attend_when_true else mask
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(masked, -math.inf)
    if mask.dtype != dtype:
        raise TypeError(f"{name}: expected a bool mask or an additive mask of dtype {dtype}, got {mask.dtype}")
    return mask


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, key_padding_mask=None, key_lengths=None):
    """F.scaled_dot_product_attention's contract on fastdl's kernels (see fastdl.functional)."""
    if not isinstance(query, torch.Tensor) or query.dim() not in (3, 4):
        got = f"{query.dim()}-D" if isinstance(query, torch.Tensor) else type(query).__name__
        raise ValueError(f"query: expected (N, H, L, E) or (N, L, E), got {got}")
    for name, t in (("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != query.dim():
            raise ValueError(f"{name}: expected {query.dim()} dims like query, got "
                             f"{t.dim() if isinstance(t, torch.Tensor) else type(t).__name__}")
    if value.shape[-1] != query.shape[-1]:
        raise NotImplementedError(f"value: a head dim ({value.shape[-1]}) different from query's "
                                  f"({query.shape[-1]}) is not supported")
    if query.dim() == 4 and key.shape[1] != query.shape[1] and not enable_gqa:
        raise ValueError(f"key: {key.shape[1]} heads, query {query.shape[1]}; pass enable_gqa=True for "
                         "grouped-query attention")
    if attn_mask is not None:
        full = query.shape[:-1] + key.shape[-2:-1]
        try:
            attn_mask = _additive("attn_mask", attn_mask, query.dtype, True).expand(full)
        except RuntimeError:
            raise ValueError(f"attn_mask: shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"{tuple(full)} (query's batch dims, L, S)") from None
    no_heads = query.dim() == 3
    if no_heads:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        attn_mask = attn_mask.unsqueeze(1) if attn_mask is not None else None
    seed = new_seed(dropout_p)
    out, _ = attention(query, key, value, attn_mask, key_padding_mask, key_lengths, is_causal, scale, dropout_p,
                       seed)
    return out.squeeze(1) if no_heads else out
