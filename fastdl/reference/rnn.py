"""Reference recurrent layers in plain PyTorch: the contract of fastdl::rnn_forward, and the fallback.

One layer and direction runs `scan(gates_x, batch_sizes, h0, c0, w_hh, b_hh, mode, reverse)` with
gates_x = x W_ih^T + b_ih precomputed for every step. Without batch_sizes, gates_x is (T, N, G*H)
and every sequence runs T steps. With batch_sizes (a PackedSequence's: int64 (T,), non-increasing,
batch_sizes[0] = N), gates_x is packed (sum(batch_sizes), G*H): step t holds the first
batch_sizes[t] sequences, and a sequence's state stops changing after its last step (forward) or
starts from h0 at its last step (reverse). Modes and gate orders are PyTorch's (csrc/rnn.h).
"""
import torch

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def cell(mode, gx, gh, h, c=None):
    """One step on B rows: gx, gh (B, G*H), h, c (B, H) -> (h', c' or None)."""
    if mode == "lstm":
        i, f, g, o = (gx + gh).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "gru":
        xr, xz, xn = gx.chunk(3, 1)
        hr, hz, hn = gh.chunk(3, 1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h, None
    pre = gx + gh
    return (torch.tanh(pre) if mode == "rnn_tanh" else torch.relu(pre)), None


def steps(T, N, batch_sizes):
    """[(row offset in gates_x's first dim, active rows)] for each step t in order 0..T-1."""
    if batch_sizes is None:
        return [(t * N, N) for t in range(T)]
    sizes = [int(b) for b in batch_sizes]
    offsets = [sum(sizes[:t]) for t in range(len(sizes))]
    return list(zip(offsets, sizes))


def scan(gates_x, batch_sizes, h0, c0, w_hh, b_hh, mode, reverse):
    """(output, h_n, c_n or None); differentiable. output has gates_x's shape with H last."""
    H = h0.shape[-1]
    packed = batch_sizes is not None
    flat = gates_x if packed else gates_x.reshape(-1, gates_x.shape[-1])
    T = len(batch_sizes) if packed else gates_x.shape[0]
    order = steps(T, h0.shape[0], batch_sizes)
    h, c = h0, c0
    outs = [None] * T
    for t in (reversed(range(T)) if reverse else range(T)):
        start, B = order[t]
        gh = torch.nn.functional.linear(h[:B], w_hh, b_hh)
        h_new, c_new = cell(mode, flat[start:start + B], gh, h[:B], None if c is None else c[:B])
        outs[t] = h_new
        h = torch.cat([h_new, h[B:]])
        if c is not None:
            c = torch.cat([c_new, c[B:]])
    output = torch.cat(outs) if T else flat.new_empty(0, H)
    return (output if packed else output.view(*gates_x.shape[:-1], H)), h, c
