"""Triton kernels of y = act(batch_norm(x) + residual), training and eval, forward and backward.

x (N, C, *) is seen as C channels by M = N * HW positions, stored either as planes (NCHW: channel
stride HW) or as rows (channels_last: channel stride 1). Every kernel works on [BLOCK_C, BLOCK_R]
tiles of (channel, position).

Training forward, 2 launches: `_stats_kernel` writes per-split (mean, M2) partials (tiles merged
with Chan's formula); `_forward_kernel` combines the partials of its channels exactly, normalizes
its tile, and its first position block writes mean / invstd and updates the running statistics.
Backward, 2 launches: `_grad_stats_kernel` writes per-split sums of dz and dz * (x - mean);
`_backward_kernel` combines them, writes dx (and dz for the residual), its first position block
writes grad_weight / grad_bias. No atomics: results are deterministic.
"""
import torch
import triton
import triton.language as tl

from fastdl._tensor import memory_format_of

ACTIVATIONS = {"none": 0, "relu": 1, "relu6": 2, "leaky_relu": 3}


@triton.jit
def _offsets(r, c, C, HW, CHANNELS_LAST: tl.constexpr):
    """Element offsets of positions r ([1, BLOCK_R]) and channels c ([BLOCK_C, 1]), both int64 (as
    every offset in these kernels: past 2^31 elements, one plane c * HW or position r included)."""
    if CHANNELS_LAST:
        return r * C + c
    return (r // HW) * C * HW + r % HW + c * HW


@triton.jit
def _activate(z, slope, ACT: tl.constexpr):
    if ACT == 1:
        z = tl.where(z < 0, 0.0, z)
    elif ACT == 2:
        z = tl.where(z < 0, 0.0, tl.where(z > 6, 6.0, z))
    elif ACT == 3:
        z = tl.where(z < 0, z * slope, z)
    return z


@triton.jit
def _act_mask(z, ACT: tl.constexpr):
    if ACT == 2:
        return (z > 0) & (z < 6)
    return z > 0


@triton.jit
def _act_grad(dy, m, slope, ACT: tl.constexpr):
    if ACT == 1 or ACT == 2:
        dy = tl.where(m, dy, 0.0)
    elif ACT == 3:
        dy = tl.where(m, dy, dy * slope)
    return dy


@triton.jit
def _stats_kernel(x_ptr, part_mean_ptr, part_m2_ptr, C, HW, M, ROWS_PER_SPLIT,
                  CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                  ACC: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    r_start = pid_s.to(tl.int64) * ROWS_PER_SPLIT
    r_end = tl.minimum(r_start + ROWS_PER_SPLIT, M)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for r0 in range(r_start, r_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        ok = c_ok[:, None] & (r < r_end)[None, :]
        x = tl.load(x_ptr + _offsets(r[None, :], c[:, None], C, HW, CHANNELS_LAST), mask=ok, other=0.0).to(ACC)
        seen = (r0 - r_start).to(ACC)
        cnt = tl.minimum(r_end - r0, BLOCK_R).to(ACC)
        tile_mean = tl.sum(x, axis=1) / cnt
        dev = tl.where(ok, x - tile_mean[:, None], 0.0)
        delta = tile_mean - mean
        mean += delta * (cnt / (seen + cnt))
        m2 += tl.sum(dev * dev, axis=1) + delta * delta * (seen * cnt / (seen + cnt))
    tl.store(part_mean_ptr + pid_s.to(tl.int64) * C + c, mean, mask=c_ok)
    tl.store(part_m2_ptr + pid_s.to(tl.int64) * C + c, m2, mask=c_ok)


@triton.jit
def _forward_kernel(x_ptr, res_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, part_mean_ptr, part_m2_ptr,
                    mean_ptr, invstd_ptr, y_ptr, mask_ptr,
                    C, HW, M, ROWS_PER_SPLIT, SPLIT, momentum, eps, slope,
                    TRAINING: tl.constexpr, UPDATE_RUNNING: tl.constexpr, HAS_RES: tl.constexpr,
                    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SAVE_MASK: tl.constexpr, ACT: tl.constexpr,
                    CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    pid_r = tl.program_id(0)  # position blocks on axis 0 (up to 2^31 - 1; axis 1 stops at 65535)
    pid_c = tl.program_id(1)
    c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    if TRAINING:
        # Exact combination of the split partials: mean = sum(n_i mean_i) / M,
        # M2 = sum(M2_i + n_i (mean_i - mean)^2).
        s = tl.arange(0, BLOCK_S)
        ok = (s < SPLIT)[:, None] & c_ok[None, :]
        n = tl.minimum(tl.maximum(M - s.to(tl.int64) * ROWS_PER_SPLIT, 0), ROWS_PER_SPLIT).to(ACC)[:, None]
        pm = tl.load(part_mean_ptr + s.to(tl.int64)[:, None] * C + c[None, :], mask=ok, other=0.0)
        pm2 = tl.load(part_m2_ptr + s.to(tl.int64)[:, None] * C + c[None, :], mask=ok, other=0.0)
        mean = tl.sum(pm * n, axis=0) / M
        dev = tl.where(ok, pm - mean[None, :], 0.0)
        m2 = tl.sum(pm2 + dev * dev * n, axis=0)
        invstd = 1.0 / tl.sqrt(m2 / M + eps)
        if pid_r == 0:
            tl.store(mean_ptr + c, mean, mask=c_ok)
            tl.store(invstd_ptr + c, invstd, mask=c_ok)
            if UPDATE_RUNNING:
                rm = tl.load(rm_ptr + c, mask=c_ok).to(ACC)
                rv = tl.load(rv_ptr + c, mask=c_ok).to(ACC)
                tl.store(rm_ptr + c, (1 - momentum) * rm + momentum * mean, mask=c_ok)
                tl.store(rv_ptr + c, (1 - momentum) * rv + momentum * (m2 / (M - 1)), mask=c_ok)
    else:
        mean = tl.load(rm_ptr + c, mask=c_ok, other=0.0).to(ACC)
        invstd = 1.0 / tl.sqrt(tl.load(rv_ptr + c, mask=c_ok, other=1.0).to(ACC) + eps)
        if pid_r == 0:
            tl.store(mean_ptr + c, mean, mask=c_ok)
            tl.store(invstd_ptr + c, invstd, mask=c_ok)
    scale = invstd
    if HAS_W:
        scale = scale * tl.load(w_ptr + c, mask=c_ok, other=1.0).to(ACC)
    shift = tl.zeros([BLOCK_C], ACC)
    if HAS_B:
        shift = tl.load(b_ptr + c, mask=c_ok, other=0.0).to(ACC)
    r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = c_ok[:, None] & (r < M)[None, :]
    offs = _offsets(r[None, :], c[:, None], C, HW, CHANNELS_LAST)
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(ACC)
    z = (x - mean[:, None]) * scale[:, None] + shift[:, None]
    if HAS_RES:
        z += tl.load(res_ptr + offs, mask=ok, other=0.0).to(ACC)
    tl.store(y_ptr + offs, _activate(z, slope, ACT).to(y_ptr.dtype.element_ty), mask=ok)
    if SAVE_MASK:
        tl.store(mask_ptr + offs, _act_mask(z, ACT).to(tl.uint8), mask=ok)


@triton.jit
def _grad_stats_kernel(dy_ptr, x_ptr, mask_ptr, mean_ptr, part_dz_ptr, part_dzx_ptr,
                       C, HW, M, ROWS_PER_SPLIT, slope,
                       ACT: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_R: tl.constexpr, ACC: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0).to(ACC)
    r_start = pid_s.to(tl.int64) * ROWS_PER_SPLIT
    r_end = tl.minimum(r_start + ROWS_PER_SPLIT, M)
    s_dz = tl.zeros([BLOCK_C], ACC)
    s_dzx = tl.zeros([BLOCK_C], ACC)
    for r0 in range(r_start, r_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        ok = c_ok[:, None] & (r < r_end)[None, :]
        offs = _offsets(r[None, :], c[:, None], C, HW, CHANNELS_LAST)
        dz = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(ACC)
        if ACT != 0:
            dz = _act_grad(dz, tl.load(mask_ptr + offs, mask=ok, other=0) != 0, slope, ACT)
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(ACC)
        s_dz += tl.sum(dz, axis=1)
        s_dzx += tl.sum(tl.where(ok, dz * (x - mean[:, None]), 0.0), axis=1)
    tl.store(part_dz_ptr + pid_s.to(tl.int64) * C + c, s_dz, mask=c_ok)
    tl.store(part_dzx_ptr + pid_s.to(tl.int64) * C + c, s_dzx, mask=c_ok)


@triton.jit
def _backward_kernel(dy_ptr, x_ptr, mask_ptr, w_ptr, mean_ptr, invstd_ptr, part_dz_ptr, part_dzx_ptr,
                     dx_ptr, dw_ptr, db_ptr, dres_ptr, C, HW, M, SPLIT, slope,
                     TRAINING: tl.constexpr, HAS_W: tl.constexpr, RES_GRAD: tl.constexpr,
                     ACT: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    pid_r = tl.program_id(0)  # as in _forward_kernel
    pid_c = tl.program_id(1)
    c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    s = tl.arange(0, BLOCK_S)
    ok = (s < SPLIT)[:, None] & c_ok[None, :]
    sum_dz = tl.sum(tl.load(part_dz_ptr + s.to(tl.int64)[:, None] * C + c[None, :], mask=ok, other=0.0), axis=0)
    sum_dzx = tl.sum(tl.load(part_dzx_ptr + s.to(tl.int64)[:, None] * C + c[None, :], mask=ok, other=0.0), axis=0)
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0).to(ACC)
    invstd = tl.load(invstd_ptr + c, mask=c_ok, other=0.0).to(ACC)
    if pid_r == 0:
        tl.store(dw_ptr + c, sum_dzx * invstd, mask=c_ok)
        tl.store(db_ptr + c, sum_dz, mask=c_ok)
    a = invstd
    if HAS_W:
        a = a * tl.load(w_ptr + c, mask=c_ok, other=1.0).to(ACC)
    # dx = dz * a + (x - mean) * b + d (b = d = 0 in eval)
    b = tl.zeros([BLOCK_C], ACC)
    d = tl.zeros([BLOCK_C], ACC)
    if TRAINING:
        b = -a * invstd * invstd * sum_dzx / M
        d = -a * sum_dz / M
    r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = c_ok[:, None] & (r < M)[None, :]
    offs = _offsets(r[None, :], c[:, None], C, HW, CHANNELS_LAST)
    dz = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(ACC)
    if ACT != 0:
        dz = _act_grad(dz, tl.load(mask_ptr + offs, mask=ok, other=0) != 0, slope, ACT)
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(ACC)
    dx = dz * a[:, None] + (x - mean[:, None]) * b[:, None] + d[:, None]
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)
    if RES_GRAD:
        tl.store(dres_ptr + offs, dz.to(dres_ptr.dtype.element_ty), mask=ok)


def _layout(x):
    """(x contiguous in its own memory format, that format, C, HW, M)."""
    fmt = memory_format_of(x)
    x = x.contiguous(memory_format=fmt)
    N, C = x.shape[:2]
    HW = x.numel() // max(N * C, 1)
    return x, fmt, C, HW, N * HW


def _programs(device):
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: few, large programs


def _config(C, M, channels_last, device):
    """Block sizes, and the split of the M positions among the reduction kernels' programs."""
    if channels_last:
        block_c = min(triton.next_power_of_2(C), 64)
        block_r = max(2048 // block_c, 16)
    else:
        block_c = min(triton.next_power_of_2(C), 2)
        block_r = 1024
    block_r = min(block_r, max(triton.next_power_of_2(M), 16))
    c_blocks = triton.cdiv(C, block_c)
    split = max(1, min(triton.cdiv(M, block_r), _programs(device) // c_blocks, 4096 // block_c))
    rows_per_split = max(triton.cdiv(triton.cdiv(M, split), block_r), 1) * block_r
    split = max(triton.cdiv(M, rows_per_split), 1)
    return dict(block_c=block_c, block_r=block_r, split=split, rows_per_split=rows_per_split,
                block_s=triton.next_power_of_2(split), grid_c=c_blocks,
                grid_r=max(triton.cdiv(M, block_r), 1))


def stats_grid(cfg):
    """The reduction kernels' grid: (channel blocks, splits); splits <= 4096 / BLOCK_C."""
    return cfg["grid_c"], cfg["split"]


def tile_grid(cfg):
    """The tile kernels' grid: (position blocks, channel blocks). Position blocks go on axis 0, the
    only one CUDA lets past 65535 programs: a ResNet's first BN at batch 256 (N * 112 * 112
    positions in 32-row channels_last blocks) needs 100,352 of them."""
    return cfg["grid_r"], cfg["grid_c"]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _partial_stats(x, cfg, C, HW, M, channels_last):
    """Launches the statistics kernel: (mean, M2) of each split of the M positions, (split, C) each."""
    acc = _acc(x.dtype)
    part_mean = torch.empty((cfg["split"], C), dtype=acc, device=x.device)
    part_m2 = torch.empty_like(part_mean)
    _stats_kernel[stats_grid(cfg)](
        x, part_mean, part_m2, C, HW, M, cfg["rows_per_split"],
        CHANNELS_LAST=channels_last, BLOCK_C=cfg["block_c"], BLOCK_R=cfg["block_r"], ACC=_tl(acc))
    return part_mean, part_m2


def stats(x):
    """The batch statistics alone: (mean, M2) of x (N, C, *) per channel, (C,) each in fp32 (fp64 for
    fp64 x). The split partials are merged exactly as the forward kernel merges them."""
    x, fmt, C, HW, M = _layout(x)
    cfg = _config(C, M, fmt == torch.channels_last, x.device)
    part_mean, part_m2 = _partial_stats(x, cfg, C, HW, M, fmt == torch.channels_last)
    starts = torch.arange(cfg["split"], device=x.device) * cfg["rows_per_split"]
    n = (M - starts).clamp(0, cfg["rows_per_split"]).to(part_mean.dtype)[:, None]
    mean = (part_mean * n).sum(0) / M
    return mean, (part_m2 + n * (part_mean - mean) ** 2).sum(0)


def forward(x, weight, bias, residual, running_mean, running_var, training, momentum, eps,
            activation, slope, save_mask):
    """Launches the forward kernels. Returns (y, mean, invstd, mask) as the op's schema says."""
    x, fmt, C, HW, M = _layout(x)
    cl = fmt == torch.channels_last
    acc = _acc(x.dtype)
    act = ACTIVATIONS[activation]
    y = torch.empty_like(x, memory_format=fmt)
    mean = torch.empty(C, dtype=acc, device=x.device)
    invstd = torch.empty(C, dtype=acc, device=x.device)
    with_mask = save_mask and act != 0
    mask = torch.empty_like(x, dtype=torch.bool, memory_format=fmt) if with_mask else \
        torch.empty(0, dtype=torch.bool, device=x.device)
    res = residual.contiguous(memory_format=fmt) if residual is not None else x
    cfg = _config(C, M, cl, x.device)
    part_mean, part_m2 = _partial_stats(x, cfg, C, HW, M, cl) if training else (mean, mean)
    _forward_kernel[tile_grid(cfg)](
        x, res, weight if weight is not None else x, bias if bias is not None else x,
        running_mean if running_mean is not None else mean, running_var if running_var is not None else mean,
        part_mean, part_m2, mean, invstd, y, mask.view(torch.uint8) if with_mask else y,
        C, HW, M, cfg["rows_per_split"], cfg["split"], momentum, eps, slope,
        TRAINING=training, UPDATE_RUNNING=training and running_mean is not None,
        HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        SAVE_MASK=with_mask, ACT=act, CHANNELS_LAST=cl, BLOCK_C=cfg["block_c"], BLOCK_R=cfg["block_r"],
        BLOCK_S=cfg["block_s"], ACC=_tl(acc))
    return y, mean, invstd, mask


def backward(grad_out, x, weight, mean, invstd, mask, training, activation, slope, residual_grad):
    """Launches the backward kernels. Returns (grad_x, grad_weight, grad_bias, grad_residual)."""
    x, fmt, C, HW, M = _layout(x)
    cl = fmt == torch.channels_last
    grad_out = grad_out.contiguous(memory_format=fmt)
    act = ACTIVATIONS[activation]
    acc = _acc(x.dtype)
    mask = mask.contiguous(memory_format=fmt).view(torch.uint8) if act != 0 else grad_out
    dx = torch.empty_like(x, memory_format=fmt)
    dw = torch.empty(C, dtype=acc, device=x.device)
    db = torch.empty(C, dtype=acc, device=x.device)
    with_res = residual_grad and act != 0
    dres = torch.empty_like(x, memory_format=fmt) if with_res else torch.empty(0, dtype=x.dtype, device=x.device)
    cfg = _config(C, M, cl, x.device)
    part_dz = torch.empty((cfg["split"], C), dtype=acc, device=x.device)
    part_dzx = torch.empty_like(part_dz)
    _grad_stats_kernel[stats_grid(cfg)](
        grad_out, x, mask, mean, part_dz, part_dzx, C, HW, M, cfg["rows_per_split"], slope,
        ACT=act, CHANNELS_LAST=cl, BLOCK_C=cfg["block_c"], BLOCK_R=cfg["block_r"], ACC=_tl(acc))
    _backward_kernel[tile_grid(cfg)](
        grad_out, x, mask, weight if weight is not None else x, mean, invstd, part_dz, part_dzx,
        dx, dw, db, dres if with_res else dx, C, HW, M, cfg["split"], slope,
        TRAINING=training, HAS_W=weight is not None, RES_GRAD=with_res, ACT=act, CHANNELS_LAST=cl,
        BLOCK_C=cfg["block_c"], BLOCK_R=cfg["block_r"], BLOCK_S=cfg["block_s"], ACC=_tl(acc))
    return dx, dw, db, dres


def _tl(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32
