"""Triton kernels of fused attention, FlashAttention-2 style, forward and backward.

q (N, H, L, D), k and v (N, Hkv, S, D), any strides; query head h reads kv head h // (H // Hkv).
The head dim is padded to BLOCK_D (a power of two >= 16) with masked loads and stores. Every grid
is (blocks along a sequence, heads, batch), so each axis stays within CUDA's limits (axis 1 and 2:
65535) and neighbouring programs share a head's k / v in L2.

Forward, 1 launch: `_forward_kernel`, one program per (query block, h, n), keeps its q tile in
registers and streams key blocks with an online softmax in fp32, in base 2 (log2(e) folded into
the scale). Key blocks past key_lengths[n] or, with is_causal, past the block's last query are
never visited; blocks wholly inside the bounds skip the per-element bound and causal masks.
Writes out and lse (natural log, +inf for a row with no attended key, whose out row is 0).

Backward, 3 launches: `_delta_kernel` writes delta = rowsum(dO * O) in fp32; `_dkdv_kernel`, one
program per (key block, kv head, n), loops over the H / Hkv query heads of its group and their
query blocks, so grouped-query attention needs no atomics; `_dq_kernel`, one program per (query
block, h, n), loops over key blocks. Both rebuild P = exp(s - lse) and dropout's mask. No atomics:
results are deterministic.

Dropout keeps p_ij by the counter-based hash of fastdl.reference.attention.dropout_keep, computed
in uint32 (the multiplications wrap mod 2**32), bit for bit the reference's mask.

fp32 inputs follow torch.backends.cuda.matmul.allow_tf32: TF32 dots on tensor cores when torch
allows TF32 for fp32 matmuls (about 1e-3 relative error), else IEEE fp32 FMAs with small tiles.
Head dims up to 256. Every pointer offset is formed in int64. Configs and their pruning per device
and variant: attention_configs.py. No Hopper-specific paths (TMA descriptors, warp
specialisation): they are not written because no GPU was at hand to measure them.
"""
import math

import torch
import triton
import triton.language as tl

from fastdl.reference.attention import dropout_threshold
from fastdl.triton import attention_configs as configs

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# ---- shared pieces ---------------------------------------------------------------------------------

@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """a @ b accumulated in fp32. PREC ("ieee" or "tf32") decides fp32 operands only: fp16 / bf16
    ones always run on tensor cores."""
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _mix32(x):
    """lowbias32 on uint32: x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _row_hash(rows, seed_lo, seed_hi):
    """Dropout's per-row hash; rows: int64 row ids (n * H + h) * L + i."""
    hi = _mix32((rows >> 32).to(tl.uint32) ^ seed_hi.to(tl.uint32))
    return _mix32(seed_lo.to(tl.uint32) ^ _mix32(rows.to(tl.uint32) ^ hi))


@triton.jit
def _col_hash(cols):
    return cols.to(tl.uint32) * 0x9E3779B9


@triton.jit
def _keep(row_h, col_h, threshold):
    """Dropout keeps (row, col) when the top 24 bits of its hash are >= threshold (broadcasting)."""
    return (_mix32(row_h ^ col_h) >> 8) >= threshold


@triton.jit
def _key_end(LENS, n, stride_len, S, HAS_LENGTHS: tl.constexpr):
    """One past the last key that key_lengths lets batch n attend (in [0, S])."""
    end = S
    if HAS_LENGTHS:
        end = tl.minimum(tl.maximum(tl.load(LENS + n * stride_len), 0), S).to(tl.int32)
    return end


# ---- forward ---------------------------------------------------------------------------------------

@triton.jit
def _rows(base, n, h, rows, cols, stride_n, stride_h, stride_r, stride_c):
    """Pointers [len(rows), len(cols)] to elements (n, h, rows, cols) of a 4-D tensor at `base`
    (n, h int64). Every offset is formed in int64: one (n, h) slice may pass 2^31 elements."""
    return base + n * stride_n + h * stride_h + rows.to(tl.int64)[:, None] * stride_r + \
        cols.to(tl.int64)[None, :] * stride_c


@triton.jit
def _rows_t(base, n, h, rows, cols, stride_n, stride_h, stride_r, stride_c):
    """`_rows` transposed: pointers [len(cols), len(rows)]."""
    return base + n * stride_n + h * stride_h + rows.to(tl.int64)[None, :] * stride_r + \
        cols.to(tl.int64)[:, None] * stride_c


@triton.jit
def _query_block_keys(LENS, n, stride_len, S, L, pid_m, HAS_LENGTHS: tl.constexpr, IS_CAUSAL: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(full_n, end_n) for query block pid_m: keys [0, full_n) need no bound / causal mask,
    [full_n, end_n) do, and past end_n none is attended."""
    end_n = _key_end(LENS, n, stride_len, S, HAS_LENGTHS)
    full_n = end_n // BLOCK_N * BLOCK_N
    if IS_CAUSAL:
        end_n = tl.minimum(end_n, tl.minimum((pid_m + 1) * BLOCK_M, L))
        full_n = tl.minimum(full_n, (pid_m * BLOCK_M + 1) // BLOCK_N * BLOCK_N)
    return full_n, end_n


@triton.jit
def _forward_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, am_ptrs, kpm_ptrs, lo, hi, offs_m, offs_n, m_ok, d_ok,
                    end_n, S, stride_kj, stride_vj, stride_aj, stride_pj, qk_scale, row_h, threshold,
                    HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr,
                    DROPOUT: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """Online-softmax update of (acc [BLOCK_M, BLOCK_D], l_i, m_i [BLOCK_M]) over the key blocks
    starting in [lo, hi). Scores are in base 2. MASKED: apply the bound (j < end_n) and causal
    masks, needed only on the blocks at the end of the range."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_ok = d_ok[:, None]
        v_ok = d_ok[None, :]
        if MASKED:
            k_ok = k_ok & (cols < end_n)[None, :]
            v_ok = v_ok & (cols < end_n)[:, None]
        kT = tl.load(k_ptrs + tl.cast(start_n, tl.int64) * stride_kj, mask=k_ok, other=0.0)
        s = _dot(q, kT, PREC) * qk_scale
        if HAS_MASK:
            am = tl.load(am_ptrs + tl.cast(start_n, tl.int64) * stride_aj, mask=m_ok[:, None] & (cols < S)[None, :],
                         other=0.0)
            s += am.to(tl.float32) * LOG2E
        if MASKED:
            ok = (cols < end_n)[None, :]
            if IS_CAUSAL:
                ok = ok & (offs_m[:, None] >= cols[None, :])
            s = tl.where(ok, s, float("-inf"))
        if HAS_KPM:
            attend = tl.load(kpm_ptrs + tl.cast(start_n, tl.int64) * stride_pj, mask=cols < S, other=0) != 0
            s = tl.where(attend[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing attended so far
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_keep(row_h[:, None], _col_hash(cols)[None, :], threshold), p, 0.0)
        v = tl.load(v_ptrs + tl.cast(start_n, tl.int64) * stride_vj, mask=v_ok, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=configs.FORWARD, key=configs.KEY,
                 prune_configs_by={"early_config_prune": configs.Prune("_forward_kernel")})
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "L_BUCKET", "S_BUCKET"])
def _forward_kernel(Q, K, V, AM, KPM, LENS, OUT, LSE,
                    stride_qn, stride_qh, stride_qm, stride_qd, stride_kn, stride_kh, stride_kj, stride_kd,
                    stride_vn, stride_vh, stride_vj, stride_vd, stride_an, stride_ah, stride_am, stride_aj,
                    stride_pn, stride_pj, stride_len, stride_on, stride_oh, stride_om, stride_od,
                    H, L, S, GROUP, qk_scale, seed_lo, seed_hi, threshold, keep_scale, L_BUCKET, S_BUCKET,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr,
                    HAS_LENGTHS: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(L, BLOCK_M), H, N). Loads a q tile [BLOCK_M, BLOCK_D] and streams k^T
    [BLOCK_D, BLOCK_N], v [BLOCK_N, BLOCK_D] (and the attn_mask tile, key_padding_mask slice).
    Stores out [BLOCK_M, BLOCK_D] and lse [BLOCK_M] (fp32, (N, H, L) contiguous)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    n = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    d_ok = offs_d < HEAD_DIM
    q = tl.load(_rows(Q, n, h, offs_m, offs_d, stride_qn, stride_qh, stride_qm, stride_qd),
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    hk = h // GROUP
    k_ptrs = _rows_t(K, n, hk, offs_n, offs_d, stride_kn, stride_kh, stride_kj, stride_kd)
    v_ptrs = _rows(V, n, hk, offs_n, offs_d, stride_vn, stride_vh, stride_vj, stride_vd)
    am_ptrs = _rows(AM, n, h, offs_m, offs_n, stride_an, stride_ah, stride_am, stride_aj)
    kpm_ptrs = KPM + n * stride_pn + offs_n.to(tl.int64) * stride_pj
    row_h = _row_hash((n * H + h) * L + offs_m, seed_lo, seed_hi)

    full_n, end_n = _query_block_keys(LENS, n, stride_len, S, L, pid_m, HAS_LENGTHS, IS_CAUSAL, BLOCK_M, BLOCK_N)

    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    acc, l_i, m_i = _forward_blocks(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, am_ptrs, kpm_ptrs, 0, full_n, offs_m, offs_n, m_ok, d_ok, end_n, S,
        stride_kj, stride_vj, stride_aj, stride_pj, qk_scale, row_h, threshold,
        HAS_MASK, HAS_KPM, IS_CAUSAL, DROPOUT, False, BLOCK_N, PREC)
    acc, l_i, m_i = _forward_blocks(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, am_ptrs, kpm_ptrs, full_n, end_n, offs_m, offs_n, m_ok, d_ok, end_n, S,
        stride_kj, stride_vj, stride_aj, stride_pj, qk_scale, row_h, threshold,
        HAS_MASK, HAS_KPM, IS_CAUSAL, DROPOUT, True, BLOCK_N, PREC)

    live = l_i > 0  # else no key was attended (or all scores were -inf): out 0, lse +inf
    l_safe = tl.where(live, l_i, 1.0)
    out = acc * (keep_scale / l_safe)[:, None]
    tl.store(_rows(OUT, n, h, offs_m, offs_d, stride_on, stride_oh, stride_om, stride_od),
             out.to(OUT.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    lse = tl.where(live, (m_i + tl.log2(l_safe)) * LN2, float("inf"))
    tl.store(LSE + ((n * H + h) * L + offs_m), lse, mask=m_ok)


# ---- backward --------------------------------------------------------------------------------------

@triton.jit
def _delta_kernel(OUT, DO, DELTA, stride_on, stride_oh, stride_om, stride_od,
                  stride_gn, stride_gh, stride_gm, stride_gd, H, L,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Grid (cdiv(L, BLOCK_M), H, N). Loads out and grad_out tiles [BLOCK_M, BLOCK_D]; stores
    delta = rowsum(grad_out * out) [BLOCK_M] (fp32, (N, H, L) contiguous)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    n = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < L)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(_rows(OUT, n, h, offs_m, offs_d, stride_on, stride_oh, stride_om, stride_od),
                mask=ok, other=0.0)
    do = tl.load(_rows(DO, n, h, offs_m, offs_d, stride_gn, stride_gh, stride_gm, stride_gd),
                 mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + ((n * H + h) * L + offs_m), delta, mask=offs_m < L)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_ptrs, do_ptrs, am_ptrs, LSE_H, DELTA_H, lo, hi, offs_m, offs_n, n_ok, d_ok,
                 L, stride_qm, stride_gm, stride_am, stride_lm, qk_scale, keep_scale, row0, col_h,
                 seed_lo, seed_hi, threshold, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                 CAUSAL_MASK: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr):
    """Adds to dk, dv [BLOCK_N, BLOCK_D] the contributions of the query blocks starting in [lo, hi)
    of one query head, in the transposed orientation (key rows, query columns). Key-side masks
    (bounds, padding) are applied by the caller on the result: a key's row of dk / dv depends on
    that key alone. CAUSAL_MASK: apply j <= i, needed only on the blocks at the diagonal."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        r_ok = rows < L
        qT = tl.load(q_ptrs + tl.cast(start_m, tl.int64) * stride_qm, mask=d_ok[:, None] & r_ok[None, :], other=0.0)
        do = tl.load(do_ptrs + tl.cast(start_m, tl.int64) * stride_gm, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(LSE_H + rows.to(tl.int64) * stride_lm, mask=r_ok, other=float("inf"))  # rows past L: P = 0
        delta = tl.load(DELTA_H + rows.to(tl.int64), mask=r_ok, other=0.0)
        sT = _dot(k, qT, PREC) * qk_scale
        if HAS_MASK:
            am = tl.load(am_ptrs + tl.cast(start_m, tl.int64) * stride_am, mask=n_ok[:, None] & r_ok[None, :],
                         other=0.0)
            sT += am.to(tl.float32) * LOG2E
        pT = tl.exp2(sT - (lse * LOG2E)[None, :])
        if CAUSAL_MASK:
            pT = tl.where(rows[None, :] >= offs_n[:, None], pT, 0.0)
        dpT = _dot(v, tl.trans(do), PREC)
        if DROPOUT:
            keep = _keep(_row_hash(row0 + rows, seed_lo, seed_hi)[None, :], col_h[:, None], threshold)
            dv += _dot(tl.where(keep, pT * keep_scale, 0.0).to(do.dtype), do, PREC)
            dpT = tl.where(keep, dpT * keep_scale, 0.0)
        else:
            dv += _dot(pT.to(do.dtype), do, PREC)
        dsT = pT * (dpT - delta[None, :])
        dk += _dot(dsT.to(qT.dtype), tl.trans(qT), PREC)
    return dk, dv


@triton.autotune(configs=configs.DKDV, key=configs.KEY,
                 prune_configs_by={"early_config_prune": configs.Prune("_dkdv_kernel")})
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "L_BUCKET", "S_BUCKET"])
def _dkdv_kernel(Q, K, V, AM, KPM, LENS, DO, LSE, DELTA, DK, DV,
                 stride_qn, stride_qh, stride_qm, stride_qd, stride_kn, stride_kh, stride_kj, stride_kd,
                 stride_vn, stride_vh, stride_vj, stride_vd, stride_an, stride_ah, stride_am, stride_aj,
                 stride_pn, stride_pj, stride_len, stride_gn, stride_gh, stride_gm, stride_gd,
                 stride_ln, stride_lh, stride_lm, stride_dkn, stride_dkh, stride_dkj, stride_dkd,
                 stride_dvn, stride_dvh, stride_dvj, stride_dvd,
                 H, L, S, GROUP, qk_scale, scale, seed_lo, seed_hi, threshold, keep_scale, L_BUCKET, S_BUCKET,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr,
                 HAS_LENGTHS: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(S, BLOCK_N), Hkv, N). Loads k, v tiles [BLOCK_N, BLOCK_D] once, then for each of
    the GROUP query heads of kv head hk streams q^T [BLOCK_D, BLOCK_M], grad_out [BLOCK_M, BLOCK_D],
    lse and delta [BLOCK_M] (and the attn_mask tile). Stores dk, dv [BLOCK_N, BLOCK_D]."""
    pid_n = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)
    n = tl.program_id(2).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < S
    d_ok = offs_d < HEAD_DIM
    kv_ok = n_ok[:, None] & d_ok[None, :]
    k = tl.load(_rows(K, n, hk, offs_n, offs_d, stride_kn, stride_kh, stride_kj, stride_kd),
                mask=kv_ok, other=0.0)
    v = tl.load(_rows(V, n, hk, offs_n, offs_d, stride_vn, stride_vh, stride_vj, stride_vd),
                mask=kv_ok, other=0.0)
    col_h = _col_hash(offs_n)

    # Query blocks [lo, diag) meet the causal diagonal, [diag, hi) are wholly below it. A key block
    # at or past key_lengths[n] is never visited (hi = 0): its dk, dv are 0.
    end_n = _key_end(LENS, n, stride_len, S, HAS_LENGTHS)
    hi = tl.where(start_n < end_n, L, 0)
    lo = 0
    diag = 0
    if IS_CAUSAL:
        lo = start_n // BLOCK_M * BLOCK_M
        diag = tl.minimum(tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M, hi)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_ptrs = _rows_t(Q, n, h, offs_m, offs_d, stride_qn, stride_qh, stride_qm, stride_qd)
        do_ptrs = _rows(DO, n, h, offs_m, offs_d, stride_gn, stride_gh, stride_gm, stride_gd)
        am_ptrs = _rows_t(AM, n, h, offs_m, offs_n, stride_an, stride_ah, stride_am, stride_aj)
        lse_h = LSE + n * stride_ln + h * stride_lh
        delta_h = DELTA + (n * H + h) * L
        row0 = (n * H + h) * L
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_ptrs, do_ptrs, am_ptrs, lse_h, delta_h, lo, diag, offs_m, offs_n,
                              n_ok, d_ok, L, stride_qm, stride_gm, stride_am, stride_lm, qk_scale, keep_scale,
                              row0, col_h, seed_lo, seed_hi, threshold, HAS_MASK, DROPOUT, IS_CAUSAL, BLOCK_M, PREC)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_ptrs, do_ptrs, am_ptrs, lse_h, delta_h, diag, hi, offs_m, offs_n,
                              n_ok, d_ok, L, stride_qm, stride_gm, stride_am, stride_lm, qk_scale, keep_scale,
                              row0, col_h, seed_lo, seed_hi, threshold, HAS_MASK, DROPOUT, False, BLOCK_M, PREC)

    attended = offs_n < end_n
    if HAS_KPM:
        attended = attended & (tl.load(KPM + n * stride_pn + offs_n.to(tl.int64) * stride_pj, mask=n_ok, other=0) != 0)
    dk = tl.where(attended[:, None], dk * scale, 0.0)
    dv = tl.where(attended[:, None], dv, 0.0)
    tl.store(_rows(DK, n, hk, offs_n, offs_d, stride_dkn, stride_dkh, stride_dkj, stride_dkd),
             dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(_rows(DV, n, hk, offs_n, offs_d, stride_dvn, stride_dvh, stride_dvj, stride_dvd),
             dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, k_ptrs, v_ptrs, am_ptrs, kpm_ptrs, lo, hi, offs_m, offs_n, m_ok, d_ok,
               end_n, S, stride_kj, stride_vj, stride_aj, stride_pj, qk_scale, keep_scale, row_h, threshold,
               HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
               MASKED: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """Adds to dq [BLOCK_M, BLOCK_D] (unscaled) the key blocks starting in [lo, hi); MASKED as in
    `_forward_blocks`."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_ok = d_ok[:, None]
        if MASKED:
            kv_ok = kv_ok & (cols < end_n)[None, :]
        kT = tl.load(k_ptrs + tl.cast(start_n, tl.int64) * stride_kj, mask=kv_ok, other=0.0)
        vT = tl.load(v_ptrs + tl.cast(start_n, tl.int64) * stride_vj, mask=kv_ok, other=0.0)
        s = _dot(q, kT, PREC) * qk_scale
        if HAS_MASK:
            am = tl.load(am_ptrs + tl.cast(start_n, tl.int64) * stride_aj, mask=m_ok[:, None] & (cols < S)[None, :],
                         other=0.0)
            s += am.to(tl.float32) * LOG2E
        p = tl.exp2(s - (lse * LOG2E)[:, None])
        if MASKED:
            ok = (cols < end_n)[None, :]
            if IS_CAUSAL:
                ok = ok & (offs_m[:, None] >= cols[None, :])
            p = tl.where(ok, p, 0.0)
        if HAS_KPM:
            attend = tl.load(kpm_ptrs + tl.cast(start_n, tl.int64) * stride_pj, mask=cols < S, other=0) != 0
            p = tl.where(attend[None, :], p, 0.0)
        dp = _dot(do, vT, PREC)
        if DROPOUT:
            keep = _keep(row_h[:, None], _col_hash(cols)[None, :], threshold)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kT.dtype), tl.trans(kT), PREC)
    return dq


@triton.autotune(configs=configs.DQ, key=configs.KEY,
                 prune_configs_by={"early_config_prune": configs.Prune("_dq_kernel")})
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "L_BUCKET", "S_BUCKET"])
def _dq_kernel(Q, K, V, AM, KPM, LENS, DO, LSE, DELTA, DQ,
               stride_qn, stride_qh, stride_qm, stride_qd, stride_kn, stride_kh, stride_kj, stride_kd,
               stride_vn, stride_vh, stride_vj, stride_vd, stride_an, stride_ah, stride_am, stride_aj,
               stride_pn, stride_pj, stride_len, stride_gn, stride_gh, stride_gm, stride_gd,
               stride_ln, stride_lh, stride_lm, stride_dqn, stride_dqh, stride_dqm, stride_dqd,
               H, L, S, GROUP, qk_scale, scale, seed_lo, seed_hi, threshold, keep_scale, L_BUCKET, S_BUCKET,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr,
               HAS_LENGTHS: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(L, BLOCK_M), H, N). Loads q, grad_out tiles [BLOCK_M, BLOCK_D], lse and delta
    [BLOCK_M], streams k^T, v^T [BLOCK_D, BLOCK_N] over the key range of `_forward_kernel`.
    Stores dq [BLOCK_M, BLOCK_D]."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    n = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    d_ok = offs_d < HEAD_DIM
    tile_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(_rows(Q, n, h, offs_m, offs_d, stride_qn, stride_qh, stride_qm, stride_qd),
                mask=tile_ok, other=0.0)
    do = tl.load(_rows(DO, n, h, offs_m, offs_d, stride_gn, stride_gh, stride_gm, stride_gd),
                 mask=tile_ok, other=0.0)
    lse = tl.load(LSE + n * stride_ln + h * stride_lh + offs_m.to(tl.int64) * stride_lm, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + ((n * H + h) * L + offs_m), mask=m_ok, other=0.0)
    hk = h // GROUP
    k_ptrs = _rows_t(K, n, hk, offs_n, offs_d, stride_kn, stride_kh, stride_kj, stride_kd)
    v_ptrs = _rows_t(V, n, hk, offs_n, offs_d, stride_vn, stride_vh, stride_vj, stride_vd)
    am_ptrs = _rows(AM, n, h, offs_m, offs_n, stride_an, stride_ah, stride_am, stride_aj)
    kpm_ptrs = KPM + n * stride_pn + offs_n.to(tl.int64) * stride_pj
    row_h = _row_hash((n * H + h) * L + offs_m, seed_lo, seed_hi)

    full_n, end_n = _query_block_keys(LENS, n, stride_len, S, L, pid_m, HAS_LENGTHS, IS_CAUSAL, BLOCK_M, BLOCK_N)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _dq_blocks(dq, q, do, lse, delta, k_ptrs, v_ptrs, am_ptrs, kpm_ptrs, 0, full_n, offs_m, offs_n, m_ok, d_ok,
                    end_n, S, stride_kj, stride_vj, stride_aj, stride_pj, qk_scale, keep_scale, row_h, threshold,
                    HAS_MASK, HAS_KPM, IS_CAUSAL, DROPOUT, False, BLOCK_N, PREC)
    dq = _dq_blocks(dq, q, do, lse, delta, k_ptrs, v_ptrs, am_ptrs, kpm_ptrs, full_n, end_n, offs_m, offs_n, m_ok,
                    d_ok, end_n, S, stride_kj, stride_vj, stride_aj, stride_pj, qk_scale, keep_scale, row_h,
                    threshold, HAS_MASK, HAS_KPM, IS_CAUSAL, DROPOUT, True, BLOCK_N, PREC)
    tl.store(_rows(DQ, n, h, offs_m, offs_d, stride_dqn, stride_dqh, stride_dqm, stride_dqd),
             (dq * scale).to(DQ.dtype.element_ty), mask=tile_ok)


# ---- launchers -------------------------------------------------------------------------------------

def _like_output(t):
    """An empty tensor of t's (N, H, L, D) shape stored (N, L, H, D)-contiguous."""
    N, H, L, D = t.shape
    return t.new_empty((N, L, H, D)).transpose(1, 2)


def _common_args(q, k, attn_mask, key_padding_mask, key_lengths, is_causal, scale, dropout_p, seed):
    """(the optional tensors with their strides, the scalars, the constexprs) shared by every
    kernel but `_delta_kernel`. An absent tensor is replaced by q, never read."""
    N, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    am = attn_mask.expand(N, H, L, S) if attn_mask is not None else q
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else q
    lens = key_lengths if key_lengths is not None else q
    tensors = (am, kpm, lens)
    strides = (*am.stride(), *kpm.stride()[:2], lens.stride(0))
    seed = int(seed)  # an int, or the op's int64 scalar tensor on the CPU
    scalars = dict(H=H, L=L, S=S, GROUP=H // Hkv, qk_scale=scale * math.log2(math.e), seed_lo=seed & 0xFFFFFFFF,
                   seed_hi=(seed >> 32) & 0xFFFFFFFF, threshold=dropout_threshold(dropout_p),
                   keep_scale=1.0 / (1.0 - dropout_p), L_BUCKET=triton.next_power_of_2(L),
                   S_BUCKET=triton.next_power_of_2(S))
    meta = dict(HEAD_DIM=D, BLOCK_D=max(triton.next_power_of_2(D), 16), HAS_MASK=attn_mask is not None,
                HAS_KPM=key_padding_mask is not None, HAS_LENGTHS=key_lengths is not None, IS_CAUSAL=bool(is_causal),
                DROPOUT=dropout_p > 0, PREC=precision(q.dtype))
    return tensors, strides, scalars, meta


def precision(dtype):
    """The dots' input precision: "tf32" (tensor cores, about 1e-3 relative error) for fp32 inputs
    when torch allows TF32 for fp32 matmuls (torch.backends.cuda.matmul.allow_tf32, which
    torch.set_float32_matmul_precision("high") sets), else "ieee"."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


MAX_HEAD_DIM = 256


def _check(q, k):
    """Clear errors for what the kernels cannot launch: dtype, head dim, and the grid's axes 1 and
    2 (heads and batch, at most 65535 each on CUDA)."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"query: the Triton attention kernels take float16, bfloat16 or float32, got {q.dtype}")
    N, H, _, D = q.shape
    if D > MAX_HEAD_DIM:
        raise NotImplementedError(f"query: the Triton attention kernels take head dims up to {MAX_HEAD_DIM}, got {D}")
    if max(N, H, k.shape[1]) > 65535:
        raise NotImplementedError(f"query: the Triton attention kernels take a batch and head count up to 65535 "
                                  f"(CUDA's grid), got batch {N}, heads {H}")


def forward(q, k, v, attn_mask, key_padding_mask, key_lengths, is_causal, scale, dropout_p, seed):
    """Launches `_forward_kernel`. q (N, H, L, D), k and v (N, Hkv, S, D). Returns out (N, H, L, D) in
    q's dtype, stored (N, L, H, D)-contiguous, and lse (N, H, L) fp32."""
    _check(q, k)
    N, H, L, _ = q.shape
    tensors, strides, scalars, meta = _common_args(q, k, attn_mask, key_padding_mask, key_lengths, is_causal,
                                                   scale, dropout_p, seed)
    out = _like_output(q)
    lse = torch.empty((N, H, L), dtype=torch.float32, device=q.device)
    _forward_kernel[lambda m: (triton.cdiv(L, m["BLOCK_M"]), H, N)](
        q, k, v, *tensors, out, lse, *q.stride(), *k.stride(), *v.stride(), *strides, *out.stride(), **scalars,
        **meta)
    return out, lse


def backward(grad_out, q, k, v, out, lse, attn_mask, key_padding_mask, key_lengths, is_causal, scale, dropout_p,
             seed):
    """Launches `_delta_kernel`, `_dkdv_kernel` and `_dq_kernel`. grad_out, out (N, H, L, D), lse (N, H, L)
    fp32 from `forward`. Returns (grad_q, grad_k, grad_v) of q's, k's and v's shapes and dtypes, stored
    (N, L or S, heads, D)-contiguous."""
    _check(q, k)
    N, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    tensors, strides, scalars, meta = _common_args(q, k, attn_mask, key_padding_mask, key_lengths, is_causal,
                                                   scale, dropout_p, seed)
    delta = torch.empty((N, H, L), dtype=torch.float32, device=q.device)
    _delta_kernel[(triton.cdiv(L, configs.DELTA_BLOCK_M), H, N)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), H, L,
        HEAD_DIM=D, BLOCK_D=meta["BLOCK_D"], BLOCK_M=configs.DELTA_BLOCK_M)
    dq, dk, dv = _like_output(q), _like_output(k), _like_output(v)
    inputs = (q, k, v, *tensors, grad_out, lse, delta)
    input_strides = (*q.stride(), *k.stride(), *v.stride(), *strides, *grad_out.stride(), *lse.stride())
    _dkdv_kernel[lambda m: (triton.cdiv(S, m["BLOCK_N"]), Hkv, N)](
        *inputs, dk, dv, *input_strides, *dk.stride(), *dv.stride(), **scalars, scale=scale, **meta)
    _dq_kernel[lambda m: (triton.cdiv(L, m["BLOCK_M"]), H, N)](
        *inputs, dq, *input_strides, *dq.stride(), **scalars, scale=scale, **meta)
    return dq, dk, dv
