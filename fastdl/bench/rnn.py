"""Recurrent layers: fastdl.FusedLSTM / FusedGRU / FusedRNN against nn.LSTM / GRU / RNN (oneDNN or
the native loop on CPU, cuDNN on CUDA), and a Python loop of fastdl's cells against one of nn's.

Layer cases (x of (T, N, I), zero initial states): fastdl, the Fused module sharing the nn module's
weights; eager, the nn module. There is no "compile" for layers: torch.compile does not trace
nn.LSTM / GRU / RNN (it runs them eagerly), so it would time eager again. Shapes: PyTorch's
fastrnns one (T=100, N=64, I=H=512, 1 layer), small batches (N=1 and 8) and a 2-layer
bidirectional classifier (T=50, N=32, I=128, H=256, batch_first).
Cell cases: a Python loop over T steps of fastdl.Fused*Cell (fastdl), of nn.*Cell (eager), and of
torch.compile(nn.*Cell, fullgraph=True) (compile: the step compiled, the loop left in Python). The
loop takes its steps from x.unbind(0) (whose backward is one stack) rather than x[t] (whose backward
fills and adds a zero tensor of x's size per step: O(T^2) traffic that swamps any cell).
fwd is inference (no_grad); fwd+bwd the forward and torch.autograd.grad of x and every parameter.
flops: 2 * T * N * G * H * (I + H) per layer and direction for the forward (the GEMMs), 3 times
that for forward and backward. quick: the fastrnns LSTM and GRU layers, forward+backward.
"""
import torch
from torch import nn

import fastdl
from fastdl.bench import harness
from fastdl.bench.harness import DTYPE_NAMES, dtype_name

LAYERS = {"lstm": (nn.LSTM, fastdl.FusedLSTM, 4), "gru": (nn.GRU, fastdl.FusedGRU, 3),
          "rnn": (nn.RNN, fastdl.FusedRNN, 1)}
CELLS = {"lstm": (nn.LSTMCell, fastdl.FusedLSTMCell), "gru": (nn.GRUCell, fastdl.FusedGRUCell),
         "rnn": (nn.RNNCell, fastdl.FusedRNNCell)}
IMPLS = harness.IMPLS


def case(kind, cell, T, N, I, H, layers, bidirectional, dtype, pass_):
    name = (f"{kind}{'cell' if cell else ''}-T{T}-N{N}-I{I}-H{H}" + (f"-L{layers}" if layers > 1 else "")
            + ("-bi" if bidirectional else "") + f"-{DTYPE_NAMES[dtype]}-{pass_}")
    G, D = LAYERS[kind][2], 2 if bidirectional else 1
    fwd = sum(2 * T * N * G * H * ((I if layer == 0 else D * H) + H) * D for layer in range(layers))
    return dict(op="rnn", kind=kind, cell=cell, name=name, shape=[T, N, I, H], layers=layers,
                bidirectional=bidirectional, dtype=dtype_name(dtype), **{"pass": pass_},
                flops=fwd if pass_ == "fwd" else 3 * fwd)


def cases(device, quick, dtypes=None):
    """The cases measured on `device` in `dtypes` (default: fp32 on CPU or in quick, also fp16 and
    bf16 on CUDA); `quick`: the fastrnns LSTM and GRU layers, forward+backward."""
    passes = ("fwd", "fwd+bwd")
    if quick:
        return [case(kind, False, 100, 64, 512, 512, 1, False, d, "fwd+bwd") for d in dtypes or [torch.float32]
                for kind in ("lstm", "gru")]
    dtypes = dtypes or ((torch.float32,) if device == "cpu" else (torch.float32, torch.float16, torch.bfloat16))
    out = []
    for dtype in dtypes:
        for kind in LAYERS:
            out += [case(kind, False, 100, 64, 512, 512, 1, False, dtype, p) for p in passes]
            out += [case(kind, True, 100, 64, 512, 512, 1, False, dtype, p) for p in passes]
            out += [case(kind, False, 100, N, 512, 512, 1, False, dtype, p) for N in (1, 8) for p in passes]
            out += [case(kind, False, 50, 32, 128, 256, 2, True, dtype, p) for p in passes]
    return out


def layer_forward(impl, case, device):
    T, N, I, H = case["shape"]
    dtype = getattr(torch, case["dtype"])
    eager_cls, fused_cls, _ = LAYERS[case["kind"]]
    eager = eager_cls(I, H, num_layers=case["layers"], bidirectional=case["bidirectional"], device=device,
                      dtype=dtype)
    module = fused_cls.from_module(eager) if impl == "fastdl" else eager
    x = torch.randn(T, N, I, device=device, dtype=dtype, requires_grad=case["pass"] != "fwd")
    return (lambda: module(x)[0]), [x, *module.parameters()]


def cell_forward(impl, case, device):
    T, N, I, H = case["shape"]
    dtype = getattr(torch, case["dtype"])
    eager_cls, fused_cls = CELLS[case["kind"]]
    eager = eager_cls(I, H, device=device, dtype=dtype)
    cell = fused_cls.from_module(eager) if impl == "fastdl" else eager
    step = torch.compile(eager, fullgraph=True) if impl == "compile" else cell
    x = torch.randn(T, N, I, device=device, dtype=dtype, requires_grad=case["pass"] != "fwd")
    lstm = case["kind"] == "lstm"

    def loop(x):
        state = None
        outs = []
        for x_t in x.unbind(0):
            state = step(x_t, state)
            outs.append(state[0] if lstm else state)
        return torch.stack(outs)
    return (lambda: loop(x)), [x, *cell.parameters()]


def make_step(case, impl, device):
    """The step of an impl: a layer's or a cell loop's forward (and backward); no "compile" for layers."""
    if impl == "compile" and not case["cell"]:
        raise harness.Unsupported("torch.compile does not trace nn.LSTM / GRU / RNN: it would time eager again")
    forward, inputs = (cell_forward if case["cell"] else layer_forward)(impl, case, device)
    return harness.grad_step(forward, inputs, case)
