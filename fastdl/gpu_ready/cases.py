"""The launches the GPU-readiness gate compiles: fastdl's Triton wrappers run on "meta" tensors.

Attention: every kernel x dtype (fp16, bf16, fp32 with IEEE dots, fp32 with TF32) x variant
(plain; causal; "full": attn_mask + key_padding_mask + key_lengths + causal + dropout, the most
registers) x head dim. Batch norm: training and eval, forward and backward, with and without the
residual / activation, in both layouts, at the shapes whose grids are largest (ResNet's first BN
at batch 256, 112 x 112) and smallest.
"""
import contextlib
import dataclasses

import torch

HEAD_DIMS = (16, 64, 80, 128, 256)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "tf32": torch.float32}
VARIANTS = ("plain", "causal", "full")


@dataclasses.dataclass
class Case:
    op: str
    dtype: str
    variant: str
    head_dim: int  # 0 where the op has none
    launches: list


@contextlib.contextmanager
def _tf32(on):
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _nhld(N, H, L, D, dtype):
    """A meta (N, H, L, D) tensor stored (N, L, H, D), as a projection's output is."""
    return torch.empty((N, L, H, D), dtype=dtype, device="meta").transpose(1, 2)


def attention_case(dtype, variant, head_dim, N=2, H=8, L=1024, S=1024):
    """The launches of one forward and one backward (forward, delta, dkdv, dq)."""
    from fastdl.gpu_ready.triton_aot import record
    from fastdl.triton import attention as kernels
    t = DTYPES[dtype]
    q, k, v = _nhld(N, H, L, head_dim, t), _nhld(N, H, S, head_dim, t), _nhld(N, H, S, head_dim, t)
    causal = variant in ("causal", "full")
    full = variant == "full"
    am = torch.empty((L, S), dtype=t, device="meta") if full else None
    kpm = torch.empty((N, S), dtype=torch.bool, device="meta") if full else None
    lens = torch.empty((N,), dtype=torch.int64, device="meta") if full else None
    p = 0.1 if full else 0.0
    names = ["_forward_kernel", "_delta_kernel", "_dkdv_kernel", "_dq_kernel"]
    with _tf32(dtype == "tf32"), record(kernels, names) as launches:
        out, lse = kernels.forward(q, k, v, am, kpm, lens, causal, head_dim ** -0.5, p, 1234)
        kernels.backward(torch.empty_like(out), q, k, v, out, lse, am, kpm, lens, causal, head_dim ** -0.5, p, 1234)
    return Case("attention", dtype, variant, head_dim, launches)


def attention_cases(dtypes=tuple(DTYPES), variants=VARIANTS, head_dims=HEAD_DIMS):
    return [attention_case(d, v, h) for d in dtypes for v in variants for h in head_dims]


BN_SHAPES = {"resnet-stem-b256": (256, 64, 112, 112), "small": (2, 3, 5, 5), "wide": (8, 1024, 7, 7)}


def batch_norm_case(dtype, shape, channels_last, training, residual, activation):
    from fastdl.gpu_ready.triton_aot import record
    from fastdl.triton import batch_norm_act as kernels
    t = DTYPES[dtype]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(BN_SHAPES[shape], dtype=t, device="meta").contiguous(memory_format=fmt)
    C = x.shape[1]
    w, b, rm, rv = (torch.empty(C, dtype=torch.float32, device="meta") for _ in range(4))
    res = torch.empty_like(x) if residual else None
    names = ["_stats_kernel", "_forward_kernel", "_grad_stats_kernel", "_backward_kernel"]
    with record(kernels, names) as launches:
        y, mean, invstd, mask = kernels.forward(x, w, b, res, rm, rv, training, 0.1, 1e-5, activation, 0.01, True)
        kernels.backward(torch.empty_like(y), x, w, mean, invstd, mask, training, activation, 0.01, residual)
    layout = "channels_last" if channels_last else "nchw"
    variant = f"{shape} {layout} {'train' if training else 'eval'}{' +res' if residual else ''} {activation}"
    return Case("batch_norm_act", dtype, variant, 0, launches)


def batch_norm_cases(dtypes=("fp16", "bf16", "fp32")):
    return [batch_norm_case(d, s, cl, tr, res, act) for d in dtypes for s in BN_SHAPES for cl in (False, True)
            for tr, res, act in ((True, True, "relu"), (False, False, "none"))]
