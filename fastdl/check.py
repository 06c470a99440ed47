"""`fastdl check`: every op and every model against its float64 PyTorch reference on this machine, as
table rows (the models' in fastdl/check_models.py)."""
import itertools

import torch
import torch.nn as nn
import torch.nn.functional as tF

from fastdl import _backends
from fastdl import functional as F
from fastdl.check_models import check_models
from fastdl.nn import FusedAttention, FusedBatchNorm2d
from fastdl.testing import check_close

ACTIVATIONS = {None: lambda z: z, "relu": tF.relu, "relu6": tF.relu6, "leaky_relu": tF.leaky_relu}


# fp16 / bf16 on the GPU are held to "twice PyTorch's own error" by the cuda tests, not here.
DTYPES = (torch.float32, torch.float64)


def check_batch_norm_act(device):
    """Rows (op, case, backend, output, ok, message): FusedBatchNorm2d vs nn.BatchNorm2d + add + act
    in float64, one training step then one eval step, for each dtype, layout and activation."""
    shape, C = (4, 6, 7, 5), 6
    n = shape[0] * shape[2] * shape[3]
    for dtype, cl, act in itertools.product(DTYPES, (False, True), ACTIVATIONS):
        g = torch.Generator().manual_seed(0)
        ref = nn.BatchNorm2d(C, dtype=torch.float64, device=device)
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5, generator=g)
            ref.bias.uniform_(-0.5, 0.5, generator=g)
        ours = FusedBatchNorm2d(C, activation=act, device=device, dtype=dtype)
        ours.load_state_dict(ref.state_dict())
        fmt = torch.channels_last if cl else torch.contiguous_format
        case = f"{'x'.join(map(str, shape))}-{str(dtype)[6:]}-{'channels_last' if cl else 'nchw'}-{act or 'none'}"
        backend = _backends.choose("batch_norm_act", device, dtype).name
        for training in (True, False):
            ref.train(training), ours.train(training)
            x, r, dy = (torch.randn(shape, generator=g, dtype=torch.float64).to(device) for _ in range(3))
            x64, r64 = x.clone().requires_grad_(), r.clone().requires_grad_()
            y64 = ACTIVATIONS[act](ref(x64) + r64)
            want = (y64,) + torch.autograd.grad(y64, (x64, r64, ref.weight, ref.bias), dy)
            xt, rt = (t.to(dtype, memory_format=fmt).requires_grad_() for t in (x, r))
            yt = ours(xt, rt)
            got = (yt,) + torch.autograd.grad(yt, (xt, rt, ours.weight, ours.bias), dy.to(dtype, memory_format=fmt))
            names = ("y", "grad_x", "grad_residual", "grad_weight", "grad_bias")
            for name, a, b in zip(names, got, want):
                ok, msg = check_close(a, b, dtype, n=n if name in ("grad_weight", "grad_bias") else 1)
                yield ("batch_norm_act", f"{case}-{'train' if training else 'eval'}", backend, name, ok, msg)
        for name in ("running_mean", "running_var"):
            ok, msg = check_close(getattr(ours, name), getattr(ref, name), dtype, n=n)
            yield ("batch_norm_act", f"{case}-stats", backend, name, ok, msg)


def check_depthwise_conv2d(device):
    """Rows (op, case, backend, output, ok, message): fastdl.functional.depthwise_conv2d vs
    F.conv2d(groups=C) in float64, output and the input, weight and bias gradients, for each dtype,
    layout and a few kernel / stride / dilation / multiplier settings."""
    settings = [(3, 1, 1, 1), (5, 2, 2, 1), (7, 1, 1, 2)]  # kernel, stride, dilation, multiplier
    for dtype, cl, (k, stride, dil, mult) in itertools.product(DTYPES, (False, True), settings):
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(shape, generator=g, dtype=torch.float64).to(device)
                   for shape in ((2, 4, 11, 9), (4 * mult, 1, k, k), (4 * mult,)))
        pad = dil * (k - 1) // 2
        x64, w64, b64 = (t.clone().requires_grad_() for t in (x, w, b))
        y64 = tF.conv2d(x64, w64, b64, stride, pad, dil, groups=4)
        dy = torch.randn(y64.shape, generator=g, dtype=torch.float64).to(device)
        want = (y64,) + torch.autograd.grad(y64, (x64, w64, b64), dy)
        fmt = torch.channels_last if cl else torch.contiguous_format
        xt = x.to(dtype, memory_format=fmt).requires_grad_()
        wt, bt = (t.to(dtype).requires_grad_() for t in (w, b))
        yt = F.depthwise_conv2d(xt, wt, bt, stride, pad, dil)
        got = (yt,) + torch.autograd.grad(yt, (xt, wt, bt), dy.to(dtype, memory_format=fmt))
        case = f"2x4x11x9-k{k}-s{stride}-d{dil}-m{mult}-{str(dtype)[6:]}-{'channels_last' if cl else 'nchw'}"
        backend = _backends.choose("depthwise_conv2d", device, dtype).name
        positions = y64.shape[0] * y64.shape[2] * y64.shape[3]
        for name, a, e, n in zip(("y", "grad_x", "grad_weight", "grad_bias"), got, want,
                                 (k * k, k * k * mult, positions, positions)):
            ok, msg = check_close(a, e, dtype, n=n)
            yield ("depthwise_conv2d", case, backend, name, ok, msg)


def check_attention(device):
    """Rows (op, case, backend, output, ok, message): fastdl.functional.scaled_dot_product_attention
    vs F.scaled_dot_product_attention in float64 (out, grad_q, grad_k, grad_v), for each dtype and a
    few settings (causal, cross-attention, grouped-query, key padding, additive mask, odd head dim);
    then FusedAttention vs nn.MultiheadAttention (output and weights)."""
    settings = [  # name, N, H, Hkv, L, S, D, causal, padded, masked
        ("self", 2, 4, 4, 33, 33, 64, False, False, False),
        ("causal-cross", 2, 4, 4, 17, 40, 40, True, False, False),
        ("gqa-padded", 2, 4, 2, 20, 29, 72, False, True, False),
        ("masked", 2, 2, 2, 9, 13, 16, False, False, True),
    ]
    for dtype, (name, N, H, Hkv, L, S, D, causal, padded, masked) in itertools.product(DTYPES, settings):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64).to(device)
                   for shape in ((N, H, L, D), (N, Hkv, S, D), (N, Hkv, S, D)))
        dout = torch.randn(N, H, L, D, generator=g, dtype=torch.float64).to(device)
        padding = (torch.arange(S) < torch.tensor([S, S // 2]).view(2, 1)).to(device) if padded else None
        mask = torch.randn(N, 1, L, S, generator=g, dtype=torch.float64).to(device) if masked else None
        dense = mask
        if padded:
            dense = torch.zeros(N, 1, 1, S, dtype=torch.float64, device=device).masked_fill(
                ~padding.view(N, 1, 1, S), float("-inf"))
        ins64 = [t.clone().requires_grad_() for t in (q, k, v)]
        y64 = tF.scaled_dot_product_attention(*ins64, attn_mask=dense, is_causal=causal, enable_gqa=H != Hkv)
        want = (y64,) + torch.autograd.grad(y64, ins64, dout)
        ins = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        y = F.scaled_dot_product_attention(*ins, attn_mask=mask.to(dtype) if masked else None, is_causal=causal,
                                           enable_gqa=H != Hkv, key_padding_mask=padding)
        got = (y,) + torch.autograd.grad(y, ins, dout.to(dtype))
        case = f"{name}-N{N}-H{H}-Hkv{Hkv}-L{L}-S{S}-D{D}-{str(dtype)[6:]}"
        backend = _backends.choose("attention", device, dtype).name
        for out, a, e, n in zip(("out", "grad_q", "grad_k", "grad_v"), got, want, (S, S, L * H // Hkv, L * H // Hkv)):
            ok, msg = check_close(a, e, dtype, n=n)
            yield ("attention", case, backend, out, ok, msg)
    for dtype in DTYPES:
        torch.manual_seed(0)
        ref = nn.MultiheadAttention(32, 4, batch_first=True, dtype=torch.float64, device=device)
        ours = FusedAttention(32, 4, batch_first=True, dtype=dtype, device=device)
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(3, 12, 32, dtype=torch.float64, device=device)
        kpm = torch.zeros(3, 12, dtype=torch.bool, device=device)
        kpm[2, 7:] = True
        want = ref(x, x, x, key_padding_mask=kpm)
        xt = x.to(dtype)
        got = ours(xt, xt, xt, key_padding_mask=kpm)
        backend = _backends.choose("attention", device, dtype).name
        for out, a, e in zip(("attn_output", "attn_weights"), got, want):
            ok, msg = check_close(a, e, dtype, n=12)
            yield ("attention", f"FusedAttention-N3-L12-E32-H4-padded-{str(dtype)[6:]}", backend, out, ok, msg)


def check_rnn(device):
    """Rows (op, case, backend, output, ok, message): FusedLSTM / FusedGRU / FusedRNN vs nn.LSTM /
    GRU / RNN in float64 (output, final states, the input's and every parameter's gradient), 2
    bidirectional layers, padded and packed (unsorted lengths), for each dtype."""
    from torch.nn.utils.rnn import pack_padded_sequence

    from fastdl.nn import FusedGRU, FusedLSTM, FusedRNN

    T, N, I, H = 6, 3, 5, 7
    lengths = torch.tensor([4, 6, 2])
    for dtype, (ref_cls, cls), packed in itertools.product(
            DTYPES, ((nn.LSTM, FusedLSTM), (nn.GRU, FusedGRU), (nn.RNN, FusedRNN)), (False, True)):
        torch.manual_seed(0)
        ref = ref_cls(I, H, num_layers=2, bidirectional=True, dtype=torch.float64, device=device)
        ours = cls(I, H, num_layers=2, bidirectional=True, dtype=dtype, device=device)
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(T, N, I, dtype=torch.float64, device=device)
        results = []
        for m, dt in ((ref, torch.float64), (ours, dtype)):
            xt = x.to(dt).requires_grad_()
            inp = pack_padded_sequence(xt, lengths, enforce_sorted=False) if packed else xt
            out, states = m(inp)
            outs = [out.data if packed else out] + list(states if isinstance(states, tuple) else (states,))
            g = torch.Generator().manual_seed(1)
            loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(device, dt)).sum() for o in outs)
            results.append(outs + list(torch.autograd.grad(loss, [xt, *m.parameters()])))
        names = ["output", "h_n"] + (["c_n"] if ref_cls is nn.LSTM else []) + ["grad_input"] + [
            f"grad_{n}" for n, _ in ref.named_parameters()]
        case = f"{ref_cls.__name__}-T{T}-N{N}-I{I}-H{H}-L2-bi{'-packed' if packed else ''}-{str(dtype)[6:]}"
        backend = _backends.choose("rnn", device, dtype).name
        for name, a, e in zip(names, results[1], results[0]):
            ok, msg = check_close(a, e, dtype, n=T * N * H)
            yield ("rnn", case, backend, name, ok, msg)


CHECKS = {"attention": check_attention, "batch_norm_act": check_batch_norm_act,
          "depthwise_conv2d": check_depthwise_conv2d, "rnn": check_rnn, "models": check_models}


def run(device):
    """All rows for `device` ("cpu" or "cuda")."""
    return [row for check in CHECKS.values() for row in check(device)]
