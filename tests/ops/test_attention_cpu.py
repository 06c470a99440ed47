"""The raw CPU ops fastdl::attention_forward / attention_backward (csrc/cpu/attention*.cpp) against
fastdl.reference.attention.attention in float64: out, lse and the three gradients, over shapes, masks,
dropout, layouts, empty sizes and thread counts, plus the argument checks."""
import math
from dataclasses import dataclass

import pytest
import torch

import fastdl.functional

from fastdl.reference import attention as reference
from fastdl.testing import assert_close

ops = torch.ops.fastdl
DTYPES = {"f32": torch.float32, "f64": torch.float64}


@dataclass(frozen=True)
class Case:
    N: int
    H: int
    Hkv: int
    L: int
    S: int
    D: int
    causal: bool = False
    mask: str = ""  # "", "kpm", "lengths", "bool", "bool-N1", "add-11", or "+"-joined
    dropout: float = 0.0
    layout: str = "heads-last"  # "heads-last" ((N, L, H, D) storage), "qkv-view", "strided"

    def __str__(self):
        parts = [f"N{self.N}", f"H{self.H}"] + ([f"Hkv{self.Hkv}"] if self.Hkv != self.H else [])
        parts += [f"L{self.L}", f"S{self.S}", f"D{self.D}"]
        parts += ["causal"] if self.causal else []
        parts += [self.mask] if self.mask else []
        parts += [f"drop{self.dropout}"] if self.dropout else []
        parts += [self.layout] if self.layout != "heads-last" else []
        return "-".join(parts)


def lay_out(t, layout, g):
    """t (N, heads, rows, D) stored as the layout says, with the same values."""
    N, Hh, R, D = t.shape
    if layout == "qkv-view":  # one of three slices of a (N, R, 3, heads, D) projection, transposed
        wide = torch.randn(N, R, 3, Hh, D, generator=g, dtype=t.dtype)
        wide[:, :, 1] = t.transpose(1, 2)
        return wide[:, :, 1].transpose(1, 2)
    if layout == "strided":  # last dim of stride 2 (the API makes it dense)
        wide = torch.full((N, Hh, R, 2 * D), math.nan, dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def make_masks(case, g):
    """(attn_mask, key_padding_mask, key_lengths) in float64 / bool / int64 for case.mask."""
    N, H, L, S = case.N, case.H, case.L, case.S
    kinds = case.mask.split("+") if case.mask else []
    attn_mask = kpm = lengths = None
    if "kpm" in kinds:  # random keys off, batch 1 (if any) entirely off, keys 0..63 of batch 0 off
        kpm = torch.rand(N, S, generator=g) > 0.3
        kpm[1:2] = False
        kpm[0, :64] = False
        kpm[0, -1] = True
    if "lengths" in kinds:  # 0, S, then partial lengths
        lengths = torch.tensor([0, S, S // 2 + 1, 1][:N], dtype=torch.int64)
    if "bool" in kinds or "bool-N1" in kinds:  # -inf where a random bool mask says no; row 1 fully masked
        allowed = torch.rand(N, 1 if "bool-N1" in kinds else H, L, S, generator=g) > 0.3
        allowed[:, :, 1 % L] = False
        attn_mask = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, -math.inf)
    if "add-11" in kinds:  # a (1, 1, L, S) additive float mask
        attn_mask = torch.randn(1, 1, L, S, generator=g, dtype=torch.float64)
    return attn_mask, kpm, lengths


def inputs(case, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(case.N, case.H, case.L, case.D, generator=g, dtype=torch.float64)
    k = torch.randn(case.N, case.Hkv, case.S, case.D, generator=g, dtype=torch.float64)
    v = torch.randn(case.N, case.Hkv, case.S, case.D, generator=g, dtype=torch.float64)
    dout = torch.randn(case.N, case.H, case.L, case.D, generator=g, dtype=torch.float64)
    return (q, k, v, dout), make_masks(case, g), g


def run_op(case, dtype, seed=0, dropout_seed=1234):
    """The op's (out, lse, grad_q, grad_k, grad_v) in dtype, and the float64 inputs and masks."""
    (q, k, v, dout), (attn_mask, kpm, lengths), g = inputs(case, seed)
    qd, kd, vd, dd = (lay_out(t.to(dtype), case.layout, g) for t in (q, k, v, dout))
    mask_d = attn_mask.to(dtype) if attn_mask is not None else None
    args = (mask_d, kpm, lengths, case.causal, 1.0 / math.sqrt(case.D), case.dropout, torch.tensor(dropout_seed))
    out, lse = ops.attention_forward(qd, kd, vd, *args)
    grads = ops.attention_backward(dd, qd, kd, vd, out, lse, *args)
    return (out, lse, *grads), ((q, k, v, dout), (attn_mask, kpm, lengths))


def run_reference(case, tensors, masks, dropout_seed=1234):
    """The reference's (out, lse, grad_q, grad_k, grad_v) in float64."""
    q, k, v = (t.clone().requires_grad_() for t in tensors[:3])
    out, lse = reference.attention(q, k, v, *masks, case.causal, 1.0 / math.sqrt(case.D), case.dropout,
                                   dropout_seed)
    grads = torch.autograd.grad(out, (q, k, v), tensors[3])
    return (out.detach(), lse, *grads)


def assert_lse(name, got, expected, dtype):
    """lse: +inf exactly where the reference has +inf (rows with no attended key), close elsewhere."""
    dead = torch.isinf(expected)
    assert torch.equal(torch.isinf(got) & (got > 0), dead), f"{name}: +inf rows differ"
    assert_close(name, got[~dead], expected[~dead], dtype)


def compare(case, dtype, seed=0):
    got, (tensors, masks) = run_op(case, dtype, seed)
    expected = run_reference(case, tensors, masks)
    group = case.H // case.Hkv
    assert_close("out", got[0], expected[0], dtype)
    assert_lse("lse", got[1], expected[1], dtype)
    assert_close("grad_q", got[2], expected[2], dtype, n=case.S)
    assert_close("grad_k", got[3], expected[3], dtype, n=case.L * group)
    assert_close("grad_v", got[4], expected[4], dtype, n=case.L * group)
    return got


SHAPES = [
    Case(2, 4, 4, 17, 33, 40),
    Case(2, 4, 4, 17, 33, 40, causal=True),
    Case(2, 4, 4, 33, 17, 40),
    Case(2, 4, 4, 33, 17, 40, causal=True),  # L > S, causal: rows past S see every key
    Case(2, 4, 2, 17, 17, 16, causal=True),  # GQA
    Case(2, 4, 1, 29, 70, 64),
    Case(1, 2, 2, 1, 1, 64),
    Case(1, 2, 1, 1, 17, 72, causal=True),
    Case(1, 2, 2, 129, 129, 64, causal=True),
    Case(1, 3, 1, 129, 65, 128),
    Case(1, 2, 1, 17, 19, 256, causal=True),
    Case(2, 4, 2, 70, 129, 40, causal=True, dropout=0.3),
    Case(1, 2, 2, 65, 33, 16, dropout=0.5),
]
MASKS = [
    Case(3, 4, 2, 37, 70, 24, mask="kpm"),
    Case(3, 4, 2, 37, 70, 24, causal=True, mask="kpm"),
    Case(4, 2, 2, 37, 70, 24, mask="lengths"),
    Case(4, 2, 1, 80, 70, 24, causal=True, mask="lengths"),
    Case(2, 4, 2, 37, 70, 24, mask="bool"),
    Case(2, 4, 2, 37, 70, 24, causal=True, mask="bool-N1"),
    Case(2, 4, 4, 37, 70, 24, mask="add-11"),
    Case(3, 4, 2, 37, 70, 24, causal=True, mask="bool+kpm+lengths", dropout=0.2),
]
LAYOUTS = [
    Case(2, 4, 2, 33, 70, 40, causal=True, layout="qkv-view"),
    Case(1, 4, 2, 40, 300, 24, mask="kpm", layout="qkv-view"),  # >= 256 keys: k and v copied to dense rows
    Case(2, 4, 2, 33, 70, 40, layout="strided", mask="kpm"),
]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", SHAPES + MASKS + LAYOUTS, ids=str)
def test_matches_reference(case, dtype, isa):
    got = compare(case, dtype)
    out, lse = got[:2]
    assert out.shape == (case.N, case.H, case.L, case.D) and lse.shape == (case.N, case.H, case.L)
    assert lse.dtype == dtype
    # out and every gradient are stored (N, L, heads, D)-contiguous
    for t in (out, got[2], got[3], got[4]):
        assert t.transpose(1, 2).is_contiguous()


def test_long_sequence():
    compare(Case(1, 2, 1, 1000, 1000, 64, causal=True), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_fully_masked_rows_are_zero_not_nan(dtype, isa):
    case = Case(3, 2, 2, 20, 70, 16, mask="bool+kpm+lengths")
    out, lse, gq, gk, gv = compare(case, dtype)
    for name, t in (("out", out), ("grad_q", gq), ("grad_k", gk), ("grad_v", gv)):
        assert not t.isnan().any(), name
    assert not lse.isnan().any()
    assert (out[1] == 0).all() and (gq[1] == 0).all()  # batch 1: every key padded
    assert torch.isinf(lse[1]).all() and torch.isinf(lse[:, :, 1]).all()  # row 1 masked by attn_mask


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", [(0, 2, 5, 7), (2, 2, 0, 7), (2, 2, 5, 0), (2, 2, 0, 0)],
                         ids=lambda s: "N{}-H{}-L{}-S{}".format(*s))
def test_empty_sizes(shape, dtype):
    N, H, L, S = shape
    case = Case(N, H, 1, L, S, 8, causal=True)
    out, lse, gq, gk, gv = compare(case, dtype)
    if S == 0:
        assert torch.isinf(lse).all() and (out == 0).all() and (gq == 0).all()


# dropout -------------------------------------------------------------------------------------


def dropout_mask_through_op(seed, p, N=1, H=2, L=300, S=128):
    """The op's keep mask (N, H, L, S): with q = 0 every probability is 1 / S, and v = the identity
    (D = S) makes out[n, h, i, j] = keep_ij / (S (1 - p))."""
    q = torch.zeros(N, H, L, S, dtype=torch.float64)
    v = torch.eye(S, dtype=torch.float64).expand(N, 1, S, S)
    out, _ = ops.attention_forward(q, v, v, None, None, None, False, 1.0, p, torch.tensor(seed))
    scaled = out * S * (1 - p)
    assert ((scaled - scaled.round()).abs() < 1e-9).all()
    return scaled.round().bool()


@pytest.mark.parametrize("seed", [0, 1234, 2**40 + 7, -5], ids=lambda s: f"seed{s}")
def test_dropout_mask_is_the_reference_hash(seed):
    keep = dropout_mask_through_op(seed, 0.2)
    assert torch.equal(keep, reference.dropout_keep(seed, *keep.shape, 0.2))


def test_dropout_keep_rate():
    p = 0.2
    keep = dropout_mask_through_op(7, p, N=2, H=2, L=256, S=128)
    n = keep.numel()
    assert abs(keep.double().mean().item() - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n)


def test_dropout_seeds():
    case = Case(2, 2, 1, 33, 40, 16, causal=True, dropout=0.3)
    a, _ = run_op(case, torch.float32, dropout_seed=1)
    b, _ = run_op(case, torch.float32, dropout_seed=1)
    c, _ = run_op(case, torch.float32, dropout_seed=2)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[2], c[2])


# determinism ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [
    Case(1, 2, 1, 150, 150, 40, causal=True, mask="kpm", dropout=0.1),  # 1 kv head: the two schemes differ
    Case(3, 4, 2, 70, 90, 24, mask="bool"),
], ids=str)
def test_same_bits_for_any_thread_count(case, isa):
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(run_op(case, torch.float32)[0])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for name, x, y in zip(("out", "lse", "grad_q", "grad_k", "grad_v"), results[0], other):
            assert torch.equal(x, y), name


# argument checks -----------------------------------------------------------------------------


def good(N=2, H=4, Hkv=2, L=5, S=7, D=8, dtype=torch.float32):
    return dict(q=torch.randn(N, H, L, D, dtype=dtype), k=torch.randn(N, Hkv, S, D, dtype=dtype),
                v=torch.randn(N, Hkv, S, D, dtype=dtype), attn_mask=None, key_padding_mask=None,
                key_lengths=None, is_causal=False, scale=0.5, dropout_p=0.0, seed=torch.tensor(0))


def forward_with(**changes):
    a = good()
    a.update(changes)
    return ops.attention_forward(*a.values())


def backward_with(**changes):
    a = good()
    out, lse = ops.attention_forward(*a.values())
    b = dict(grad_out=torch.randn_like(out), q=a["q"], k=a["k"], v=a["v"], out=out, lse=lse)
    b.update((k, v) for k, v in a.items() if k not in b)
    b.update(changes)
    return ops.attention_backward(*b.values())


ERRORS = [
    ("q-3d", lambda: forward_with(q=torch.randn(2, 4, 5)), ValueError, "q: expected a 4-D"),
    ("q-f16", lambda: forward_with(**{k: v.half() if isinstance(v, torch.Tensor) else v
                                      for k, v in good().items()}), TypeError, "q: .*float32 or float64"),
    ("q-int", lambda: forward_with(q=torch.ones(2, 4, 5, 8, dtype=torch.int64)), TypeError, "q: "),
    ("k-dtype", lambda: forward_with(k=torch.randn(2, 2, 7, 8, dtype=torch.float64)), TypeError, "k: expected dtype"),
    ("v-dtype", lambda: forward_with(v=torch.randn(2, 2, 7, 8, dtype=torch.float64)), TypeError, "v: expected dtype"),
    ("k-D", lambda: forward_with(k=torch.randn(2, 2, 7, 9)), ValueError, "k: expected shape"),
    ("k-N", lambda: forward_with(k=torch.randn(3, 2, 7, 8)), ValueError, "k: expected shape"),
    ("k-heads", lambda: forward_with(k=torch.randn(2, 3, 7, 8), v=torch.randn(2, 3, 7, 8)), ValueError,
     "k: .*divides"),
    ("v-shape", lambda: forward_with(v=torch.randn(2, 2, 6, 8)), ValueError, "v: expected shape"),
    ("mask-shape", lambda: forward_with(attn_mask=torch.zeros(2, 4, 5, 6)), ValueError, "attn_mask: .*broadcastable"),
    ("mask-3d", lambda: forward_with(attn_mask=torch.zeros(5, 7)), ValueError, "attn_mask: "),
    ("mask-dtype", lambda: forward_with(attn_mask=torch.zeros(2, 4, 5, 7, dtype=torch.bool)), TypeError,
     "attn_mask: .*dtype"),
    ("kpm-dtype", lambda: forward_with(key_padding_mask=torch.ones(2, 7)), TypeError, "key_padding_mask: .*bool"),
    ("kpm-shape", lambda: forward_with(key_padding_mask=torch.ones(2, 6, dtype=torch.bool)), ValueError,
     "key_padding_mask: expected shape"),
    ("lengths-dtype", lambda: forward_with(key_lengths=torch.ones(2, dtype=torch.int32)), TypeError,
     "key_lengths: .*int64"),
    ("lengths-shape", lambda: forward_with(key_lengths=torch.ones(3, dtype=torch.int64)), ValueError,
     "key_lengths: expected shape"),
    ("dropout-1", lambda: forward_with(dropout_p=1.0), ValueError, "dropout_p: "),
    ("dropout-neg", lambda: forward_with(dropout_p=-0.1), ValueError, "dropout_p: "),
    ("grad_out-shape", lambda: backward_with(grad_out=torch.randn(2, 4, 5, 9)), ValueError, "grad_out: expected shape"),
    ("out-dtype", lambda: backward_with(out=torch.randn(2, 4, 5, 8, dtype=torch.float64)), TypeError,
     "out: expected dtype"),
    ("lse-shape", lambda: backward_with(lse=torch.randn(2, 4, 6)), ValueError, "lse: expected shape"),
    ("lse-dtype", lambda: backward_with(lse=torch.randn(2, 4, 5, dtype=torch.float64)), TypeError,
     "lse: expected dtype"),
]


@pytest.mark.parametrize("call, error, match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_broadcast_mask_shapes_match_full_mask():
    """A (N, 1, L, S) and a (1, 1, L, S) mask give what their expansion to (N, H, L, S) gives."""
    a = good(dtype=torch.float64)
    for shape in [(2, 1, 5, 7), (1, 1, 5, 7), (1, 4, 1, 7)]:
        mask = torch.randn(shape, dtype=torch.float64)
        small = forward_with(**{**a, "attn_mask": mask})
        full = forward_with(**{**a, "attn_mask": mask.expand(2, 4, 5, 7).contiguous()})
        for x, y in zip(small, full):
            assert torch.equal(x, y)



def test_double_backward_is_refused():
    """create_graph=True gives the same first derivatives; differentiating them raises, naming the
    op, as torch's own flash attention does (never a second derivative missing its terms)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = fastdl.functional.scaled_dot_product_attention(q, k, v)
    want = torch.autograd.grad(out.square().sum(), (q, k, v), retain_graph=True)
    got = torch.autograd.grad(out.square().sum(), (q, k, v), create_graph=True)
    for name, a, e in zip("qkv", got, want):
        assert torch.equal(a, e), name
    with pytest.raises(NotImplementedError, match="^attention: double backward"):
        torch.autograd.grad(got[0].square().sum(), (q, k, v))
