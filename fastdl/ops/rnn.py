"""rnn: LSTM, GRU and Elman RNN layers, the time loop and backpropagation through time in C++.

The fastdl::rnn_forward / _backward schemas (csrc/fastdl.cpp) run one layer and direction given
the input projections of every step; their C++ implementations for CPU (csrc/cpu/rnn_api.cpp) and
CUDA (csrc/cuda/rnn_api.cpp) share the loop of csrc/rnn_scan.h (per step, the recurrent GEMM and
one fused pointwise kernel), and the dispatcher picks one. The forward op's autograd is C++
(csrc/autograd/rnn.cpp); the backward op is not differentiable (a create_graph=True gradient
raises when differentiated). fastdl::rnn_cell (csrc/autograd/rnn_cell.cpp) is a cell module's
whole step in one call from Python: checks, input projection and one rnn_forward step, composite,
so its autograd is theirs. This module adds the fake impls, `scan` (one layer and direction,
routed to fastdl/reference/rnn.py only when fastdl._backends says no kernel applies), `cell` and
`rnn`, the stack of layers and directions that fastdl.FusedLSTM / FusedGRU / FusedRNN run.
"""
import torch
import torch.nn.functional as tF

from fastdl import _autograd, _backends, _extension
from fastdl._tensor import any_autocast, autocast_dtype, cast_all, device_type
from fastdl.reference import rnn as reference

MODES = tuple(reference.GATES)
SPEC = _backends.register(_backends.OpSpec(
    "rnn", gpu="cuda",
    cpu_dtypes=(torch.float32, torch.float64),
    gpu_dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64)))


def scan(gates_x, batch_sizes, h0, c0, w_hh, b_hh, mode, reverse):
    """One layer and direction: (output, h_n, c_n or None).

    gates_x: x W_ih^T + b_ih, (T, N, G*H), or packed (sum(batch_sizes), G*H) with a PackedSequence's
    batch_sizes; h0, c0 (c0 for "lstm" only): (N, H); w_hh: (G*H, H); b_hh: (G*H,) or None.
    output: gates_x's shape with H last; h_n, c_n: (N, H), each sequence's last state.
    """
    if _backends.choose(SPEC.name, device_type(h0), h0.dtype).name == "reference":
        return reference.scan(gates_x, batch_sizes, h0, c0, w_hh, b_hh, mode, reverse)
    save = torch.is_grad_enabled() and (gates_x.requires_grad or h0.requires_grad or w_hh.requires_grad or (
        c0 is not None and c0.requires_grad) or (b_hh is not None and b_hh.requires_grad))
    out, h_n, c_n, _ = torch.ops.fastdl.rnn_forward.default(gates_x, batch_sizes, h0, c0, w_hh, b_hh, mode, reverse,
                                                            save)
    return out, h_n, c_n if mode == "lstm" else None


def cell_is_fused(x):
    """Whether a cell step on x runs as the single fastdl::rnn_cell call (csrc/autograd/rnn_cell.cpp):
    a kernel for x's device and dtype, and no autocast (which project / scan handle)."""
    return not any_autocast() and _backends.choose(SPEC.name, device_type(x), x.dtype).name != "reference"


def cell(x, h0, c0, w_ih, w_hh, b_ih, b_hh, mode):
    """One step of a cell: (h', c' or None). x: (N, I) or (I,); h0, c0 (c0 for "lstm" only): like x
    with H features, or None for zeros; w_ih (G*H, I); w_hh (G*H, H); b_ih, b_hh (G*H,) or None.
    cell_is_fused(x) must hold. The checks name the arguments as the cell modules take them."""
    h, c = torch.ops.fastdl.rnn_cell.default(x, h0, c0, w_ih, w_hh, b_ih, b_hh, mode)
    return h, c if mode == "lstm" else None


_HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN_MIN_MACS = 1 << 22  # below this a oneDNN call's fixed cost (~35 us) loses to MKL (see csrc/rnn_scan.h)


def _onednn_applies(x, w):
    """Whether the input projection x w^T runs on oneDNN: CPU float32, oneDNN built and enabled,
    eager, and a GEMM large enough to pay for oneDNN's per-call cost."""
    return (x.numel() * w.shape[0] >= _ONEDNN_MIN_MACS and _HAS_ONEDNN and x.dtype == torch.float32
            and x.is_cpu and torch.backends.mkldnn.enabled and not torch.compiler.is_compiling())


class _OneDnnLinear(torch.autograd.Function):
    """x w^T + b for a 2-D x, its three GEMMs (forward, grad_x, grad_w) on oneDNN, as
    csrc/rnn_scan.h runs the recurrent ones: at these shapes about twice MKL's sgemm on CPUs where
    MKL takes a slow path (AMD), as fast elsewhere."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable ATen GEMMs
            return (grad.mm(w) if ctx.needs_input_grad[0] else None, grad.t().mm(x) if ctx.needs_input_grad[1] else None,
                    grad.sum(0) if ctx.needs_input_grad[2] else None)
        lp = torch.ops.mkldnn._linear_pointwise
        grad_x = lp(grad, w.t(), None, "none", [], "") if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:  # grad^T x, the operand oneDNN copies chosen as in csrc/rnn_scan.h
            S, M, K = x.shape[0], grad.shape[1], x.shape[1]
            grad_w = (lp(grad.t(), x.t(), None, "none", [], "") if S * M <= S * K + M * K
                      else lp(x.t(), grad.t(), None, "none", [], "").t())
            if grad_w.stride() != w.stride():  # the gradient layout contract (DDP's buckets view w's strides)
                grad_w = torch.empty_like(w).copy_(grad_w)
        grad_b = grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def project(x, w_ih, b_ih):
    """gates_x = x w_ih^T + b_ih for x of (..., I): F.linear, or oneDNN on the CPU in float32 for
    large GEMMs."""
    if not _onednn_applies(x, w_ih):
        if any_autocast() and torch.is_autocast_enabled(x.device.type):  # x is in the dtype the layer runs in
            with torch.autocast(x.device.type, enabled=False):
                return tF.linear(x, w_ih, b_ih)
        return tF.linear(x, w_ih, b_ih)
    flat = x.reshape(-1, x.shape[-1])
    return _OneDnnLinear.apply(flat, w_ih, b_ih).view(*x.shape[:-1], w_ih.shape[0])


def autocast_runs_low(mode, device, cell):
    """Whether torch.autocast gives nn's layer (cell=False) or cell of this mode a lower-precision
    output on device (a device type), so that fastdl's runs in that dtype too: on CUDA all of them (cuDNN's RNN
    and the *_cell ops are on autocast's list). On the CPU, the LSTM layer (mkldnn_rnn_layer) and
    Elman's layer and cell (their linear ops) do; the GRU layer and the LSTM and GRU cells return
    float32. The tests compare these dtypes with nn's."""
    if device == "cuda":
        return True
    return device == "cpu" and (mode.startswith("rnn_") or (mode == "lstm" and not cell))


def rnn(mode, x, batch_sizes, hx, cx, weights, num_layers, bidirectional, dropout, training):
    """A stack of layers, as nn.LSTM / nn.GRU / nn.RNN compute it: (output, h_n, c_n or None).

    x: (T, N, I), or packed (sum(batch_sizes), I); hx, cx: (num_layers * D, N, H), cx for "lstm";
    weights: per layer and direction (D = 2 when bidirectional), (w_ih, w_hh, b_ih, b_hh), the
    biases None without bias. Dropout of probability `dropout` applies to every layer's output but
    the last, in training. output: (T, N, D*H) or packed (S, D*H); h_n, c_n: (num_layers * D, N, H).
    Under torch.autocast it runs in autocast's lower-precision dtype where nn's layer does (see
    autocast_runs_low).
    """
    if any_autocast() and autocast_runs_low(mode, x.device.type, cell=False):
        dtype = autocast_dtype(x.device.type)
        x, hx, cx = cast_all(dtype, x, hx, cx)
        weights = [cast_all(dtype, *w) for w in weights]
    D = 2 if bidirectional else 1
    h_n, c_n = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            k = layer * D + d
            w_ih, w_hh, b_ih, b_hh = weights[k]
            out, h, c = scan(project(x, w_ih, b_ih), batch_sizes, hx[k], None if cx is None else cx[k], w_hh,
                             b_hh, mode, reverse=d == 1)
            outs.append(out), h_n.append(h), c_n.append(c)
        x = torch.cat(outs, -1) if D == 2 else outs[0]
        if dropout and training and layer < num_layers - 1:
            x = tF.dropout(x, dropout, training=True)
    if len(h_n) == 1:  # one layer and direction: a view, not a copy
        return x, h_n[0].unsqueeze(0), None if cx is None else c_n[0].unsqueeze(0)
    return x, torch.stack(h_n), None if cx is None else torch.stack(c_n)


def _workspace_width(mode, H):
    return {"lstm": 5 * H, "gru": 4 * H}.get(mode, 0)


def _fake_forward(gates_x, batch_sizes, h0, c0, w_hh, b_hh, mode, reverse, save_workspace):
    H = h0.shape[1]
    rows = gates_x.shape[0] if batch_sizes is not None else gates_x.shape[0] * gates_x.shape[1]
    return (gates_x.new_empty(gates_x.shape[:-1] + (H,)), h0.new_empty(h0.shape),
            h0.new_empty(h0.shape if mode == "lstm" else (0,)),
            h0.new_empty((rows if save_workspace else 0, _workspace_width(mode, H))))


def _fake_backward(grad_output, grad_h_n, grad_c_n, batch_sizes, h0, c0, w_hh, output, workspace, mode, reverse):
    G = w_hh.shape[0] // w_hh.shape[1]
    return (output.new_empty(output.shape[:-1] + (w_hh.shape[0],)), h0.new_empty(h0.shape),
            h0.new_empty(h0.shape if mode == "lstm" else (0,)), w_hh.new_empty(w_hh.shape),
            w_hh.new_empty((G * w_hh.shape[1],)))


if _extension.loaded():
    torch.library.register_fake("fastdl::rnn_forward")(_fake_forward)
    torch.library.register_fake("fastdl::rnn_backward")(_fake_backward)
    torch.library.register_autograd("fastdl::rnn_backward", _autograd.refused("rnn"))
