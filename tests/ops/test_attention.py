"""fastdl attention: the functional and the modules against PyTorch in float64 (CPU kernels).

The raw CPU kernels are tested in test_attention_cpu.py, the Triton kernels in
test_attention_triton.py; here: fastdl.functional.scaled_dot_product_attention against
F.scaled_dot_product_attention, FusedAttention against nn.MultiheadAttention and
FusedTransformerEncoderLayer against nn.TransformerEncoderLayer with copied weights, their
gradients, masks, dropout, gradcheck, opcheck, torch.compile and errors.
"""
import math

import pytest
import torch
import torch.nn.functional as tF
from torch import nn

import fastdl
import fastdl.functional as F
from fastdl.ops import attention as ops
from fastdl.reference import attention as reference
from fastdl.testing import assert_close

DTYPES = [torch.float32, torch.float64]


def rand(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def grads_of(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout, allow_unused=True)


# ---- functional against F.scaled_dot_product_attention ------------------------------------------

SDPA_CASES = [  # N, H, Hkv, L, S, D, causal, mask: None | "bool" | "float" | "bool-2d"
    (2, 4, 4, 17, 17, 16, False, None),
    (2, 4, 4, 17, 33, 40, True, None),
    (1, 2, 2, 33, 9, 64, True, None),
    (2, 4, 2, 13, 21, 72, False, "bool"),
    (2, 4, 1, 9, 9, 32, False, "float"),
    (3, 2, 2, 1, 5, 8, False, "bool-2d"),
    (1, 1, 1, 129, 129, 128, True, None),
]


def case_id(c):
    N, H, Hkv, L, S, D, causal, mask = c
    return f"N{N}-H{H}-Hkv{Hkv}-L{L}-S{S}-D{D}" + ("-causal" if causal else "") + (f"-{mask}" if mask else "")


def sdpa_mask(kind, N, H, L, S, dtype):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(7)
    if kind == "float":
        return torch.randn(N, H, L, S, generator=g, dtype=dtype)
    shape = (L, S) if kind == "bool-2d" else (N, 1, L, S)
    m = torch.rand(shape, generator=g) > 0.3
    m[..., 0] = True  # every query keeps a key: F.scaled_dot_product_attention gives NaN otherwise
    return m


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SDPA_CASES, ids=case_id)
def test_functional_matches_torch_sdpa(case, dtype):
    N, H, Hkv, L, S, D, causal, kind = case
    q, k, v = rand(N, H, L, D, seed=1), rand(N, Hkv, S, D, seed=2), rand(N, Hkv, S, D, seed=3)
    dout = rand(N, H, L, D, seed=4)
    mask = sdpa_mask(kind, N, H, L, S, torch.float64)
    ins64 = [t.clone().requires_grad_() for t in (q, k, v)]
    if causal:  # torch refuses attn_mask with is_causal; fastdl takes both, but this case compares plain causal
        want = tF.scaled_dot_product_attention(*ins64, is_causal=True, enable_gqa=Hkv != H)
    else:
        want = tF.scaled_dot_product_attention(*ins64, attn_mask=mask, enable_gqa=Hkv != H)
    want_grads = grads_of(want, ins64, dout)
    ins = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    got = F.scaled_dot_product_attention(*ins, attn_mask=None if mask is None else mask.to(dtype) if
                                         mask.is_floating_point() else mask, is_causal=causal,
                                         enable_gqa=Hkv != H)
    got_grads = grads_of(got, ins, dout.to(dtype))
    assert_close("out", got, want, dtype, n=S)
    for name, a, b, n in zip(("grad_q", "grad_k", "grad_v"), got_grads, want_grads, (S, L * H // Hkv, L * H // Hkv)):
        assert_close(name, a, b, dtype, n=n)


def test_functional_three_dim_inputs_and_scale():
    q, k, v = rand(3, 7, 8, seed=1), rand(3, 5, 8, seed=2), rand(3, 5, 8, seed=3)
    mask = torch.rand(3, 7, 5, generator=torch.Generator().manual_seed(0)) > 0.2
    mask[..., 0] = True
    want = tF.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    assert_close("out", F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_key_padding_mask_and_lengths_match_dense_mask(dtype):
    """key_padding_mask (True = attend) and key_lengths give what the same dense bool mask gives."""
    N, H, L, S, D = 3, 2, 11, 19, 24
    q, k, v = (rand(N, H, n, D, seed=i).to(dtype) for i, n in enumerate((L, S, S)))
    lengths = torch.tensor([19, 7, 1])
    padding = torch.arange(S) < lengths[:, None]
    dense = padding.view(N, 1, 1, S)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    assert_close("out(key_padding_mask)", F.scaled_dot_product_attention(q, k, v, key_padding_mask=padding), want)
    assert_close("out(key_lengths)", F.scaled_dot_product_attention(q, k, v, key_lengths=lengths), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows_give_zeros_and_zero_gradients(dtype):
    """Defined behaviour: a query with no key to attend outputs zeros and passes no gradient (torch: NaN)."""
    N, H, L, S, D = 2, 2, 6, 5, 8
    q, k, v = (rand(N, H, n, D, seed=i).to(dtype).requires_grad_() for i, n in enumerate((L, S, S)))
    padding = torch.ones(N, S, dtype=torch.bool)
    padding[1] = False  # batch 1: every key padded
    mask = torch.zeros(N, H, L, S, dtype=dtype)
    mask[0, :, 2] = -math.inf  # batch 0, query 2: every key -inf
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, key_padding_mask=padding, is_causal=True)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert out[1].abs().max() == 0 and out[0, :, 2].abs().max() == 0
    assert all(torch.isfinite(t).all() for t in (out, dq, dk, dv))
    assert dq[1].abs().max() == 0 and dk[1].abs().max() == 0 and dv[1].abs().max() == 0
    assert dq[0, :, 2].abs().max() == 0
    assert out[0, :, 3].abs().max() > 0


def test_reference_matches_torch_sdpa_float64():
    """The ground truth of the kernel tests is fastdl.reference.attention: check it against torch."""
    q, k, v = rand(2, 4, 9, 16, seed=1), rand(2, 2, 12, 16, seed=2), rand(2, 2, 12, 16, seed=3)
    mask = rand(2, 4, 9, 12, seed=5)
    padding = torch.ones(2, 12, dtype=torch.bool)
    padding[1, 5:] = False
    dense = mask.masked_fill(~padding.view(2, 1, 1, 12), -math.inf)
    want = tF.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)
    out, lse = reference.attention(q, k, v, mask, padding, None, False, 1 / 4)
    assert_close("out", out, want)
    s = q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 4 + dense
    assert_close("lse", lse, torch.logsumexp(s, -1))


# ---- dropout --------------------------------------------------------------------------------------

def test_dropout_matches_reference_and_is_reproducible():
    N, H, L, S, D = 2, 2, 33, 40, 16
    q, k, v = (rand(N, H, n, D, seed=i) for i, n in enumerate((L, S, S)))
    out, _ = ops.attention(q, k, v, dropout_p=0.3, seed=1234)
    want, _ = reference.attention(q, k, v, dropout_p=0.3, seed=1234)
    assert_close("out", out, want)
    torch.manual_seed(5)
    a = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(5)
    b = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    c = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dropout_keep_rate():
    """With v = I and uniform scores, out = keep / ((1 - p) * S): the kept fraction within 4 sigma."""
    N, H, L, S, p = 2, 4, 64, 64, 0.2
    q, k = torch.zeros(N, H, L, S, dtype=torch.float64), torch.zeros(N, H, S, S, dtype=torch.float64)
    v = torch.eye(S, dtype=torch.float64).expand(N, H, S, S)
    out, _ = ops.attention(q, k, v, dropout_p=p, seed=99)
    kept = out * (1 - p) * S
    assert torch.allclose(kept, kept.round(), atol=1e-9)  # exactly 0 or 1
    n = kept.numel()
    assert abs(kept.mean().item() - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n)
    assert torch.equal(kept.round().bool(), reference.dropout_keep(99, N, H, L, S, p))


def test_dropout_backward_uses_forward_mask():
    N, H, L, S, D = 1, 2, 9, 11, 8
    ins = [rand(N, H, n, D, seed=i).requires_grad_() for i, n in enumerate((L, S, S))]
    out, _ = ops.attention(*ins, dropout_p=0.4, seed=77)
    got = torch.autograd.grad(out, ins, torch.ones_like(out))
    ref = [t.detach().clone().requires_grad_() for t in ins]
    want_out, _ = reference.attention(*ref, dropout_p=0.4, seed=77)
    want = torch.autograd.grad(want_out, ref, torch.ones_like(want_out))
    for name, a, b in zip(("grad_q", "grad_k", "grad_v"), got, want):
        assert_close(name, a, b)


# ---- gradcheck, opcheck, torch.compile ------------------------------------------------------------

@pytest.mark.parametrize("kind", ["plain", "causal-gqa", "masks", "dropout"])
def test_gradcheck_float64(kind, isa):
    N, H, L, S, D = 2, 2, 5, 6, 4
    Hkv = 1 if kind == "causal-gqa" else H
    q, k, v = rand(N, H, L, D, seed=1), rand(N, Hkv, S, D, seed=2), rand(N, Hkv, S, D, seed=3)
    mask = rand(1, H, L, S, seed=4) if kind == "masks" else None
    padding = torch.tensor([[True] * 6, [True, False, True, True, False, False]]) if kind == "masks" else None
    p = 0.3 if kind == "dropout" else 0.0

    def f(q, k, v):
        return ops.attention(q, k, v, mask, padding, None, kind == "causal-gqa", 0.7, p, 11)[0]

    assert torch.autograd.gradcheck(f, [t.requires_grad_() for t in (q, k, v)])


def opcheck_args(dtype=torch.float32):
    q, k, v = rand(2, 4, 7, 8, dtype=dtype, seed=1), rand(2, 2, 9, 8, dtype=dtype, seed=2), rand(2, 2, 9, 8, dtype=dtype, seed=3)
    mask = rand(1, 4, 7, 9, dtype=dtype, seed=4).expand(2, 4, 7, 9)
    padding = torch.tensor([[True] * 9, [True] * 4 + [False] * 5])
    return [
        (q, k, v, None, None, None, False, 0.5, 0.0, torch.tensor(0)),
        (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), mask, padding, torch.tensor([9, 3]), True,
         0.35, 0.25, torch.tensor(3)),
    ]


@pytest.mark.parametrize("i", [0, 1])
def test_opcheck_forward(i):
    torch.library.opcheck(torch.ops.fastdl.attention_forward.default, opcheck_args()[i])


def test_opcheck_backward():
    q, k, v, mask, padding, lengths, causal, scale, p, seed = opcheck_args()[1]
    out, lse = torch.ops.fastdl.attention_forward(q.detach(), k.detach(), v.detach(), mask, padding, lengths, causal,
                                                  scale, p, seed)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, mask, padding, lengths, causal,
            scale, p, seed)
    torch.library.opcheck(torch.ops.fastdl.attention_backward.default, args)


def test_compile_fullgraph_functional_and_modules():
    torch._dynamo.reset()
    q, k, v = (rand(2, 4, 9, 8, dtype=torch.float32, seed=i).requires_grad_() for i in range(3))
    f = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), fullgraph=True)
    out = f(q, k, v)
    assert_close("out", out, tF.scaled_dot_product_attention(q, k, v, is_causal=True))
    out.sum().backward()

    mha = fastdl.FusedAttention(16, 4, batch_first=True)
    x = torch.randn(2, 7, 16)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 4:] = True
    cm = torch.compile(lambda x: mha(x, x, x, key_padding_mask=padding, need_weights=False)[0], fullgraph=True)
    assert_close("FusedAttention", cm(x), mha(x, x, x, key_padding_mask=padding, need_weights=False)[0])
    layer = fastdl.FusedTransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    cl = torch.compile(lambda x: layer(x, src_key_padding_mask=padding), fullgraph=True)
    y = cl(x)
    assert_close("FusedTransformerEncoderLayer", y, layer(x, src_key_padding_mask=padding))
    y.sum().backward()


def test_compile_fullgraph_training_with_dropout():
    """The dropout seed is a tensor drawn in the graph: training with dropout compiles whole, and
    each call draws a new mask."""
    torch._dynamo.reset()
    layer = fastdl.FusedTransformerEncoderLayer(16, 4, 32, dropout=0.3, batch_first=True).train()
    x = torch.randn(2, 9, 16, requires_grad=True)
    step = torch.compile(lambda x: layer(x), fullgraph=True)
    a, b = step(x), step(x)
    assert not torch.equal(a, b)
    a.sum().backward()
    assert torch.isfinite(x.grad).all()


# ---- FusedAttention against nn.MultiheadAttention -------------------------------------------------

MHA_CASES = {  # name: constructor kwargs
    "default": {},
    "batch_first": dict(batch_first=True),
    "no_bias": dict(bias=False),
    "kdim_vdim": dict(kdim=6, vdim=10),
    "bias_kv": dict(add_bias_kv=True),
    "zero_attn": dict(add_zero_attn=True, batch_first=True),
    "bias_kv_zero_attn_kdim": dict(add_bias_kv=True, add_zero_attn=True, kdim=6, vdim=10),
}
MASKS = ["none", "kpm_bool", "kpm_float", "attn_bool_2d", "attn_float_3d", "both"]


def mha_pair(kwargs, dtype=torch.float64, E=16, H=4):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, dtype=torch.float64, **kwargs)
    with torch.no_grad():  # nonzero biases, so that a bias mix-up shows
        for name, p in ref.named_parameters():
            if "bias" in name:
                p.uniform_(-0.5, 0.5)
    ours = fastdl.FusedAttention(E, H, dtype=dtype, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def mha_inputs(ref, N, L, S, self_attention, batched=True, seed=0):
    E, kdim, vdim = ref.embed_dim, ref.kdim, ref.vdim
    shape = (lambda T, F_: (N, T, F_) if ref.batch_first else (T, N, F_)) if batched else (lambda T, F_: (T, F_))
    q = rand(*shape(L, E), seed=seed)
    if self_attention:
        return q, q, q
    return q, rand(*shape(S, kdim), seed=seed + 1), rand(*shape(S, vdim), seed=seed + 2)


def mha_masks(kind, N, H, L, S, batched=True):
    g = torch.Generator().manual_seed(3)
    kpm = attn = None
    if kind in ("kpm_bool", "both"):
        kpm = torch.zeros(N, S, dtype=torch.bool)
        kpm[-1, S // 2:] = True
    if kind == "kpm_float":
        kpm = torch.randn(N, S, generator=g, dtype=torch.float64)
    if kind in ("attn_bool_2d", "both"):
        attn = torch.rand(L, S, generator=g) > 0.7
        attn[:, 0] = False  # every query keeps a key (nn.MultiheadAttention gives NaN otherwise)
    if kind == "attn_float_3d":
        attn = torch.randn(N * H, L, S, generator=g, dtype=torch.float64)
    if not batched:
        kpm = kpm[0] if kpm is not None else None
    return kpm, attn


def run_mha(m, inputs, kpm, attn, need_weights, average, dtype, dout):
    ins = [t.to(dtype).requires_grad_() for t in dict.fromkeys(inputs)]  # self-attention: one tensor
    args = [ins[0], ins[min(1, len(ins) - 1)], ins[-1]]
    cast = lambda t: t.to(dtype) if t is not None and t.is_floating_point() else t  # noqa: E731
    out, w = m(*args, key_padding_mask=cast(kpm), attn_mask=cast(attn), need_weights=need_weights,
               average_attn_weights=average)
    params = [p for _, p in sorted(m.named_parameters())]
    grads = torch.autograd.grad(out, ins + params, dout.to(dtype))
    return out, w, grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("name", MHA_CASES)
def test_fused_attention_matches_multihead_attention(name, masks, dtype):
    kwargs = MHA_CASES[name]
    ref, ours = mha_pair(kwargs, dtype)
    N, L, S = 3, 7, 9
    self_attention = "kdim" not in kwargs and masks != "attn_float_3d"
    if self_attention:
        S = L
    inputs = mha_inputs(ref, N, L, S, self_attention)
    kpm, attn = mha_masks(masks, N, 4, L, S)
    average = masks != "both"
    dout = rand(*inputs[0].shape, seed=9)
    want = run_mha(ref, inputs, kpm, attn, True, average, torch.float64, dout)
    got = run_mha(ours, inputs, kpm, attn, True, average, dtype, dout)
    assert_close("attn_output", got[0], want[0], dtype, n=S)
    assert_close("attn_weights", got[1], want[1], dtype)
    names = [f"grad_input{i}" for i in range(len(dict.fromkeys(inputs)))] + [n for n, _ in sorted(ref.named_parameters())]
    for n, a, b in zip(names, got[2], want[2]):
        assert_close(n, a, b, dtype, n=N * L * S)


def test_attention_weights_head_at_a_time_equals_all_heads(monkeypatch):
    """attention_weights' two paths for averaged weights (all heads in one product for small
    scores, one head at a time beyond _ALL_HEADS_MAX) agree, with every mask, grouped heads and
    dropout. (Per-head weights always take the first: the result holds every head anyway.)"""
    g = torch.Generator().manual_seed(0)
    N, H, Hkv, L, S, D = 2, 4, 2, 5, 6, 8
    q = torch.randn(N, H, L, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(N, Hkv, S, D, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.randn(N, H, L, S, generator=g, dtype=torch.float64)
    padding = torch.ones(N, S, dtype=torch.bool)
    padding[1, 4:] = False
    seed = torch.tensor(1234, dtype=torch.int64)
    args = (mask, padding, None, True, None, 0.3, seed)
    _, lse = ops.attention(q, k, v, *args)
    together = ops.attention_weights(q, k, lse, *args)
    monkeypatch.setattr(ops, "_ALL_HEADS_MAX", 0)
    apart = ops.attention_weights(q, k, lse, *args)
    assert together.shape == (N, L, S) and together.abs().sum() > 0
    assert_close("weights, one head at a time", apart, together, torch.float64, n=H)


@pytest.mark.parametrize("batch_first", [False, True])
def test_fused_attention_unbatched_and_need_weights_false(batch_first):
    ref, ours = mha_pair(dict(batch_first=batch_first))
    q, k, v = mha_inputs(ref, 1, 5, 8, False, batched=False)
    kpm, attn = mha_masks("both", 1, 4, 5, 8, batched=False)
    want, want_w = ref(q, k, v, key_padding_mask=kpm, attn_mask=attn, average_attn_weights=False)
    got, got_w = ours(q, k, v, key_padding_mask=kpm, attn_mask=attn, average_attn_weights=False)
    assert got.shape == (5, 16) and got_w.shape == (4, 5, 8)
    assert_close("attn_output", got, want)
    assert_close("attn_weights", got_w, want_w)
    out, w = ours(q, k, v, need_weights=False)
    assert w is None
    assert_close("attn_output", out, ref(q, k, v, need_weights=False)[0])


def test_fused_attention_is_causal():
    ref, ours = mha_pair(dict(batch_first=True))
    x = rand(2, 6, 16, seed=1)
    causal = nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64)
    want, want_w = ref(x, x, x, attn_mask=causal, is_causal=True)
    got, got_w = ours(x, x, x, attn_mask=causal, is_causal=True)
    assert_close("attn_output", got, want)
    assert_close("attn_weights", got_w, want_w)
    assert_close("attn_output(no mask)", ours(x, x, x, is_causal=True, need_weights=False)[0], want)


def test_fused_attention_fully_masked_rows():
    _, ours = mha_pair(dict(batch_first=True))
    x = rand(2, 5, 16, seed=1).requires_grad_()
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1] = True  # every key of batch 1 ignored: nn.MultiheadAttention gives NaN, fastdl zeros
    out, w = ours(x, x, x, key_padding_mask=kpm)
    assert torch.isfinite(out).all() and w[1].abs().max() == 0
    assert_close("attn_output[1]", out[1], ours.out_proj.bias.expand(5, 16))
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(g).all()


def test_fused_attention_dropout_train_and_eval():
    ref, ours = mha_pair(dict(dropout=0.5, batch_first=True))
    x = rand(2, 9, 16, seed=1)
    ref.eval(), ours.eval()
    assert_close("eval", ours(x, x, x)[0], ref(x, x, x)[0])
    ours.train()
    torch.manual_seed(1)
    a, wa = ours(x, x, x, average_attn_weights=False)
    torch.manual_seed(1)
    b, _ = ours(x, x, x)
    assert torch.equal(a, b) and not torch.equal(a, ours(x, x, x)[0])
    kept = (wa > 0).double().mean().item()  # weights carry the dropout mask, as nn.MultiheadAttention's do
    assert abs(kept - 0.5) < 4 * math.sqrt(0.25 / wa.numel())


def test_fused_attention_state_dict_both_ways_and_from_module():
    for kwargs in MHA_CASES.values():
        ref = nn.MultiheadAttention(16, 4, **kwargs)
        ours = fastdl.FusedAttention(16, 4, **kwargs)
        assert ours.state_dict().keys() == ref.state_dict().keys()
        ours.load_state_dict(ref.state_dict())
        ref.load_state_dict(ours.state_dict())
        m = fastdl.FusedAttention.from_module(ref)
        assert all(a is b for a, b in zip(m.parameters(), ref.parameters()))
        x = torch.randn(5, 2, 16)
        k = torch.randn(5, 2, ref.kdim)
        v = torch.randn(5, 2, ref.vdim)
        assert_close("from_module", m(x, k, v)[0], ref(x, k, v)[0])


def test_need_weights_are_not_differentiable():
    _, ours = mha_pair({})
    x = rand(4, 2, 16).requires_grad_()
    _, w = ours(x, x, x)
    with pytest.raises(NotImplementedError, match="need_weights"):
        w.sum().backward()


# ---- FusedTransformerEncoderLayer ----------------------------------------------------------------

@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_encoder_layer_matches_torch(batch_first, norm_first, activation):
    torch.manual_seed(0)
    kw = dict(dim_feedforward=24, dropout=0.0, activation=activation, batch_first=batch_first, norm_first=norm_first,
              dtype=torch.float64)
    ref = nn.TransformerEncoderLayer(16, 4, **kw)
    ours = fastdl.FusedTransformerEncoderLayer(16, 4, **kw)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())
    N, S = 3, 8
    x = rand(*((N, S, 16) if batch_first else (S, N, 16)), seed=1)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[0, 5:] = True
    src_mask = nn.Transformer.generate_square_subsequent_mask(S, dtype=torch.float64)
    for args in (dict(), dict(src_key_padding_mask=kpm), dict(src_mask=src_mask, is_causal=True)):
        xs = [x.clone().requires_grad_() for _ in range(2)]
        want, got = ref(xs[0], **args), ours(xs[1], **args)
        assert_close("output", got, want)
        gw = torch.autograd.grad(want.sum(), [xs[0]] + list(ref.parameters()))
        gg = torch.autograd.grad(got.sum(), [xs[1]] + list(ours.parameters()))
        for (n, _), a, b in zip([("input", None)] + list(ref.named_parameters()), gg, gw):
            assert_close(f"grad_{n}", a, b, n=N * S)


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
def test_encoder_layer_in_transformer_encoder_eval_fast_path():
    """nn.TransformerEncoder's inference fast path (nested tensors) must not reach fastdl's layer."""
    torch.manual_seed(0)
    ref_layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
    enc_ref = nn.TransformerEncoder(ref_layer, 2, enable_nested_tensor=False).eval()
    enc = nn.TransformerEncoder(fastdl.FusedTransformerEncoderLayer(16, 4, 32, batch_first=True), 2).eval()
    enc.load_state_dict(enc_ref.state_dict())
    x = torch.randn(2, 7, 16)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 3:] = True
    with torch.no_grad():
        want, got = enc_ref(x, src_key_padding_mask=kpm), enc(x, src_key_padding_mask=kpm)
    assert_close("output[valid]", got[~kpm], want[~kpm])


def test_encoder_layer_from_module():
    ref = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, activation="gelu", norm_first=True)
    ours = fastdl.FusedTransformerEncoderLayer.from_module(ref)
    x = torch.randn(6, 2, 16)
    assert_close("output", ours(x), ref(x))


# ---- errors, backends ----------------------------------------------------------------------------

@pytest.mark.parametrize("make,exc,match", [
    (lambda: fastdl.FusedAttention(16, 5), ValueError, "num_heads"),
    (lambda: fastdl.FusedTransformerEncoderLayer(16, 4, activation="tanh"), ValueError, "activation"),
])
def test_constructor_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_module_errors_name_the_argument():
    m = fastdl.FusedAttention(16, 4, kdim=6, vdim=10)
    x, k, v = torch.randn(5, 2, 16), torch.randn(7, 2, 6), torch.randn(7, 2, 10)
    cases = [
        (dict(query=torch.randn(5, 2, 12), key=k, value=v), "query: expected 16 features"),
        (dict(query=x, key=torch.randn(7, 2, 16), value=v), "key: expected 6 features"),
        (dict(query=x, key=k, value=torch.randn(6, 2, 10)), "value: expected key's sequence"),
        (dict(query=x, key=torch.randn(7, 3, 6), value=torch.randn(7, 3, 10)), "key: expected batch size 2"),
        (dict(query=x, key=k, value=v, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), "key_padding_mask"),
        (dict(query=x, key=k, value=v, attn_mask=torch.zeros(5, 5, dtype=torch.bool)), "attn_mask"),
        (dict(query=x, key=k, value=v, attn_mask=torch.zeros(5, 7, dtype=torch.int32)), "attn_mask"),
        (dict(query=x, key=k.to("meta"), value=v), "key: expected the module's device"),
    ]
    for kwargs, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            m(**kwargs)


def test_functional_errors_name_the_argument():
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 6, 8)
    with pytest.raises(ValueError, match="enable_gqa"):
        F.scaled_dot_product_attention(q, k, k)
    with pytest.raises(ValueError, match="attn_mask"):
        F.scaled_dot_product_attention(q, k, k, torch.ones(3, 5, 6, dtype=torch.bool), enable_gqa=True)
    with pytest.raises(TypeError, match="attn_mask"):
        F.scaled_dot_product_attention(q, k, k, torch.ones(5, 6, dtype=torch.float64), enable_gqa=True)
    with pytest.raises(ValueError, match="key_padding_mask"):
        F.scaled_dot_product_attention(q, k, k, enable_gqa=True, key_padding_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_lengths"):
        F.scaled_dot_product_attention(q, k, k, enable_gqa=True, key_lengths=torch.ones(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="key: its 3 heads"):
        F.scaled_dot_product_attention(q, torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8), enable_gqa=True)
    with pytest.raises(NotImplementedError, match="value"):
        F.scaled_dot_product_attention(q, k, torch.randn(2, 2, 6, 4), enable_gqa=True)
    with pytest.raises(ValueError, match="dropout_p"):
        F.scaled_dot_product_attention(q, q, q, dropout_p=1.0)
    with pytest.raises(ValueError, match="key: expected device"):
        F.scaled_dot_product_attention(q, q.to("meta"), q)
    with pytest.raises(NotImplementedError, match="attn_mask"):
        F.scaled_dot_product_attention(q, q, q, torch.zeros(5, 5, requires_grad=True))


def test_cpu_backends():
    assert fastdl._backends.choose("attention", "cpu", torch.float32).name == "cpp"
    assert fastdl._backends.choose("attention", "cpu", torch.float64).name == "cpp"
    ref = fastdl._backends.choose("attention", "cpu", torch.bfloat16)
    assert ref.name == "reference" and "float32, float64" in ref.reason
    q = rand(1, 2, 5, 8, dtype=torch.bfloat16)  # runs the reference in fp32
    assert_close("bf16 out", F.scaled_dot_product_attention(q, q, q), tF.scaled_dot_product_attention(
        q.double(), q.double(), q.double()), torch.bfloat16)


# ---- CUDA: the modules on the GPU ----------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("masks", ["none", "kpm_bool", "both"])
def test_cuda_fused_attention_matches_multihead_attention(masks, dtype):
    """fp32 within the table; fp16 / bf16 within twice nn.MultiheadAttention's own error in that dtype."""
    assert fastdl._backends.choose("attention", "cuda", dtype).name == "triton"
    ref, ours = mha_pair(dict(batch_first=True), dtype, E=128, H=2)
    low = mha_pair(dict(batch_first=True), dtype, E=128, H=2)[0].to(dtype)
    ref, ours, low = ref.cuda(), ours.cuda(), low.cuda()
    N, L = 3, 200
    inputs = [t.cuda() for t in mha_inputs(ref, N, L, L, True)]
    kpm, attn = (t.cuda() if t is not None else None for t in mha_masks(masks, N, 2, L, L))
    dout = rand(N, L, 128, seed=9).cuda()
    want = run_mha(ref, inputs, kpm, attn, True, True, torch.float64, dout)
    got = run_mha(ours, inputs, kpm, attn, True, True, dtype, dout)
    theirs = run_mha(low, inputs, kpm, attn, True, True, dtype, dout) if dtype != torch.float32 else None
    pairs = [("attn_output", got[0], want[0], None if theirs is None else theirs[0]),
             ("attn_weights", got[1], want[1], None if theirs is None else theirs[1])]
    pairs += [(f"grad{i}", a, b, None if theirs is None else c)
              for i, (a, b, c) in enumerate(zip(got[2], want[2], theirs[2] if theirs else want[2]))]
    for name, a, b, c in pairs:
        if c is None:
            assert_close(name, a, b, dtype, n=N * L)
        else:
            err, torch_err = (a.double() - b).abs().max().item(), (c.double() - b).abs().max().item()
            assert err <= 2 * torch_err + 1e-5, f"{name}: fastdl error {err:.3g}, torch's {torch_err:.3g}"


@pytest.mark.cuda
def test_cuda_encoder_layer_bf16_trains():
    layer = fastdl.FusedTransformerEncoderLayer(256, 4, 512, batch_first=True, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4, 300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    kpm = torch.zeros(4, 300, dtype=torch.bool, device="cuda")
    kpm[1, 100:] = True
    y = layer(x, src_key_padding_mask=kpm, is_causal=True)
    y.float().square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
