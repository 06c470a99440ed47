"""Depthwise conv2d and MobileNetV1's separable block: fastdl against the PyTorch it replaces.

impls: fastdl, `fastdl.DepthwiseConv2d` (or `fastdl.DepthwiseSeparableConv2d`); eager,
`nn.Conv2d(C, C, k, groups=C)` (oneDNN on CPU, cuDNN on GPU) or the block's torch.nn Sequential;
compile, torch.compile of the eager module (fullgraph, static shapes, default mode).
Cases: MobileNetV2's depthwise layers (N=32, k=3, stride 1 and 2, C=32..960, H=W=112..7), the
issue's target shapes (N=32, C=128, 56x56, k=3 and k=7), ConvNeXt's k=7 and RepLKNet's k=31; one
separable block. channels_last unless marked -nchw; fp32 (and bf16 on CUDA). fwd is inference
(no_grad); fwd+bwd is the forward and torch.autograd.grad of the input and every parameter.
quick: the k=3 target shape, forward+backward.
"""
import torch
from torch import nn

import fastdl
from fastdl.bench import harness
from fastdl.bench.harness import DTYPE_NAMES, dtype_name

# (N, C, H, W, kernel, stride)
MOBILENET_V2 = [(32, 32, 112, 112, 3, 1), (32, 96, 112, 112, 3, 2), (32, 144, 56, 56, 3, 1),
                (32, 144, 56, 56, 3, 2), (32, 192, 28, 28, 3, 1), (32, 384, 14, 14, 3, 1),
                (32, 576, 14, 14, 3, 2), (32, 960, 7, 7, 3, 1)]
TARGETS = [(32, 128, 56, 56, 3, 1), (32, 128, 56, 56, 7, 1)]
LARGE_KERNELS = [(32, 96, 56, 56, 7, 1), (8, 128, 28, 28, 31, 1)]
CPU_LARGE_KERNELS = [(32, 96, 56, 56, 7, 1), (2, 128, 28, 28, 31, 1)]
BLOCK = (32, 128, 28, 28, 3, 1)
IMPLS = harness.IMPLS


def traffic_bytes(shape, stride, dtype, pass_):
    """Bytes the fewest-pass kernels move: fwd reads x, writes y; backward reads dy twice (input and
    weight gradients) and x once, writes dx: fwd+bwd = 2 * |x| + |dx| + |y| + 2 * |dy|."""
    N, C, H, W = shape
    x = N * C * H * W * dtype.itemsize
    y = x // (stride * stride)
    return x + y if pass_ == "fwd" else 3 * x + 3 * y


def make_case(spec, dtype, pass_, channels_last=True, block=False):
    N, C, H, W, k, s = spec
    name = (f"{'block-' if block else ''}N{N}-C{C}-H{H}-k{k}-s{s}-{DTYPE_NAMES[dtype]}-{pass_}"
            + ("" if channels_last else "-nchw"))
    return {"op": "depthwise_conv2d", "name": name, "shape": [N, C, H, W], "kernel": k, "stride": s,
            "dtype": dtype_name(dtype), "block": block,
            "memory_format": "channels_last" if channels_last else "contiguous", "pass": pass_,
            "bytes": traffic_bytes((N, C, H, W), s, dtype, pass_)}


def cases(device, quick, dtypes=None):
    """The cases measured on `device` in `dtypes` (default: fp32, and bf16 on CUDA unless quick);
    `quick`: the k=3 target shape, channels_last, forward+backward."""
    if quick:
        return [make_case(TARGETS[0], d, "fwd+bwd") for d in dtypes or [torch.float32]]
    dtypes = dtypes or [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
    large = LARGE_KERNELS if device == "cuda" else CPU_LARGE_KERNELS
    out = []
    for dtype in dtypes:
        for spec in MOBILENET_V2 + TARGETS + large:
            out += [make_case(spec, dtype, p) for p in ("fwd", "fwd+bwd")]
        out += [make_case(t, dtype, "fwd+bwd", channels_last=False) for t in TARGETS]
        out += [make_case(BLOCK, dtype, p, block=True) for p in ("fwd", "fwd+bwd")]
    return out


def make_module(impl, case):
    C, k, s = case["shape"][1], case["kernel"], case["stride"]
    if case["block"]:
        eager = nn.Sequential(nn.Conv2d(C, C, k, s, k // 2, groups=C, bias=False), nn.BatchNorm2d(C), nn.ReLU(inplace=True),
                              nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C), nn.ReLU(inplace=True))
        ours = fastdl.DepthwiseSeparableConv2d(C, C, k, s)
    else:
        eager = nn.Conv2d(C, C, k, s, k // 2, groups=C)
        ours = fastdl.DepthwiseConv2d(C, C, k, s, k // 2)
    if impl == "fastdl":
        ours.load_state_dict(eager.state_dict())
        return ours
    if impl == "eager":
        return eager
    return torch.compile(eager, fullgraph=True, dynamic=False)


def make_step(case, impl, device):
    """One forward (inference) or forward + backward of the impl's module on a random input of the case."""
    dtype = getattr(torch, case["dtype"])
    fmt = torch.channels_last if case["memory_format"] == "channels_last" else torch.contiguous_format
    module = make_module(impl, case).to(device=device, dtype=dtype, memory_format=fmt)
    x = torch.randn(case["shape"], device=device, dtype=dtype).to(memory_format=fmt)
    if case["pass"] == "fwd":
        module.eval()
    else:
        x.requires_grad_()
    return harness.grad_step(lambda: module(x), [x, *module.parameters()], case)
