"""Attention: fastdl against F.scaled_dot_product_attention and nn.MultiheadAttention.

Functional cases (q, k, v of (N, H, L, D)): fastdl.functional.scaled_dot_product_attention;
eager, F.scaled_dot_product_attention with PyTorch's own backend choice; compile, torch.compile of
it; on CUDA also each SDPA backend on its own ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn",
"sdpa-math"), where it supports the case. "-pad" cases mask the last quarter of the keys of every
other sequence: fastdl takes key_padding_mask, SDPA a (N, 1, 1, S) bool attn_mask.
Module cases (x of (N, L, E), self-attention, batch_first): fastdl.FusedAttention against
nn.MultiheadAttention, both called by default (need_weights=True: the averaged weights returned)
or with need_weights=False ("-noweights"); "-causal" ones pass the (L, L) causal mask and is_causal.
fwd is inference (no_grad); fwd+bwd the forward and torch.autograd.grad of q, k, v (functional) or
of x and every parameter (module). flops: 4 N H L S D for the forward (halved when causal), 2.5
times that for the backward. quick: one functional and one module shape, forward+backward.
"""
import torch
import torch.nn.functional as tF
from torch import nn

import fastdl
import fastdl.functional as F
from fastdl.bench import harness
from fastdl.bench.harness import DTYPE_NAMES, dtype_name

SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                 "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}
IMPLS = (*harness.IMPLS, *SDPA_BACKENDS)


def flops(N, H, L, D, causal, pass_):
    fwd = 4 * N * H * L * L * D / (2 if causal else 1)
    return fwd if pass_ == "fwd" else 3.5 * fwd


def functional_case(N, H, L, D, dtype, causal, pad, pass_):
    name = (f"sdpa-N{N}-H{H}-L{L}-D{D}-{DTYPE_NAMES[dtype]}" + ("-causal" if causal else "") + ("-pad" if pad else "")
            + f"-{pass_}")
    return dict(op="attention", kind="functional", name=name, shape=[N, H, L, D], dtype=dtype_name(dtype),
                causal=causal, pad=pad, **{"pass": pass_}, flops=flops(N, H, L, D, causal, pass_))


def module_case(N, L, E, H, dtype, need_weights, pass_, causal=False):
    name = (f"mha-N{N}-L{L}-E{E}-H{H}-{DTYPE_NAMES[dtype]}" + ("-causal" if causal else "")
            + ("" if need_weights else "-noweights") + f"-{pass_}")
    return dict(op="attention", kind="module", name=name, shape=[N, L, E], heads=H, dtype=dtype_name(dtype),
                need_weights=need_weights, causal=causal, **{"pass": pass_},
                flops=flops(N, H, L, E // H, causal, pass_))


def cases(device, quick, dtypes=None):
    """The cases measured on `device` in `dtypes` (default: fp32 on CPU or in quick, bf16 and fp16
    on CUDA); `quick`: one functional and one module shape, forward+backward."""
    passes = ("fwd", "fwd+bwd")
    if quick:
        return [case for d in dtypes or [torch.float32]
                for case in (functional_case(4, 8, 1024, 64, d, False, False, "fwd+bwd"),
                             module_case(4, 256, 512, 8, d, True, "fwd+bwd"))]
    if device == "cpu":
        return [case for d in dtypes or [torch.float32] for case in cpu_cases(d, passes)]
    out = []
    for dtype in dtypes or (torch.bfloat16, torch.float16):
        for D in (64, 128):
            for L in (128, 512, 2048, 4096, 8192, 16384):
                N = max(1, 16384 // L)
                H = 2048 // D
                for causal in (False, True):
                    out += [functional_case(N, H, L, D, dtype, causal, False, p) for p in passes]
                if L >= 2048 and dtype == torch.bfloat16:
                    out += [functional_case(N, H, L, D, dtype, False, True, p) for p in passes]
    out += [module_case(4, L, 1024, 16, dtype, nw, p) for dtype in dtypes or (torch.bfloat16,)
            for L in (512, 2048) for nw in (True, False) for p in passes]
    return out


def cpu_cases(dtype, passes):
    out = [functional_case(4, 8, L, 64, dtype, causal, pad, p)
           for L in (256, 1024) for causal in (False, True) for pad in (False, True) for p in passes]
    out += [module_case(4, L, 512, 8, dtype, nw, p) for L in (256, 1024) for nw in (True, False) for p in passes]
    return out


def functional_step(impl, case, device):
    N, H, L, D = case["shape"]
    dtype = getattr(torch, case["dtype"])
    q, k, v = (torch.randn(N, H, L, D, device=device, dtype=dtype, requires_grad=case["pass"] != "fwd")
               for _ in range(3))
    lengths = torch.full((N,), L, device=device)
    lengths[1::2] = L - L // 4
    padding = torch.arange(L, device=device) < lengths[:, None]
    causal = case["causal"]
    if impl == "fastdl":
        def attend():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                  key_padding_mask=padding if case["pad"] else None)
    else:
        mask = padding.view(N, 1, 1, L) if case["pad"] else None
        if causal and mask is not None:
            mask = mask & torch.ones(L, L, dtype=torch.bool, device=device).tril()
        sdpa = torch.compile(tF.scaled_dot_product_attention, fullgraph=True) if impl == "compile" else \
            tF.scaled_dot_product_attention
        is_causal = causal and mask is None

        def attend():
            return sdpa(q, k, v, attn_mask=mask, is_causal=is_causal)
        if impl in SDPA_BACKENDS:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backend = getattr(SDPBackend, SDPA_BACKENDS[impl])
            plain = attend

            def attend():
                with sdpa_kernel(backend):
                    return plain()
            try:
                attend()
            except RuntimeError as e:
                raise harness.Unsupported(f"{impl} does not take this case: {str(e).splitlines()[0][:120]}") from e
    return harness.grad_step(attend, [q, k, v], case)


def module_step(impl, case, device):
    N, L, E = case["shape"]
    dtype = getattr(torch, case["dtype"])
    eager = nn.MultiheadAttention(E, case["heads"], batch_first=True, device=device, dtype=dtype)
    module = fastdl.FusedAttention.from_module(eager) if impl == "fastdl" else eager
    x = torch.randn(N, L, E, device=device, dtype=dtype, requires_grad=case["pass"] != "fwd")
    nw = case["need_weights"]
    call = torch.compile(module, fullgraph=True) if impl == "compile" else module
    # causal: MultiheadAttention takes is_causal only as a hint beside the (L, L) mask; fastdl ignores the mask.
    causal = dict(attn_mask=torch.ones(L, L, dtype=torch.bool, device=device).triu(1), is_causal=True) \
        if case.get("causal") else {}

    def attend():
        return call(x, x, x, need_weights=nw, **causal)[0]
    return harness.grad_step(attend, [x, *module.parameters()], case)


def make_step(case, impl, device):
    """The step of an impl: SDPA's backends on their own are measured for functional cases on CUDA only."""
    if impl in SDPA_BACKENDS and not (device.type == "cuda" and case["kind"] == "functional"):
        raise harness.Unsupported(f"{impl}: measured for functional cases on CUDA only")
    return (functional_step if case["kind"] == "functional" else module_step)(impl, case, device)
