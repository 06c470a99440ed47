"""relu(batch_norm(x) + residual), the tail of a ResNet block: fastdl against the PyTorch it replaces.

impls: fastdl, `FusedBatchNorm2d(C, activation="relu")(x, residual)`; eager, `nn.BatchNorm2d` then
`+= residual` and an in-place relu, as torchvision's ResNet blocks write it; compile, torch.compile
of that eager composition (fullgraph, static shapes, default mode).
Cases: the BatchNorm shapes of ResNet's four stages (N=32; C=64..512; H=W=56..7), plus one in
channels_last; fp32 (and bf16 on CUDA, with fp32 parameters); training and eval, each forward
alone and forward+backward. A training forward runs with inputs that require grad (the forward of a
training step); an eval forward runs under no_grad (inference); fwd+bwd is the forward and
torch.autograd.grad of (x, residual, weight, bias). quick: one ResNet-stage shape, a training
forward+backward and an inference forward.
"""
import torch
from torch import nn

import fastdl
from fastdl.bench import harness
from fastdl.bench.harness import DTYPE_NAMES, dtype_name

SHAPES = [(32, 64, 56, 56), (32, 128, 28, 28), (32, 256, 14, 14), (32, 512, 7, 7)]
QUICK_SHAPES = [(32, 256, 14, 14)]
CHANNELS_LAST_SHAPE = (32, 256, 14, 14)
PASSES = [("train", "fwd"), ("train", "fwd+bwd"), ("eval", "fwd"), ("eval", "fwd+bwd")]
QUICK_PASSES = [("train", "fwd+bwd"), ("eval", "fwd")]
IMPLS = harness.IMPLS


def traffic_bytes(shape, dtype, mode, pass_):
    """Bytes the fewest-pass kernels must move, counting E = one tensor's bytes, m = a 1-byte mask.

    eval fwd: read x and residual, write y: 3E. train fwd: one more read of x for the statistics,
    and the relu mask saved for backward: 4E + m. Backward, train: a reduction pass reading dy, x and
    the mask, then an elementwise pass reading them again and writing dx and d(residual): 6E + 2m.
    Backward, eval (no reduction needed for dx): one pass, 4E + m, after a forward saving the mask.
    """
    numel = torch.Size(shape).numel()
    E, m = numel * dtype.itemsize, numel
    return {("eval", "fwd"): 3 * E, ("train", "fwd"): 4 * E + m,
            ("train", "fwd+bwd"): 10 * E + 3 * m, ("eval", "fwd+bwd"): 7 * E + 2 * m}[mode, pass_]


def fastdl_backends(device):
    """dtype name -> the backend fastdl.info() says runs the op ("reference" means no kernel is timed)."""
    return {op["dtype"]: op["backend"] for op in fastdl.info()["ops"]
            if op["op"] == "batch_norm_act" and op["device"] == device}


def make_case(shape, dtype, mode, pass_, backends, channels_last=False):
    N, C, H, W = shape
    name = f"N{N}-C{C}-H{H}-W{W}-{DTYPE_NAMES[dtype]}-{mode}-{pass_}" + ("-cl" if channels_last else "")
    return {"op": "batch_norm_act", "name": name, "shape": list(shape), "dtype": dtype_name(dtype),
            "memory_format": "channels_last" if channels_last else "contiguous", "mode": mode, "pass": pass_,
            "bytes": traffic_bytes(shape, dtype, mode, pass_), "backend": backends.get(dtype_name(dtype))}


def cases(device, quick, dtypes=None):
    """The cases measured on `device` ("cpu" or "cuda") in `dtypes` (default: fp32, and bf16 on
    CUDA); `quick`: one shape, two passes."""
    dtypes = dtypes or [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
    shapes, passes = (QUICK_SHAPES, QUICK_PASSES) if quick else (SHAPES, PASSES)
    backends = fastdl_backends(device)
    out = [make_case(s, d, mode, p, backends) for d in dtypes for s in shapes for mode, p in passes]
    if not quick:
        out += [make_case(CHANNELS_LAST_SHAPE, d, mode, p, backends, channels_last=True)
                for d in dtypes for mode, p in passes]
    return out


class EagerTail(nn.Module):
    """relu(bn(x) + residual) as torchvision's BasicBlock writes it: out += identity; relu(inplace)."""

    def __init__(self, num_features):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features)

    def forward(self, x, residual):
        out = self.bn(x)
        out += residual
        return torch.relu_(out)


def make_module(impl, num_features):
    if impl == "fastdl":
        return fastdl.FusedBatchNorm2d(num_features, activation="relu")
    if impl == "eager":
        return EagerTail(num_features)
    return torch.compile(EagerTail(num_features), fullgraph=True, dynamic=False)


def make_step(case, impl, device):
    """A function running one forward (and backward) of the impl's module on random inputs of the
    case, made once."""
    module = make_module(impl, case["shape"][1]).to(device).train(case["mode"] == "train")
    dtype = getattr(torch, case["dtype"])
    fmt = torch.channels_last if case["memory_format"] == "channels_last" else torch.contiguous_format
    needs_grad = case["mode"] == "train" or case["pass"] == "fwd+bwd"

    def tensor():
        t = torch.randn(case["shape"], device=device, dtype=dtype).to(memory_format=fmt)
        return t.requires_grad_(needs_grad)
    x, residual = tensor(), tensor()
    if not needs_grad:
        def step():
            with torch.no_grad():
                return module(x, residual)
    elif case["pass"] == "fwd":
        def step():
            return module(x, residual)
    else:
        grad = torch.randn_like(x)
        inputs = [x, residual, *module.parameters()]

        def step():
            return torch.autograd.grad(module(x, residual), inputs, grad)
    return step
