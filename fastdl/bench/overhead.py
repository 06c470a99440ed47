"""Per-call overhead: every public op and drop-in module at a tiny shape, where the math costs
nothing and what is timed is the path from the Python call to the kernel (argument checks, the
dispatcher, autograd) and back.

impls: fastdl, the fastdl module or function; eager, the torch.nn module or function it replaces
(same weights); no "compile" (at these shapes it measures torch.compile's guards, not the op).
Each step makes CALLS calls, so that one step is long enough for a wall-clock timer; the
per-call time is the step's median / CALLS (the "calls" field). fwd: under torch.no_grad()
(inference); fwd+bwd: with parameters and inputs requiring grad, the forward then
torch.autograd.grad of the inputs and parameters (a training call). Shapes: N=1 or 2, 4 channels
or 16 features, 3x3 to 5x5 images, sequences of 4.
"""
import torch
import torch.nn.functional as tF
from torch import nn

import fastdl
import fastdl.functional as F
from fastdl.bench import harness
from fastdl.bench.harness import dtype_name

IMPLS = ("fastdl", "eager")
CALLS = 50
PASSES = ("fwd", "fwd+bwd")


class _Tail(nn.Module):
    """relu(bn(x) + residual), as torchvision's BasicBlock writes it."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x, residual):
        return torch.relu(self.bn(x) + residual)


def _separable():
    return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())


def _fused_separable(ref):
    m = fastdl.DepthwiseSeparableConv2d(4, 8)
    m.load_state_dict(ref.state_dict())
    return m


def _image(N=2):
    return torch.randn(N, 4, 5, 5)


def _seq():
    return torch.randn(4, 1, 16)


# name: (the torch.nn module or function, its fastdl counterpart from it, inputs, mode)
ENTRIES = {
    "FusedBatchNorm2d+add+relu-train": (_Tail, lambda m: fastdl.FusedBatchNorm2d.from_module(m.bn, activation="relu"),
                                        lambda: (_image(), _image()), "train"),
    "FusedBatchNorm2d+add+relu-eval": (_Tail, lambda m: fastdl.FusedBatchNorm2d.from_module(m.bn, activation="relu"),
                                       lambda: (_image(), _image()), "eval"),
    "DepthwiseConv2d-k3": (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), fastdl.DepthwiseConv2d.from_module,
                           lambda: (_image(),), "train"),
    "DepthwiseSeparableConv2d-eval": (_separable, _fused_separable, lambda: (_image(),), "eval"),
    "scaled_dot_product_attention": (lambda: tF.scaled_dot_product_attention,
                                     lambda f: F.scaled_dot_product_attention,
                                     lambda: tuple(torch.randn(1, 2, 4, 8) for _ in range(3)), "train"),
    "FusedAttention-default": (lambda: nn.MultiheadAttention(16, 2, batch_first=True),
                               fastdl.FusedAttention.from_module, lambda: (torch.randn(1, 4, 16),) * 3, "train"),
    "FusedAttention-need_weights=False": (
        lambda: _NoWeights(nn.MultiheadAttention(16, 2, batch_first=True)),
        lambda m: _NoWeights(fastdl.FusedAttention.from_module(m.mha)), lambda: (torch.randn(1, 4, 16),) * 3, "train"),
    "FusedTransformerEncoderLayer": (
        lambda: nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True),
        fastdl.FusedTransformerEncoderLayer.from_module, lambda: (torch.randn(1, 4, 16),), "train"),
    "FusedLSTM-T4": (lambda: nn.LSTM(16, 16), fastdl.FusedLSTM.from_module, lambda: (_seq(),), "train"),
    "FusedGRU-T4": (lambda: nn.GRU(16, 16), fastdl.FusedGRU.from_module, lambda: (_seq(),), "train"),
    "FusedRNN-T4": (lambda: nn.RNN(16, 16), fastdl.FusedRNN.from_module, lambda: (_seq(),), "train"),
    "FusedLSTMCell": (lambda: nn.LSTMCell(16, 16), fastdl.FusedLSTMCell.from_module,
                      lambda: (torch.randn(1, 16), (torch.randn(1, 16), torch.randn(1, 16))), "train"),
    "FusedGRUCell": (lambda: nn.GRUCell(16, 16), fastdl.FusedGRUCell.from_module,
                     lambda: (torch.randn(1, 16), torch.randn(1, 16)), "train"),
    "FusedRNNCell": (lambda: nn.RNNCell(16, 16), fastdl.FusedRNNCell.from_module,
                     lambda: (torch.randn(1, 16), torch.randn(1, 16)), "train"),
}


class _NoWeights(nn.Module):
    """mha(q, k, v, need_weights=False)[0]."""

    def __init__(self, mha):
        super().__init__()
        self.mha = mha

    def forward(self, q, k, v):
        return self.mha(q, k, v, need_weights=False)[0]


def cases(device, quick, dtypes=None):
    """Every entry, fwd and fwd+bwd, in float32 (the only dtype every op has a CPU kernel for);
    quick: two entries."""
    if dtypes and torch.float32 not in dtypes:
        return []
    names = ["FusedBatchNorm2d+add+relu-train", "FusedLSTMCell"] if quick else ENTRIES
    return [dict(op="overhead", name=f"{name}-{p}", entry=name, dtype=dtype_name(torch.float32), calls=CALLS,
                 mode=ENTRIES[name][3], **{"pass": p}) for name in names for p in PASSES]


def _first(out):
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def make_step(case, impl, device):
    """CALLS calls of the impl's module or function on inputs made once."""
    make_ref, to_fastdl, make_inputs, mode = ENTRIES[case["entry"]]
    torch.manual_seed(0)
    ref = make_ref()
    if isinstance(ref, nn.Module):
        ref.to(device)
    fn = to_fastdl(ref) if impl == "fastdl" else ref
    if isinstance(fn, nn.Module):
        fn.train(mode == "train")
    inputs = _to(make_inputs(), device)
    if case["pass"] == "fwd":
        def step():
            with torch.no_grad():
                for _ in range(CALLS):
                    fn(*inputs)
        return step
    leaves = [t.requires_grad_() for t in _flat(inputs) if t.is_floating_point()]
    params = list(fn.parameters()) if isinstance(fn, nn.Module) else []
    wrt = list({id(t): t for t in leaves + params}.values())

    def step():
        for _ in range(CALLS):
            torch.autograd.grad(_first(fn(*inputs)).sum(), wrt, allow_unused=True)
    return step


def _flat(inputs):
    for t in inputs:
        yield from (_flat(t) if isinstance(t, tuple) else (t,))


def _to(inputs, device):
    return tuple(_to(t, device) if isinstance(t, tuple) else t.to(device) for t in inputs)
