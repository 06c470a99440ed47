"""The portable-CPU targets in one group, to run once per ISA copy of the C++ kernels
(FASTDL_CPU_ISA=baseline|avx2|avx512 fastdl bench --only isa; csrc/cpu/isa.h): each case is its
op stem's own case and step, marked with the stem.

Cases: SDPA at N2 H8 L2048 D64 and N4 H8 L1024 D64 (fwd and fwd+bwd); MultiheadAttention at N2
L1024 E512 H8, default call and causal need_weights=False (fwd+bwd); depthwise channels_last
N32 C128 56x56, k3 and k7 (fwd+bwd); BatchNorm2d+add+ReLU at N32 C64 56x56, train fwd+bwd and
eval fwd. fp32. quick: SDPA N4 L1024 and depthwise k3, fwd+bwd.
"""
import importlib

import torch

from fastdl.bench import attention, batch_norm_act, depthwise_conv2d

IMPLS = attention.IMPLS


def _mark(case):
    return dict(case, op="isa", stem=case["op"], name=f"{case['op']}-{case['name']}")


def cases(device, quick, dtypes=None):
    out = []
    for d in dtypes or [torch.float32]:
        sdpa = [attention.functional_case(N, 8, L, 64, d, False, False, p)
                for N, L in ((4, 1024),) + (() if quick else ((2, 2048),)) for p in (("fwd+bwd",) if quick else
                                                                                    ("fwd", "fwd+bwd"))]
        dw = [depthwise_conv2d.make_case((32, 128, 56, 56, k, 1), d, "fwd+bwd") for k in ((3,) if quick else (3, 7))]
        out += sdpa + dw
        if not quick:
            out += [attention.module_case(2, 1024, 512, 8, d, True, "fwd+bwd"),
                    attention.module_case(2, 1024, 512, 8, d, False, "fwd+bwd", causal=True)]
            backends = batch_norm_act.fastdl_backends(device)
            out += [batch_norm_act.make_case((32, 64, 56, 56), d, mode, p, backends)
                    for mode, p in (("train", "fwd+bwd"), ("eval", "fwd"))]
    return [_mark(c) for c in out]


def make_step(case, impl, device):
    stem = importlib.import_module(f"fastdl.bench.{case['stem']}")
    return stem.make_step(dict(case, op=case["stem"]), impl, device)
